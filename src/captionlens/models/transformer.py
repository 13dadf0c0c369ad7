"""A transformer captioner (Vaswani et al. 2017, pre-LN layers as in Xiong et al. 2020; the grid
encoder of e.g. Huang et al. 2019 without its refinements), explained like the LSTM captioners:
every operation LRP treats with its own rule is a module of ``layers.py``.

    x_i      = W_c a_i ⊕ P_cell(r_i, c_i)                     cells a_i of the CNN grid, learned 2-D positions
    x_i      ← x_i ⊕ SelfAttention(LN(x_i)),  x_i ← x_i ⊕ FF(LN(x_i))      × encoder_layers (0 by default)
    M        = LN(x)                                          the memory the words attend to [B, L, D]
    y_t      = W_e w_t ⊕ P_word(t)                            <start>, w_1, ... fed one position each
    for each of the ``layers`` decoder layers:
      y_t    ← y_t ⊕ SelfAttention(LN(y_t) | LN(y_{≤t}))      causal
      y_t    ← y_t ⊕ CrossAttention(LN(y_t) | M)             α over the L cells
      y_t    ← y_t ⊕ FF(LN(y_t)),  FF(u) = W_2 GELU(W_1 u)
    scores_t = fc(LN(y_t))                                    scores for w_{t+1}

Attention (``MultiHeadAttention``): ``softmax(s · q kᵀ) v`` per head, q, k, v and the output linear
projections. The reported α of a step is the last layer's cross-attention averaged over heads.
Teacher forcing runs all positions at once; ``step`` (beam search) keeps each layer's keys and values
of the words so far (``use_cache``; without it every step re-runs the whole prefix, the same result).

LRP (``explain/rules.py``): linear layers and the ⊕ residual sums ε; LayerNorm with its scale held
constant; GELU identity; attention weights constant (``attention_rule="cp"``, eq. (8) of the journal
paper) or AttnLRP's rules (``"attnlrp"``, Achtibat et al. 2024). Relevance reaching the positional
embeddings is reported apart (``exp.extra["positions"]``). There is no visual sentinel (β).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from .decoder import Decoder, DecoderOption, DecoderOutput, StepOutput
from .layers import AttentionScores, AttentionWeights, GridPositions, LearnedPositions, Sum, WeightedSum
from .registry import register_architecture

MAX_WORDS = 64  # learned word positions: captions (with <start>) up to this many tokens
MAX_GRID = 32  # learned grid positions: grids up to 32 × 32 cells
MAX_LAYERS = 256  # more is a typo (a billion layers would only run out of memory slowly)


class MultiHeadAttention(nn.Module):
    """``softmax(q kᵀ / √d_k) v`` over ``heads`` heads of size d_k = D / heads, then a linear output.
    ``kind`` ("self", "cross" or "encoder") tells attention rollout how the layer mixes positions."""

    def __init__(self, size: int, heads: int, kind: str) -> None:
        super().__init__()
        if size % heads:
            raise ValueError(f"d_model {size} is not divisible by {heads} heads")
        self.heads, self.kind = heads, kind
        self.query = nn.Linear(size, size)
        self.key = nn.Linear(size, size)
        self.value = nn.Linear(size, size)
        self.output = nn.Linear(size, size)
        self.scores = AttentionScores(1 / math.sqrt(size // heads))
        self.weights = AttentionWeights(dim=-1)
        self.mix = WeightedSum()  # Σ_j α_ij v_j per head

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, D] -> [B, H, S, D/H]."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)

    def keys_values(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """source [B, N, D] -> keys, values [B, H, N, D/H] (computed once for a fixed memory)."""
        return self.split(self.key(source)), self.split(self.value(source))

    def forward(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                causal: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        # x [B, Q, D], keys/values [B, H, N, D/H] -> output [B, Q, D], weights α [B, H, Q, N]
        alpha = self.weights(self.scores(self.split(self.query(x)), keys, causal))
        context = self.mix(alpha, values)  # [B, H, Q, D/H]
        return self.output(context.transpose(1, 2).flatten(2)), alpha


class FeedForward(nn.Module):
    """The pre-LN feed-forward sublayer both layer kinds end with, ``x ⊕ W_2 GELU(W_1 LN(x))`` with
    dropout. LRP: LayerNorm with σ held constant, ε through both linear layers and the residual ⊕,
    identity through GELU."""

    def __init__(self, size: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(size)
        self.expand = nn.Linear(size, hidden)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.contract = nn.Linear(hidden, size)
        self.residual = Sum()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, N, D] -> [B, N, D]
        hidden = self.dropout(self.activation(self.expand(self.norm(x))))  # [B, N, 4D]
        return self.residual(x, self.dropout(self.contract(hidden)))


class EncoderLayer(nn.Module):
    """Pre-LN self-attention over the grid cells and a feed-forward block, each with a residual ⊕."""

    def __init__(self, size: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attention_norm = nn.LayerNorm(size)
        self.attention = MultiHeadAttention(size, heads, "encoder")
        self.attention_residual = Sum()
        self.feedforward = FeedForward(size, 4 * size, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, L, D]
        u = self.attention_norm(x)
        attended, _ = self.attention(u, *self.attention.keys_values(u))
        return self.feedforward(self.attention_residual(x, self.dropout(attended)))


class DecoderLayer(nn.Module):
    """Pre-LN causal self-attention over the words, cross-attention to the cells, feed-forward."""

    def __init__(self, size: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self_norm = nn.LayerNorm(size)
        self.self_attention = MultiHeadAttention(size, heads, "self")
        self.self_residual = Sum()
        self.cross_norm = nn.LayerNorm(size)
        self.cross_attention = MultiHeadAttention(size, heads, "cross")
        self.cross_residual = Sum()
        self.feedforward = FeedForward(size, 4 * size, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, y: torch.Tensor, cell_keys: torch.Tensor, cell_values: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        # y [B, Q, D] (the newest Q positions), cell keys/values [B, H, L, D/H], past: the earlier
        # positions' self-attention keys/values [B, H, t, D/H] -> y [B, Q, D], cross-attention
        # α [B, H, Q, L] and the keys/values of all t+Q positions
        u = self.self_norm(y)
        keys, values = self.self_attention.keys_values(u)
        if past is not None:
            keys, values = torch.cat([past[0], keys], dim=2), torch.cat([past[1], values], dim=2)
        attended, _ = self.self_attention(u, keys, values, causal=y.shape[1] > 1)
        y = self.self_residual(y, self.dropout(attended))
        looked, alpha = self.cross_attention(self.cross_norm(y), cell_keys, cell_values)
        y = self.cross_residual(y, self.dropout(looked))
        return self.feedforward(y), alpha, keys, values


class TransformerMemory(NamedTuple):
    """The encoded cells and every decoder layer's cross-attention keys and values (once per image)."""

    cells: torch.Tensor  # M [B, L, D]
    keys: torch.Tensor  # [B, layers, H, L, D/H]
    values: torch.Tensor  # [B, layers, H, L, D/H]


