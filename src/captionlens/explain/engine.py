"""The shared machinery of every explanation method: hooks that live only inside ``with`` blocks,
one traced forward of the *unchanged* model, and one batched backward for all explained words.

The forward runs once for a batch of images; the backward carries one seed per explained word,
batched by ``torch.func.vmap`` over ``torch.autograd.grad`` (``words_backward``). Words never share a backward,
so nothing accumulates from one word into the next.
"""
from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.captioner import CaptionModel
from ..models.decoder import DecoderOutput
from ..models.layers import ROLE

ForwardHook = Callable[[nn.Module, tuple, torch.Tensor], torch.Tensor | None]


def _keeping_role(hook: ForwardHook) -> ForwardHook:
    """``hook``, with the mark of a gate's or attention weights' output carried over to the tensor
    the hook puts in its place (canonised products find their gates by it)."""
    def wrapped(module, inputs, output):
        result = hook(module, inputs, output)
        if result is not None and hasattr(output, ROLE):
            setattr(result, ROLE, getattr(output, ROLE))
        return result
    return wrapped


@contextlib.contextmanager
def forward_hooks(modules: list[tuple[nn.Module, ForwardHook]]) -> Iterator[None]:
    """Attach forward hooks for the duration of the block; they are removed even on errors (also
    those attached before one that failed to attach)."""
    with contextlib.ExitStack() as attached:
        for module, hook in modules:
            attached.callback(module.register_forward_hook(_keeping_role(hook)).remove)
        yield


@dataclass
class Trace:
    """One forward of ``model.run`` with the tensors explanations are read at."""

    pixels: torch.Tensor  # [B, 3, H, W], requires grad unless the trace stops at the grid
    grid: torch.Tensor  # encoder output A [B, C, h, w]
    embeddings: list[torch.Tensor]  # the word embeddings as the decoder looked them up: [B, E] per step
    # (a recurrent decoder) or [B, S, E] at once (a transformer)
    output: DecoderOutput  # logits [B, S, V], alpha [B, S, L], beta [B, S]
    positions: list[torch.Tensor]  # outputs of LearnedPositions modules, [B, n, D] each (none for the LSTMs)
    fed: int = 0  # the fed tokens S: embeddings before them are a prompt's (a Hugging Face captioner's)
    special: list[torch.Tensor] = field(default_factory=list)  # learned tokens joined to the input (CLS)
    largest_saved: int = 0  # bytes of the largest activation the forward saved (measured for "auto" passes)

    def embedding_values(self) -> torch.Tensor:
        """The embeddings of the fed tokens [B, S, E], whichever way the decoder looked them up."""
        values = torch.cat([_as_sequence(e.detach()) for e in self.embeddings], dim=1)
        return values[:, values.shape[1] - self.fed:] if self.fed else values


def _as_sequence(tensor: torch.Tensor, axis: int = 1) -> torch.Tensor:
    """One step's embedding [.., B, E] as a sequence of one [.., B, 1, E]; a sequence unchanged."""
    return tensor.unsqueeze(axis) if tensor.dim() == axis + 1 else tensor


def trace(model: CaptionModel, pixels: torch.Tensor, token_ids: torch.Tensor,
          extra_hooks: list[tuple[nn.Module, ForwardHook]] = (), to_pixels: bool = True) -> Trace:
    """Run ``model`` (teacher forcing on ``token_ids`` [B, S]) and keep the grid and the embeddings.
    With ``to_pixels=False`` the encoder runs without a graph and gradients stop at the grid (all
    that Grad-CAM needs): the same forward, without the cost of the CNN's backward."""
    captured: dict[str, list[torch.Tensor]] = {"grid": [], "embeddings": [], "positions": []}

    def keep(name: str) -> ForwardHook:
        def hook(module, inputs, output):
            captured[name].append(output)
            # the model goes on with a copy: a forward that adds to it in place (GIT's ``embeddings +=
            # positions``) must not change what is read here
            return output.clone() if name == "embeddings" else None
        return hook

    readers = [(model.embedding_module, keep("embeddings"))] + [
        (module, keep("positions")) for module in model.position_modules()]

    def on_grid(grid: torch.Tensor) -> torch.Tensor:
        if not to_pixels:  # the encoder ran without a graph: gradients stop here
            grid = grid.detach().requires_grad_(True)
        captured["grid"].append(grid)
        return grid

    largest = [0]

    def measure(saved: torch.Tensor) -> torch.Tensor:  # activations only: weights do not grow with the words
        if not isinstance(saved, nn.Parameter):
            largest[0] = max(largest[0], saved.numel() * saved.element_size())
        return saved

    # measured only where max_words_per_pass="auto" reads it: a hook on every saved tensor is not free
    measuring = (torch.autograd.graph.saved_tensors_hooks(measure, lambda saved: saved)
                 if _WORDS_PER_PASS.get() == "auto" else contextlib.nullcontext())
    pixels = pixels.detach().requires_grad_(to_pixels)
    with forward_hooks([*extra_hooks, *readers]), torch.enable_grad(), measuring:
        if to_pixels:
            output = model.run_with_grid(pixels, token_ids, on_grid)
        else:
            with _no_grad_in(model.vision_module()):
                output = model.run_with_grid(pixels, token_ids, on_grid)
    positions = captured["positions"] + getattr(model, "captured_constants", lambda: [])()
    return Trace(pixels, captured["grid"][0], captured["embeddings"], output, positions, token_ids.shape[1],
                 getattr(model, "captured_special", lambda: [])(), largest[0])


