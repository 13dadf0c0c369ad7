"""Runs the experiments on one captioner and one dataset split (or a subset of it), computing the
captions once and each method's explanations of each object mention once, and writing every table
(CSV + JSON + Markdown) and plot into an output folder.

Explanations live in an explanation store (``--store``, by default ``OUT/explanations.zarr``): read
from it when it holds them, computed and written into it when not — so memory is bounded by a batch,
and a second experiment, or the same one after a crash, reuses what was computed.

Tables that label object words say which ground truth they used (``ground_truth``: ``boxes`` or
``references``), and every cell left empty says why in a ``note`` column."""
from __future__ import annotations

import shutil
from functools import cached_property
from pathlib import Path

import numpy as np

from ..data.bundle import DataBundle
from ..data.ground_truth import Subset
from ..explain import Explanation, methods_for
from ..explain.store import ExplanationStore, StoreMismatch
from ..io import atomic_write, claim_output_folder
from ..models import Captioner
from .ablation import word_ablation
from .caption_metrics import caption_metrics, token_metrics
from .context import (Mention, Predictions, StoredExplanations, explain_into_store, explain_mentions, predict,
                      word_probabilities)
from .correctness import CURVES, correctness_curves, localisable, plot_correctness
from .explain_split import explained_positions, stored_caption
from .faithfulness import Curves, other_words, plot_curves, region_perturbation, summarise
from .finetune import MODES, FinetuneConfig, finetune, journal_weight_maps, true_positive_rates
from .hallucination import SCORES, UNDEFINED, auc_interval, auc_table, chair, detection_scores, labels_of, mean_average_precision, plot_roc
from .intervals import t_interval
from .masking import feature_masking
from .metrics import hallucination_rate, object_precision_recall
from .sanity import cascading_randomisation, input_invariance, plot_randomisation
from .tables import plot_bars, write_table


def why_empty(labels: np.ndarray, min_count: int) -> str:
    """Why a score over true/hallucinated mentions cannot be computed ('' when it can)."""
    if len(labels) == 0:
        return f"no object word predicted more than {min_count} times (lower --min-count)"
    if labels.min() == labels.max():
        kind = "true positives" if labels[0] else "hallucinated"
        return f"all {len(labels)} mentions are {kind}: one class only, undefined"
    return ""


