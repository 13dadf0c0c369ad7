"""The LRP rules, each written once (Bach et al. 2015; Arras et al. 2017; the papers' Section III-A).

A rule replaces a module's output by an identical tensor whose *backward* carries relevance instead
of gradient: given the relevance ``R`` of the module's output it returns the relevance of each input.
Running ``torch.autograd.grad`` through a model whose modules carry these rules is therefore LRP, and
every application of a module (one per time step) keeps its own inputs in the autograd graph — never
a single stored input per module. Every backward is linear in ``R`` and made of plain tensor
operations, so many relevance seeds flow back as one batch (``torch.func.vmap`` over the backward:
every kernel sees the words as a batch dimension; see ``engine.words_backward``).

Relevance of a rule's inputs, with ``z`` the module's output and ``stab(z) = z + ε·sign(z)``
(sign(0) = 1):

* ε-rule, linear layer ``z_j = Σ_i x_i w_ij + b_j``:   ``R_i = Σ_j x_i w_ij / stab(z_j) · R_j``     (eq. 2)
* ε-rule, sum ``z = Σ_k t_k``:                          ``R_k = t_k / stab(z) · R``
* ε-rule, mean over cells ``z = (1/L) Σ_i a_i``:         ``R_i = (a_i / L) / stab(z) · R``
* ε-rule, weighted sum with constant weights (eq. 8):  ``R_n = w_n v_n / stab(z) · R``, weights get 0
* gate ⊙ signal (LRP-LSTM):                             ``R_signal = R``, ``R_gate = 0``
* ε-rule, sum or mean over dimensions ``z = Σ_i x_i``:  ``R_i = x_i / stab(z) · R``
* ε-rule, per-channel affine ``z = x·s + t``:           ``R_x = x·s / stab(z) · R``
* gates and attention weights (sigmoid, softmax):       ``R_in = 0``
* tanh on a signal path:                                ``R_in = R``
* αβ-rule, convolution (eq. 3):                          ``R_i = Σ_j (α (x_i w_ij)^+ / z_j^+ − β (x_i w_ij)^− / z_j^−) R_j``
  with ``z_j^± = Σ_i (x_i w_ij)^±`` (the bias is left out, so α − β = 1 conserves relevance)
* zB-rule (first layer, inputs in [low, high]):         ``R_i = Σ_j (x_i w_ij − l_i w_ij^+ − h_i w_ij^−) / z_j^B · R_j``
* ε-rule, average pooling ``z_j = Σ_i P_ji x_i``:        ``R_i = Σ_j x_i P_ji / stab(z_j) · R_j``
  (``P`` the pooling's matrix, any kernel or adaptive output size)
* LayerNorm ``y = w ⊙ (x − μ)/σ + b`` with σ held constant (AttnLRP, Prop. 3.4; the ε-rule of the
  linear map that remains):                                ``R_i = x_i/σ · (w_i S_i − mean_j w_j S_j)``,
  ``S = R / stab(y)`` — with b = 0 the scale cancels: identity on σ, ε-rule on the centring
* GELU (the feed-forward block's activation):             ``R_in = R`` (identity rule, AttnLRP eq. 9); so
  for every element-wise activation (SiLU, quick GELU) and for RMSNorm ``y = w ⊙ x / rms(x)`` with the
  rms held constant (AttnLRP, Prop. 3.4: with no bias, all of ``R`` stays with ``x``)
* product of two tensors that both depend on the input ``z = a ⊙ b`` (a gated MLP's ``act(g) ⊙ u``):
  the uniform rule, ``R_a = R_b = a b / stab(2 z) · R`` ≈ ``R / 2`` (AttnLRP, Prop. 3.3)
* scaling by a constant ``z = c·x`` (an attention's 1/√d, a rotary embedding's cos and sin), negation:
  ``R_x = R`` (the ε-rule of a one-input linear map)

Softmax attention (``AttentionScores`` → ``AttentionWeights`` → ``WeightedSum``), by ``attention_rule``:

* ``"cp"`` (Ali et al. 2022's conservative propagation; the papers' eq. 8): the weights are constants
  of the linear combination — ε-rule on the values, nothing into weights, scores, queries or keys.
* ``"attnlrp"`` (Achtibat et al. 2024): softmax ``s = softmax(x)``, ``R_x = x ⊙ (R − s Σ_j R_j)``
  (Prop. 3.1, Taylor at x with bias; masked −∞ scores get 0); a bilinear product ``z = c·A B``
  (q·kᵀ with c = 1/√d_k, and α·v with c = 1) splits relevance evenly between its two factors
  (uniform rule, Prop. 3.3): ``R_A = c·A ⊙ (S Bᵀ)``, ``R_B = c·B ⊙ (Aᵀ S)`` with ``S = R / stab(2z)``.

Batch-norm gets no rule of its own: an explanation folds it into the preceding convolution (or
makes it a per-channel linear layer, ε-rule) first — see ``canonize.py``. ReLU and ReLU6 pass
relevance unchanged (an inactive unit's output is 0, so the next rule gives it none);
max-pooling is winner-take-all: each window's relevance to its maximum, as its ordinary backward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd import Function
from torch.nn import functional as F

from ..models.layers import (AttentionScores, AttentionWeights, ChannelAffine, Gate, GateProduct, GridMean,
                             LearnedPositions, Reduce, SignalTanh, Sum, TFSamePad, WeightedSum)

ATTENTION_RULES = ("cp", "attnlrp")
TINY = 1e-12  # keeps αβ denominators away from zero where a unit got no positive (negative) input


def stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``z + ε·sign(z)`` with sign(0) = 1, the ε-rule's denominator."""
    return z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)


