"""The model's own attention as an explanation.

* ``attention``: α_t over the grid (eq. (3); the transformer: the last layer's cross-attention
  averaged over heads), upsampled to the image, with the sentinel weight β_t (eq. (6)) in
  ``extra["beta"]`` where the decoder has a sentinel. Attention says nothing about the preceding
  words, so its linguistic explanation is zero.
* ``rollout`` (transformers): attention rollout (Abnar & Zuidema 2020) — each layer's head-averaged
  attention with its residual, ``Ã = ½(A + I)``, multiplied through the layers. A word's row of the
  product says how much of its final representation came from each fed token and each cell:

      E = Π_encoder Ã_enc                                  cells ← cells [L, L] (I without encoder layers)
      W = I [S, S],  C = 0 [S, L]                          what each position is made of: tokens, cells
      per decoder layer:  W ← Ã_self W,  C ← Ã_self C      causal self-attention mixes the positions
                          W ← ½ W,  C ← ½ C + ½ A_cross E  the residual keeps half, cross-attention adds cells

  ``C[t]`` is the image map of the word predicted at step t, ``W[t]`` its preceding-word explanation
  (every row of [W C] sums to 1).
"""
from __future__ import annotations

import torch

from ..models.captioner import CaptionModel
from ..models.transformer import MultiHeadAttention
from .engine import Targets, forward_hooks
from .methods import MethodOutput, register_method, upsample


@register_method("attention", title="attention", citation="the model's own α_t (Xu et al. 2015; Lu et al. 2017)",
                 order=0, non_negative=lambda parameters: True, enters_vision=False)
@torch.no_grad()
def attention(model: CaptionModel, pixels: torch.Tensor, token_ids: torch.Tensor, targets: Targets) -> MethodOutput:
    grids = []
    out = model.run_with_grid(pixels, token_ids, lambda grid: grids.append(grid) or grid)
    grid = grids[0]  # [B, C, h, w]
    batch = torch.arange(pixels.shape[0], device=pixels.device).unsqueeze(1)
    alpha = out.alpha[batch, targets.steps] * targets.valid.unsqueeze(2)  # [B, K, L]
    alpha = alpha.reshape(*alpha.shape[:2], *grid.shape[2:])  # [B, K, h, w]
    preceding = pixels.new_zeros(*targets.steps.shape, token_ids.shape[1])
    extra = {} if out.beta is None else {"beta": out.beta[batch, targets.steps]}  # no sentinel: no β
    return MethodOutput(upsample(alpha, tuple(pixels.shape[2:])), alpha, preceding, targets.scores(out.logits),
                        extra=extra)


def _attention_layers(model: torch.nn.Module) -> list[MultiHeadAttention]:
    return [m for m in model.modules() if isinstance(m, MultiHeadAttention)]


@register_method("rollout", title="attention rollout", citation="Abnar & Zuidema 2020", order=1,
                 non_negative=lambda parameters: True, linguistic_rank=5,
                 applies=lambda model: bool(_attention_layers(model)) or hasattr(model, "run_with_records"))
