"""LRP for the captioners (Algorithm 1 for grid-TD, Algorithm 2 for adaptive): the model is
canonised (``canonize.py``: batch-norm folded, standard layers replaced by rule-bearing equivalents),
the rules of ``rules.py`` are attached to the model's own modules for one forward, then the relevance of every
explained word — starting at its fc logit — flows back in one batched backward, to the pixels
(image explanation), to the grid, and to the word embeddings (linguistic explanation)."""
from __future__ import annotations

from dataclasses import asdict

import torch
from torch import nn

from ..errors import UnsupportedModel
from ..models.captioner import CaptionModel
from ..models.layers import AttentionScores
from .canonize import CANONIZERS, canonized
from .engine import ForwardHook, Targets, batched_backward, trace
from .methods import MethodOutput, register_method, words_first
from .rules import NEUTRAL, RULES, LRPParameters, rule_by_name


def _rule_for(module: nn.Module):
    for kind in type(module).__mro__:  # the most specific registered type wins (SignalTanh before Tanh)
        if kind in RULES:
            return RULES[kind]
    return rule_by_name(module)


def has_dot_product_attention(model: nn.Module) -> bool:
    """Whether ``attention_rule`` applies: the model has dot-product softmax attention (the
    transformer, a Hugging Face captioner), not only the LSTMs' additive attention."""
    return bool(getattr(model, "relevance_by_operation", False)) or any(
        isinstance(m, AttentionScores) for m in model.modules())


def rule_hooks(model: CaptionModel, parameters: LRPParameters) -> list[tuple[nn.Module, ForwardHook]]:
    """A forward hook per leaf module that applies its LRP rule. Raises for a module type that
    has no rule and is not known to pass relevance correctly."""
    encoder = model.encoder
    first_conv = next((m for m in encoder.modules() if isinstance(m, nn.Conv2d)), None)
    mean = torch.tensor(encoder.mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.std).view(1, 3, 1, 1)
    bounds = ((0 - mean) / std, (1 - mean) / std)  # the pixel range [0, 1] after normalisation
    hooks = []
    for name, module in model.named_modules():
        if list(module.children()):
            continue
        rule = _rule_for(module)
        if rule is None:
            if isinstance(module, NEUTRAL):
                continue
            if getattr(model, "relevance_by_operation", False):  # refused if relevance could pass it
                hooks.append((module, lambda m, i, o, name=name: _unsupported(m, o, name)))
                continue
            raise UnsupportedModel(
                f"LRP has no rule for module {name!r} of type {type(module).__name__}. captionlens explains the layers "
                "of captionlens.models.layers, nn.Linear/Conv2d/ReLU/ReLU6/pooling/dropout/embedding, and canonises "
                f"{', '.join(sorted(t.__name__ for t in CANONIZERS))}; write the rest from those (see the README, "
                "'Explain your own captioner'), and run `captionlens audit` to check")
        first = module is first_conv
        hooks.append((module, lambda m, i, o, rule=rule, first=first: rule(
            m, i, o, parameters, first=first, bounds=tuple(b.to(o.device, o.dtype) for b in bounds))))
    return hooks


def _unsupported(module: nn.Module, output, name: str) -> None:
    """A module without a rule whose output depends on the input: refused (relevance would pass it
    by its gradient, which is no LRP rule)."""
    if isinstance(output, torch.Tensor) and output.requires_grad:
        raise UnsupportedModel(f"LRP has no rule for module {name!r} of type {type(module).__name__}, and relevance "
                               "would pass through it; run `captionlens audit` to see where")


@register_method("lrp", title="LRP", citation="Bach et al. 2015; Sun et al. (the papers' Algorithms 1 and 2); "
                 "Arras et al. 2017 (LSTMs); Achtibat et al. 2024 (AttnLRP)", order=6, linguistic_rank=0)
def lrp(model: CaptionModel, pixels: torch.Tensor, token_ids: torch.Tensor, targets: Targets, *,
        epsilon: float = 0.01, alpha: float = 1.0, beta: float = 0.0, first_layer: str = "alphabeta",
        attention_rule: str = "cp") -> MethodOutput:
    """ε-rule for linear, sum, mean, attention and LSTM layers (gates get nothing), αβ for the
    convolutions (``first_layer="zb"`` for the zB-rule on the first one). Dot-product attention
    (the transformer): weights held constant (``attention_rule="cp"``) or AttnLRP's rules
    (``"attnlrp"``). Relevance of learned positional embeddings: ``extra["positions"]`` [B, K]."""
    parameters = LRPParameters(epsilon, alpha, beta, first_layer, attention_rule)
    if attention_rule != "cp" and not has_dot_product_attention(model):
        raise ValueError(f"attention_rule={attention_rule!r} is for dot-product softmax attention (the transformer); "
                         "this model's attention is additive, whose weights LRP holds constant (eq. 8)")
    with canonized(model, parameters=parameters):  # the backward too: the rules read the (folded) weights then
        traced = trace(model, pixels, token_ids, rule_hooks(model, parameters))
        logits = traced.output.logits
        score = targets.scores(logits).detach()
        back = batched_backward(traced, targets.seeds(logits, scale=score))
    return MethodOutput(
        image=words_first(back.pixels.sum(dim=2)),  # [B, K, H, W]
        grid=words_first(back.grid.sum(dim=2)),  # [B, K, h, w]
        preceding=words_first(back.embeddings.sum(dim=-1)),  # [B, K, S]
        score=score,
        parameters=asdict(parameters),
        extra=({"positions": words_first(back.positions)} if traced.positions else {})
        | ({"prompt": words_first(back.prompt)} if back.prompt is not None else {})
        | ({"special": words_first(back.special)} if back.special is not None else {}),
    )