# --------------------------------------------------------------------------- relevance functions
class _RelevanceFunction(Function):
    """``apply(output, settings, *tensors)``: forward returns the module's (already computed)
    output unchanged; ``backward`` turns the output's relevance into the relevance of ``tensors``
    (``ctx.saved_tensors``), with ``settings`` (ε, a module, ...) in ``ctx.settings``."""

    generate_vmap_rule = True

    @staticmethod
    def forward(output, settings, *tensors):
        return output.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.settings, *tensors = inputs
        ctx.save_for_backward(*tensors)

    @classmethod
    def relevance(cls, ctx, relevance) -> tuple:
        raise NotImplementedError

    @classmethod
    def backward(cls, ctx, relevance):
        return (None, None, *cls.relevance(ctx, relevance))


class _EpsilonLinear(_RelevanceFunction):
    @classmethod
    def relevance(cls, ctx, relevance):
        x, weight, out = ctx.saved_tensors
        share = relevance / stabilize(out, ctx.settings)  # [..., out]
        return x * (share @ weight), None, None  # [..., in]


class _EpsilonSum(_RelevanceFunction):
    @classmethod
    def relevance(cls, ctx, relevance):
        out, *terms = ctx.saved_tensors
        denominator = stabilize(out, ctx.settings)  # each term's fraction once, not once per explained word
        return (None, *(relevance * (term / denominator) for term in terms))


class _EpsilonWeightedSum(_RelevanceFunction):
    @classmethod
    def relevance(cls, ctx, relevance):
        weights, values, out = ctx.saved_tensors
        share = relevance / stabilize(out, ctx.settings)
        if weights.dim() == values.dim() - 1:  # one query: weights [B, N], values [B, N, D], out [B, D]
            return None, weights.unsqueeze(-1) * values * share.unsqueeze(-2), None
        return None, values * (weights.transpose(-1, -2) @ share), None  # [..., Q, N], [..., N, D], [..., Q, D]


