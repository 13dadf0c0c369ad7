"""LRP-inference fine-tuning (ICML eq. (10)-(12); journal eq. (14)-(15), Table III) and its baselines.

For each training image the model's own caption is predicted and each of its words ``w_t`` that is
not a stop word is explained by LRP; ``E_t`` is the image explanation divided by its max |value|. The
weights over the vocabulary are ``m[h(w_t)] = 1 + mean(E_t)`` (1 for every other word), the
re-weighted scores ``p̂ = m ⊙ p`` and the loss on the reference caption

    L = λ · CE(p) + (1 − λ) · CE(p̂)                                            (eq. 12)

so a word the model predicts without image support (negative mean relevance) is pushed down. ``m`` is
recomputed for every batch from the current model, since the heatmaps change while tuning.

Baselines (journal Section IV-B-4): ``frequency`` uses ``1 + (share of the word's predictions on the
training set that are true positives)`` for object words instead of the LRP term; ``plain`` tunes with
CE alone for the same steps and samples.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
from torch import nn

from ..data.bundle import DataBundle
from ..data.images import decoded_batches, normalise
from ..explain import explain_batch
from ..models import Captioner
from ..pipeline import pad_captions
from .context import Predictions

MODES = ("lrp", "frequency", "plain")


@dataclass(frozen=True)
class FinetuneConfig:
    mode: str = "lrp"
    steps: int = 60
    batch_size: int = 32
    learning_rate: float = 1e-4
    lam: float = 0.5  # λ of eq. (12)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown fine-tuning mode {self.mode!r}; choose one of {MODES}")
        if not 0 <= self.lam <= 1 or self.steps < 1:
            raise ValueError("λ must lie in [0, 1] and steps be ≥ 1")


def true_positive_rates(predictions: Predictions) -> dict[str, float]:
    """Per object word: the share of its predicted occurrences that are true positives."""
    hits, totals = Counter(), Counter()
    for mention in predictions.mentions():
        totals[mention.word] += 1
        hits[mention.word] += mention.true_positive
    return {word: hits[word] / totals[word] for word in totals}


def lrp_weights(captioner: Captioner, pixels: torch.Tensor, stop_words: frozenset[str] = ENGLISH_STOP_WORDS) -> torch.Tensor:
    """m [B, V] of eq. (11) from the model's own captions of ``pixels``."""
    vocab = captioner.vocab
    weights = torch.ones(pixels.shape[0], len(vocab), device=pixels.device)
    captions = _captions(captioner, pixels)
    positions = [[t for t, w in enumerate(c.words) if w not in stop_words] for c in captions]
    explanations = explain_batch(captioner, list(_as_images(captioner, pixels)), captions, "lrp", words=positions)
    for b, explanation in enumerate(explanations):
        values: dict[int, list[float]] = {}
        for row, word in enumerate(explanation.words):
            heatmap = explanation.image[row]
            peak = heatmap.abs().max()
            mean = float(heatmap.mean() / peak) if peak > 0 else 0.0  # mean(E_t), E_t in [-1, 1]
            values.setdefault(vocab.index(word), []).append(mean)
        for index, means in values.items():
            weights[b, index] = 1 + float(np.mean(means))
    return weights


def frequency_weights(captioner: Captioner, pixels: torch.Tensor, rates: dict[str, float]) -> torch.Tensor:
    """The frequency-inference baseline: 1 + true-positive rate for the object words of each caption."""
    vocab = captioner.vocab
    weights = torch.ones(pixels.shape[0], len(vocab), device=pixels.device)
    for b, caption in enumerate(_captions(captioner, pixels)):
        for word in caption.words:
            if word in rates:
                weights[b, vocab.index(word)] = 1 + rates[word]
    return weights


@torch.no_grad()
def _captions(captioner: Captioner, pixels: torch.Tensor):
    was_training = captioner.model.training
    captioner.model.eval()
    grids = captioner.model.encoder(pixels)
    captions = captioner.caption_features(grids, beam_size=3)
    captioner.model.train(was_training)
    return captions


def _as_images(captioner: Captioner, pixels: torch.Tensor):
    """Undo the encoder's normalisation: [3, H, W] tensors in [0, 1] that ``explain_batch`` takes."""
    encoder = captioner.model.encoder
    mean = torch.tensor(encoder.mean, device=pixels.device).view(3, 1, 1)
    std = torch.tensor(encoder.std, device=pixels.device).view(3, 1, 1)
    return [(p * std + mean).clamp(0, 1).cpu() for p in pixels]


def reweighted_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, lam: float,
                    pad_id: int) -> torch.Tensor:
    """Eq. (12): λ·CE(p) + (1−λ)·CE(m ⊙ p); logits [B, T, V], targets [B, T], weights m [B, V]."""
    flat_targets = targets.reshape(-1)
    plain = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_targets, ignore_index=pad_id)
    reweighted = logits * weights.unsqueeze(1)  # p̂ = m ⊙ p at every step
    inferred = nn.functional.cross_entropy(reweighted.reshape(-1, logits.shape[-1]), flat_targets, ignore_index=pad_id)
    return lam * plain + (1 - lam) * inferred


def finetune(captioner: Captioner, data: DataBundle, config: FinetuneConfig,
             rates: dict[str, float] | None = None, progress: bool = True, workers: int = 0) -> Captioner:
    """A fine-tuned copy of ``captioner`` (the original is left unchanged); ``workers`` processes
    decode the training images ahead of the steps."""
    from tqdm import tqdm

    if config.mode == "frequency" and rates is None:
        raise ValueError("the frequency baseline needs the true-positive rates of the training predictions")
    tuned = Captioner(copy.deepcopy(captioner.model), captioner.vocab, captioner.config, captioner.device)
    decoder = tuned.model.decoder
    optimizer = torch.optim.Adam(decoder.parameters(), lr=config.learning_rate)
    records = data.split("train")
    if not records:
        raise ValueError(f"the training split of {data.name} has no images to fine-tune on")
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    vocab = tuned.vocab
    plan = []  # per step: the chosen training images and one reference caption of each
    for _ in range(config.steps):
        chosen = rng.choice(len(records), size=min(config.batch_size, len(records)), replace=False)
        plan.append((chosen, [records[i].captions[rng.integers(len(records[i].captions))] for i in chosen]))
    images = decoded_batches([[records[i].path for i in chosen] for chosen, _ in plan], tuned.image_size, workers)
    encoder = tuned.model.encoder
    for (chosen, references), pixels in tqdm(zip(plan, images), total=len(plan),
                                             desc=f"fine-tune {config.mode} seed {config.seed}", disable=not progress):
        pixels = normalise(pixels.to(tuned.device), encoder.mean, encoder.std)
        tokens = pad_captions([vocab.encode(c[: tuned.config.max_length]) for c in references], vocab.pad_id)
        tokens = tokens.to(tuned.device)
        if config.mode == "lrp":
            weights = lrp_weights(tuned, pixels)
        elif config.mode == "frequency":
            weights = frequency_weights(tuned, pixels, rates)
        else:
            weights = torch.ones(len(chosen), len(vocab), device=tuned.device)
        decoder.train()
        with torch.no_grad():
            grids = encoder(pixels)
        logits = decoder(grids, tokens[:, :-1]).logits
        loss = reweighted_loss(logits, tokens[:, 1:], weights, config.lam if config.mode != "plain" else 1.0,
                               vocab.pad_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(decoder.parameters(), 5.0)
        optimizer.step()
    tuned.model.eval()
    return tuned
