"""LRP operation by operation, for models whose forwards are not written in captionlens's modules —
Hugging Face captioners (``models/hf.py``): every operation between modules that moves relevance
gets its rule from ``rules.py`` while the model runs, unchanged, as its authors wrote it (autoLRP's
idea, with AttnLRP's rules; Achtibat et al. 2024).

Within ``relevance_by_operation(model, parameters)`` the model's parameters are frozen, so a tensor
"flows" exactly when it depends on the input (pixels, word embeddings). Then, between modules:

* views, indexing, concatenation, casts, ``masked_scatter`` and eval-mode dropout route relevance as
  their own backward does (unit gain);
* ``a + b`` of two flowing tensors: the ε-rule of a sum; ``x + c`` with a constant (an attention
  mask): all relevance stays with ``x``; with a *learned* constant (a position table, a CLS token) the
  constant becomes an input of its own whose relevance is reported apart (``captured``);
* ``c·x``, ``x / c``, ``−x`` with constant ``c``: ``R_x = R``; ``a ⊙ b`` of two flowing tensors: the
  uniform rule, unless one is a softmax's weights (then those weights get nothing);
* softmax: AttnLRP's rule (``attention_rule="attnlrp"``) or none into the scores (``"cp"``); its
  output is marked as attention weights;
* ``A @ B``: with attention weights and values, the ε-rule with the weights held constant ("cp") or
  the uniform rule ("attnlrp"); queries × keys: nothing ("cp") or the uniform rule ("attnlrp");
* anything else a flowing tensor meets between modules is refused (``UnsupportedModel``, naming the
  operation and the module): no relevance is ever moved by a rule nobody wrote.

Leaf modules get their rules as everywhere (``lrp.rule_hooks``); a leaf module without a rule that a
flowing tensor reaches is refused the same way.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from ..errors import UnsupportedModel
from ..models.layers import ROLE
from .rules import (LRPParameters, _EpsilonMatmul, _EpsilonSum, _EpsilonWeightedSum, _GateProduct, _NoRelevance,
                    _PassThrough, _SoftmaxTaylor, _UniformProduct, uniform_product)

# ``x += y`` arrives as ``x.add_(y)`` and rebinds ``x`` to what it returns: in-place steps are explained
# as their out-of-place twins (a leaf input cannot be changed in place); the test that the explained
# forward equals the model's guards against a forward that would discard such a result.
ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.__iadd__,
       torch.Tensor.add_}
MULTIPLY = {torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.__imul__,
            torch.Tensor.mul_}
DIVIDE = {torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.true_divide, torch.Tensor.div_}
NEGATE = {torch.neg, torch.Tensor.neg, torch.Tensor.__neg__}
MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax}
DROPOUT = {F.dropout, torch.dropout}
JOIN = {torch.cat, torch.concat, torch.stack}
# Operations whose own backward routes relevance correctly: each output element is one input element
# (or a sum of copies of it), or the output does not depend on the input's values at all.
ROUTING = {
    torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.view_as, torch.Tensor.reshape_as,
    torch.Tensor.transpose, torch.transpose, torch.Tensor.permute, torch.permute, torch.Tensor.contiguous,
    torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.squeeze, torch.squeeze, torch.Tensor.flatten,
    torch.flatten, torch.Tensor.unflatten, torch.Tensor.expand, torch.Tensor.expand_as, torch.Tensor.repeat,
    torch.Tensor.__getitem__, torch.Tensor.split, torch.split, torch.Tensor.chunk, torch.chunk, torch.Tensor.unbind,
    torch.unbind, torch.cat, torch.concat, torch.stack, torch.Tensor.narrow, torch.Tensor.select,
    torch.Tensor.index_select, torch.index_select, torch.Tensor.clone, torch.Tensor.to, torch.Tensor.type,
    torch.Tensor.float, torch.Tensor.double, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.type_as,
    torch.Tensor.masked_scatter, torch.Tensor.masked_fill, torch.masked_fill, torch.where,
    torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel, torch.Tensor.__len__, torch.Tensor.detach,
    torch.ones_like, torch.zeros_like, torch.full_like, torch.empty_like, torch.Tensor.new_ones, torch.Tensor.new_zeros,
    torch.Tensor.new_full, torch.Tensor.new_empty, torch.Tensor.new_tensor, torch.Tensor.__setitem__,
}


def _rule_bearing(func) -> bool:
    """Operations the mode moves relevance through with a rule (the audit probes these)."""
    return func in ADD or func in MULTIPLY or func in DIVIDE or func in NEGATE or func in SOFTMAX or func in MATMUL


def _flows(x) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad


def _learned(x) -> bool:
    """A constant that is (a view of) a learned parameter: a position table, a CLS token."""
    return isinstance(x, torch.Tensor) and not x.requires_grad and (
        isinstance(x, nn.Parameter) or isinstance(getattr(x, "_base", None), nn.Parameter))


def _weights(x) -> bool:
    return isinstance(x, torch.Tensor) and getattr(x, ROLE, None) == "weights"


class RelevanceByOperation(TorchFunctionMode):
    """The mode active while the model runs (see the module docstring)."""

    def __init__(self, stack, parameters: LRPParameters, captured: list[tuple[str, torch.Tensor]]) -> None:
        super().__init__()
        self.stack, self.p, self.captured = stack, parameters, captured

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.stack.between_modules() or not torch.is_grad_enabled():
            return func(*args, **kwargs)
        operands = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        operands += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        if not any(_flows(t) for t in operands):
            return func(*args, **kwargs)
        args = self.prepared(func, args, kwargs)
        if func in ROUTING or getattr(func, "__name__", "") == "__get__":  # attributes: .shape, .dtype
            out = func(*args, **kwargs)
            if _weights(args[0]) and isinstance(out, torch.Tensor):
                setattr(out, ROLE, "weights")  # weights.transpose(...) are still weights
            return out
        if func in DROPOUT:
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            if training:
                raise UnsupportedModel("LRP explains a model in eval mode (dropout off)")
            return args[0]
        if func in ADD and len(args) == 2 and not kwargs:
            return self._add(*args)
        if func in MULTIPLY and len(args) == 2 and not kwargs:
            return self._multiply(func, *args)
        if func in DIVIDE and len(args) == 2 and not kwargs and not _flows(args[1]):
            return _PassThrough.apply(torch.div(args[0].detach(), args[1]), None, args[0])
        if func in NEGATE and len(args) == 1:
            return _PassThrough.apply(func(*args), None, args[0])
        if func in SOFTMAX:
            return self._softmax(func, args, kwargs)
        if func in MATMUL and len(args) == 2 and not kwargs:
            return self._matmul(func, *args)
        out = func(*args, **kwargs)
        if not any(_flows(t) for t in (out if isinstance(out, (list, tuple)) else [out])):
            return out  # a comparison, a dtype or size query: nothing that carries relevance
        raise UnsupportedModel(f"LRP has no rule for {getattr(func, '__qualname__', func)} on a tensor that depends "
                               f"on the input, in {self.stack.where()}; run `captionlens audit` to see where, and write "
                               "that step as a module with a rule (docs: Your own captioner)")

    # ------------------------------------------------------------------------------ the rules
    def prepared(self, func, args: tuple, kwargs: dict) -> tuple:
        """``args`` with every learned constant that joins a flowing tensor (a CLS token concatenated,
        a position table added) turned into an input of its own."""
        if func in JOIN and args and isinstance(args[0], (list, tuple)) and any(_learned(t) for t in args[0]):
            return ([self._leaf(t, t, "special") if _learned(t) else t for t in args[0]], *args[1:])
        if func in ADD and len(args) == 2 and not kwargs:
            a, b = args
            if _learned(a) and _flows(b):
                return self._leaf(a, b, "positions"), b
            if _learned(b) and _flows(a):
                return a, self._leaf(b, a, "positions")
        return args

    def _leaf(self, constant: torch.Tensor, like: torch.Tensor, kind: str) -> torch.Tensor:
        """A learned constant as an input of its own (one copy per image), its relevance reported apart:
        one added to the tokens is a position table ("positions"), one joined to them a token of its
        own, such as CLS ("special")."""
        shape = torch.broadcast_shapes(constant.shape, like.shape)
        leaf = constant.detach().expand(shape).clone().requires_grad_(True)
        self.captured.append((kind, leaf))
        return leaf

    def _add(self, a, b):
        if _flows(a) and _flows(b):
            out = a.detach() + b.detach()
            return _EpsilonSum.apply(out, self.p.epsilon, out, a, b)
        flowing = a if _flows(a) else b
        return _PassThrough.apply(torch.add(a.detach(), b.detach() if isinstance(b, torch.Tensor) else b), None, flowing)

    def _multiply(self, func, a, b):
        if _flows(a) and _flows(b):
            out = torch.mul(a.detach(), b.detach())
            if _weights(a) or _weights(b):  # attention weights times values: the weights are coefficients
                weights, values = (a, b) if _weights(a) else (b, a)
                return _GateProduct.apply(out, None, weights, values)
            return uniform_product(a, b, out, self.p)
        flowing = a if _flows(a) else b
        plain = {torch.Tensor.mul_: torch.mul, torch.Tensor.__imul__: torch.mul}.get(func, func)
        return _PassThrough.apply(plain(a.detach() if isinstance(a, torch.Tensor) else a,
                                        b.detach() if isinstance(b, torch.Tensor) else b), None, flowing)

    def _softmax(self, func, args, kwargs):
        x = args[0]
        out = func(*args, **kwargs)
        if self.p.attention_rule == "attnlrp":
            result = _SoftmaxTaylor.apply(out, None, x, out.detach())
        else:
            result = _NoRelevance.apply(out, None, x)
        setattr(result, ROLE, "weights")
        return result

    def _matmul(self, func, a, b):
        if not _flows(a) or not _flows(b):  # x @ W or W @ x with a constant W: the ε-rule of a linear map
            out = func(a.detach(), b.detach())
            return _EpsilonMatmul.apply(out, (self.p.epsilon, _flows(a)), a, b, out.detach())
        out = func(a.detach(), b.detach())
        if self.p.attention_rule == "attnlrp":
            return _UniformProduct.apply(out, (self.p.epsilon, 1.0), a, b)
        if _weights(a):  # α · V with α held constant (the papers' eq. 8)
            return _EpsilonWeightedSum.apply(out, self.p.epsilon, a.detach(), b, out.detach())
        return _NoRelevance.apply(out, None, a, b)  # Q · Kᵀ: the scores get nothing under "cp"


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Within the block no parameter requires grad (so flowing means depending on the input)."""
    changed = [p for p in model.parameters() if p.requires_grad]
    for parameter in changed:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in changed:
            parameter.requires_grad_(True)


