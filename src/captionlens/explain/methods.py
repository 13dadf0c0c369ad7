"""The registry of explanation methods and the record each one returns (per image batch)."""
from __future__ import annotations

import inspect
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


Method = Callable[..., MethodOutput]  # (model, pixels, token_ids, targets, *, parameters...) -> MethodOutput


@dataclass(frozen=True)
class MethodInfo:
    """Everything captionlens knows about one explanation method, declared once where the method is
    written (``register_method``) and read by the figures, the colour scales, the store, the CLI's help
    and the viewer."""

    name: str
    function: Method
    title: str  # as figures and tables print it: "Guided Grad-CAM"
    citation: str  # where the method comes from
    order: int  # its column in figures, left to right
    non_negative: Callable[[dict], bool]  # whether its maps are ≥ 0 by construction, given its parameters
    linguistic_rank: int | None  # which method's preceding-word relevance a figure shows (lowest first); None: none
    applies: Callable[[nn.Module], bool]  # whether it is defined for a model
    enters_vision: bool  # whether it reads the image encoder beyond its output (a backward through it, its attention)

    @property
    def parameters(self) -> dict[str, object]:
        """The keyword parameters it takes (after ``*`` in its signature) with their defaults."""
        return {name: p.default for name, p in inspect.signature(self.function).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}


METHOD_INFO: dict[str, MethodInfo] = {}
METHODS: dict[str, Method] = {}  # name -> function (the public shortcut)


def register_method(name: str, *, title: str, citation: str, order: int, non_negative=lambda parameters: False,
                    linguistic_rank: int | None = None, applies=lambda model: True,
                    enters_vision: bool = True) -> Callable[[Method], Method]:
    """Register an explanation method: a function ``(model, pixels, token_ids, targets, *, parameters)``
    returning a ``MethodOutput``, with what the rest of captionlens needs to know about it.
    ``enters_vision=False``: the method uses nothing of the image encoder but its output (Grad-CAM's
    gradient stops at the grid), so ``precision="bf16-vision"`` (a float32 decoder reading float32
    features) gives it fp32's numbers, and it runs the fp32 model."""
    def decorator(function: Method) -> Method:
        if name in METHOD_INFO:
            raise ValueError(f"method {name!r} is registered twice")
        METHOD_INFO[name] = MethodInfo(name, function, title, citation, order, non_negative, linguistic_rank, applies,
                                        enters_vision)
        METHODS[name] = function
        return function

    return decorator


def method_info(name: str) -> MethodInfo:
    """The registered method ``name``, or a ValueError listing the choices."""
    if name not in METHOD_INFO:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(sorted(METHOD_INFO))}")
    return METHOD_INFO[name]


def methods_for(model: nn.Module) -> tuple[str, ...]:
    """The registered methods defined for ``model``, sorted (attention rollout needs a transformer)."""
    return tuple(sorted(name for name, info in METHOD_INFO.items() if info.applies(model)))


def in_column_order(names) -> list[str]:
    """``names`` in the order figures show them (unregistered names last, as given)."""
    return sorted(names, key=lambda n: METHOD_INFO[n].order if n in METHOD_INFO else len(METHOD_INFO))


def linguistic_method(names) -> str | None:
    """Which of ``names`` a figure takes the preceding-word relevance from (None: none has it)."""
    ranked = [n for n in names if n in METHOD_INFO and METHOD_INFO[n].linguistic_rank is not None]
    return min(ranked, key=lambda n: METHOD_INFO[n].linguistic_rank, default=None)


def words_first(tensor: torch.Tensor) -> torch.Tensor:
    """[K, B, ...] (the batched-backward layout) -> [B, K, ...]."""
    return tensor.transpose(0, 1)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling of grid maps [B, K, h, w] to the image size [B, K, H, W]."""
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