class TransformerState(NamedTuple):
    """What ``step`` carries: the tokens fed so far and each layer's self-attention keys and values."""

    tokens: torch.Tensor  # [B, t] long
    keys: torch.Tensor  # [B, layers, H, t, D/H]
    values: torch.Tensor  # [B, layers, H, t, D/H]


@register_architecture("transformer")
class TransformerDecoder(Decoder):
    """``hidden_size`` is d_model; ``embed_size`` ≠ d_model adds a linear map from the word embedding.
    ``layers``, ``heads`` and ``encoder_layers`` come from the run's ``architecture_options``."""

    default_dropout = 0.1
    options = {
        "layers": DecoderOption(int, 3, "decoder layers", 1, MAX_LAYERS),
        "heads": DecoderOption(int, 8, "attention heads, dividing the model width (hidden size)", 1, 4096),
        "encoder_layers": DecoderOption(int, 0, "self-attention layers over the grid cells", 0, MAX_LAYERS),
    }

    def __init__(self, vocab_size: int, feature_channels: int, hidden_size: int = 512, embed_size: int = 512,
                 attention_size: int | None = None, dropout: float = 0.1, layers: int = 3, heads: int = 8,
                 encoder_layers: int = 0) -> None:
        layers, heads, encoder_layers = (self.options[name].check(name, value) for name, value in
                                         (("layers", layers), ("heads", heads), ("encoder_layers", encoder_layers)))
        super().__init__(vocab_size, feature_channels, hidden_size, embed_size, attention_size, dropout)
        self.layer_count, self.heads = layers, heads
        d = hidden_size
        self.embed_projection = nn.Identity() if embed_size == d else nn.Linear(embed_size, d, bias=False)
        self.word_positions = LearnedPositions(MAX_WORDS, d)
        self.word_sum = Sum()  # W_e w_t ⊕ P_word(t)
        self.encoder_layers = nn.ModuleList(EncoderLayer(d, heads, dropout) for _ in range(encoder_layers))
        self.memory_norm = nn.LayerNorm(d)
        self.layers = nn.ModuleList(DecoderLayer(d, heads, dropout) for _ in range(layers))
        self.output_norm = nn.LayerNorm(d)
        self.use_cache = True

    def build_input_layers(self, feature_channels: int) -> None:
        self.cell_projection = nn.Linear(feature_channels, self.hidden_size)  # W_c
        self.cell_positions = GridPositions(MAX_GRID, self.hidden_size)
        self.cell_sum = Sum()  # W_c a_i ⊕ P_cell

    def prepare(self, grid: torch.Tensor) -> TransformerMemory:
        """grid [B, C, h, w] -> the memory and each layer's cross-attention keys and values."""
        cells = self.cell_projection(grid.flatten(2).transpose(1, 2))  # [B, L, D]
        x = self.cell_sum(cells, self.cell_positions(cells, *grid.shape[2:]))
        for layer in self.encoder_layers:
            x = layer(x)
        memory = self.memory_norm(x)  # M [B, L, D]
        keys, values = zip(*(layer.cross_attention.keys_values(memory) for layer in self.layers))
        return TransformerMemory(memory, torch.stack(keys, 1), torch.stack(values, 1))

    def embed(self, token_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """token_ids [B, S] at positions offset.. -> y [B, S, D]."""
        words = self.embed_projection(self.embedding(token_ids))
        return self.dropout(self.word_sum(words, self.word_positions(words, offset)))

    def decode(self, memory: TransformerMemory, y: torch.Tensor, past: TransformerState | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decoder layers on the newest positions y [B, Q, D] (after ``past``'s, whose keys and
        values are reused): logits [B, Q, V], α [B, Q, L], and every layer's keys and values of all
        positions [B, layers, H, t+Q, D/H]."""
        all_keys, all_values = [], []
        for index, layer in enumerate(self.layers):
            earlier = None if past is None else (past.keys[:, index], past.values[:, index])
            y, alpha, keys, values = layer(y, memory.keys[:, index], memory.values[:, index], earlier)
            all_keys.append(keys)
            all_values.append(values)
        logits = self.fc(self.dropout(self.output_norm(y)))  # [B, Q, V]
        return logits, alpha.mean(dim=1), torch.stack(all_keys, 1), torch.stack(all_values, 1)

    def forward(self, grid: torch.Tensor, token_ids: torch.Tensor) -> DecoderOutput:
        """Teacher forcing, all positions at once: token_ids [B, T] -> logits [B, T, V], α [B, T, L]."""
        logits, alpha, _, _ = self.decode(self.prepare(grid), self.embed(token_ids))
        return DecoderOutput(logits, alpha, None)

    def initial_state(self, memory: TransformerMemory) -> TransformerState:
        batch, size = memory.cells.shape[0], self.hidden_size // self.heads
        empty = memory.cells.new_zeros(batch, self.layer_count, self.heads, 0, size)
        return TransformerState(torch.zeros(batch, 0, dtype=torch.long, device=memory.cells.device), empty, empty)

    def step(self, memory: TransformerMemory, words: torch.Tensor, state: TransformerState) -> StepOutput:
        tokens = torch.cat([state.tokens, words.unsqueeze(1)], dim=1)  # [B, t+1]
        if self.use_cache:  # only the new position runs; the earlier ones' keys and values are reused
            logits, alpha, keys, values = self.decode(memory, self.embed(words.unsqueeze(1), state.tokens.shape[1]),
                                                      state)
        else:  # the whole prefix again (the reference the cache must equal)
            logits, alpha, keys, values = self.decode(memory, self.embed(tokens))
        return StepOutput(logits[:, -1], TransformerState(tokens, keys, values), alpha[:, -1], None)
