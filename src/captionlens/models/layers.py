"""Building blocks shared by the captioners, each a module of its own.

Every operation that LRP treats with its own rule is a separate ``nn.Module`` here (the ⊕ sums, the
gate products, the tanh on a signal path, the mean over grid cells, the attention's weighted sum).
The models' forward passes use exactly these modules, so an explainer can attach a rule to each of
them with hooks and run the *same* forward — never a second hand-written copy that could drift (a
published LRP implementation of these captioners re-implemented the forward and added a bias twice).

Papers: Sun et al., "Understanding Image Captioning Models beyond Visualizing Attention" (the ICML
paper, equations (1)-(8)) and its journal version (eq. (5)-(12)); Lu et al. 2017 (adaptive attention);
Arras et al. 2017 (LRP for LSTMs: which paths count as signal and which as gates).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F


class Sum(nn.Module):
    """Element-wise sum of several tensors of one shape: the ⊕ nodes of the papers' Fig. 2 and the
    memory-cell update ``c_t = f ⊙ c_{t-1} + i ⊙ g_t``. LRP: ε-rule, each term in proportion."""

    def forward(self, *terms: torch.Tensor) -> torch.Tensor:
        total = terms[0]
        for term in terms[1:]:
            total = total + term
        return total


class GateProduct(nn.Module):
    """``gate ⊙ signal`` where ``gate`` is a sigmoid gate. LRP-LSTM (Arras et al. 2017): the gate
    gets no relevance, the signal all of it."""

    def forward(self, gate: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        return gate * signal


class SignalTanh(nn.Tanh):
    """tanh on a signal path (cell input, ``tanh(c_t)``). LRP passes relevance through unchanged."""


class GridMean(nn.Module):
    """Mean over the L grid cells, ``(1/L) Σ_i a_i`` (Section 4). LRP: ε-rule (it is linear)."""

    def forward(self, cells: torch.Tensor) -> torch.Tensor:  # cells [B, L, C]
        return cells.mean(dim=1)  # [B, C]


class WeightedSum(nn.Module):
    """``Σ_i w_i x_i`` with attention weights ``w``: one query (weights [B, N], values [B, N, D] ->
    [B, D]) or many (weights [..., Q, N], values [..., N, D] -> [..., Q, D], e.g. multi-head
    attention). LRP treats the weights as the constant coefficients of a linear combination (eq. (8)):
    ε-rule on the values, nothing into the weights (``attention_rule="attnlrp"``: AttnLRP's rule)."""

    def forward(self, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        if weights.dim() == values.dim() - 1:  # one query: weights [B, N], values [B, N, D]
            return torch.einsum("bn,bnd->bd", weights, values)  # [B, D]
        return weights @ values  # [..., Q, N] @ [..., N, D] -> [..., Q, D]


class AttentionScores(nn.Module):
    """Scaled dot-product scores ``z_ij = s · q_i · k_j`` (Vaswani et al. 2017, s = 1/√d_k), with
    ``-inf`` above the diagonal when ``causal`` (position i sees keys j ≤ i). LRP: the scores feed
    attention weights, which get no relevance under ``attention_rule="cp"``; under ``"attnlrp"`` the
    bilinear product shares it (AttnLRP's uniform rule)."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, causal: bool = False) -> torch.Tensor:
        # queries [..., Q, d], keys [..., N, d] -> scores [..., Q, N]
        scores = (queries * self.scale) @ keys.transpose(-1, -2)
        if causal:
            q, n = scores.shape[-2:]
            future = torch.ones(q, n, dtype=torch.bool, device=scores.device).triu(n - q + 1)
            scores = scores.masked_fill(future, float("-inf"))
        return scores


class LearnedPositions(nn.Module):
    """Learned positional embeddings of a sequence, ``P[offset : offset + S]`` for every row of a
    batch (Vaswani et al. 2017, §3.5, the learned variant). The explainers read relevance at this
    module's output: what LRP gives to *where* a word or cell is, apart from *what* it is."""

    def __init__(self, count: int, size: int) -> None:
        super().__init__()
        self.count = count
        self.table = nn.Parameter(torch.empty(count, size))  # [count, D]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for table in self.parameters(recurse=False):
            nn.init.normal_(table, std=0.02)

    def forward(self, like: torch.Tensor, offset: int = 0) -> torch.Tensor:
        # like [B, S, D] -> the positions offset .. offset+S-1 [B, S, D]
        batch, length = like.shape[:2]
        if offset + length > self.count:
            raise ValueError(f"position {offset + length - 1} is beyond the {self.count} learned positions")
        return self.table[offset: offset + length].unsqueeze(0).expand(batch, -1, -1)


class GridPositions(LearnedPositions):
    """Learned 2-D positions of the grid cells: a row and a column embedding summed,
    ``P[r, c] = P_row[r] + P_col[c]``, in the cells' row-major order (up to ``count`` × ``count``)."""

    def __init__(self, count: int, size: int) -> None:
        super().__init__(count, size)
        self.columns = nn.Parameter(torch.empty(count, size))  # [count, D]
        nn.init.normal_(self.columns, std=0.02)

    def forward(self, like: torch.Tensor, height: int = 1, width: int = 1) -> torch.Tensor:
        # like [B, L=h*w, D] -> [B, L, D]
        if max(height, width) > self.count:
            raise ValueError(f"a {height}×{width} grid is beyond the {self.count}×{self.count} learned positions")
        table = (self.table[:height, None] + self.columns[None, :width]).reshape(height * width, -1)
        return table.unsqueeze(0).expand(like.shape[0], -1, -1)


class LSTMState(NamedTuple):
    hidden: torch.Tensor  # h_t [B, D]
    memory: torch.Tensor  # m_t (the memory cell) [B, D]


class LSTMCell(nn.Module):
    """An LSTM cell written out gate by gate, optionally with the visual sentinel of eq. (1).

    ``gates`` is one linear layer on ``[x_t; h_{t-1}]`` producing input, forget, output gates, the
    cell input and — with ``sentinel=True`` — the sentinel gate ``σ(W_x x_t + W_h h_{t-1})``.
    """

    def __init__(self, input_size: int, hidden_size: int, sentinel: bool = False) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.sentinel = sentinel
        chunks = 5 if sentinel else 4
        self.gates = nn.Linear(input_size + hidden_size, chunks * hidden_size)
        self.cell_input_tanh = SignalTanh()
        self.input_gate_product = GateProduct()
        self.forget_gate_product = GateProduct()
        self.memory_sum = Sum()
        self.memory_tanh = SignalTanh()
        self.output_gate_product = GateProduct()
        self.sentinel_gate_product = GateProduct() if sentinel else None

    @torch.no_grad()
    def load_torch_weights(self, weight_ih: torch.Tensor, weight_hh: torch.Tensor, bias_ih: torch.Tensor | None,
                           bias_hh: torch.Tensor | None) -> "LSTMCell":
        """Take the weights of PyTorch's ``nn.LSTMCell``/``nn.LSTM`` (gate blocks i, f, g, o):
        ``[W_ih | W_hh]`` side by side, the two biases summed, the blocks reordered to ours
        (i, f, o, g). Returns self."""
        h = self.hidden_size
        if self.sentinel or weight_ih.shape[0] != 4 * h:
            raise ValueError(f"expected LSTM weights of {4 * h} rows for a cell without sentinel, got {weight_ih.shape[0]}")
        order = torch.cat([torch.arange(0, 2 * h), torch.arange(3 * h, 4 * h), torch.arange(2 * h, 3 * h)])
        self.gates.weight.copy_(torch.cat([weight_ih, weight_hh], dim=1)[order])
        bias = weight_ih.new_zeros(4 * h) if bias_ih is None else bias_ih + bias_hh
        self.gates.bias.copy_(bias[order])
        return self

    def initial_state(self, batch_size: int, like: torch.Tensor) -> LSTMState:
        zeros = like.new_zeros(batch_size, self.hidden_size)
        return LSTMState(zeros, zeros)

    def forward(
        self, x: torch.Tensor, state: LSTMState
    ) -> tuple[LSTMState, torch.Tensor | None]:
        # x [B, I]; returns the new state and the sentinel s_t [B, D] (None without sentinel)
        pre = self.gates(torch.cat([x, state.hidden], dim=1))  # [B, chunks*D]
        parts = pre.split(self.hidden_size, dim=1)
        input_gate, forget_gate, output_gate = (torch.sigmoid(p) for p in parts[:3])
        cell_input = self.cell_input_tanh(parts[3])  # g_t [B, D]
        memory = self.memory_sum(
            self.forget_gate_product(forget_gate, state.memory),  # f ⊙ m_{t-1}
            self.input_gate_product(input_gate, cell_input),  # i ⊙ g_t
        )  # m_t [B, D]
        memory_signal = self.memory_tanh(memory)  # tanh(m_t) [B, D]
        hidden = self.output_gate_product(output_gate, memory_signal)  # h_t [B, D]
        sentinel = None
        if self.sentinel_gate_product is not None:
            # eq. (1): s_t = σ(W_x x_t + W_h h_{t-1}) ⊙ tanh(m_t)
            sentinel = self.sentinel_gate_product(torch.sigmoid(parts[4]), memory_signal)
        return LSTMState(hidden, memory), sentinel


class AdaptiveAttention(nn.Module):
    """The adaptive module (eq. (2)-(7); Lu et al. 2017): attention over the L grid cells and the
    visual sentinel.

    Since ``α̂ = softmax([a; b])`` gives ``α̂_i = (1-β_t) α_i`` for i ≤ L and ``α̂_{L+1} = β_t``, the
    context ``ĉ_t = (1-β_t) Σ α_i v_i + β_t s_t`` (eq. (7)) is one weighted sum of ``[V; s_t]`` with
    the weights ``α̂`` — exactly the linear combination that eq. (8) explains with the ε-rule.
    """

    def __init__(self, hidden_size: int, attention_size: int) -> None:
        super().__init__()
        self.feature_proj = nn.Linear(hidden_size, attention_size)  # W_v
        self.sentinel_proj = nn.Linear(hidden_size, attention_size)  # W_s
        self.hidden_proj = nn.Linear(hidden_size, attention_size)  # W_g
        self.score = nn.Linear(attention_size, 1)  # w_a
        self.score_tanh = nn.Tanh()
        self.combine = WeightedSum()

    def cell_keys(self, cells: torch.Tensor) -> torch.Tensor:
        """``W_v V`` [B, L, A]: constant over time steps, so computed once per image."""
        return self.feature_proj(cells)

    def forward(
        self, memory: "GridMemory", sentinel: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # memory.cells V [B, L, D], memory.cell_keys W_v V [B, L, A], sentinel s_t [B, D], hidden h_t [B, D]
        cells = memory.cells
        query = self.hidden_proj(hidden).unsqueeze(1)  # W_g h_t [B, 1, A]
        cell_scores = self.score(self.score_tanh(memory.cell_keys + query))  # eq. (2) [B, L, 1]
        sentinel_score = self.score(
            self.score_tanh(self.sentinel_proj(sentinel).unsqueeze(1) + query)
        )  # eq. (5) [B, 1, 1]
        scores = torch.cat([cell_scores, sentinel_score], dim=1).squeeze(2)  # [a; b] [B, L+1]
        weights = torch.softmax(scores, dim=1)  # α̂ (eq. (6)) [B, L+1]
        context = self.combine(weights, torch.cat([cells, sentinel.unsqueeze(1)], dim=1))  # ĉ_t [B, D]
        alpha = torch.softmax(cell_scores.squeeze(2), dim=1)  # α (eq. (3)) [B, L]
        beta = weights[:, -1]  # β_t [B]
        return context, alpha, beta


class GridMemory(NamedTuple):
    """What the decoder attends to: ``V`` and ``v_g`` (Section 4), and the attention keys ``W_v V``."""

    cells: torch.Tensor  # V = {v_i} [B, L, D]
    global_feature: torch.Tensor  # v_g [B, D]
    cell_keys: torch.Tensor  # W_v V [B, L, A]


class GridProjection(nn.Module):
    """``v_i = ReLU(W_a a_i)`` and ``v_g = ReLU(W_b (1/L) Σ_i a_i)`` on the encoder's grid (Section 4)."""

    def __init__(self, feature_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.cell_proj = nn.Linear(feature_channels, hidden_size)  # W_a
        self.global_proj = nn.Linear(feature_channels, hidden_size)  # W_b
        self.mean = GridMean()
        self.relu = nn.ReLU()

    def forward(self, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # grid A [B, C, h, w] from the CNN encoder
        cells = grid.flatten(2).transpose(1, 2)  # a_i [B, L=h*w, C]
        v = self.relu(self.cell_proj(cells))  # V [B, L, D]
        v_g = self.relu(self.global_proj(self.mean(cells)))  # v_g [B, D]
        return v, v_g


# ------------------------------------------------------------- the same operations, as modules
# Decoders written with standard PyTorch layers are explained by replacing those layers with these
# (``explain.canonize``); they are equally usable in a decoder of one's own.
ROLE = "_captionlens_role"  # attribute marking the output of a Gate ("gate") or AttentionWeights ("weights")

class ChannelAffine(nn.Module):
    """``y = x · scale + shift`` per channel (dim 1): an eval-mode batch-norm that follows no
    convolution. LRP: ε-rule (a diagonal linear layer)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, C, ...]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)


class Reduce(nn.Module):
    """Sum or mean over dimensions, ``z = Σ_i x_i`` (``/ n`` for a mean). LRP: ε-rule."""

    def forward(self, x: torch.Tensor, dim, keepdim: bool = False, mean: bool = False) -> torch.Tensor:
        return x.mean(dim=dim, keepdim=keepdim) if mean else x.sum(dim=dim, keepdim=keepdim)


class Gate(nn.Sigmoid):
    """A sigmoid whose output gates a product (``σ(·) ⊙ signal``): marked so the product becomes a
    ``GateProduct``. LRP: a gate receives no relevance."""

    role = "gate"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        setattr(out, ROLE, self.role)
        return out


class AttentionWeights(nn.Softmax):
    """A softmax whose output weighs values (``Σ_i α_i v_i``): marked so the product is the constant
    coefficient of a weighted sum (eq. (8)). LRP: attention weights receive no relevance."""

    role = "weights"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        setattr(out, ROLE, self.role)
        return out


class TFSamePad(nn.Module):
    """Zero padding so that a ``kernel``/``stride`` convolution gives ``ceil(n / stride)`` outputs
    (TensorFlow's "same"); the extra pixel of an odd total goes at the bottom/right. LRP: none
    needed — padded zeros receive no relevance and the ordinary backward crops."""

    def __init__(self, kernel: int, stride: int) -> None:
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, C, H + pad, W + pad]
        pads = []
        for size in (x.shape[-1], x.shape[-2]):  # F.pad lists the last dimension first
            total = max((math.ceil(size / self.stride) - 1) * self.stride + self.kernel - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads)
