"""The adaptive attention captioner (Lu et al. 2017, "Knowing when to look") as the papers use it:
one LSTM with a visual sentinel and the adaptive module (appendix Fig. 8, Algorithm 2).

    x_t      = [W_e w_{t-1}; v_g]                          sequential input
    h_t, m_t = LSTM(x_t, h_{t-1}, m_{t-1})
    s_t      = σ(W_x x_t + W_h h_{t-1}) ⊙ tanh(m_t)         eq. (1)
    ĉ_t, α_t, β_t = adaptive module(V, s_t, h_t)          eq. (2)-(7)
    scores_t = fc(ĉ_t + h_t)
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .decoder import GridAttentionDecoder, StepOutput
from .layers import AdaptiveAttention, GridMemory, LSTMCell, LSTMState
from .registry import register_architecture


class AdaptiveState(NamedTuple):
    hidden: torch.Tensor  # h_t [B, D]
    memory: torch.Tensor  # m_t [B, D]


@register_architecture("adaptive")
class AdaptiveDecoder(GridAttentionDecoder):
    def __init__(self, vocab_size: int, feature_channels: int, **sizes) -> None:
        super().__init__(vocab_size, feature_channels, **sizes)
        self.lstm = LSTMCell(self.embed_size + self.hidden_size, self.hidden_size, sentinel=True)
        self.attention = AdaptiveAttention(self.hidden_size, self.attention_size)

    def initial_state(self, memory: GridMemory) -> AdaptiveState:
        return AdaptiveState(*self.lstm.initial_state(memory.cells.shape[0], memory.cells))

    def step(self, memory: GridMemory, words: torch.Tensor, state: AdaptiveState) -> StepOutput:
        x = torch.cat([self.embedding(words), memory.global_feature], dim=1)  # x_t [B, E+D]
        lstm_state, sentinel = self.lstm(x, LSTMState(state.hidden, state.memory))  # h_t, m_t, s_t
        context, alpha, beta = self.attention(memory, sentinel, lstm_state.hidden)  # ĉ_t [B, D]
        logits = self.predict(context, lstm_state.hidden)  # fc(ĉ_t + h_t) [B, V]
        return StepOutput(logits, AdaptiveState(*lstm_state), alpha, beta)
