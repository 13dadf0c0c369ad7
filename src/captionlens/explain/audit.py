"""The check to run before trusting LRP heatmaps of a model of one's own: where, if anywhere, is
relevance created or lost?

On a float64 copy with every bias zeroed (batch-norm shifts and running means too) and ε → 0 (α = 1,
β = 0), every LRP rule conserves relevance: what enters a module at its output leaves at its inputs.
The audit runs LRP on that copy, word by word, with a probe on every input and output of every leaf
module and of every operation *between* modules (a ``*`` or ``+`` written in a forward, a reshape, a
concatenation), and reports per module and per operation the relevance entering and leaving it. A
row whose difference exceeds the tolerance is flagged: an operation that moves relevance without a
rule — a plain ``a * b`` product passes ``b · R`` to ``a`` and creates or destroys relevance — or a
rule that does not conserve. Modules whose inputs carry no relevance (the word embedding) are where
an explanation is read, not leaks.

    report = cl.audit_lrp(cap)        # or: captionlens audit --model RUN
    report.passed, report.flagged     # rows: name, kind, calls, relevance_in, relevance_out
"""
from __future__ import annotations

import copy
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.autograd import Function
from torch.utils._pytree import tree_map

from ..errors import real
from ..models.captioner import Captioner
from ..models.layers import ROLE
from .canonize import canonized
from .engine import trace
from .lrp import rule_hooks
from .rules import LRPParameters


@dataclass
class AuditRow:
    name: str  # module path ("decoder.lstm.gates"), or "where: operation" between modules
    kind: str  # module type or the operation's name
    calls: int = 0
    relevance_in: float = 0.0  # Σ relevance arriving at the outputs
    relevance_out: float = 0.0  # Σ relevance leaving to the inputs
    sink: bool = False  # no input carries relevance: where the explanation is read (embedding)
    flagged: bool = False

    @property
    def created(self) -> float:
        return self.relevance_out - self.relevance_in

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "calls": self.calls, "relevance_in": self.relevance_in,
                "relevance_out": self.relevance_out, "created": self.created, "sink": self.sink,
                "flagged": self.flagged}


@dataclass
class AuditReport:
    words: list[str]
    score: float  # Σ over the explained words of their logits
    pixels: float  # Σ relevance reaching the pixels
    embeddings: float  # Σ relevance reaching the word embeddings
    tolerance: float
    rows: list[AuditRow] = field(default_factory=list)
    positions: float = 0.0  # Σ relevance reaching learned positional embeddings (transformers)

    @property
    def flagged(self) -> list[AuditRow]:
        return [row for row in self.rows if row.flagged]

    @property
    def conservation(self) -> float:
        """(pixels + embeddings + positions) / score: 1 when nothing is created or lost."""
        return (self.pixels + self.embeddings + self.positions) / self.score if self.score else float("nan")

    @property
    def passed(self) -> bool:
        return not self.flagged and abs(self.conservation - 1) <= self.tolerance

    def to_dict(self) -> dict:
        return {"passed": self.passed, "words": self.words, "score": self.score, "pixels": self.pixels,
                "embeddings": self.embeddings, "positions": self.positions, "conservation": self.conservation, "tolerance": self.tolerance,
                "flagged": [row.name for row in self.flagged], "rows": [row.to_dict() for row in self.rows]}


class _Probe(Function):
    """Identity whose backward adds the relevance passing through to ``record[key]``."""

    @staticmethod
    def forward(ctx, x, record, key):
        ctx.record, ctx.key = record, key
        return x.clone()

    @staticmethod
    def backward(ctx, relevance):
        ctx.record[ctx.key] += float(relevance.double().sum())
        return relevance, None, None


