"""LRP-inference fine-tuning (ICML eq. (10)-(12); journal eq. (14)-(15), Table III) and its baselines.

For each training image the model's own caption is predicted and each of its words ``w_t`` is
explained by LRP; ``E_t`` is the image explanation divided by its max |value|. The weights over the
vocabulary are ``m[h(w_t)] = 1 + mean(E_t)`` (1 for every other word), the re-weighted scores
``p̂ = m ⊙ p`` and the loss on the reference caption

    L = λ · CE(p) + (1 − λ) · CE(p̂)                                            (eq. 12)

so a word the model predicts without image support (negative mean relevance) is pushed down. The two
papers define it differently, and both are here:

* ``lrp`` (ICML): ``m`` is recomputed for every batch from the current model, since the heatmaps
  change while tuning; stop words keep ``m = 1``; ``steps`` batches.
* ``lrp_journal`` (journal): the captions of the training images are predicted and explained once,
  by the model before tuning; ``m = 0`` for the articles {a, an, the}; one epoch over the images.

``m − 1`` of every explained word is recorded: with ``E_t`` max-normalised its mean is often near 0,
and then eq. (12) barely changes the logits — the finetune table reports its distribution.

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
from .hallucination import demo_min_count
from .intervals import NOT_MEASURED, above, below, shown, t_interval
from .registry import Experiment, Finding, Option, Rows, register_experiment

MODES = ("lrp", "lrp_journal", "frequency", "plain")
ARTICLES = frozenset({"a", "an", "the"})  # m = 0 in the journal variant


@dataclass(frozen=True)
class FinetuneConfig:
    mode: str = "lrp"
    steps: int = 60
    batch_size: int = 32
    learning_rate: float = 1e-4
    lam: float = 0.5  # λ of eq. (12)
    seed: int = 0
    epoch_images: int | None = None  # lrp_journal: the training images of its one epoch (None: all)

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


def lrp_weight_maps(captioner: Captioner, pixels: torch.Tensor, skipped: frozenset[str] = ENGLISH_STOP_WORDS,
                    zeroed: frozenset[str] = frozenset()) -> list[dict[int, float]]:
    """Per image of ``pixels``, ``{vocabulary index: m}`` of eq. (11) for the words of the model's own
    caption: ``1 + mean(E_t)`` (averaged over repeats of a word), 0 for ``zeroed`` words; ``skipped``
    words are not explained and keep 1."""
    vocab = captioner.vocab
    captions = _captions(captioner, pixels)
    positions = [[t for t, w in enumerate(c.words) if w not in skipped and w not in zeroed] for c in captions]
    explanations = explain_batch(captioner, list(_as_images(captioner, pixels)), captions, "lrp", words=positions)
    maps = []
    for caption, explanation in zip(captions, explanations):
        values: dict[int, list[float]] = {}
        for row, word in enumerate(explanation.words):
            heatmap = explanation.image[row]
            peak = heatmap.abs().max()
            mean = float(heatmap.mean() / peak) if peak > 0 else 0.0  # mean(E_t), E_t in [-1, 1]
            values.setdefault(vocab.index(word), []).append(mean)
        weights = {index: 1 + float(np.mean(means)) for index, means in values.items()}
        weights |= {vocab.index(w): 0.0 for w in caption.words if w in zeroed}
        maps.append(weights)
    return maps


def weight_matrix(maps: list[dict[int, float]], vocab_size: int, device) -> torch.Tensor:
    """m [B, V] from per-image ``{index: m}`` (1 elsewhere)."""
    weights = torch.ones(len(maps), vocab_size, device=device)
    for b, entries in enumerate(maps):
        for index, value in entries.items():
            weights[b, index] = value
    return weights


def lrp_weights(captioner: Captioner, pixels: torch.Tensor, stop_words: frozenset[str] = ENGLISH_STOP_WORDS) -> torch.Tensor:
    """m [B, V] of eq. (11) from the model's own captions of ``pixels`` (the ICML variant)."""
    return weight_matrix(lrp_weight_maps(captioner, pixels, stop_words), len(captioner.vocab), pixels.device)


