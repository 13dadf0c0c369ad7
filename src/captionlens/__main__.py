"""``python -m captionlens`` (and ``torchrun ... -m captionlens``) runs the command line."""
from .cli import app

app()
