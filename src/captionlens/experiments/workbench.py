"""Runs the experiments on one captioner and one dataset split, computing the captions once and each
method's explanations of each object mention once, and writing every table (CSV + JSON + Markdown)
and plot into an output folder."""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from ..data.bundle import DataBundle
from ..explain import Explanation
from ..models import Captioner
from .ablation import word_ablation
from .caption_metrics import caption_metrics, token_metrics
from .context import Mention, Predictions, explain_mentions, predict, word_probabilities
from .correctness import CURVES, correctness_curves, localisable, plot_correctness
from .finetune import MODES, FinetuneConfig, finetune, true_positive_rates
from .hallucination import SCORES, auc_table, chair, detection_scores, labels_of, mean_average_precision, plot_roc
from .masking import feature_masking
from .metrics import hallucination_rate
from .tables import plot_bars, write_table


class Workbench:
    def __init__(self, captioner: Captioner, data: DataBundle, out: str | Path, split: str = "test",
                 limit: int | None = None, beam_size: int = 3, progress: bool = True) -> None:
        self.captioner, self.data, self.split = captioner, data, split
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.limit, self.beam_size, self.progress = limit, beam_size, progress
        self._explanations: dict[str, dict[Mention, Explanation]] = {}

    @cached_property
    def predictions(self) -> Predictions:
        return predict(self.captioner, self.data, self.split, self.beam_size, self.limit, self.progress)

    def explanations(self, method: str, mentions: list[Mention]) -> dict[Mention, Explanation]:
        """Each mention's explanation by ``method`` (computed once, kept for later experiments)."""
        known = self._explanations.setdefault(method, {})
        missing = [m for m in mentions if m not in known]
        if missing:
            known.update(explain_mentions(self.captioner, self.predictions, missing, method, progress=self.progress))
        return {m: known[m] for m in mentions}

    # --------------------------------------------------------------------------- Table 1
    def metrics(self, spice_corenlp=None, bertscore_model=None) -> dict:
        p = self.predictions
        scores = caption_metrics([" ".join(c.words) for c in p.captions],
                                 [r.raw or [" ".join(t) for t in r.captions] for r in p.records],
                                 spice_corenlp, bertscore_model)
        rows = [{"metric": k, "value": v} for k, v in scores.items()]
        write_table(self.out, "metrics", rows,
                    f"Caption metrics, {self.split} split ({len(p.records)} images, beam {self.beam_size})")
        plot_bars([r for r in rows if isinstance(r["value"], float)], "metric", "value", self.out / "metrics.png",
                  "caption metrics")
        return scores

    # ---------------------------------------------------------------------- Fig. 3 / Fig. 5
    def correctness(self) -> list[dict]:
        mentions = localisable(self.predictions, self.data.objects)
        explanations = {method: self.explanations(method, mentions) for method in {m for m, _ in CURVES.values()}}
        rows = correctness_curves(self.predictions, self.data.objects, explanations)
        write_table(self.out, "correctness", rows, f"Correctness of {len(mentions)} correctly predicted object words")
        plot_correctness(rows, self.out / "correctness.png")
        return rows

    # ------------------------------------------------------------------ Table 3 and Table 5
    def hallucination(self, min_count: int = 50) -> dict:
        p = self.predictions
        mentions = p.frequent_mentions(min_count)
        labels = labels_of(mentions)
        explanations = {method: self.explanations(method, mentions) for method in {m for m, _ in SCORES.values()}}
        scores = detection_scores(mentions, explanations)
        auc = auc_table(labels, scores)
        rates = chair([c.words for c in p.captions], p.objects, p.synonyms)
        result = {"auc": auc, "chair": rates, "true_positives": int(labels.sum()),
                  "false_positives": int(len(labels) - labels.sum()), "words": sorted({m.word for m in mentions})}
        write_table(self.out, "hallucination_auc", [{"score": k, "auc": v} for k, v in auc.items()],
                    f"AUC of true vs hallucinated object words ({result['true_positives']} TP, "
                    f"{result['false_positives']} FP; words predicted > {min_count} times)")
        write_table(self.out, "chair", [rates], "CHAIR hallucination rates")
        plot_roc(labels, scores, self.out / "hallucination_roc.png")
        return result

    def mean_average_precision(self, min_count: int = 50) -> dict:
        mentions = self.predictions.frequent_mentions(min_count)
        probabilities = word_probabilities(self.captioner, self.predictions, mentions)
        result = mean_average_precision([m.word for m in mentions], labels_of(mentions), probabilities)
        rows = [{"word": w, "ap": ap} for w, ap in result["per_word"].items()] + [{"word": "mAP", "ap": result["map"]}]
        write_table(self.out, "map", rows, f"AP of frequent object words (> {min_count})")
        plot_bars(rows, "word", "ap", self.out / "map.png", "average precision of frequent object words")
        return result


    # ---------------------------------------------------------------- Table 2 / Table IV
    def ablation(self, top: int = 3, skip: int = 5, seed: int = 0) -> list[dict]:
        rows = word_ablation(self.captioner, self.predictions, top, skip, seed)
        write_table(self.out, "ablation", rows, f"Word ablation: top-{top} preceding words deleted "
                    f"(targets at position ≥ {skip})")
        plot_bars(rows, ("words", "ranking"), "drop_share", self.out / "ablation.png",
                  "share of targets whose probability drops")
        return rows

    # ------------------------------------------------------------------- Fig. 4 / IV-B-1
    MASKING_METHODS = ("lrp", "guided_gradcam", "gradcam", "attention")

    def masking(self, fraction: float = 0.1, seed: int = 0, limit: int | None = 200) -> list[dict]:
        """Masking on (at most ``limit``) correctly predicted object words."""
        mentions = [m for m in self.predictions.mentions() if m.true_positive][:limit]
        explanations = {method: self.explanations(method, mentions) for method in self.MASKING_METHODS}
        rows = feature_masking(self.captioner, self.predictions, explanations, mentions, fraction, seed,
                               self.beam_size)
        write_table(self.out, "masking", rows, f"Feature masking: {fraction:.0%} of the pixels masked; share of "
                    f"{len(mentions)} correctly named objects that are no longer named")
        plot_bars(rows, ("method", "masked"), "vanished", self.out / "masking.png", "word no longer named after masking")
        return rows

    # ------------------------------------------------------------ Table 4 / 5, Table III
    def finetune(self, modes=MODES, seeds=(0, 1, 2), steps: int = 60, learning_rate: float = 1e-4,
                 lam: float = 0.5, batch_size: int = 32, min_count: int = 50, train_limit: int | None = 500,
                 save: bool = False, full_metrics: bool = False) -> list[dict]:
        """Fine-tune the captioner with each mode and seed from the same start, then score each tuned
        model on this split: caption metrics (BLEU-4, ROUGE-L, CIDEr without Java; ``full_metrics``
        for all of Table 1), the share of true-positive object words (TP%), the mAP of frequent object
        words and the biased word's hallucination rate; mean ± std over seeds."""
        training = predict(self.captioner, self.data, "train", self.beam_size, train_limit, self.progress)
        rates = true_positive_rates(training)
        results = {"original": [self._tuned_scores(self.captioner, min_count, full_metrics)]}
        for mode in modes:
            for seed in seeds:
                config = FinetuneConfig(mode, steps, batch_size, learning_rate, lam, seed)
                tuned = finetune(self.captioner, self.data, config, rates, self.progress)
                if save:
                    tuned.save(self.out / "finetuned" / f"{mode}-seed{seed}")
                results.setdefault(mode, []).append(self._tuned_scores(tuned, min_count, full_metrics))
        rows = []
        for mode, runs in results.items():
            row = {"model": mode, "runs": len(runs)}
            for key in runs[0]:
                values = np.array([r[key] for r in runs], dtype=float)
                finite = values[~np.isnan(values)]
                row[key] = float(finite.mean()) if finite.size else float("nan")
                row[f"{key}_std"] = float(finite.std()) if finite.size > 1 else 0.0
            rows.append(row)
        write_table(self.out, "finetune", rows, f"Fine-tuning ({steps} steps, λ = {lam}, lr = {learning_rate}, "
                    f"seeds {list(seeds)}), scored on {len(self.predictions.records)} {self.split} images")
        key = "hallucination_rate" if "hallucination_rate" in rows[0] else "TP%"
        plot_bars(rows, "model", key, self.out / "finetune.png", f"{key} after fine-tuning (mean ± std)", f"{key}_std")
        return rows

    def _tuned_scores(self, captioner: Captioner, min_count: int, full_metrics: bool) -> dict:
        p = predict(captioner, self.data, self.split, self.beam_size, self.limit, progress=False)
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
        bias = self.data.shapes_config
        if bias:
            rate = hallucination_rate([c.words for c in p.captions], p.objects, p.synonyms, bias["bias_word"],
                                      bias["bias_partner"])
            scores["hallucination_rate"] = rate.rate
        return scores