@contextlib.contextmanager
def _no_grad_in(module: nn.Module) -> Iterator[None]:
    """Within the block, ``module``'s forward builds no graph (Grad-CAM needs none below the grid)."""
    def pre(m, inputs):
        m._grad_was = torch.is_grad_enabled()
        torch.set_grad_enabled(False)

    def post(m, inputs, output):
        torch.set_grad_enabled(m.__dict__.pop("_grad_was", True))

    with contextlib.ExitStack() as attached:
        attached.callback(module.register_forward_pre_hook(pre).remove)
        attached.callback(module.register_forward_hook(post, always_call=True).remove)
        yield


@dataclass
class Targets:
    """Which logits are explained: for the k-th explained word of image b, the score at step
    ``steps[b, k]`` of token ``tokens[b, k]``; ``valid[b, k]`` is False for padding."""

    steps: torch.Tensor  # [B, K] long
    tokens: torch.Tensor  # [B, K] long
    valid: torch.Tensor  # [B, K] bool

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """The explained logits [B, K] (0 where not valid)."""
        batch = torch.arange(logits.shape[0], device=logits.device).unsqueeze(1)
        return logits[batch, self.steps, self.tokens] * self.valid

    def seeds(self, logits: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """One seed per explained word: [K, B, S, V], one-hot at the word's logit, times ``scale``
        [B, K] (1 for gradients; the logit itself for LRP, whose relevance starts at the fc score)."""
        batch, k = self.steps.shape
        seeds = logits.new_zeros(k, *logits.shape)
        values = self.valid.to(logits.dtype) if scale is None else scale * self.valid
        rows = torch.arange(batch, device=logits.device)
        for j in range(k):
            seeds[j, rows, self.steps[:, j], self.tokens[:, j]] = values[:, j]
        return seeds


@dataclass
class Backward:
    """What flows back to the inputs for each explained word (first axis: the K words)."""

    pixels: torch.Tensor | None  # [K, B, 3, H, W]; None when the trace stopped at the grid
    grid: torch.Tensor  # [K, B, C, h, w]
    embeddings: torch.Tensor  # [K, B, S, E]
    positions: torch.Tensor  # [K, B]: summed over every learned position (0 for a model without them)
    prompt: torch.Tensor | None = None  # [K, B]: summed over a prompt's tokens before the fed ones (or None)
    special: torch.Tensor | None = None  # [K, B]: summed over learned tokens joined to the input (CLS), or None


_WORDS_PER_PASS: contextvars.ContextVar[int | str | None] = contextvars.ContextVar("words_per_pass", default=None)
# max_words_per_pass="auto": the words of one backward get this much memory. Each word costs about
# WORD_COST × the forward's largest saved activation (the relevance or gradient of a layer, and the
# rule's temporaries; measured: 51 MiB a word for VGG16 at 224 px, whose largest activation is 12 MiB).
AUTO_PASS_MEMORY = 256 * 2**20
WORD_COST = 4.2


def auto_words_per_pass(largest_saved: int) -> int:
    """How many words share one backward so that their memory stays within ``AUTO_PASS_MEMORY``."""
    return max(1, int(AUTO_PASS_MEMORY // max(1.0, WORD_COST * largest_saved)))


@contextlib.contextmanager
def words_per_pass(limit: int | str | None) -> Iterator[None]:
    """Within the block, at most ``limit`` words share one batched backward (the forward is still run
    once): memory grows with the words of a pass, so this bounds it for long captions and big batches.
    ``"auto"`` sizes the passes from the traced forward (``auto_words_per_pass``)."""
    if limit != "auto" and limit is not None and (isinstance(limit, (str, bool)) or limit < 1):
        raise ValueError(f"max_words_per_pass must be ≥ 1 or 'auto', got {limit!r}")
    token = _WORDS_PER_PASS.set(limit)
    try:
        yield
    finally:
        _WORDS_PER_PASS.reset(token)


def words_backward(output: torch.Tensor, inputs: list[torch.Tensor], seeds: torch.Tensor, retain: bool,
                   kernels_see_words: bool = True) -> tuple:
    """The backward of ``output`` to ``inputs`` for each of the K seeds [K, *output.shape] at once,
    the forward's saved activations shared; ``retain=False`` frees the graph as it goes (the last pass).

    ``kernels_see_words=True``: ``torch.func.vmap`` over ``torch.autograd.grad``, so the kernels see the
    words as a batch dimension (one transposed convolution, max-pool spreading and matrix product per
    layer for all K words). ``False``: ``is_grads_batched=True``, PyTorch's older vmap, which has no
    batching rule for convolutions and runs their backward word by word. Which is faster depends on
    the kernels (``benchmarks/explain_speed.py`` measures both side by side): on a 2-core CPU at the
    papers' size, LRP's rules (written as transposed convolutions and matrix products) take 0.82–0.97×
    the time as a batch, while autograd's own convolution backward (the gradient methods) takes
    1.00–1.29× in float32 on VGG16 — oneDNN's batch-1 backward at 224×224 beats its batch-15 one — and
    0.80× at 64×64, 0.80–0.90× on ResNet-101 at 256×256, and 0.88–0.96× in bfloat16
    (``gradients.words_as_a_batch``)."""
    if not kernels_see_words:
        return torch.autograd.grad(output, inputs, seeds, is_grads_batched=True, allow_unused=True,
                                   retain_graph=retain)

    def backward(seed):  # called once, on the K seeds as one batched tensor
        return torch.autograd.grad(output, inputs, seed, allow_unused=True, retain_graph=retain)
    with warnings.catch_warnings():  # an operation without a batching rule (LLaVA's masked_scatter) runs
        # word by word, exactly; PyTorch's note about its speed is for PyTorch, not for our users
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented "
                                "the batching rule", category=UserWarning)
        return torch.func.vmap(backward)(seeds)


def batched_backward(traced: Trace, seeds: torch.Tensor, kernels_see_words: bool = True) -> Backward:
    """All K seeds back through one forward graph in batched calls of at most ``words_per_pass``
    seeds (all K at once by default), to the pixels only when the trace kept their graph;
    ``kernels_see_words`` as in ``words_backward``."""
    to_pixels = traced.pixels.requires_grad
    inputs = [traced.pixels, traced.grid] if to_pixels else [traced.grid]
    inputs += [*traced.positions, *traced.embeddings, *traced.special]
    step = _WORDS_PER_PASS.get()
    step = auto_words_per_pass(traced.largest_saved) if step == "auto" else step or seeds.shape[0]
    reached = [x for x in inputs if x.requires_grad]  # a position computed without a graph gets nothing
    chunks = []
    for start in range(0, seeds.shape[0], step):
        last = start + step >= seeds.shape[0]
        chunks.append(words_backward(traced.output.logits, reached, seeds[start: start + step], retain=not last,
                                     kernels_see_words=kernels_see_words))
    found = iter([None if parts[0] is None else torch.cat(parts) for parts in zip(*chunks)])
    grads = [next(found) if x.requires_grad else None for x in inputs]
    grads = [torch.zeros((seeds.shape[0], *x.shape), device=x.device, dtype=x.dtype) if g is None else g
             for g, x in zip(grads, inputs)]
    if not to_pixels:
        grads = [None, *grads]
    count, special = len(traced.positions), len(traced.special)
    positions = sum((g.flatten(2).sum(dim=2) for g in grads[2: 2 + count]), seeds.new_zeros(seeds.shape[:2]))
    embedded = grads[2 + count: len(grads) - special]
    embeddings = torch.cat([_as_sequence(g, axis=2) for g in embedded], dim=2)
    prompt = None
    if traced.fed and embeddings.shape[2] > traced.fed:  # a prompt before the fed tokens
        prompt = embeddings[:, :, : embeddings.shape[2] - traced.fed].sum(dim=(2, 3))
        embeddings = embeddings[:, :, embeddings.shape[2] - traced.fed:]
    special_relevance = sum((g.flatten(2).sum(dim=2) for g in grads[len(grads) - special:]),
                            seeds.new_zeros(seeds.shape[:2])) if special else None
    return Backward(grads[0], grads[1], embeddings, positions, prompt, special_relevance)
