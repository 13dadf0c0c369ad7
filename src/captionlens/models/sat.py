"""Show, Attend and Tell (Xu et al. 2015, soft attention) in the layout of the widely used PyTorch
tutorial (sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning, ``models.py``), so its checkpoints import
unchanged (``captionlens import sat-tutorial``). The encoder's cells ``a_i`` are attended directly
(no projection), the LSTM starts from the image and a gate scales the context:

    ā             = (1/L) Σ_i a_i                                      mean of the grid (§3.1.2)
    h_0, c_0      = f_init,h(ā), f_init,c(ā)                           init_h, init_c
    e_ti          = w_a · ReLU(W_a a_i + W_h h_{t-1})                  eq. (4), f_att
    α_t           = softmax(e_t)                                       eq. (5)
    z_t           = σ(f_β(h_{t-1})) ⊙ Σ_i α_ti a_i                     eq. (6) with the gating scalar (§4.2.1)
    h_t, c_t      = LSTM([E y_{t-1}; z_t], h_{t-1}, c_{t-1})           eq. (1)-(3)
    scores_t      = fc(dropout(h_t))

LRP: the gate and the attention weights get no relevance (they are the coefficients of products
and of the weighted sum, eq. (8) of the journal paper); relevance reaches the image through the
context at every step *and* through ``h_0, c_0`` (ε-rule through init_h/init_c and the mean).
There is no visual sentinel, so β-based scores are not defined for this architecture.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .decoder import Decoder, StepOutput
from .layers import GateProduct, GridMean, GridMemory, LSTMCell, LSTMState, WeightedSum
from .registry import register_architecture


class SATState(NamedTuple):
    hidden: torch.Tensor  # h_t [B, D]
    memory: torch.Tensor  # c_t [B, D]


class SoftAttention(nn.Module):
    """Deterministic soft attention over the encoder's cells (eq. (4)-(6)) with the gating scalar."""

    def __init__(self, feature_channels: int, hidden_size: int, attention_size: int) -> None:
        super().__init__()
        self.encoder_att = nn.Linear(feature_channels, attention_size)  # W_a
        self.decoder_att = nn.Linear(hidden_size, attention_size)  # W_h
        self.full_att = nn.Linear(attention_size, 1)  # w_a
        self.score_relu = nn.ReLU()
        self.combine = WeightedSum()  # Σ_i α_i a_i
        self.f_beta = nn.Linear(hidden_size, feature_channels)  # gate f_β
        self.gate_product = GateProduct()  # σ(f_β(h)) ⊙ context

    def cell_keys(self, cells: torch.Tensor) -> torch.Tensor:
        """``W_a a_i`` [B, L, A]: constant over time steps."""
        return self.encoder_att(cells)

    def forward(self, memory: GridMemory, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # memory.cells a [B, L, C], memory.cell_keys [B, L, A], hidden h_{t-1} [B, D]
        query = self.decoder_att(hidden).unsqueeze(1)  # [B, 1, A]
        scores = self.full_att(self.score_relu(memory.cell_keys + query)).squeeze(2)  # e_t [B, L]
        alpha = torch.softmax(scores, dim=1)  # α_t [B, L]
        context = self.combine(alpha, memory.cells)  # Σ α_i a_i [B, C]
        gate = torch.sigmoid(self.f_beta(hidden))  # [B, C]
        return self.gate_product(gate, context), alpha  # z_t [B, C], α_t [B, L]


@register_architecture("sat")
class SATDecoder(Decoder):
    def __init__(self, vocab_size: int, feature_channels: int, **sizes) -> None:
        super().__init__(vocab_size, feature_channels, **sizes)
        d = self.hidden_size
        self.mean = GridMean()
        self.init_h = nn.Linear(feature_channels, d)  # f_init,h
        self.init_c = nn.Linear(feature_channels, d)  # f_init,c
        self.attention = SoftAttention(feature_channels, d, self.attention_size)
        self.lstm = LSTMCell(self.embed_size + feature_channels, d)

    def prepare(self, grid: torch.Tensor) -> GridMemory:
        """grid [B, C, h, w] -> a [B, L, C], ā [B, C] and the attention keys W_a a [B, L, A]."""
        cells = grid.flatten(2).transpose(1, 2)  # a_i [B, L=h*w, C]
        return GridMemory(cells, self.mean(cells), self.attention.cell_keys(cells))

    def initial_state(self, memory: GridMemory) -> SATState:
        return SATState(self.init_h(memory.global_feature), self.init_c(memory.global_feature))  # h_0, c_0 [B, D]

    def step(self, memory: GridMemory, words: torch.Tensor, state: SATState) -> StepOutput:
        context, alpha = self.attention(memory, state.hidden)  # z_t [B, C], α_t [B, L]
        x = torch.cat([self.embedding(words), context], dim=1)  # [E y_{t-1}; z_t] [B, E+C]
        lstm_state, _ = self.lstm(x, LSTMState(state.hidden, state.memory))
        logits = self.fc(self.dropout(lstm_state.hidden))  # [B, V]
        return StepOutput(logits, SATState(*lstm_state), alpha, None)