class _UniformProduct(_RelevanceFunction):
    @classmethod
    def relevance(cls, ctx, relevance):
        a, b = ctx.saved_tensors  # z = c · a @ b: a [..., Q, N], b [..., N, D]
        epsilon, scale = ctx.settings
        share = relevance / stabilize(2 * scale * (a @ b), epsilon)  # [..., Q, D]
        return scale * a * (share @ b.transpose(-1, -2)), scale * b * (a.transpose(-1, -2) @ share)


class _EpsilonMatmul(_RelevanceFunction):
    @classmethod
    def relevance(cls, ctx, relevance):
        a, b, out = ctx.saved_tensors  # z = a @ b, one factor constant (a weight matrix)
        epsilon, first_flows = ctx.settings
        share = relevance / stabilize(out, epsilon)
        if first_flows:  # R_a = a ⊙ (S bᵀ)
            return a * (share @ b.transpose(-1, -2)), None, None
        return None, b * (a.transpose(-1, -2) @ share), None  # R_b = b ⊙ (aᵀ S)


class _UniformElementwise(_RelevanceFunction):
    @classmethod
    def relevance(cls, ctx, relevance):
        a, b = ctx.saved_tensors  # z = a ⊙ b, both depending on the input: half the relevance each
        product = a * b
        half = relevance * (product / stabilize(2 * product, ctx.settings))
        return _unbroadcast(half, a.shape), _unbroadcast(half, b.shape)


def _unbroadcast(relevance: torch.Tensor, shape) -> torch.Tensor:
    """Relevance of a broadcast operand: summed over the dimensions it was broadcast along."""
    while relevance.dim() > len(shape):
        relevance = relevance.sum(dim=0)
    for d, n in enumerate(shape):
        if n == 1 and relevance.shape[d] != 1:
            relevance = relevance.sum(dim=d, keepdim=True)
    return relevance


class _SoftmaxTaylor(_RelevanceFunction):
    @classmethod
    def relevance(cls, ctx, relevance):
        x, out = ctx.saved_tensors  # scores and weights [..., N]
        x = torch.where(torch.isneginf(x), torch.zeros_like(x), x)  # masked scores: weight 0, relevance 0
        return x * (relevance - out * relevance.sum(dim=-1, keepdim=True)), None


class _EpsilonLayerNorm(_RelevanceFunction):
    @classmethod
    def relevance(cls, ctx, relevance):
        x, out = ctx.saved_tensors
        epsilon, module = ctx.settings
        dims = tuple(range(-len(module.normalized_shape), 0))
        std = (x.var(dim=dims, unbiased=False, keepdim=True) + module.eps).sqrt()  # σ, held constant
        share = relevance / stabilize(out, epsilon)
        if module.weight is not None:
            share = share * module.weight
        return x / std * (share - share.mean(dim=dims, keepdim=True)), None


class _GateProduct(_RelevanceFunction):
    @classmethod
    def relevance(cls, ctx, relevance):
        return None, relevance  # (gate, signal)


class _EpsilonChannelAffine(_RelevanceFunction):
    @classmethod
    def relevance(cls, ctx, relevance):
        x, scale, out = ctx.saved_tensors  # x [B, C, ...], scale [C] shaped to broadcast
        return relevance * (x * scale / stabilize(out, ctx.settings)), None, None


class _EpsilonReduce(_RelevanceFunction):
    @classmethod
    def relevance(cls, ctx, relevance):
        x, out = ctx.saved_tensors
        epsilon, dims, keepdim, count = ctx.settings
        share = relevance / stabilize(out, epsilon)
        if not keepdim:
            for d in sorted(dims):  # dims as non-negative positions in x
                share = share.unsqueeze(d)
        return x / count * share, None


class _NoRelevance(_RelevanceFunction):
    @classmethod
    def relevance(cls, ctx, relevance):
        return tuple(torch.zeros_like(x) for x in ctx.saved_tensors)


class _PassThrough(_RelevanceFunction):
    @classmethod
    def relevance(cls, ctx, relevance):
        return (relevance,)