class Workbench:
    def __init__(self, captioner: Captioner, data: DataBundle, out: str | Path, split: str = "test",
                 limit: int | None = None, beam_size: int = 3, progress: bool = True, ground_truth: str = "auto",
                 subset: Subset | None = None, workers: int = 0, store: str | Path | None = None) -> None:
        self.captioner, self.data, self.split = captioner, data, split
        self.out = claim_output_folder(out, "results")
        self.limit, self.beam_size, self.progress = limit, beam_size, progress
        self.ground_truth, self.subset, self.workers = ground_truth, subset, workers
        self.own_store = store is None
        self.store_path = self.out / "explanations.zarr" if store is None else Path(store)

    @cached_property
    def store(self) -> ExplanationStore:
        """The explanation store (created for the object words when missing). A store given by the
        user must match the model and split; the workbench's own store in OUT is replaced when not."""
        create = lambda: ExplanationStore.create(self.store_path, self.captioner.fingerprint(), self.split,  # noqa: E731
                                                 "objects", {}, any_words=True)
        try:
            return create()
        except StoreMismatch:
            if not self.own_store:
                raise
            shutil.rmtree(self.store_path)
            return create()

    @cached_property
    def predictions(self) -> Predictions:
        """The captions of the images: the store's where it has them, else made now and written to it."""
        store = self.store
        p = self._predict(self.captioner, known=lambda r: stored_caption(store, r.image_id)
                          if store.has_caption(r.image_id) else None)
        mode = store.attributes["words"]
        for record, caption in zip(p.records, p.captions):
            positions = explained_positions(caption.words, mode, p.synonyms) if p.synonyms or mode == "all" else []
            store.write_caption(record.image_id, record.path.name, caption.words, caption.token_ids, positions,
                                caption.score)
        return p

    def _predict(self, captioner: Captioner, split: str | None = None, limit: int | None = None,
                 subset: bool = True, known=None) -> Predictions:
        return predict(captioner, self.data, split or self.split, self.beam_size, limit or self.limit, self.progress,
                       self.ground_truth, self.subset if subset else None, self.workers, known)

    @property
    def scope(self) -> str:
        """Which images the tables are about, for their titles."""
        p = self.predictions
        text = f"{len(p.records)} {self.split} images of {self.data.name}"
        text += f" ({self.subset.describe()})" if self.subset else ""
        return text + (f"; ground truth: {p.truth.description}" if p.truth else "")

    def _labelled(self, rows: list[dict]) -> list[dict]:
        """Rows with the ground truth's source beside every number."""
        return [{**row, "ground_truth": self.predictions.require_truth().source} for row in rows]

    def _available(self, table: dict[str, tuple]) -> list[str]:
        """The methods a table of (method, ...) entries uses that this captioner has (rollout: a
        transformer), sorted."""
        return sorted(set(methods_for(self.captioner.model)) & {entry[0] for entry in table.values()})

    def explanations(self, method: str, mentions: list[Mention]) -> StoredExplanations:
        """``explanations[mention]``: its explanation by ``method``, from the store (computed and
        written there first if missing)."""
        return explain_into_store(self.captioner, self.predictions, self.store, mentions, method,
                                  progress=self.progress)

    # --------------------------------------------------------------------------- Table 1
    def metrics(self, spice_corenlp=None, bertscore_model=None) -> dict:
        """Caption metrics (need only reference captions), then the object metrics (precision,
        recall, CHAIR) where ground truth for objects exists, else "not available: <why>"."""
        p = self.predictions
        scores = caption_metrics([" ".join(c.words) for c in p.captions],
                                 [r.raw or [" ".join(t) for t in r.captions] for r in p.records],
                                 spice_corenlp, bertscore_model)
        if p.truth is None:
            scores["object metrics"] = f"not available: {p.missing_truth}"
        else:
            words = [c.words for c in p.captions]
            objects = object_precision_recall(words, p.objects, p.synonyms)
            rates = chair(words, p.objects, p.synonyms)
            scores |= {"object precision": objects.precision, "object recall": objects.recall,
                       "CHAIR-i": rates["chair_i"], "CHAIR-s": rates["chair_s"],
                       "ground truth": p.truth.source}
        rows = [{"metric": k, "value": v} if not isinstance(v, str) or k == "ground truth"
                else {"metric": k, "value": None, "note": v} for k, v in scores.items()]
        write_table(self.out, "metrics", rows, f"Caption metrics, beam {self.beam_size}: {self.scope}")
        plot_bars([r for r in rows if isinstance(r["value"], float)], "metric", "value", self.out / "metrics.png",
                  "caption metrics")
        return scores

    # ---------------------------------------------------------------------- Fig. 3 / Fig. 5
    def correctness(self) -> list[dict]:
        """Localisation in the boxes; without boxes, one row saying the measure is not available."""
        if not self.data.instance_files:
            rows = [{"curve": "all", "mentions": 0, "note": "not available: correctness needs object boxes (COCO "
                     f"instances_*.json, --instances); {self.data.name} has none"}]
            write_table(self.out, "correctness", rows, f"Correctness: {len(self.predictions.records)} "
                        f"{self.split} images of {self.data.name}")
            return rows
        truth = self.data.ground_truth("boxes")
        predictions = self.predictions if self.predictions.truth.source == "boxes" else \
            Predictions(self.predictions.records, self.predictions.captions, self.predictions.synonyms, truth,
                        self.predictions.image_size, self.workers)
        objects = truth.annotations
        mentions = localisable(predictions, objects)
        explanations = {method: self.explanations(method, mentions) for method in self._available(CURVES)}
        rows = correctness_curves(predictions, objects, explanations)
        if not mentions:
            rows = [{**row, "note": "no correctly named object word with a box in the image"} for row in rows]
        write_table(self.out, "correctness", [{**row, "ground_truth": "boxes"} for row in rows],
                    f"Correctness of {len(mentions)} correctly predicted object words in {len(predictions.records)} "
                    f"{self.split} images of {self.data.name}; ground truth: {truth.description}")
        plot_correctness(rows, self.out / "correctness.png")
        return rows

    # ------------------------------------------------------------------ Table 3 and Table 5
    def hallucination(self, min_count: int = 50) -> dict:
        p = self.predictions
        mentions = p.frequent_mentions(min_count)
        labels = labels_of(mentions)
        explanations = {method: self.explanations(method, mentions) for method in self._available(SCORES)}
        scores = detection_scores(mentions, explanations)
        auc = auc_table(labels, scores)
        rates = chair([c.words for c in p.captions], p.objects, p.synonyms)
        note = why_empty(labels, min_count)
        intervals = {name: auc_interval(labels, values) for name, values in scores.items()}
        result = {"auc": auc, "auc_interval": intervals, "chair": rates, "true_positives": int(labels.sum()),
                  "false_positives": int(len(labels) - labels.sum()), "words": sorted({m.word for m in mentions}),
                  "ground_truth": p.truth.source, "note": note}
        write_table(self.out, "hallucination_auc",
                    self._labelled([{"score": k, "auc": v, "auc_low": intervals[k][0], "auc_high": intervals[k][1]}
                                    | ({"note": note} if note else {})
                                    | ({} if np.isfinite(scores[k]).all() else {"note": UNDEFINED})
                                    for k, v in auc.items()]),
                    f"AUC of true vs hallucinated object words ({result['true_positives']} TP, "
                    f"{result['false_positives']} FP; words predicted > {min_count} times; 95% bootstrap intervals over "
                    f"mentions): {self.scope}")
        chair_note = {} if rates["object_mentions"] else {"note": "no object word in any caption"}
        write_table(self.out, "chair", self._labelled([rates | chair_note]), f"CHAIR hallucination rates: {self.scope}")
        plot_roc(labels, scores, self.out / "hallucination_roc.png")
        return result

    def mean_average_precision(self, min_count: int = 50) -> dict:
        mentions = self.predictions.frequent_mentions(min_count)
        probabilities = word_probabilities(self.captioner, self.predictions, mentions)
        labels = labels_of(mentions)
        result = mean_average_precision([m.word for m in mentions], labels, probabilities)
        result["ground_truth"] = self.predictions.truth.source
        result["note"] = why_empty(labels, min_count) or (
            "" if result["per_word"] else "no frequent object word has both true and hallucinated mentions")
        rows = [{"word": w, "ap": ap} for w, ap in result["per_word"].items()]
        rows.append({"word": "mAP", "ap": result["map"]} | ({"note": result["note"]} if result["note"] else {}))
        write_table(self.out, "map", self._labelled(rows), f"AP of frequent object words (> {min_count}): {self.scope}")
        plot_bars([r for r in rows if r["ap"] == r["ap"]], "word", "ap", self.out / "map.png",
                  "average precision of frequent object words")
        return result

    # ---------------------------------------------------------------- Table 2 / Table IV
    def ablation(self, top: int = 3, skip: int = 5, seed: int = 0) -> list[dict]:
        rows = word_ablation(self.captioner, self.predictions, top, skip, seed)
        reason = ("no object words are known (pass --synonyms)" if self.predictions.synonyms is None
                  else f"no caption has such a word at position ≥ {skip} (lower --skip)")
        rows = [row | ({"note": reason} if not row["targets"] else {}) for row in rows]
        write_table(self.out, "ablation", rows, f"Word ablation: top-{top} preceding words deleted "
                    f"(targets at position ≥ {skip}): {self.scope}")
        plot_bars([r for r in rows if r["targets"]], ("words", "ranking"), "drop_share", self.out / "ablation.png",
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
        if not mentions:
            rows = [row | {"note": "no correctly named object word to mask"} for row in rows]
        write_table(self.out, "masking", self._labelled(rows), f"Feature masking: {fraction:.0%} of the pixels "
                    f"masked; share of {len(mentions)} correctly named objects that are no longer named: {self.scope}")
        plot_bars(rows, ("method", "masked"), "vanished", self.out / "masking.png", "word no longer named after masking")
        return rows

    # ----------------------------------------------- faithfulness and sanity (beyond the papers)
    def word_explanations(self, method: str, mentions: list[Mention]) -> dict[Mention, Explanation]:
        """Each mention's explanation: from the store for the words it explains (object words, or
        all words of a store made with ``explain-split --words all``), computed now for the rest."""
        p = self.predictions
        stored_positions = {i: set(self.store.positions(p.records[i].image_id)) for i in {m.image for m in mentions}}
        stored = [m for m in mentions if m.position in stored_positions[m.image]]
        from_store, known = self.explanations(method, stored), set(stored)
        computed = explain_mentions(self.captioner, p, [m for m in mentions if m not in known], method)
        return {m: from_store[m] for m in stored} | computed

    def _sanity_words(self, words: int, other: int, seed: int) -> tuple[list[Mention], list[str]]:
        """Up to ``words`` correctly named object words and ``other`` other words, with their kinds."""
        p = self.predictions
        objects = [m for m in p.mentions() if m.true_positive][:words] if p.truth is not None and p.synonyms else []
        others = other_words(p, other, seed)
        return objects + others, ["object"] * len(objects) + ["other"] * len(others)

    def faithfulness(self, words: int = 100, other: int = 50, patch: int = 8, regions: int = 100,
                     replacement: str = "blur", seed: int = 0, methods: tuple[str, ...] | None = None) -> list[dict]:
        """Region perturbation (``faithfulness.py``) of ``words`` correctly named object words and a
        sample of ``other`` other words, for each method and a random order."""
        mentions, kinds = self._sanity_words(words, other, seed)
        methods = methods or methods_for(self.captioner.model)
        explanations = {method: self.word_explanations(method, mentions) for method in methods}
        curves = region_perturbation(self.captioner, self.predictions, explanations, mentions, patch, regions,
                                     replacement, seed, self.progress)
        rows = summarise(curves, kinds)
        if not mentions:
            rows = [{"words": "none", "note": "no caption word to perturb"}]
        write_table(self.out, "faithfulness", rows,
                    f"Region perturbation ({patch}×{patch} patches replaced by {'a blurred copy' if replacement == 'blur' else 'the dataset mean'}, "
                    f"{curves.logit.shape[-1] - 1} steps): AOPC of the word's logit, most relevant first (MoRF) and "
                    f"least relevant first (LeRF), ABPC = MoRF − LeRF; 95% bootstrap intervals over words: {self.scope}")
        self._save_curves(curves, mentions, kinds)
        plot_curves(curves, kinds, self.out / "faithfulness.png")
        return rows

    def _save_curves(self, curves: Curves, mentions: list[Mention], kinds: list[str]) -> None:
        """``faithfulness_curves.npz``: the curves [words, methods, orders, steps] and who is who."""
        records = self.predictions.records

        def write(tmp) -> None:
            with open(tmp, "wb") as handle:
                np.savez_compressed(handle, logit=curves.logit, probability=curves.probability,
                                    methods=np.array(curves.methods), orders=np.array(curves.orders),
                                    kinds=np.array(kinds), words=np.array([m.word for m in mentions]),
                                    image_ids=np.array([records[m.image].image_id for m in mentions]),
                                    positions=np.array([m.position for m in mentions]))

        atomic_write(self.out / "faithfulness_curves.npz", write)

    def sanity(self, words: int = 50, other: int = 25, seed: int = 0, shift: float = 1.0,
               methods: tuple[str, ...] | None = None) -> dict:
        """Cascading model-parameter randomisation and input invariance (``sanity.py``) on the
        explanations of ``words`` object words and ``other`` other words."""
        mentions, _ = self._sanity_words(words, other, seed)
        methods = methods or methods_for(self.captioner.model)
        originals = {method: self.word_explanations(method, mentions) for method in methods}
        steps = cascading_randomisation(self.captioner, self.predictions, mentions, methods, seed,
                                        originals=originals, progress=self.progress)
        invariance = input_invariance(self.captioner, self.predictions, mentions, methods, shift, originals=originals)
        note = [] if mentions else [{"note": "no caption word to explain"}]
        write_table(self.out, "randomisation", steps or note,
                    f"Cascading randomisation (output layer first): similarity of each method's maps of "
                    f"{len(mentions)} words to the trained model's, after each block is re-initialised; 95% "
                    f"bootstrap intervals over words: {self.scope}")
        write_table(self.out, "input_invariance", invariance or note,
                    f"Input invariance: inputs shifted by {shift} (normalised units) through a model whose first "
                    f"layer absorbs the shift; relative change of the explanations: {self.scope}")
        if steps:
            plot_randomisation(steps, self.out / "randomisation.png")
        return {"randomisation": steps, "input_invariance": invariance}

    # ------------------------------------------------------------ Table 4 / 5, Table III
    def finetune(self, modes=MODES, seeds=(0, 1, 2), steps: int = 60, learning_rate: float = 1e-4,
                 lam: float = 0.5, batch_size: int = 32, min_count: int = 50, train_limit: int | None = 500,
                 save: bool = False, full_metrics: bool = False) -> list[dict]:
        """Fine-tune the captioner with each mode and seed from the same start, then score each tuned
        model on this split (or subset): caption metrics (BLEU-4, ROUGE-L, CIDEr without Java;
        ``full_metrics`` for all of Table 1), the share of true-positive object words (TP%), the mAP of
        frequent object words and the biased word's hallucination rate (the shapes world's planted
        bias, or the subset's excluded word: how often it is said for images whose references never
        mention it); mean ± std over seeds."""
        self.predictions.require_truth()
        training = self._predict(self.captioner, "train", train_limit, subset=False)
        rates = true_positive_rates(training)
        results = {"original": [self._tuned_scores(self.captioner, min_count, full_metrics)]}
        journal = journal_weight_maps(self.captioner, self.data, train_limit, batch_size, self.workers, self.progress) \
            if "lrp_journal" in modes else None  # explained once, by the model before tuning: shared by the seeds
        weight_changes: dict[str, list[float]] = {}
        for mode in modes:
            for seed in seeds:
                config = FinetuneConfig(mode, steps, batch_size, learning_rate, lam, seed, epoch_images=train_limit)
                tuned = finetune(self.captioner, self.data, config, rates, self.progress, self.workers, journal,
                                 weight_changes.setdefault(mode, []))
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
        title = f"Fine-tuning ({steps} steps, λ = {lam}, lr = {learning_rate}, seeds {list(seeds)}): {self.scope}"
        if self._biased_word():
            title += f"; hallucination_rate: how often '{self._biased_word()[0]}' is said where it is not"
        write_table(self.out, "finetune", self._labelled(rows), title)
        key = "hallucination_rate" if "hallucination_rate" in rows[0] else "TP%"
        plot_bars(rows, "model", key, self.out / "finetune.png", f"{key} after fine-tuning (mean ± std)", f"{key}_std")
        return rows

    def _biased_word(self) -> tuple[str, str | None] | None:
        """(biased word, the partner whose presence it is said for) of the shapes world's planted bias,
        or (the subset's excluded word, None)."""
        if self.subset is not None and self.subset.exclude:
            return self.subset.exclude[0], None
        if self.data.shapes_config:
            return self.data.shapes_config["bias_word"], self.data.shapes_config["bias_partner"]
        return None

    def _tuned_scores(self, captioner: Captioner, min_count: int, full_metrics: bool) -> dict:
        p = self._predict(captioner) if captioner is not self.captioner else self.predictions
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
        biased = self._biased_word()
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