def frequency_weights(captioner: Captioner, pixels: torch.Tensor, rates: dict[str, float]) -> torch.Tensor:
    """The frequency-inference baseline: 1 + true-positive rate for the object words of each caption."""
    vocab = captioner.vocab
    maps = [{vocab.index(w): 1 + rates[w] for w in caption.words if w in rates} for caption in _captions(captioner, pixels)]
    return weight_matrix(maps, len(vocab), pixels.device)


@torch.no_grad()
def _captions(captioner: Captioner, pixels: torch.Tensor):
    was_training = captioner.model.training
    captioner.model.eval()
    captions = captioner.caption_pixels(pixels, beam_size=3)
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


def journal_weight_maps(captioner: Captioner, data: DataBundle, images: int | None = None, batch_size: int = 32,
                        workers: int = 0, progress: bool = True) -> list[dict[int, float]]:
    """The journal variant's ``m`` for the first ``images`` training images, predicted and explained
    once by ``captioner`` before tuning (articles: m = 0; other stop words are explained too)."""
    from tqdm import tqdm

    records = data.split("train")[:images]
    encoder = captioner.model.encoder
    batches = [[r.path for r in records[i: i + batch_size]] for i in range(0, len(records), batch_size)]
    maps = []
    for pixels in tqdm(decoded_batches(batches, captioner.image_size, workers), total=len(batches),
                       desc="explaining the training captions once", disable=not progress):
        pixels = normalise(pixels.to(captioner.device), encoder.mean, encoder.std)
        maps += lrp_weight_maps(captioner, pixels, skipped=frozenset(), zeroed=ARTICLES)
    return maps


