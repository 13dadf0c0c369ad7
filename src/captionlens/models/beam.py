"""Beam search batched across images (the papers decode with beam size 3); beam size 1 is greedy.

Scores are summed log-probabilities. At each step the K best candidates are ranked; one that emits
``<end>`` among them finishes (the best finished caption per image is kept), and the K best that do
not end live on. Decoding stops once no live beam can beat the finished caption (log-probabilities
are ≤ 0), or at ``max_length``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .decoder import Decoder


class Hypothesis(NamedTuple):
    token_ids: list[int]  # the words and the final <end> (without <start>)
    score: float  # sum of log-probabilities


@torch.no_grad()
def beam_search(
    decoder: Decoder,
    grid: torch.Tensor,
    start_id: int,
    end_id: int,
    beam_size: int = 3,
    max_length: int = 20,
    banned: tuple[int, ...] = (),
) -> list[Hypothesis]:
    """The best caption for each image of ``grid`` [B, C, h, w]; tokens in ``banned`` (<pad>,
    <start>) are never generated."""
    if beam_size < 1 or max_length < 1:
        raise ValueError("beam_size and max_length must be ≥ 1")
    batch, k = grid.shape[0], beam_size
    device = grid.device
    memory = decoder.prepare(grid)
    memory = type(memory)(*(t.repeat_interleave(k, dim=0) for t in memory))  # [B*K, ...]
    state = decoder.initial_state(memory)
    words = torch.full((batch * k,), start_id, dtype=torch.long, device=device)  # [B*K]
    scores = torch.full((batch, k), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live beam at the start, so the first step has no duplicates
    sequences = torch.empty(batch, k, 0, dtype=torch.long, device=device)  # [B, K, t]
    best_score = torch.full((batch,), float("-inf"), device=device)
    best_sequence = torch.full((batch, max_length), end_id, dtype=torch.long, device=device)
    best_length = torch.zeros(batch, dtype=torch.long, device=device)
    offsets = (torch.arange(batch, device=device) * k).unsqueeze(1)  # [B, 1]

    for t in range(max_length):
        out = decoder.step(memory, words, state)
        log_probs = torch.log_softmax(out.logits, dim=-1).view(batch, k, -1)  # [B, K, V]
        if banned:
            log_probs[:, :, list(banned)] = float("-inf")
        candidates = (scores.unsqueeze(2) + log_probs).view(batch, -1)  # [B, K*V]
        vocab = log_probs.shape[2]
        # The 2K best candidates hold at least K that do not end (one <end> per beam at most).
        top_scores, top_index = candidates.topk(2 * k, dim=1)  # [B, 2K]
        ends = top_index % vocab == end_id
        # A caption finishes when its <end> ranks among the K best; the best finished one is kept.
        rank = torch.arange(2 * k, device=device).unsqueeze(0)
        finishing = torch.where(ends & (rank < k), top_scores, torch.full_like(top_scores, float("-inf")))
        end_score, end_position = finishing.max(dim=1)  # [B]
        better = end_score > best_score
        if better.any():
            rows = better.nonzero().squeeze(1)
            beams = top_index[rows, end_position[rows]] // vocab
            best_score[rows] = end_score[rows]
            best_sequence[rows, :t] = sequences[rows, beams]
            best_length[rows] = t + 1
        # The K best candidates that do not end live on.
        live = torch.where(ends, torch.full_like(top_scores, float("-inf")), top_scores)
        scores, keep = live.topk(k, dim=1)  # [B, K]
        flat = top_index.gather(1, keep)
        origin, words = flat // vocab, flat % vocab  # [B, K]
        sequences = torch.cat([sequences.gather(1, origin.unsqueeze(2).expand(-1, -1, t)),
                               words.unsqueeze(2)], dim=2)  # [B, K, t+1]
        state = decoder.reorder_state(out.state, (offsets + origin).view(-1))
        words = words.view(-1)
        if bool((best_score >= scores[:, 0]).all()):
            break

    hypotheses = []
    for b in range(batch):
        if best_length[b] > 0:
            ids = best_sequence[b, : best_length[b]].tolist()  # ends with <end>
            hypotheses.append(Hypothesis(ids, float(best_score[b])))
        else:  # no caption ended within max_length: the best live beam
            hypotheses.append(Hypothesis(sequences[b, 0].tolist(), float(scores[b, 0])))
    return hypotheses
