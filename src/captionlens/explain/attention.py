"""The model's own attention as an explanation: α_t over the grid (eq. (3)), upsampled to the image,
with the sentinel weight β_t (eq. (6)) in ``extra["beta"]`` where the decoder has a sentinel. Attention says nothing about the
preceding words, so its linguistic explanation is zero."""
from __future__ import annotations

import torch

from ..models.captioner import CaptionModel
from .engine import Targets
from .methods import MethodOutput, register_method, upsample


@register_method("attention")
@torch.no_grad()
def attention(model: CaptionModel, pixels: torch.Tensor, token_ids: torch.Tensor, targets: Targets) -> MethodOutput:
    grid = model.encoder(pixels)  # [B, C, h, w]
    out = model.decoder(grid, token_ids)
    batch = torch.arange(pixels.shape[0], device=pixels.device).unsqueeze(1)
    alpha = out.alpha[batch, targets.steps] * targets.valid.unsqueeze(2)  # [B, K, L]
    alpha = alpha.reshape(*alpha.shape[:2], *grid.shape[2:])  # [B, K, h, w]
    preceding = pixels.new_zeros(*targets.steps.shape, token_ids.shape[1])
    extra = {} if out.beta is None else {"beta": out.beta[batch, targets.steps]}  # no sentinel: no β
    return MethodOutput(upsample(alpha, tuple(pixels.shape[2:])), alpha, preceding, targets.scores(out.logits),
                        extra=extra)