def with_values_of(values: torch.Tensor, flowing: torch.Tensor) -> torch.Tensor:
    """A tensor equal to ``values`` whose gradient or relevance goes, unchanged, to ``flowing`` (the
    same shape: the same quantity computed another way, e.g. in another precision)."""
    return _PassThrough.apply(values, None, flowing)


def _pointwise(module: nn.Conv2d, weight: torch.Tensor) -> bool:
    """A 1×1 convolution without padding or groups (most of a ResNet bottleneck's, its strided
    shortcuts, the EfficientNets' projections): a matrix product over the channels at every pixel
    it reads."""
    return weight.shape[-2:] == (1, 1) and module.padding in ((0, 0), "valid") and module.groups == 1


def _per_pixel(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix`` [C', C] applied to the channels of x [.., C, h, w] at every pixel -> [.., C', h, w]
    (reshape, not flatten: PyTorch's older vmap, which ``is_grads_batched`` runs, has no flatten)."""
    *batch, channels, height, width = x.shape
    return torch.matmul(matrix, x.reshape(*batch, channels, height * width)).reshape(*batch, -1, height, width)


def _conv_transpose(share: torch.Tensor, weight: torch.Tensor, module: nn.Conv2d, input_shape) -> torch.Tensor:
    """The adjoint of ``module``'s convolution applied to ``share`` (shapes of the input). Written as
    a transposed convolution, which vmap batches over the explained words in one call (the
    convolution's own backward would be looped word by word); a 1×1 one as the matrix product
    ``Wᵀ share`` at the pixels it read, zeros between them where it strides: in the αβ rule for 15
    words on a 2-core CPU, 1.1–2.2× faster than oneDNN's 1×1 transposed convolution at ResNet-101's
    16×16 and 64×64 layers (fp32 and bf16), 0.7–0.9× as fast at its 8×8 ones, and 1.4–3.2× faster for
    its strided shortcuts (docs/benchmarks.md, "1×1 convolutions as matrix products"; "A CPU without
    bfloat16 units; strided 1×1 convolutions")."""
    if _pointwise(module, weight):  # share [.., C_out, h', w'] -> [.., C_in, h', w'] at the pixels read
        spread = _per_pixel(weight.flatten(1).T.contiguous(), share)  # bf16 matmul: 2.4× slower on the transposed view
        (sh, sw), (height, width) = module.stride, input_shape[-2:]
        if (sh, sw) == (1, 1):
            return spread
        *batch, channels, rows, columns = spread.shape  # every sh-th row, sw-th column: zeros between, cropped
        spread = F.pad(spread.reshape(*batch, channels, rows, 1, columns, 1), (0, sw - 1, 0, 0, 0, sh - 1))
        spread = spread.reshape(*batch, channels, rows * sh, columns * sw)
        return F.pad(spread, (0, width - columns * sw, 0, height - rows * sh))
    produced = [(o - 1) * s - 2 * p + d * (k - 1) + 1 for o, s, p, d, k in zip(
        share.shape[-2:], module.stride, module.padding, module.dilation, weight.shape[-2:])]
    extra = tuple(size - made for size, made in zip(input_shape[-2:], produced))  # rows/columns no output saw
    return F.conv_transpose2d(share, weight, None, module.stride, module.padding, extra, module.groups,
                              module.dilation)


def _conv(x: torch.Tensor, weight: torch.Tensor, module: nn.Conv2d) -> torch.Tensor:
    """``module``'s convolution of ``x`` with ``weight`` and no bias; a 1×1 one as the matrix product
    ``W x`` at the pixels it reads."""
    if _pointwise(module, weight):  # x [.., C_in, h, w] -> [.., C_out, h', w']
        sh, sw = module.stride
        return _per_pixel(weight.flatten(1), x if (sh, sw) == (1, 1) else x[..., ::sh, ::sw])
    return F.conv2d(x, weight, None, module.stride, module.padding, module.dilation, module.groups)


class _AlphaBetaConv(_RelevanceFunction):
    @classmethod
    def relevance(cls, ctx, relevance):
        (x,) = ctx.saved_tensors
        module, alpha, beta = ctx.settings
        weight = module.weight.detach()
        signed = bool((x < 0).any())  # after a ReLU every input is ≥ 0: half the work, x as it is
        # each weight sign made only where it is used (α1β0 after a ReLU: W⁺ alone, no copy of W⁻)
        w_pos = weight.clamp(min=0)
        w_neg = weight.clamp(max=0) if signed or beta != 0 else None
        x_pos = x.clamp(min=0) if signed else x
        pairs = {"pos": [(x_pos, w_pos)], "neg": [(x_pos, w_neg)]}
        if signed:
            x_neg = x.clamp(max=0)
            pairs["pos"].append((x_neg, w_neg))
            pairs["neg"].append((x_neg, w_pos))
        result = None
        for sign, factor in (("pos", alpha), ("neg", -beta)):
            if factor == 0:
                continue
            z = sum(_conv(xs, ws, module) for xs, ws in pairs[sign])  # z^+ ≥ 0 or z^- ≤ 0, computed once
            share = relevance / (z + (TINY if sign == "pos" else -TINY))
            if module.groups == 1:
                # one transposed convolution for both input signs (weights side by side): one pass over share
                weights = [ws for _, ws in pairs[sign]]
                spread = _conv_transpose(share, weights[0] if len(weights) == 1 else torch.cat(weights, dim=1),
                                         module, (*x.shape[:-3], x.shape[-3] * len(weights), *x.shape[-2:]))
                parts = spread.split(x.shape[-3], dim=-3)
            else:  # grouped (depthwise): side-by-side weights would mix the groups
                parts = [_conv_transpose(share, ws, module, x.shape) for _, ws in pairs[sign]]
            for part, (xs, _) in zip(parts, pairs[sign]):  # in place: the spread is this rule's own buffer
                term = part.mul_(xs if factor == 1 else factor * xs)
                result = term if result is None else result.add_(term)
        return (result,)


class _ZBoxConv(_RelevanceFunction):
    @classmethod
    def relevance(cls, ctx, relevance):
        x, low, high = ctx.saved_tensors
        module = ctx.settings
        w = module.weight
        w_pos, w_neg = w.clamp(min=0), w.clamp(max=0)
        low, high = low.expand_as(x), high.expand_as(x)
        z = _conv(x, w, module) - _conv(low, w_pos, module) - _conv(high, w_neg, module)
        share = relevance / stabilize(z, TINY)
        result = (x * _conv_transpose(share, w, module, x.shape) - low * _conv_transpose(share, w_pos, module, x.shape)
                  - high * _conv_transpose(share, w_neg, module, x.shape))
        return result, None, None


class _EpsilonPool(_RelevanceFunction):
    @classmethod
    def relevance(cls, ctx, relevance):
        x, matrix, out = ctx.saved_tensors  # x [B, C, h, w], matrix P [h'w', hw], out [B, C, h', w']
        share = relevance / stabilize(out, ctx.settings)
        share = share.reshape(*share.shape[:-2], share.shape[-2] * share.shape[-1])  # [B, C, h'w']
        return x * (share @ matrix).reshape(x.shape), None, None


class _WinnerTakesAll(_RelevanceFunction):
    @classmethod
    def relevance(cls, ctx, relevance):
        _, winners = ctx.saved_tensors  # the input x [B, C, H, W]; 1 at each window's winner, 0 elsewhere
        (kh, kw), channels_last = ctx.settings
        *batch, channels, h, w = relevance.shape  # [.., C, h, w] with h = H / kh, w = W / kw
        if channels_last:  # laid out [.., h, w, C] in memory: spread and mask there (the result channels last)
            spread = relevance.movedim(-3, -1).reshape(*batch, h, 1, w, 1, channels)
            mask = winners.movedim(-3, -1).reshape(*winners.shape[:-3], h, kh, w, kw, channels)
            return (spread * mask).reshape(*batch, h * kh, w * kw, channels).movedim(-1, -3), None
        spread = relevance.reshape(*batch, channels, h, 1, w, 1)
        mask = winners.reshape(*winners.shape[:-2], h, kh, w, kw)
        return (spread * mask).reshape(*batch, channels, h * kh, w * kw), None


def pooling_matrix(module: nn.Module, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """The matrix ``P`` [h'·w', h·w] of a linear pooling (average, adaptive average): the pooling
    applied to each basis image."""
    basis = torch.eye(height * width, dtype=like.dtype, device=like.device).view(height * width, 1, height, width)
    with torch.no_grad():
        return module.forward(basis).flatten(1).T.contiguous()  # forward: without the hooks


# ------------------------------------------------------------------------------------ the rules
@dataclass(frozen=True)
class LRPParameters:
    """The papers' settings by default: ε = 0.01 for linear, sum, attention and LSTM layers; αβ with
    α = 1, β = 0 for the convolutions. ``first_layer`` is "alphabeta" (as every conv) or "zb"
    (bounded inputs: the pixel range after normalisation). ``attention_rule`` ("cp" or "attnlrp")
    is how relevance passes dot-product softmax attention."""

    epsilon: float = 0.01
    alpha: float = 1.0
    beta: float = 0.0
    first_layer: str = "alphabeta"
    attention_rule: str = "cp"

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in (self.epsilon, self.alpha, self.beta)):
            raise ValueError(f"ε, α and β must be finite numbers, got ε={self.epsilon}, α={self.alpha}, β={self.beta}")
        if self.epsilon < 0:
            raise ValueError("epsilon must be ≥ 0")
        if self.alpha - self.beta != 1 or self.beta < 0:
            raise ValueError(f"the αβ-rule needs α − β = 1 and β ≥ 0, got α={self.alpha}, β={self.beta}")
        if self.first_layer not in ("alphabeta", "zb"):
            raise ValueError(f"first_layer must be 'alphabeta' or 'zb', got {self.first_layer!r}")
        if self.attention_rule not in ATTENTION_RULES:
            raise ValueError(f"attention_rule must be one of {', '.join(map(repr, ATTENTION_RULES))}, "
                             f"got {self.attention_rule!r}")


def epsilon_linear(module: nn.Linear, inputs, output, p: LRPParameters, **_) -> torch.Tensor:
    return _EpsilonLinear.apply(output, p.epsilon, inputs[0], module.weight, output.detach())


def epsilon_linear_transposed(module: nn.Module, inputs, output, p: LRPParameters, **_) -> torch.Tensor:
    """A linear layer that stores its weight as [in, out] (GPT-2's ``Conv1D``): the ε-rule of ``x W + b``."""
    return _EpsilonLinear.apply(output, p.epsilon, inputs[0], module.weight.T, output.detach())


def uniform_product(a: torch.Tensor, b: torch.Tensor, output: torch.Tensor, p: LRPParameters) -> torch.Tensor:
    """``a ⊙ b`` with both factors depending on the input: the uniform rule."""
    return _UniformElementwise.apply(output, p.epsilon, a, b)


def epsilon_sum(module: Sum, inputs, output, p: LRPParameters, **_) -> torch.Tensor:
    return _EpsilonSum.apply(output, p.epsilon, output.detach(), *inputs)


def epsilon_mean(module: GridMean, inputs, output, p: LRPParameters, **_) -> torch.Tensor:
    cells = inputs[0]  # [B, L, C]: the mean over the L cells is the ε-rule of a reduction over dim 1
    return _EpsilonReduce.apply(output, (p.epsilon, (1,), False, cells.shape[1]), cells, output.detach())


def weighted_sum(module: WeightedSum, inputs, output, p: LRPParameters, **_) -> torch.Tensor:
    if p.attention_rule == "attnlrp":
        return _UniformProduct.apply(output, (p.epsilon, 1.0), inputs[0], inputs[1])
    return _EpsilonWeightedSum.apply(output, p.epsilon, inputs[0], inputs[1], output.detach())


def attention_scores(module: AttentionScores, inputs, output, p: LRPParameters, **_) -> torch.Tensor:
    queries, keys = inputs[0], inputs[1]
    if p.attention_rule == "attnlrp":
        return _UniformProduct.apply(output, (p.epsilon, module.scale), queries, keys.transpose(-1, -2))
    return _NoRelevance.apply(output, None, queries, keys)


def attention_weights(module: AttentionWeights, inputs, output, p: LRPParameters, **_) -> torch.Tensor:
    if p.attention_rule == "attnlrp":
        return _SoftmaxTaylor.apply(output, None, inputs[0], output.detach())
    return _NoRelevance.apply(output, None, inputs[0])


def epsilon_layer_norm(module: nn.LayerNorm, inputs, output, p: LRPParameters, **_) -> torch.Tensor:
    return _EpsilonLayerNorm.apply(output, (p.epsilon, module), inputs[0], output.detach())


def gate_product(module: GateProduct, inputs, output, p: LRPParameters, **_) -> torch.Tensor:
    return _GateProduct.apply(output, None, inputs[0], inputs[1])


def epsilon_channel_affine(module: ChannelAffine, inputs, output, p: LRPParameters, **_) -> torch.Tensor:
    x = inputs[0]
    scale = module.scale.view((1, -1) + (1,) * (x.dim() - 2))
    return _EpsilonChannelAffine.apply(output, p.epsilon, x, scale, output.detach())


def epsilon_reduce(module: Reduce, inputs, output, p: LRPParameters, **_) -> torch.Tensor:
    x, dim = inputs[0], inputs[1]
    dims = tuple(d % x.dim() for d in ((dim,) if isinstance(dim, int) else dim))
    keepdim, mean = (list(inputs[2:]) + [False, False])[:2]
    count = math.prod(x.shape[d] for d in dims) if mean else 1
    return _EpsilonReduce.apply(output, (p.epsilon, dims, keepdim, count), x, output.detach())


def no_relevance(module: nn.Module, inputs, output, p: LRPParameters, **_) -> torch.Tensor:
    return _NoRelevance.apply(output, None, inputs[0])


def pass_through(module: nn.Module, inputs, output, p: LRPParameters, **_) -> torch.Tensor:
    return _PassThrough.apply(output, None, inputs[0])


def epsilon_pool(module: nn.Module, inputs, output, p: LRPParameters, **_) -> torch.Tensor:
    matrix = pooling_matrix(module, *inputs[0].shape[-2:], inputs[0])
    return _EpsilonPool.apply(output, p.epsilon, inputs[0], matrix, output.detach())


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def winner_takes_all(module: nn.MaxPool2d, inputs, output, p: LRPParameters | None = None, **_) -> torch.Tensor | None:
    """Max-pooling whose windows tile the input (kernel = stride, no padding: VGG's 2×2) passes each
    window's relevance — or gradient: the two are the same here — to the window's first maximum,
    the winner the pooling's own backward picks, as one broadcast product for all words (that
    backward's scatter is 3–4× slower in the channels-last layout of a bfloat16 encoder). Any other
    pooling: None, and its ordinary backward passes relevance to its winners."""
    x = inputs[0]
    kernel, stride = _pair(module.kernel_size), _pair(module.stride or module.kernel_size)
    if (kernel != stride or _pair(module.padding) != (0, 0) or _pair(module.dilation) != (1, 1) or module.return_indices
            or x.dim() != 4 or x.shape[-2] % kernel[0] or x.shape[-1] % kernel[1]):
        return None
    _, first = F.max_pool2d(x.detach(), kernel, stride, return_indices=True)  # [B, C, h, w]: flat index in H·W
    winners = torch.zeros(x.shape, dtype=x.dtype, device=x.device).flatten(-2).scatter_(-1, first.flatten(-2), 1)
    channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    return _WinnerTakesAll.apply(output, (kernel, channels_last), x, winners.view(x.shape).contiguous(memory_format=layout))


def convolution(module: nn.Conv2d, inputs, output, p: LRPParameters, first: bool = False,
                bounds: tuple[torch.Tensor, torch.Tensor] | None = None, **_) -> torch.Tensor:
    if first and p.first_layer == "zb":
        low, high = bounds
        return _ZBoxConv.apply(output, module, inputs[0], low, high)
    return _AlphaBetaConv.apply(output, (module, p.alpha, p.beta), inputs[0])


# Which rule each module type gets. Module types absent here must either pass relevance through
# with their ordinary backward (NEUTRAL) or receive none; LRP refuses any other module.
RULES = {
    nn.Linear: epsilon_linear,
    nn.Conv2d: convolution,
    Sum: epsilon_sum,
    GridMean: epsilon_mean,
    WeightedSum: weighted_sum,
    AttentionScores: attention_scores,
    nn.LayerNorm: epsilon_layer_norm,
    nn.GELU: pass_through,
    nn.SiLU: pass_through,
    GateProduct: gate_product,
    SignalTanh: pass_through,
    # ReLU passes relevance unchanged: every rule that receives a ReLU's output multiplies by its
    # input, so an inactive unit gets exactly 0 anyway and the ReLU's own mask would be wasted work.
    nn.ReLU: pass_through,
    nn.ReLU6: pass_through,  # the clipped part is treated as the ReLU's: relevance passes (as Zennit's Pass)
    nn.AvgPool2d: epsilon_pool,
    nn.MaxPool2d: winner_takes_all,
    nn.AdaptiveAvgPool2d: epsilon_pool,
    ChannelAffine: epsilon_channel_affine,
    Reduce: epsilon_reduce,
    Gate: no_relevance,  # gates are coefficients: they receive nothing
    AttentionWeights: attention_weights,  # nothing either, unless attention_rule="attnlrp"
}
# (Eval-mode) dropout passes relevance correctly with its ordinary backward, as overlapping max-pooling
# does (winner_takes_all leaves it to it); the embedding's output is where the linguistic relevance is
# read; the attention's tanh only feeds the attention scores, which get no relevance.
# Zero padding passes relevance correctly too (padded zeros receive none; its backward crops).
# Constant padding (the input-invariance test's shift-absorbing layer) crops the same way: what
# the rule gives the padded constants is not an input's and is dropped.
# Learned positions are read where they enter the model, like the word embeddings.
NEUTRAL = (nn.Dropout, nn.Identity, nn.Embedding, nn.Tanh, nn.Sequential, nn.ModuleDict,
           nn.ModuleList, nn.ZeroPad2d, nn.ConstantPad2d, TFSamePad, LearnedPositions)


# Rules of layers from libraries that are optional here (transformers), by class name: a linear layer
# that stores its weight as [in, out], element-wise activations, RMS normalisations.
RULES_BY_NAME = {
    "Conv1D": epsilon_linear_transposed,
    "GELUActivation": pass_through, "NewGELUActivation": pass_through, "FastGELUActivation": pass_through,
    "QuickGELUActivation": pass_through, "SiLUActivation": pass_through, "PytorchGELUTanh": pass_through,
    "GELUTanh": pass_through, "AccurateGELUActivation": pass_through, "MishActivation": pass_through,
}


def rule_by_name(module: nn.Module):
    """The rule of a layer known by its class name (``RULES_BY_NAME``; any ``*RMSNorm``: identity), or None."""
    name = type(module).__name__
    if name in RULES_BY_NAME:
        return RULES_BY_NAME[name]
    if name.endswith("RMSNorm") and not list(module.children()):
        return pass_through
    return None
