"""The local web viewer (``captionlens serve``): a thin FastAPI layer over the Python API."""
