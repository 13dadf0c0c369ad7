"""The grid-TD captioner (the papers' Fig. 2): a top-down attention LSTM that emits the visual
sentinel, the adaptive module, and a language LSTM, on grid features instead of BUTD's regions.

    x¹_t          = [W_e w_{t-1}; v_g; h²_{t-1}]                 top-down input
    h¹_t, m¹_t    = TopDownLSTM(x¹_t, h¹_{t-1}, m¹_{t-1})
    s_t           = σ(W_x x¹_t + W_h h¹_{t-1}) ⊙ tanh(m¹_t)        eq. (1)
    ĉ_t, α_t, β_t = adaptive module(V, s_t, h¹_t)                eq. (2)-(7)
    h²_t, m²_t    = LanguageLSTM([ĉ_t; h¹_t], h²_{t-1}, m²_{t-1})
    scores_t      = fc(ĉ_t + h²_t)                               Algorithm 1, lines 1-2
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .decoder import GridAttentionDecoder, StepOutput
from .layers import AdaptiveAttention, GridMemory, LSTMCell, LSTMState
from .registry import register_architecture


class GridTDState(NamedTuple):
    top_hidden: torch.Tensor  # h¹_t [B, D]
    top_memory: torch.Tensor  # m¹_t [B, D]
    language_hidden: torch.Tensor  # h²_t [B, D]
    language_memory: torch.Tensor  # m²_t [B, D]


@register_architecture("gridtd")
class GridTDDecoder(GridAttentionDecoder):
    def __init__(self, vocab_size: int, feature_channels: int, **sizes) -> None:
        super().__init__(vocab_size, feature_channels, **sizes)
        d = self.hidden_size
        self.top_down_lstm = LSTMCell(self.embed_size + 2 * d, d, sentinel=True)
        self.attention = AdaptiveAttention(d, self.attention_size)
        self.language_lstm = LSTMCell(2 * d, d)

    def initial_state(self, memory: GridMemory) -> GridTDState:
        batch = memory.cells.shape[0]
        return GridTDState(
            *self.top_down_lstm.initial_state(batch, memory.cells),
            *self.language_lstm.initial_state(batch, memory.cells),
        )

    def step(self, memory: GridMemory, words: torch.Tensor, state: GridTDState) -> StepOutput:
        x_top = torch.cat(
            [self.embedding(words), memory.global_feature, state.language_hidden], dim=1
        )  # x¹_t [B, E+2D]
        top, sentinel = self.top_down_lstm(x_top, LSTMState(state.top_hidden, state.top_memory))
        context, alpha, beta = self.attention(memory, sentinel, top.hidden)  # ĉ_t [B, D]
        language, _ = self.language_lstm(
            torch.cat([context, top.hidden], dim=1),  # [ĉ_t; h¹_t] [B, 2D]
            LSTMState(state.language_hidden, state.language_memory),
        )
        logits = self.predict(context, language.hidden)  # fc(ĉ_t + h²_t) [B, V]
        return StepOutput(logits, GridTDState(*top, *language), alpha, beta)
