"""Gradient explanations (Section 3.3 / III-C), all batched over the explained words like LRP:

* Grad-CAM (Selvaraju et al. 2017) on the encoder's grid: channel weights are the spatial mean of the
  gradient of the word's logit; the map Σ_c w_c A_c keeps its sign (``relu=True`` for the usual
  ReLU'd map); the image map is its bilinear upsampling.
* guided backprop (Springenberg et al. 2015) through the CNN encoder to the pixels.
* Guided Grad-CAM = guided backprop × upsampled ReLU'd Grad-CAM.
* gradient × input at the pixels.

Linguistic explanation (Grad*): the gradient at each preceding word's embedding, summed over its
dimensions; for gradient × input, embedding × gradient summed.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.autograd import Function

from ..models.captioner import CaptionModel
from .canonize import batch_norms_folded
from .engine import Backward, Targets, Trace, batched_backward, trace
from .methods import MethodOutput, register_method, upsample, words_first
from .rules import winner_takes_all


class _GuidedReLU(Function):
    """Backward of ReLU (or ReLU6) in guided backprop: only positive gradients through active units
    (below the clip, for ReLU6)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, output, upper):
        return output.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.upper = inputs[2]

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad.clamp(min=0) * ((x > 0) & (x < ctx.upper)), None, None


def guided_relu_hooks(model: CaptionModel):
    """Guided backprop acts on the CNN encoder's ReLUs and ReLU6s (the decoder's gradients stay exact)."""
    return [(m, lambda module, inputs, output: _GuidedReLU.apply(inputs[0], output,
                                                                 6.0 if isinstance(module, nn.ReLU6) else math.inf))
            for m in model.encoder.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]


def max_pool_hooks(model: CaptionModel):
    """The encoder's max-poolings backward as one broadcast product for all words where their windows
    tile the input (``rules.winner_takes_all``: the same gradient, faster channels-last)."""
    return [(m, winner_takes_all) for m in model.encoder.modules() if isinstance(m, nn.MaxPool2d)]


# Autograd's float32 convolution backward runs faster with the words as a batch on small images and
# word by word on large ones (2-core CPU, 15 words, VGG16: batch / word by word 0.80x at 64 px, 0.90x at
# 96, 0.95-0.98x at 128, 0.98-1.01x at 160, 1.02-1.05x at 192, 1.02-1.29x at 224; docs/benchmarks.md):
# the batch up to this many pixels, word by word above, unless the encoder declares its own
# ``gradients_as_a_batch_up_to`` (the ResNets: 256 × 256, EfficientNet-Lite0: 224 × 224, measured). A
# bfloat16 encoder takes the batch at every size: on an AMX CPU 0.88x and 0.96x at 224 px (VGG16,
# channels last), 0.94x at 256 px (ResNet-101).
WORDS_AS_A_BATCH_UP_TO = 128 * 128


def words_as_a_batch(model: CaptionModel, pixels: torch.Tensor) -> bool:
    """Whether the gradient methods' backward sees the words as a batch for ``model`` on these
    inputs (else word by word): a bfloat16 image encoder always, a float32 one on images up to its
    ``gradients_as_a_batch_up_to`` pixels (``WORDS_AS_A_BATCH_UP_TO`` unless it declares one)."""
    vision = model.vision_module()
    parameter = next(vision.parameters(), pixels)
    limit = getattr(vision, "gradients_as_a_batch_up_to", WORDS_AS_A_BATCH_UP_TO)
    return parameter.dtype == torch.bfloat16 or pixels.shape[-2] * pixels.shape[-1] <= limit


def gradients(model: CaptionModel, pixels: torch.Tensor, token_ids: torch.Tensor, targets: Targets,
              guided: bool = False, to_pixels: bool = True) -> tuple[Trace, Backward, torch.Tensor]:
    """The gradients of every explained logit at pixels (unless ``to_pixels=False``), grid and
    embeddings: one batched backward, autograd's convolution backward seeing the words as a batch or
    word by word, whichever measured faster for these pixels (``words_as_a_batch``, ``engine.words_backward``).
    The encoder's batch-norms are folded into their convolutions meanwhile: the same gradients (to float
    rounding) without the norms' backward (``canonize.batch_norms_folded``)."""
    hooks = (guided_relu_hooks(model) if guided else []) + max_pool_hooks(model)
    with batch_norms_folded(model):
        traced = trace(model, pixels, token_ids, hooks, to_pixels)
        logits = traced.output.logits
        back = batched_backward(traced, targets.seeds(logits), kernels_see_words=words_as_a_batch(model, pixels))
    return traced, back, targets.scores(logits).detach()


