"""Canonizers (Zennit's term): for the duration of an explanation, turn a model into an equivalent
one in which every operation that moves relevance is a module with an LRP rule — then restore it.

* **Batch-norm** after a convolution is folded into it (``w' = w·γ/σ``, ``b' = (b − μ)·γ/σ + β``) and
  replaced by an identity; any other batch-norm becomes a ``ChannelAffine`` (ε-rule).
* **nn.LSTMCell** and **nn.LSTM** (one layer, ``batch_first``) become captionlens's ``LSTMCell``
  (gates written out, LRP-LSTM rules) with the same weights.
* **nn.Sigmoid** becomes a ``Gate`` and **nn.Softmax** ``AttentionWeights``: their outputs are marked,
  and between modules a product with a marked tensor becomes a ``GateProduct`` (the gate or weight
  gets no relevance), ``torch.bmm`` of weights and values a ``WeightedSum``, a sum or mean over
  dimensions a ``Reduce`` and the sum of two tensors a ``Sum`` (ε-rules) — so that
  ``(values * alpha.unsqueeze(2)).sum(dim=1)`` and ``sigmoid(f(h)) * context`` are explained as in
  the papers (eq. (8); Arras et al. 2017).

Outputs of the canonised model equal the original's (to float rounding; ≤ 1e-6 tested). Modules are
swapped in place, so do not run the same model from another thread inside the block (the viewer
holds one lock around its model). ``audit.py`` finds whatever a canonizer does not cover.
"""
from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedModel
from ..models.layers import (ROLE, AttentionWeights, ChannelAffine, Gate, GateProduct, LSTMCell, LSTMState, Reduce,
                             Sum, WeightedSum)


# --------------------------------------------------------------------------- standard recurrent layers
def _captionlens_cell(input_size: int, hidden_size: int, weight_ih: torch.Tensor, weight_hh: torch.Tensor,
                      bias_ih: torch.Tensor | None, bias_hh: torch.Tensor | None) -> LSTMCell:
    """captionlens's LSTMCell with PyTorch's LSTM weights (see ``LSTMCell.load_torch_weights``)."""
    cell = LSTMCell(input_size, hidden_size).to(weight_ih.device, weight_ih.dtype)
    return cell.load_torch_weights(weight_ih, weight_hh, bias_ih, bias_hh)


