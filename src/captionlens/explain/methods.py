"""The registry of explanation methods and the record each one returns (per image batch)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class MethodOutput:
    """Batched result of one method: B images × K explained words."""

    image: torch.Tensor  # [B, K, H, W]
    grid: torch.Tensor  # [B, K, h, w]
    preceding: torch.Tensor  # [B, K, S]: relevance at the token fed at each step
    score: torch.Tensor  # [B, K]
    parameters: dict = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # each [B, K, ...]


Method = Callable[..., MethodOutput]
METHODS: dict[str, Method] = {}
APPLIES: dict[str, Callable[[nn.Module], bool]] = {}  # methods defined for some models only


def register_method(name: str, applies: Callable[[nn.Module], bool] | None = None) -> Callable[[Method], Method]:
    """Register an explanation method; ``applies(model)`` says whether it is defined for a model
    (every model when not given)."""
    def decorator(function: Method) -> Method:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = function
        if applies is not None:
            APPLIES[name] = applies
        return function

    return decorator


def methods_for(model: nn.Module) -> tuple[str, ...]:
    """The registered methods defined for ``model``, sorted (attention rollout needs a transformer)."""
    return tuple(sorted(name for name in METHODS if APPLIES.get(name, lambda _: True)(model)))


def words_first(tensor: torch.Tensor) -> torch.Tensor:
    """[K, B, ...] (the batched-backward layout) -> [B, K, ...]."""
    return tensor.transpose(0, 1)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of grid maps [B, K, h, w] to the image size [B, K, H, W]."""
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