def finetune(captioner: Captioner, data: DataBundle, config: FinetuneConfig,
             rates: dict[str, float] | None = None, progress: bool = True, workers: int = 0,
             journal_maps: list[dict[int, float]] | None = None, m_record: list[float] | None = None) -> Captioner:
    """A fine-tuned copy of ``captioner`` (the original is left unchanged); ``workers`` processes
    decode the training images ahead of the steps. ``lrp_journal`` takes the maps of
    ``journal_weight_maps`` (computed here when not given); ``m_record`` collects ``m − 1`` of every
    LRP-weighted word."""
    from tqdm import tqdm

    if config.mode == "frequency" and rates is None:
        raise ValueError("the frequency baseline needs the true-positive rates of the training predictions")
    if config.mode == "lrp_journal" and journal_maps is None:
        journal_maps = journal_weight_maps(captioner, data, config.epoch_images, config.batch_size, workers, progress)
    tuned = captioner.with_model(copy.deepcopy(captioner.model))
    decoder = tuned.model.language_model()  # what is tuned: the decoder (a Hugging Face model's language model)
    tuned.model.requires_grad_(False)  # the image encoder stays as it was
    decoder.requires_grad_(True)
    optimizer = torch.optim.Adam(decoder.parameters(), lr=config.learning_rate)
    records = data.split("train")
    if not records:
        raise ValueError(f"the training split of {data.name} has no images to fine-tune on")
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    vocab = tuned.vocab
    plan = []  # per step: the chosen training images and one reference caption of each
    if config.mode == "lrp_journal":  # one epoch over the explained images, in a seeded order
        order = rng.permutation(len(journal_maps))
        batches = [order[i: i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    else:
        batches = [rng.choice(len(records), size=min(config.batch_size, len(records)), replace=False)
                   for _ in range(config.steps)]
    for chosen in batches:
        plan.append((chosen, [records[i].captions[rng.integers(len(records[i].captions))] for i in chosen]))
    images = decoded_batches([[records[i].path for i in chosen] for chosen, _ in plan], tuned.image_size, workers)
    encoder = tuned.model.encoder
    for (chosen, references), pixels in tqdm(zip(plan, images), total=len(plan),
                                             desc=f"fine-tune {config.mode} seed {config.seed}", disable=not progress):
        pixels = normalise(pixels.to(tuned.device), encoder.mean, encoder.std)
        tokens = pad_captions([tuned.caption_ids(c[: tuned.config.max_length])[1] for c in references], vocab.pad_id)
        tokens = tokens.to(tuned.device)
        if config.mode in ("lrp", "lrp_journal"):
            maps = lrp_weight_maps(tuned, pixels) if config.mode == "lrp" else [journal_maps[i] for i in chosen]
            weights = weight_matrix(maps, len(vocab), tuned.device)
            if m_record is not None:
                m_record += [value - 1 for entries in maps for value in entries.values() if value != 0]
        elif config.mode == "frequency":
            weights = frequency_weights(tuned, pixels, rates)
        else:
            weights = torch.ones(len(chosen), len(vocab), device=tuned.device)
        decoder.train()
        logits = tuned.model(pixels, tokens[:, :-1])
        loss = reweighted_loss(logits, tokens[:, 1:], weights, config.lam if config.mode != "plain" else 1.0,
                               vocab.pad_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(decoder.parameters(), 5.0)
        optimizer.step()
    tuned.model.eval()
    return tuned


# ------------------------------------------------------------------------- the experiment
COLUMNS = ("model", "runs", "BLEU-4*", "ROUGE-L*", "CIDEr*", "TP%*", "mAP*", "hallucination_rate*?", "m-1_*?", "note?",
           "ground_truth")
VARIANTS = (("lrp", "ICML variant"), ("lrp_journal", "journal variant"))


def finetune_findings(results: dict, arch: str) -> list[Finding]:
    table = Rows.of(results, "finetune", arch)
    original = table.find(model="original")
    findings = []
    for mode, variant in VARIANTS:
        if table.rows and not table.find(model=mode):
            continue  # a mode not run (or results from before the journal variant existed)
        claims = (f"LRP-inference fine-tuning ({variant}) hallucinates less than plain fine-tuning",
                  f"LRP-inference fine-tuning ({variant}) maintains or improves caption quality (BLEU-4 at most "
                  "0.01 below the original)")
        if not table.rows:
            findings += [(claim, NOT_MEASURED, "not measured") for claim in claims]
            continue
        tuned, plain = table.find(model=mode), table.find(model="plain")
        before = table.value(original, "BLEU-4")
        findings.append((claims[0], below(table.interval(tuned, "hallucination_rate"),
                                          table.interval(plain, "hallucination_rate")),
                         f"biased-word hallucination {shown(table.interval(tuned, 'hallucination_rate'))} (LRP) vs "
                         f"{shown(table.interval(plain, 'hallucination_rate'))} (plain), original "
                         f"{table.value(original, 'hallucination_rate'):.3f}; m − 1 mean "
                         f"{table.value(tuned, 'm-1_mean'):.3g}"))
        findings.append((claims[1], above(table.interval(tuned, "BLEU-4"), (before - 0.01,) * 2),
                         f"BLEU-4 {shown(table.interval(tuned, 'BLEU-4'))} after vs {before:.3f} before"))
    return findings


def finetune_section(results: dict, archs: list[str]) -> list[str]:
    from .tables import markdown_table

    lines = ["## Table III / Tables 4–5 — fine-tuning with LRP inference and its baselines (mean ± std over seeds)", ""]
    for arch in archs:
        rows = results.get("finetune", {}).get(arch, [])
        if rows:
            compact = [{k: (f"{r[k]:.4g} ± {r[k + '_std']:.2g}" if f"{k}_std" in r else r[k]) for k in r
                        if not k.endswith(("_std", "_low", "_high"))} for r in rows]
            lines += [f"**{arch}**", "", markdown_table(compact), ""]
    return lines + ["The papers report (journal Table III, adaptive, Flickr30K clothes subset) TP% 47.19 (plain), "
                    "50.46 (frequency), 49.12 (LRP).", ""]


def _show_table(rows, bench, options: dict) -> None:
    from .tables import markdown_table

    print(markdown_table(rows))


@register_experiment(Experiment(
    name="finetune", verb="finetune", title="Fine-tuning with LRP inference", order=6,
    papers="eq. 10-12, 14-15, Table III, Tables 4-5",
    options=(Option("modes", None, "lrp (ICML eq. 10-12: m recomputed while tuning), lrp_journal (journal: explained "
                    "once before tuning, m = 0 for a/an/the, one epoch over --train-limit images), frequency or plain; "
                    "repeat for several (default: all four).", "choices", choices=MODES, flag="mode"),
             Option("seeds", "0,1,2", "Comma-separated seeds; one tuned model per mode and seed.", "ints"),
             Option("steps", 60, "Fine-tuning steps (batches).", "int", 1, 1_000_000),
             Option("learning_rate", 1e-4, "Adam learning rate.", "float", 0, 10, low_open=True, flag="lr"),
             Option("lam", 0.5, "λ of eq. 12: weight of the plain cross-entropy.", "float", 0, 1, flag="lambda"),
             Option("batch_size", 32, "Training images per step.", "int", 1, 100_000),
             Option("min_count", 50, "Object words predicted more often than this count (paper: 50).", "int", 0),
             Option("train_limit", 500, "Training images whose predictions give the frequency baseline's rates (and "
                    "lrp_journal's epoch).", "int", 1),
             Option("save", False, "Also write each tuned model as a run folder under OUT/finetuned/.", "bool"),
             Option("full_metrics", False, "Score with all of Table 1 (Java METEOR, BERTScore) instead of "
                    "BLEU-4/ROUGE-L/CIDEr.", "bool")),
    columns=COLUMNS, findings=finetune_findings, section=finetune_section, show=_show_table,
    demo=lambda quick, seed: {"seeds": (0,) if quick else (0, 1, 2), "steps": 2 if quick else 10,
                              "batch_size": 16, "min_count": demo_min_count(quick),
                              "train_limit": 20 if quick else 100}))
def run_finetune(bench, modes=MODES, seeds=(0, 1, 2), steps: int = 60, learning_rate: float = 1e-4,
                 lam: float = 0.5, batch_size: int = 32, min_count: int = 50, train_limit: int | None = 500,
                 save: bool = False, full_metrics: bool = False) -> list[dict]:
    """LRP-inference fine-tuning and its baselines (Table III, Tables 4-5): fine-tune from the same
    model with each mode and seed, then report caption metrics (BLEU-4, ROUGE-L, CIDEr without Java;
    --full-metrics for all of Table 1), TP%, mAP and the biased word's hallucination rate, mean ± std
    over seeds. Table III on Flickr30K: --subset clothes (images whose references mention clothes but
    never 'shirt'; hallucination_rate = how often 'shirt' is said)."""
    from .tables import plot_bars, write_table

    modes = tuple(modes or MODES)
    bench.predictions.require_truth()
    training = bench.predict(bench.captioner, "train", train_limit, subset=False)
    rates = true_positive_rates(training)
    results = {"original": [tuned_scores(bench, bench.captioner, min_count, full_metrics)]}
    journal = journal_weight_maps(bench.captioner, bench.data, train_limit, batch_size, bench.workers, bench.progress) \
        if "lrp_journal" in modes else None  # explained once, by the model before tuning: shared by the seeds
    weight_changes: dict[str, list[float]] = {}
    for mode in modes:
        for seed in seeds:
            config = FinetuneConfig(mode, steps, batch_size, learning_rate, lam, seed, epoch_images=train_limit)
            tuned = finetune(bench.captioner, bench.data, config, rates, bench.progress, bench.workers, journal,
                             weight_changes.setdefault(mode, []))
            if save:
                tuned.save(bench.out / "finetuned" / f"{mode}-seed{seed}")
            results.setdefault(mode, []).append(tuned_scores(bench, tuned, min_count, full_metrics))
    rows = []
    for mode, runs in results.items():
        row = {"model": mode, "runs": len(runs)}
        for key in runs[0]:
            values = np.array([r[key] for r in runs], dtype=float)
            finite = values[~np.isnan(values)]
            row[key] = float(finite.mean()) if finite.size else float("nan")
            row[f"{key}_std"] = float(finite.std()) if finite.size > 1 else 0.0
            row[f"{key}_low"], row[f"{key}_high"] = t_interval(finite)  # 95% over seeds
        changes = np.array(weight_changes.get(mode) or [], dtype=float)
        if changes.size:  # how far eq. (12) moves the logits: m − 1 over the LRP-weighted words
            row |= {"m-1_mean": float(changes.mean()), "m-1_abs_mean": float(np.abs(changes).mean()),
                    "m-1_p05": float(np.percentile(changes, 5)), "m-1_p95": float(np.percentile(changes, 95))}
        empty = [key for key in runs[0] if row[key] != row[key]]
        if empty:
            row["note"] = f"{', '.join(empty)}: no object mentions to score (TP%), or no frequent word with " \
                          f"both true and hallucinated mentions (mAP; lower --min-count)"
        rows.append(row)
    title = f"Fine-tuning ({steps} steps, λ = {lam}, lr = {learning_rate}, seeds {list(seeds)}): {bench.scope}"
    if bench.biased_word():
        title += f"; hallucination_rate: how often '{bench.biased_word()[0]}' is said where it is not"
    write_table(bench.out, "finetune", bench.labelled(rows), title)
    key = "hallucination_rate" if "hallucination_rate" in rows[0] else "TP%"
    plot_bars(rows, "model", key, bench.out / "finetune.png", f"{key} after fine-tuning (mean ± std)", f"{key}_std")
    return rows


def tuned_scores(bench, captioner: Captioner, min_count: int, full_metrics: bool) -> dict:
    """One (tuned) captioner's scores on the workbench's images: caption metrics, TP%, mAP and the
    biased word's hallucination rate."""
    from .caption_metrics import caption_metrics, token_metrics
    from .context import word_probabilities
    from .hallucination import labels_of, mean_average_precision
    from .metrics import hallucination_rate

    p = bench.predict(captioner) if captioner is not bench.captioner else bench.predictions
    if full_metrics:
        scores = {k: v for k, v in caption_metrics([" ".join(c.words) for c in p.captions],
                                                   [r.raw or [" ".join(t) for t in r.captions] for r in p.records],
                                                   bertscore_model="minilm").items() if isinstance(v, float)}
    else:
        scores = token_metrics([c.words for c in p.captions], [r.captions for r in p.records])
    mentions = p.mentions()
    scores["TP%"] = 100 * float(np.mean([m.true_positive for m in mentions])) if mentions else float("nan")
    frequent = p.frequent_mentions(min_count)
    scores["mAP"] = mean_average_precision([m.word for m in frequent], labels_of(frequent),
                                           word_probabilities(captioner, p, frequent))["map"]
    biased = bench.biased_word()
    if biased:
        word, partner = biased
        category = p.synonyms.category(word) or word
        if partner is None:  # every image of the subset lacks the word in its references
            said = [category in p.synonyms.categories_in(c.words) or word in c.words for c in p.captions]
            scores["hallucination_rate"] = float(np.mean(said))
        else:
            scores["hallucination_rate"] = hallucination_rate([c.words for c in p.captions], p.objects,
                                                              p.synonyms, category, partner).rate
    return scores