class StandardLSTMCell(nn.Module):
    """``nn.LSTMCell``'s interface, ``(h, c) = cell(x, (h, c))`` [B, H], on captionlens's LSTMCell."""

    def __init__(self, original: nn.LSTMCell) -> None:
        super().__init__()
        self.cell = _captionlens_cell(original.input_size, original.hidden_size, original.weight_ih,
                                      original.weight_hh, original.bias_ih, original.bias_hh)

    def forward(self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        if hx is None:
            zeros = x.new_zeros(x.shape[0], self.cell.hidden_size)
            hx = (zeros, zeros)
        state, _ = self.cell(x, LSTMState(*hx))
        return state.hidden, state.memory


class StandardLSTM(nn.Module):
    """``nn.LSTM(batch_first=True)`` of one layer: ``output [B, T, H], (h_n, c_n) [1, B, H]``, one
    captionlens LSTMCell step per time step."""

    def __init__(self, original: nn.LSTM) -> None:
        super().__init__()
        unsupported = [what for what, bad in (("num_layers > 1", original.num_layers != 1),
                                              ("bidirectional", original.bidirectional),
                                              ("proj_size", original.proj_size != 0),
                                              ("batch_first=False", not original.batch_first)) if bad]
        if unsupported:
            raise UnsupportedModel(f"captionlens explains nn.LSTM with one layer, batch_first=True; this one has "
                            f"{', '.join(unsupported)} (write it as nn.LSTMCell steps or captionlens's LSTMCell)")
        self.cell = _captionlens_cell(original.input_size, original.hidden_size, original.weight_ih_l0,
                                      original.weight_hh_l0, getattr(original, "bias_ih_l0", None),
                                      getattr(original, "bias_hh_l0", None))

    def forward(self, x: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise UnsupportedModel("captionlens explains nn.LSTM on a [B, T, I] tensor (no packed sequences)")
        if hx is None:
            zeros = x.new_zeros(x.shape[0], self.cell.hidden_size)
            state = LSTMState(zeros, zeros)
        else:
            state = LSTMState(hx[0][0], hx[1][0])
        outputs = []
        for t in range(x.shape[1]):
            state, _ = self.cell(x[:, t], state)
            outputs.append(state.hidden)
        return torch.stack(outputs, dim=1), (state.hidden.unsqueeze(0), state.memory.unsqueeze(0))


def _batch_norm_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch-norm as ``x·scale + shift`` per channel."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0)
    return scale.detach(), shift.detach()


CANONIZERS: dict[type, Callable[[nn.Module], nn.Module]] = {
    nn.LSTMCell: StandardLSTMCell,
    nn.LSTM: StandardLSTM,
    nn.BatchNorm1d: lambda bn: ChannelAffine(*_batch_norm_affine(bn)),
    nn.BatchNorm2d: lambda bn: ChannelAffine(*_batch_norm_affine(bn)),
    nn.Sigmoid: lambda _: Gate(),
    nn.Softmax: lambda softmax: AttentionWeights(softmax.dim),
}
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


# ------------------------------------------------------------------------------- batch-norm folding
_CONV_BN_PAIRS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def conv_batch_norm_pairs(encoder: nn.Module) -> list[tuple[nn.Conv2d, nn.Module]]:
    """The (convolution, batch-norm) pairs of ``encoder`` where the batch-norm takes exactly the
    convolution's output, found by one forward of a blank image (cached per encoder)."""
    if encoder in _CONV_BN_PAIRS:
        return _CONV_BN_PAIRS[encoder]
    produced: dict[int, nn.Conv2d] = {}
    pairs: list[tuple[nn.Conv2d, nn.Module]] = []

    def conv_hook(module, inputs, output):
        produced[id(output)] = module

    def bn_hook(module, inputs, output):
        conv = produced.get(id(inputs[0]))
        if conv is not None and (conv, module) not in pairs:
            pairs.append((conv, module))

    handles = [m.register_forward_hook(conv_hook) for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(bn_hook) for m in encoder.modules() if isinstance(m, BATCH_NORMS)]
    try:
        parameter = next(encoder.parameters())
        size = getattr(encoder, "image_size", 224)
        with torch.no_grad():
            encoder(torch.zeros(1, 3, size, size, dtype=parameter.dtype, device=parameter.device))
    finally:
        for handle in handles:
            handle.remove()
    _CONV_BN_PAIRS[encoder] = pairs
    return pairs


@contextlib.contextmanager
def batch_norms_folded(model: nn.Module) -> Iterator[None]:
    """For the block, each batch-norm of ``model.encoder`` that takes exactly a convolution's output is
    folded into that convolution and replaced by an identity: the same function (to float rounding),
    with one layer and its backward fewer. LRP's canonizer starts with it; the gradient methods run in
    it too (ResNet-101: 104 batch-norm backwards a word fewer, and under vmap their copies)."""
    encoder = getattr(model, "encoder", None)
    if encoder is None or not any(isinstance(m, BATCH_NORMS) for m in encoder.modules()):
        yield
        return
    pairs = conv_batch_norm_pairs(encoder)
    folded = {id(bn) for _, bn in pairs}
    saved = []
    try:
        for conv, bn in pairs:
            scale, shift = _batch_norm_affine(bn)
            saved.append((conv, conv.weight, conv.bias))
            bias = conv.bias.detach() * scale + shift if conv.bias is not None else shift
            conv.weight = nn.Parameter(conv.weight.detach() * scale.view(-1, 1, 1, 1), conv.weight.requires_grad)
            conv.bias = nn.Parameter(bias, False)
        with children_replaced(encoder, lambda child: nn.Identity() if id(child) in folded else None):
            yield
    finally:
        for conv, weight, bias in reversed(saved):
            conv.weight, conv.bias = weight, bias


@contextlib.contextmanager
def children_replaced(root: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]
                      ) -> Iterator[list[tuple[nn.Module, str, nn.Module]]]:
    """For the block, every module below ``root`` for which ``replacement`` gives a module is swapped
    for it in its parent (a module met at two places gets one replacement); yields the swaps as
    (parent, name, original) and puts every original back afterwards, also when a replacement fails."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    made: dict[int, nn.Module | None] = {}
    try:
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if id(child) not in made:
                    made[id(child)] = replacement(child)
                if made[id(child)] is not None:
                    setattr(parent, name, made[id(child)])
                    swapped.append((parent, name, child))
        yield swapped
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)


# ----------------------------------------------------------------------- operations between modules
MULTIPLY = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
REDUCE = {torch.sum: False, torch.Tensor.sum: False, torch.mean: True, torch.Tensor.mean: True}
BATCH_MATMUL = {torch.bmm, torch.Tensor.bmm, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}
VIEWS = {torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.squeeze, torch.squeeze, torch.Tensor.view,
         torch.Tensor.reshape, torch.reshape, torch.Tensor.expand, torch.Tensor.expand_as, torch.Tensor.transpose,
         torch.transpose, torch.Tensor.permute, torch.Tensor.contiguous, torch.Tensor.__getitem__}


class CanonicalOps(nn.Module):
    """The modules that operations between modules are routed through (so they carry rules)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_product = GateProduct()
        self.weighted_sum = WeightedSum()
        self.reduce = Reduce()
        self.sum = Sum()


def _flows(x) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def _role(x) -> str | None:
    return getattr(x, ROLE, None) if isinstance(x, torch.Tensor) else None


class ModuleStack:
    """Which module is running: pushed and popped by hooks on every module of the model."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {module: name for name, module in model.named_modules()}
        self.running: list[nn.Module] = []
        self.handles = []
        for module in self.names:
            self.handles.append(module.register_forward_pre_hook(self._enter))
            self.handles.append(module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, module: nn.Module, inputs) -> None:
        self.running.append(module)

    def _leave(self, module: nn.Module, inputs, output) -> None:
        self.running.pop()

    def between_modules(self) -> bool:
        """True unless a leaf module's own forward is running."""
        return not self.running or bool(next(iter(self.running[-1].children()), None))

    def where(self) -> str:
        return self.names.get(self.running[-1], "?") if self.running else "(model)"

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class _BetweenModules(TorchFunctionMode):
    """Active during the model's forward: routes the operations between modules (see the module
    docstring) when ``route`` is set, and hands every other one to ``around`` (the audit's probes)."""

    def __init__(self, stack: ModuleStack, ops: CanonicalOps | None, around: Callable | None) -> None:
        super().__init__()
        self.stack, self.ops, self.around = stack, ops, around

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # inside a leaf module, an autograd Function's forward (no grad) or a hook's detach: not ours
        if not self.stack.between_modules() or not torch.is_grad_enabled() or func is torch.Tensor.detach:
            return func(*args, **kwargs)
        if self.ops is not None:
            routed = self._route(func, args, kwargs)
            if routed is not None:
                return routed
        out = self.around(func, args, kwargs, self.stack.where()) if self.around else func(*args, **kwargs)
        if func in VIEWS and _role(args[0]) and isinstance(out, torch.Tensor):
            setattr(out, ROLE, _role(args[0]))  # alpha.unsqueeze(2) is still attention weights
        return out

    def _route(self, func, args, kwargs):
        if func in MULTIPLY and len(args) == 2 and not kwargs:
            a, b = args
            if _role(a) and _flows(b) and not _role(b):
                return self.ops.gate_product(a, b)
            if _role(b) and _flows(a) and not _role(a):
                return self.ops.gate_product(b, a)
        elif func in ADD and len(args) == 2 and not kwargs and _flows(args[0]) and _flows(args[1]):
            return self.ops.sum(*args)
        elif func in REDUCE and _flows(args[0]) and "dtype" not in kwargs:
            x = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            keepdim = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            dim = tuple(range(x.dim())) if dim is None else dim
            return self.ops.reduce(x, dim, keepdim, REDUCE[func])
        elif func in BATCH_MATMUL and len(args) == 2 and not kwargs:
            weights, values = args  # [B, 1, N] @ [B, N, D]: Σ_n α_n v_n
            if _role(weights) == "weights" and _flows(values) and weights.dim() == 3 and weights.shape[1] == 1 \
                    and values.dim() == 3:
                return self.ops.weighted_sum(weights.squeeze(1), values).unsqueeze(1)
        return None


def _wrap_forward(module: nn.Module, mode_factory: Callable[[], TorchFunctionMode]) -> None:
    original = module.forward

    def forward(*args, **kwargs):
        with mode_factory():
            return original(*args, **kwargs)

    module.forward = forward  # an instance attribute: removed again on exit


@contextlib.contextmanager
def canonized(model: nn.Module, around: Callable | None = None, parameters=None) -> Iterator[nn.Module]:
    """Within the block ``model`` is canonised (see the module docstring); afterwards it is exactly
    as before. ``around(func, args, kwargs, where)``, if given, runs every operation between modules
    that is not routed (the audit uses it to probe relevance). A model explained operation by
    operation (``relevance_by_operation``: a Hugging Face captioner) gets ``operations.py``'s rules
    instead, with ``parameters`` (LRP's settings)."""
    if getattr(model, "relevance_by_operation", False):
        from .operations import by_operation

        with by_operation(model, parameters, around) as ready:
            yield ready
        return
    wrapped: list[nn.Module] = []
    stack = None
    canonical = (lambda child: CANONIZERS[type(child)](child) if type(child) in CANONIZERS else None)
    with batch_norms_folded(model), children_replaced(model, canonical) as swapped:
        try:
            route = any(type(child) not in BATCH_NORMS for _, _, child in swapped)
            if route:
                model.canonical_ops = CanonicalOps()
            if route or around is not None:
                stack = ModuleStack(model)
                ops = model.canonical_ops if route else None
                parts = model.explained_parts() if hasattr(model, "explained_parts") else [
                    m for m in (getattr(model, "encoder", None), getattr(model, "decoder", None)) if m is not None]
                for part in parts or [model]:
                    _wrap_forward(part, lambda: _BetweenModules(stack, ops, around))
                    wrapped.append(part)
            yield model
        finally:
            for part in wrapped:
                del part.forward
            if stack is not None:
                stack.remove()
            if "canonical_ops" in model._modules:
                del model.canonical_ops