def input_hooks(model) -> list:
    """Forward hooks that make the word embeddings and the learned positions inputs of their own
    (leaves requiring grad): with the weights frozen, that is where relevance is read."""
    def leaf(module, inputs, output):
        return output.detach().requires_grad_(True)

    return [(module, leaf) for module in [model.embedding_module, *model.position_modules()]]


@contextlib.contextmanager
def by_operation(model: nn.Module, parameters: LRPParameters | None, around=None) -> Iterator[nn.Module]:
    """Within the block ``model`` is explained operation by operation (the module docstring): its
    weights frozen, its word embeddings and positions made inputs, the mode watching every part
    that runs. ``around`` (the audit's probe) sees every operation the mode does not route."""
    from .canonize import ModuleStack, _wrap_forward
    from .engine import forward_hooks

    parameters = parameters or LRPParameters()
    captured: list[tuple[str, torch.Tensor]] = []
    stack = ModuleStack(model)
    wrapped = []
    try:
        with frozen(model), forward_hooks(input_hooks(model)):
            for part in model.explained_parts():
                _wrap_forward(part, lambda: _Probed(stack, parameters, captured, around))
                wrapped.append(part)
            model.captured_constants = lambda: [leaf for kind, leaf in captured if kind == "positions"]
            model.captured_special = lambda: [leaf for kind, leaf in captured if kind == "special"]
            yield model
    finally:
        for part in wrapped:
            del part.forward
        stack.remove()
        model.__dict__.pop("captured_constants", None)
        model.__dict__.pop("captured_special", None)


class _Probed(RelevanceByOperation):
    """The mode, handing the operations it does not route to the audit's probe when there is one."""

    def __init__(self, stack, parameters, captured, around) -> None:
        super().__init__(stack, parameters, captured)
        self.around = around

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.around is None or not self.stack.between_modules() or not torch.is_grad_enabled() or \
                func in ROUTING or getattr(func, "__name__", "") == "__get__" or not _rule_bearing(func):
            return super().__torch_function__(func, types, args, kwargs)
        def routed(*a, **k):
            return super(_Probed, self).__torch_function__(func, types, a, k)

        routed.__name__ = getattr(func, "__name__", str(func))
        return self.around(routed, self.prepared(func, args, kwargs), kwargs, self.stack.where())
