"""The ``captionlens`` command: every verb parses its options, calls the Python API and prints.

One module per family of verbs — ``data`` (datasets), ``training`` (train, pretrain-encoder, import),
``explaining`` (caption, explain, explain-split, audit, report), ``experiments``, ``viewer`` (serve),
``demo``; the options several verbs share are declared once in ``options``, and ``app.command``
registers each verb with one error handler: a user's mistake is one ``error:`` line, never a traceback.
"""
from .app import app, data_app, import_app
from . import data, training, explaining, experiments, viewer, demo  # noqa: F401,E402,I001  (registers the verbs, in the order --help lists them)

__all__ = ["app", "data_app", "import_app"]