@torch.no_grad()
def rollout(model: CaptionModel, pixels: torch.Tensor, token_ids: torch.Tensor, targets: Targets) -> MethodOutput:
    if hasattr(model, "run_with_records"):  # a Hugging Face captioner: its recorded attention weights
        return _hf_rollout(model, pixels, token_ids, targets)
    layers = _attention_layers(model)
    if not layers:
        raise ValueError("attention rollout needs a decoder of multi-head attention layers (--arch transformer); "
                         "this model's attention is a single additive attention: use the 'attention' method")
    weights: list[tuple[str, torch.Tensor]] = []  # (kind, head-averaged α [B, Q, N]) in the order they ran
    hooks = [(layer.weights, lambda m, i, out, kind=layer.kind: weights.append((kind, out.mean(dim=1))))
             for layer in layers]
    with forward_hooks(hooks):
        grid = model.encoder(pixels)  # [B, C, h, w]
        out = model.decoder(grid, token_ids)
    batch, steps, cells = pixels.shape[0], token_ids.shape[1], grid.shape[2] * grid.shape[3]
    dtype = out.logits.dtype  # the decoder's, whose weights these are (bf16-vision: not the pixels')
    eye = lambda n: torch.eye(n, dtype=dtype, device=pixels.device).expand(batch, n, n)  # noqa: E731
    from_cells = eye(cells)  # E [B, L, L]
    words, looked = eye(steps), pixels.new_zeros(batch, steps, cells, dtype=dtype)  # W [B, S, S], C [B, S, L]
    for kind, alpha in weights:
        if kind == "encoder":
            from_cells = (alpha + eye(cells)) / 2 @ from_cells
        elif kind == "self":
            mixing = (alpha + eye(steps)) / 2
            words, looked = mixing @ words, mixing @ looked
        else:  # cross
            words, looked = words / 2, (looked + alpha @ from_cells) / 2
    rows = torch.arange(batch, device=pixels.device).unsqueeze(1)
    valid = targets.valid.unsqueeze(2).to(dtype)
    grid_maps = (looked[rows, targets.steps] * valid).reshape(batch, -1, *grid.shape[2:])  # [B, K, h, w]
    preceding = words[rows, targets.steps] * valid  # [B, K, S]
    return MethodOutput(upsample(grid_maps, tuple(pixels.shape[2:])), grid_maps, preceding,
                        targets.scores(out.logits))


def _hf_rollout(model, pixels: torch.Tensor, token_ids: torch.Tensor, targets: Targets) -> MethodOutput:
    """Rollout through a Hugging Face captioner's recorded attention: the vision tower's self-attention
    over the image tokens (E), then the language model's — self-attention over its sequence, and
    cross-attention to the image tokens where it has them — as for captionlens's transformer. Where
    the image tokens sit in the language model's own sequence (GIT, LLaVA), the rollout runs over the
    whole sequence and the image tokens' columns carry E."""
    out, records = model.run_with_records(pixels, token_ids)
    batch, steps = pixels.shape[0], token_ids.shape[1]
    image_tokens, extra = model.image_tokens(), model.family.extra_tokens(model.hf)
    eye = lambda n: torch.eye(n, dtype=torch.float64, device=pixels.device).expand(batch, n, n)  # noqa: E731
    from_image = eye(image_tokens)  # E [B, T, T]
    text = [(name, weights.double().mean(dim=1)) for name, weights in records if name.startswith("text.")]
    for name, weights in records:
        if name.startswith("vision.") and weights.shape[-1] == image_tokens:
            from_image = (weights.double().mean(dim=1) + eye(image_tokens)) / 2 @ from_image
    if model.family.image_in_sequence:  # one sequence: [prompt or image tokens ..., the fed tokens]
        length = text[0][1].shape[-1]
        mixed = eye(length)
        for _, alpha in text:
            mixed = (alpha + eye(length)) / 2 @ mixed
        start = model._image_position()
        rows = mixed[:, length - steps:]  # the fed tokens' rows [B, S, N]
        looked = rows[:, :, start: start + image_tokens] @ from_image  # [B, S, T]
        words = rows[:, :, length - steps:]  # [B, S, S]
    else:
        words, looked = eye(steps), pixels.new_zeros(batch, steps, image_tokens, dtype=torch.float64)
        for name, alpha in text:
            if "cross" in name.lower():
                words, looked = words / 2, (looked + alpha @ from_image) / 2
            else:
                mixing = (alpha + eye(steps)) / 2
                words, looked = mixing @ words, mixing @ looked
    side = model.encoder.image_size // model.encoder.downsampling
    rows = torch.arange(batch, device=pixels.device).unsqueeze(1)
    valid = targets.valid.unsqueeze(2).to(pixels.dtype)
    grid_maps = (looked[rows, targets.steps][:, :, extra:].to(pixels.dtype) * valid).reshape(batch, -1, side, side)
    preceding = words[rows, targets.steps].to(pixels.dtype) * valid  # [B, K, S]
    return MethodOutput(upsample(grid_maps, tuple(pixels.shape[2:])), grid_maps, preceding,
                        targets.scores(out.logits))
