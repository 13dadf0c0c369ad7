"""What every captioning decoder shares: the teacher-forced loop over time steps, the word
embedding and the output layer. Architectures implement ``prepare``, ``initial_state`` and ``step``;
beam search and the explainers only use this interface. ``GridAttentionDecoder`` adds what the
papers' two captioners share: the grid projection and the output ``fc(ĉ_t + h_t)``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..errors import integer, real
from .layers import GridMemory, GridProjection, Sum


class StepOutput(NamedTuple):
    logits: torch.Tensor  # [B, V] pre-softmax fc output
    state: tuple  # the architecture's recurrent state, a NamedTuple of [B, D] tensors
    alpha: torch.Tensor  # attention over grid cells α_t [B, L]
    beta: torch.Tensor | None  # sentinel weight β_t [B]; None for a decoder without a visual sentinel


class DecoderOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, V]; logits[:, t] scores token t+1
    alpha: torch.Tensor  # [B, T, L]
    beta: torch.Tensor | None  # [B, T]; None without a visual sentinel


@dataclass(frozen=True)
class DecoderOption:
    """A keyword a decoder takes beyond its sizes (a run's ``architecture_options``), declared once: the
    CLI's ``--option``, its help and its bounds come from here."""

    kind: type  # int or float
    default: float
    help: str
    low: float | None = None
    high: float | None = None
    high_open: bool = False  # the bound ``high`` itself is not allowed

    def check(self, name: str, value: object) -> float:
        if self.kind is int:
            return integer(name, value, self.low, self.high)
        return real(name, value, self.low, self.high, high_open=self.high_open)


class Decoder(nn.Module):
    """Base class of the attention decoders (hidden/embedding sizes as in the paper: 512): the word
    embedding ``W_e``, dropout and the output layer ``fc``. Subclasses add their LSTM(s), their
    attention and ``prepare`` (grid -> ``GridMemory``)."""

    default_dropout = 0.5  # the papers' (training recipes use it unless told otherwise)
    options: dict[str, DecoderOption] = {}  # keyword arguments beyond the sizes (a run's architecture_options)
    # a decoder trains on an encoder's cached grid features; an architecture that learns its own
    # encoder from the pixels (vit-gpt2) says ``trained_from_pixels = True``
    trained_from_pixels = False

    @staticmethod
    def check_installed() -> None:
        """Raise ``MissingExtra`` naming the extra an architecture needs; these decoders need none."""

    def __init__(
        self,
        vocab_size: int,
        feature_channels: int,
        hidden_size: int = 512,
        embed_size: int = 512,
        attention_size: int | None = None,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if min(hidden_size, embed_size, attention_size or hidden_size) < 1 or not 0 <= dropout < 1:
            raise ValueError(f"hidden, embedding and attention sizes must be ≥ 1 and dropout in [0, 1), got "
                             f"{hidden_size}, {embed_size}, {attention_size}, {dropout}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.embed_size = embed_size
        self.attention_size = attention_size or hidden_size
        self.embedding = nn.Embedding(vocab_size, embed_size)  # W_e
        self.build_input_layers(feature_channels)  # here, so parameters are drawn in a fixed order
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_size, vocab_size)

    def build_input_layers(self, feature_channels: int) -> None:
        """Layers between the grid and the steps that a family of decoders shares (none here)."""

    def prepare(self, grid: torch.Tensor) -> GridMemory:
        """grid [B, C, h, w] -> what the steps attend to (computed once per image)."""
        raise NotImplementedError

    def initial_state(self, memory: GridMemory) -> tuple:
        raise NotImplementedError

    def step(self, memory: GridMemory, words: torch.Tensor, state: tuple) -> StepOutput:
        """One time step: words [B] (the previous token) -> scores for the next token."""
        raise NotImplementedError

    def forward(self, grid: torch.Tensor, token_ids: torch.Tensor) -> DecoderOutput:
        """Teacher forcing: token_ids [B, T] start with <start>; returns scores for tokens 1..T."""
        memory = self.prepare(grid)
        state = self.initial_state(memory)
        logits, alphas, betas = [], [], []
        for t in range(token_ids.shape[1]):
            out = self.step(memory, token_ids[:, t], state)
            state = out.state
            logits.append(out.logits)
            alphas.append(out.alpha)
            betas.append(out.beta)
        return DecoderOutput(torch.stack(logits, dim=1), torch.stack(alphas, dim=1),
                             None if betas[0] is None else torch.stack(betas, dim=1))

    @staticmethod
    def reorder_state(state: tuple, index: torch.Tensor) -> tuple:
        """Select batch rows of every state tensor (beam search keeps the surviving beams)."""
        return type(state)(*(tensor.index_select(0, index) for tensor in state))


class GridAttentionDecoder(Decoder):
    """The papers' two captioners: the grid projection ``V, v_g`` (Section 4), an ``AdaptiveAttention``
    as ``self.attention`` and the output ``fc(ĉ_t + h_t)``.

    ``global_dropout`` (training only; default 0, the papers' recipe): the global image feature v_g is
    zeroed for this share of the images of each training batch (not rescaled), so that the decoder
    has to find what it names through its attention over the cells rather than read it off v_g. At
    inference v_g is always given: the architecture is the papers'."""

    options = {"global_dropout": DecoderOption(
        float, 0.0, "zero the global image feature v_g for this share of each training batch, so the decoder must "
        "find objects through its attention (the demo: 0.7; the papers: 0)", 0, 1, high_open=True)}

    def __init__(self, vocab_size: int, feature_channels: int, global_dropout: float = 0.0, **sizes) -> None:
        global_dropout = self.options["global_dropout"].check("global_dropout", global_dropout)
        super().__init__(vocab_size, feature_channels, **sizes)
        self.global_dropout = float(global_dropout)

    def build_input_layers(self, feature_channels: int) -> None:
        self.projection = GridProjection(feature_channels, self.hidden_size)  # W_a, W_b
        self.output_sum = Sum()  # ĉ_t ⊕ h_t

    def prepare(self, grid: torch.Tensor) -> GridMemory:
        """grid [B, C, h, w] -> V [B, L, D], v_g [B, D] and the attention keys W_v V [B, L, A]."""
        cells, global_feature = self.projection(grid)
        if self.training and self.global_dropout > 0:
            given = torch.rand(global_feature.shape[0], 1, device=global_feature.device) >= self.global_dropout
            global_feature = global_feature * given.to(global_feature.dtype)  # v_g [B, D], withheld rows 0
        return GridMemory(cells, global_feature, self.attention.cell_keys(cells))

    def predict(self, context: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The word scores ``fc(ĉ_t + h_t)`` [B, V] (Algorithm 1, lines 1-2)."""
        return self.fc(self.dropout(self.output_sum(context, hidden)))
