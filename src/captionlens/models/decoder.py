"""What every captioning decoder shares: the teacher-forced loop over time steps, the word
embedding, the grid projection and the output layer ``fc(ĉ_t + h_t)``. Architectures implement
``initial_state`` and ``step``; beam search and the explainers only use this interface."""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .layers import GridMemory, GridProjection, Sum


class StepOutput(NamedTuple):
    logits: torch.Tensor  # [B, V] pre-softmax fc output
    state: tuple  # the architecture's recurrent state, a NamedTuple of [B, D] tensors
    alpha: torch.Tensor  # attention over grid cells α_t [B, L]
    beta: torch.Tensor  # sentinel weight β_t [B]


class DecoderOutput(NamedTuple):
    logits: torch.Tensor  # [B, T, V]; logits[:, t] scores token t+1
    alpha: torch.Tensor  # [B, T, L]
    beta: torch.Tensor  # [B, T]


class Decoder(nn.Module):
    """Base class of the attention decoders (hidden/embedding sizes as in the paper: 512).
    Subclasses add their LSTM(s) and ``self.attention`` (an ``AdaptiveAttention``)."""

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
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.embed_size = embed_size
        self.attention_size = attention_size or hidden_size
        self.embedding = nn.Embedding(vocab_size, embed_size)  # W_e
        self.projection = GridProjection(feature_channels, hidden_size)  # W_a, W_b
        self.dropout = nn.Dropout(dropout)
        self.output_sum = Sum()  # ĉ_t ⊕ h_t
        self.fc = nn.Linear(hidden_size, vocab_size)

    def prepare(self, grid: torch.Tensor) -> GridMemory:
        """grid [B, C, h, w] -> V [B, L, D], v_g [B, D] and the attention keys W_v V [B, L, A]."""
        cells, global_feature = self.projection(grid)
        return GridMemory(cells, global_feature, self.attention.cell_keys(cells))

    def initial_state(self, memory: GridMemory) -> tuple:
        raise NotImplementedError

    def step(self, memory: GridMemory, words: torch.Tensor, state: tuple) -> StepOutput:
        """One time step: words [B] (the previous token) -> scores for the next token."""
        raise NotImplementedError

    def predict(self, context: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The word scores ``fc(ĉ_t + h_t)`` [B, V] (Algorithm 1, lines 1-2)."""
        return self.fc(self.dropout(self.output_sum(context, hidden)))

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
        return DecoderOutput(
            torch.stack(logits, dim=1), torch.stack(alphas, dim=1), torch.stack(betas, dim=1)
        )

    @staticmethod
    def reorder_state(state: tuple, index: torch.Tensor) -> tuple:
        """Select batch rows of every state tensor (beam search keeps the surviving beams)."""
        return type(state)(*(tensor.index_select(0, index) for tensor in state))