def grad_cam(traced: Trace, back: Backward, relu: bool) -> torch.Tensor:
    """Grad-CAM maps [B, K, h, w] from the gradients at the grid."""
    weights = back.grid.mean(dim=(3, 4), keepdim=True)  # [K, B, C, 1, 1]
    cam = (weights * traced.grid.detach().unsqueeze(0)).sum(dim=2)  # [K, B, h, w]
    return words_first(cam.clamp(min=0) if relu else cam)


def _linguistic(back: Backward) -> torch.Tensor:
    return words_first(back.embeddings.sum(dim=-1))  # [B, K, S]


def _image_size(traced: Trace) -> tuple[int, int]:
    return tuple(traced.pixels.shape[2:])


@register_method("gradcam", title="Grad-CAM", citation="Selvaraju et al. 2017 (signed unless relu=True)", order=2,
                 non_negative=lambda parameters: bool(parameters.get("relu")), linguistic_rank=1, enters_vision=False)
def gradcam(model: CaptionModel, pixels: torch.Tensor, token_ids: torch.Tensor, targets: Targets, *,
            relu: bool = False) -> MethodOutput:
    traced, back, score = gradients(model, pixels, token_ids, targets, to_pixels=False)  # the grid is enough
    cam = grad_cam(traced, back, relu)
    return MethodOutput(upsample(cam, _image_size(traced)), cam, _linguistic(back), score, {"relu": relu})


def _grid_gradient_x_input(traced: Trace, back: Backward) -> torch.Tensor:
    return words_first((back.grid * traced.grid.detach().unsqueeze(0)).sum(dim=2))  # [B, K, h, w]


def _has_relus(model) -> bool:
    """Guided backprop is defined by the ReLUs of the encoder (a ViT's GELUs have none to guide)."""
    return any(isinstance(m, (nn.ReLU, nn.ReLU6)) for m in model.encoder.modules())


@register_method("guided_backprop", title="guided backprop", citation="Springenberg et al. 2015", order=4,
                 linguistic_rank=4, applies=_has_relus)
def guided_backprop(model: CaptionModel, pixels: torch.Tensor, token_ids: torch.Tensor,
                    targets: Targets) -> MethodOutput:
    traced, back, score = gradients(model, pixels, token_ids, targets, guided=True)
    return MethodOutput(words_first(back.pixels.sum(dim=2)), _grid_gradient_x_input(traced, back),
                        _linguistic(back), score)


@register_method("guided_gradcam", title="Guided Grad-CAM", citation="Selvaraju et al. 2017", order=3,
                 linguistic_rank=2, applies=_has_relus)
def guided_gradcam(model: CaptionModel, pixels: torch.Tensor, token_ids: torch.Tensor,
                   targets: Targets) -> MethodOutput:
    traced, back, score = gradients(model, pixels, token_ids, targets, guided=True)
    cam = grad_cam(traced, back, relu=True)  # the grid gradient is exact: guidance is below it
    guided = words_first(back.pixels.sum(dim=2))  # [B, K, H, W]
    return MethodOutput(guided * upsample(cam, _image_size(traced)), cam, _linguistic(back), score)


@register_method("gradient_x_input", title="gradient×input", citation="Shrikumar et al. 2016", order=5,
                 linguistic_rank=3)
def gradient_x_input(model: CaptionModel, pixels: torch.Tensor, token_ids: torch.Tensor,
                     targets: Targets) -> MethodOutput:
    traced, back, score = gradients(model, pixels, token_ids, targets)
    image = words_first((back.pixels * traced.pixels.detach().unsqueeze(0)).sum(dim=2))
    embeddings = traced.embedding_values()  # [B, S, E]
    preceding = words_first((back.embeddings * embeddings.unsqueeze(0)).sum(dim=-1))
    return MethodOutput(image, _grid_gradient_x_input(traced, back), preceding, score)
