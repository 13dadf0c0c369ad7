"""The command's skeleton: the Typer apps, the console, and ``command`` — how a verb is registered, with
its option groups expanded and one error handler around it."""
from __future__ import annotations

import dataclasses
import errno
import functools
import inspect
import typing
import warnings
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from ..errors import CaptionlensError

app = typer.Typer(help="Explain image-captioning models beyond attention.", no_args_is_help=True,
                  pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})
data_app = typer.Typer(help="Make a dataset folder: generate the shapes world, or describe where Flickr30K / "
                       "COCO files live (nothing is copied).", no_args_is_help=True)
app.add_typer(data_app, name="data")
import_app = typer.Typer(help="Turn a captioner trained elsewhere into a captionlens run folder.", no_args_is_help=True)
app.add_typer(import_app, name="import")
console = Console(stderr=True, soft_wrap=True)  # never break a path in the middle

# What a full, read-only or forbidden target looks like: a message, never a traceback.
DISK_ERRORS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG, errno.EMFILE,
               errno.ENFILE, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENOTEMPTY, errno.EBUSY}


def fail(message: str, code: int = 2) -> NoReturn:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code=code)


def message_of(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno in DISK_ERRORS:
        where = f" {error.filename}" if error.filename else ""
        return f"cannot write{where}: {error.strerror or error}" + (
            " (nothing half-written was left behind; free some space or choose another folder)"
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "")
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A Python warning raised during a verb, printed as ``warning: ...`` on stderr."""
    console.print(f"[yellow]warning:[/] {escape(str(message))}", highlight=False)


def handled(verb):
    """``verb`` with captionlens's own errors (and the standard ones its API raises for bad input: a
    missing file, a bad value, a word out of range, a full or read-only disk) turned into one
    ``error:`` line and exit code 2 — one handler for every verb."""

    @functools.wraps(verb)
    def run(*args, **kwargs):
        try:
            with warnings.catch_warnings():  # captionlens's warnings as one "warning:" line, not file:line noise
                warnings.showwarning = show_warning
                return verb(*args, **kwargs)
        except (CaptionlensError, FileNotFoundError, ValueError, IndexError) as error:
            fail(message_of(error))
        except OSError as error:
            if error.errno not in DISK_ERRORS:
                raise
            fail(message_of(error))

    return run


def option_groups(verb):
    """Let a verb take groups of options: each parameter annotated with a dataclass appears on the
    command line as that dataclass's fields, and reaches the verb as one object."""
    signature = inspect.signature(verb, eval_str=True)
    groups = {name: p.annotation for name, p in signature.parameters.items() if dataclasses.is_dataclass(p.annotation)}
    parameters = []
    for name, parameter in signature.parameters.items():
        if name not in groups:
            parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
            continue
        hints = typing.get_type_hints(groups[name], include_extras=True)
        parameters += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[f.name],
                                         default=f.default) for f in dataclasses.fields(groups[name])]

    @functools.wraps(verb)
    def run(**options):
        for name, group in groups.items():
            options[name] = group(**{f.name: options.pop(f.name) for f in dataclasses.fields(group)})
        return verb(**options)

    run.__signature__ = signature.replace(parameters=parameters)
    return run


def command(typer_app: typer.Typer = app, name: str | None = None):
    """Register ``verb`` on ``typer_app``: option groups expanded, errors handled."""

    def register(verb):
        typer_app.command(name)(option_groups(handled(verb)))
        return verb

    return register
