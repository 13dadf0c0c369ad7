"""Explanations for every word of a caption: LRP, Grad-CAM, Guided Grad-CAM, guided backprop,
gradient × input and attention, all with the same shapes (see ``Explanation``).

    exp = explain(cap, image, "a red circle".split(), method="lrp", epsilon=0.01)
    exp.image      # [T, H, W]    exp.grid  # [T, h, w]
    exp.preceding  # [T, T+1]     exp.score # [T]
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from ..data.images import ImageInput
from ..models.captioner import Caption, Captioner
from . import attention, gradients, lrp  # noqa: F401  (registration)
from .engine import Targets
from .explanation import Explanation
from .methods import METHODS

CaptionLike = Caption | Sequence[str] | str


def _words(caption: CaptionLike, captioner: Captioner) -> list[str]:
    if isinstance(caption, Caption):
        return list(caption.words)
    if isinstance(caption, str):
        return captioner.tokenize(caption)
    return [str(w) for w in caption]


def _positions(words: Sequence[int] | None, length: int, include_end: bool) -> list[int]:
    last = length + 1 if include_end else length  # <end> is position `length`
    if words is None:
        return list(range(last))
    positions = [int(p) for p in words]
    bad = [p for p in positions if not 0 <= p < last]
    if bad:
        raise IndexError(f"word index {bad[0]} is out of range for a caption of {length} words"
                         + (" (+ <end>)" if include_end else ""))
    return positions


def method_parameters(method: str) -> list[str]:
    """The keyword parameters a method takes (e.g. epsilon, alpha, beta for "lrp")."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    return [name for name in inspect.signature(METHODS[method]).parameters][4:]


def resolved_parameters(method: str, **given) -> dict:
    """Every parameter of ``method`` with its value: ``given`` over the method's defaults."""
    allowed = method_parameters(method)
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(f"method {method!r} takes {', '.join(allowed) or 'no parameters'}, not {', '.join(unknown)}")
    defaults = {name: p.default for name, p in inspect.signature(METHODS[method]).parameters.items() if name in allowed}
    return defaults | given


def explain_batch(captioner: Captioner, images: Sequence[ImageInput], captions: Sequence[CaptionLike],
                  method: str = "lrp", words: Sequence[int] | Sequence[Sequence[int]] | None = None,
                  include_end: bool = False, **parameters) -> list[Explanation]:
    """Explain several images at once (one forward, one batched backward): one Explanation each.

    ``words`` selects caption positions (0-based) to explain — all words by default, one list for
    every image or one list per image; ``include_end`` also explains the <end> token.
    ``parameters`` go to the method (LRP: epsilon, alpha, beta, first_layer; Grad-CAM: relu)."""
    resolved_parameters(method, **parameters)  # unknown parameters are an error
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    vocab = captioner.vocab
    word_lists = [_words(c, captioner) for c in captions]
    per_image = words is not None and len(words) > 0 and not isinstance(words[0], (int, float))
    if per_image and len(words) != len(images):
        raise ValueError(f"{len(words)} lists of word positions for {len(images)} images")
    selected = [_positions(words[b] if per_image else words, len(w), include_end) for b, w in enumerate(word_lists)]
    if not any(selected):
        return [_empty(method, w) for w in word_lists]
    device = captioner.device
    longest = max(len(w) for w in word_lists) + 1  # steps fed: <start>, w_1 .. w_n
    token_ids = torch.full((len(images), longest), vocab.pad_id, dtype=torch.long, device=device)
    k = max(len(s) for s in selected)
    steps = torch.zeros(len(images), k, dtype=torch.long, device=device)
    tokens = torch.zeros_like(steps)
    valid = torch.zeros(len(images), k, dtype=torch.bool, device=device)
    for b, (w, positions) in enumerate(zip(word_lists, selected)):
        ids = vocab.encode(w)  # <start> w_1 .. w_n <end>
        token_ids[b, : len(ids) - 1] = torch.tensor(ids[:-1])
        for j, position in enumerate(positions):
            steps[b, j], tokens[b, j], valid[b, j] = position, ids[position + 1], True
    model = captioner.model.eval()
    pixels = captioner.preprocess(list(images)).to(next(model.parameters()).dtype)
    output = METHODS[method](model, pixels, token_ids, Targets(steps, tokens, valid), **parameters)
    explanations = []
    for b, (w, positions) in enumerate(zip(word_lists, selected)):
        n, count = len(w), len(positions)
        explanations.append(Explanation(
            method=method,
            words=[w[p] if p < n else "<end>" for p in positions],
            positions=positions,
            tokens=["<start>", *w],
            image=output.image[b, :count].detach().cpu(),
            grid=output.grid[b, :count].detach().cpu(),
            preceding=_pad_columns(output.preceding[b, :count, : n + 1].detach().cpu(), n + 1),
            score=output.score[b, :count].detach().cpu(),
            parameters=output.parameters,
            extra={name: value[b, :count].detach().cpu() for name, value in output.extra.items()},
        ))
    return explanations


def _empty(method: str, words: list[str]) -> Explanation:
    """An explanation of no words (nothing was selected)."""
    return Explanation(method, [], [], ["<start>", *words], torch.zeros(0, 0, 0), torch.zeros(0, 0, 0),
                       torch.zeros(0, len(words) + 1), torch.zeros(0))


def _pad_columns(preceding: torch.Tensor, columns: int) -> torch.Tensor:
    """The relevance of w_n is only defined when <end> is explained; pad the column with 0 otherwise."""
    if preceding.shape[1] < columns:
        preceding = torch.cat([preceding, preceding.new_zeros(preceding.shape[0], columns - preceding.shape[1])], 1)
    return preceding


def explain(captioner: Captioner, image: ImageInput, caption: CaptionLike, method: str = "lrp",
            words: Sequence[int] | None = None, include_end: bool = False, **parameters) -> Explanation:
    """Explain every word (or the positions in ``words``) of ``caption`` for ``image``."""
    return explain_batch(captioner, [image], [caption], method, words, include_end, **parameters)[0]


__all__ = ["METHODS", "Explanation", "explain", "explain_batch", "method_parameters", "resolved_parameters"]
