"""Registries of architectures (decoders) and encoders: the CLI's choices come from here.

Usage (timm-style)::

    @register_architecture("adaptive")
    class AdaptiveDecoder(Decoder): ...

    ARCHITECTURES["adaptive"]  # -> AdaptiveDecoder
"""
from __future__ import annotations

from typing import Callable, TypeVar

T = TypeVar("T")

ARCHITECTURES: dict[str, type] = {}
ENCODERS: dict[str, type] = {}


def _register(table: dict[str, type], kind: str, name: str) -> Callable[[type[T]], type[T]]:
    def decorator(cls: type[T]) -> type[T]:
        if name in table:
            raise ValueError(f"{kind} {name!r} is registered twice")
        table[name] = cls
        return cls

    return decorator


def register_architecture(name: str) -> Callable[[type[T]], type[T]]:
    return _register(ARCHITECTURES, "architecture", name)


def register_encoder(name: str) -> Callable[[type[T]], type[T]]:
    return _register(ENCODERS, "encoder", name)


def lookup(table: dict[str, type], kind: str, name: str) -> type:
    """The class registered under ``name``, or a ValueError that lists the choices."""
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(table))}") from None