def _marked(probed: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """The probe's output keeps the original's mark (attention weights stay attention weights)."""
    if hasattr(original, ROLE):
        setattr(probed, ROLE, getattr(original, ROLE))
    return probed


def _flows(x) -> bool:
    return isinstance(x, torch.Tensor) and x.requires_grad and x.is_floating_point()


class _Probes:
    """Probes on leaf modules (hooks) and on operations between modules (``around``)."""

    def __init__(self) -> None:
        self.rows: dict[str, AuditRow] = {}
        self.entering: dict[str, float] = defaultdict(float)
        self.leaving: dict[str, float] = defaultdict(float)

    def _row(self, name: str, kind: str) -> AuditRow:
        if name not in self.rows:
            self.rows[name] = AuditRow(name, kind, sink=True)
        return self.rows[name]

    def wrap_inputs(self, name: str, values):
        row = self.rows[name]
        row.calls += 1

        def probe(x):
            if not _flows(x):
                return x
            row.sink = False
            return _marked(_Probe.apply(x, self.leaving, name), x)
        return tree_map(probe, values)

    def wrap_outputs(self, name: str, values):
        return tree_map(lambda x: _marked(_Probe.apply(x, self.entering, name), x) if _flows(x) else x, values)

    def module_hooks(self, model: nn.Module) -> tuple[list, list]:
        """(pre-hooks, post-hooks) for every leaf module."""
        pre, post = [], []
        for name, module in model.named_modules():
            if next(iter(module.children()), None) is not None:
                continue
            self._row(name, type(module).__name__)
            pre.append((module, lambda m, args, name=name: self.wrap_inputs(name, args)))
            post.append((module, lambda m, args, out, name=name: self.wrap_outputs(name, out)))
        return pre, post

    def around(self, func, args, kwargs, where: str):
        if not any(_flows(x) for x in (*args, *kwargs.values())):
            return func(*args, **kwargs)
        name = f"{where}: {getattr(func, '__name__', str(func))}"
        self._row(name, "operation")
        args, kwargs = self.wrap_inputs(name, (args, kwargs))
        return self.wrap_outputs(name, func(*args, **kwargs))

    def finish(self, tolerance: float) -> list[AuditRow]:
        for name, row in self.rows.items():
            row.relevance_in, row.relevance_out = self.entering[name], self.leaving[name]
            row.flagged = not row.sink and abs(row.created) > tolerance
        # operations that never carried relevance (the attention scores' path) are left out
        return [row for row in self.rows.values()
                if row.calls and (row.kind != "operation" or row.relevance_in or row.relevance_out)]


def zero_biases(model: nn.Module) -> nn.Module:
    """Every bias, batch-norm shift and running mean set to 0, in place (use on a copy)."""
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.rsplit(".", 1)[-1].startswith("bias") or name.endswith("running_mean"):
                tensor.zero_()
    return model


def audit_lrp(captioner: Captioner, image=None, caption=None, tolerance: float = 1e-5,
              epsilon: float = 1e-9) -> AuditReport:
    """Audit LRP on ``captioner`` (unchanged: a float64, bias-free copy is audited) for one image (a
    random one by default) and caption (the model's own by default). A row is flagged when relevance
    entering and leaving it differ by more than ``tolerance`` × Σ|score| (a finite number in (0, 1]: an
    infinite tolerance would pass anything, a NaN flag nothing)."""
    real("tolerance", tolerance, 0, 1, low_open=True)
    real("epsilon", epsilon, 0, 1, low_open=True)
    model = zero_biases(copy.deepcopy(captioner.model)).double().eval()
    encoder = model.encoder
    if image is None:
        pixels = torch.rand(1, 3, encoder.image_size, encoder.image_size, generator=torch.Generator().manual_seed(0))
        pixels = (pixels - torch.tensor(encoder.mean).view(1, 3, 1, 1)) / torch.tensor(encoder.std).view(1, 3, 1, 1)
    else:
        pixels = captioner.preprocess([image]).cpu()
    pixels = pixels.double().to(captioner.device)
    if caption is None:
        caption = captioner.caption_pixels(pixels.float(), beam_size=1)[0]
        if not caption.words:
            caption = ["<unk>"] if "<unk>" in captioner.vocab else [captioner.vocab.words[captioner.vocab.unk_id]]
    words, ids = captioner.caption_ids(caption)
    token_ids = torch.tensor([ids], device=captioner.device)  # <start> .. <end>
    probes = _Probes()
    parameters = LRPParameters(epsilon=epsilon, alpha=1.0, beta=0.0)
    with canonized(model, around=probes.around, parameters=parameters):
        pre, post = probes.module_hooks(model)
        handles = [m.register_forward_pre_hook(h) for m, h in pre]
        try:
            traced = trace(model, pixels, token_ids[:, :-1], [*rule_hooks(model, parameters), *post])
        finally:
            for handle in handles:
                handle.remove()
        logits = traced.output.logits  # [1, S, V]
        inputs = [traced.pixels, *traced.positions, *traced.special, *traced.embeddings]
        count = len(traced.positions) + len(traced.special)  # learned positions and tokens (CLS)
        score = pixel_total = embedding_total = position_total = magnitude = 0.0
        for step in range(logits.shape[1]):  # every word and <end>, one backward each
            token = int(token_ids[0, step + 1])
            value = logits[0, step, token].detach()
            seed = torch.zeros_like(logits)
            seed[0, step, token] = value
            grads = torch.autograd.grad(logits, inputs, seed, retain_graph=True, allow_unused=True)
            score += float(value)
            magnitude += abs(float(value))
            pixel_total += float(grads[0].sum())
            position_total += sum(float(g.sum()) for g in grads[1: 1 + count] if g is not None)
            embedding_total += sum(float(g.sum()) for g in grads[1 + count:] if g is not None)
    rows = probes.finish(tolerance * max(magnitude, 1e-12))
    return AuditReport([*words, "<end>"], score, pixel_total, embedding_total, tolerance, rows, position_total)
