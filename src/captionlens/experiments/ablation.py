"""Word ablation (ICML Table 2; journal appendix D, Table IV): do the preceding words that a linguistic
explanation ranks highest matter to the model?

For each target word at caption position ≥ ``skip`` (the papers: the first 5 words are not used),
delete the ``top`` preceding words with the highest LRP relevance, the highest |Grad*| (the gradient
at the embedding, summed), or ``top`` random ones; feed the edited prefix to the same model with the
same image and compare the target word's probability with the unedited one. Reported per word type
(stop words, object words) and ranking: how often the probability drops, and the mean drop.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

from ..explain import explain_batch
from ..models import Captioner
from .context import Predictions, image_batches
from .intervals import FAILS, HOLDS, INCONCLUSIVE, NOT_MEASURED, all_of, shown
from .registry import Experiment, Finding, Option, Rows, register_experiment

RANKINGS = ("lrp", "grad", "random")


@dataclass(frozen=True)
class Target:
    image: int
    position: int  # of the target word in the caption
    kind: str  # "stop" or "object"


def ablation_targets(predictions: Predictions, skip: int = 5) -> list[Target]:
    targets = []
    for index, caption in enumerate(predictions.captions):
        objects = {o.position for o in predictions.synonyms.find(caption.words)} if predictions.synonyms else set()
        for position, word in enumerate(caption.words):
            if position < skip:
                continue
            if position in objects:
                targets.append(Target(index, position, "object"))
            elif word in ENGLISH_STOP_WORDS:
                targets.append(Target(index, position, "stop"))
    return targets


def choose_deletions(relevance: np.ndarray, top: int, ranking: str, rng: np.random.Generator) -> list[int]:
    """Indices (0-based caption positions) of the preceding words to delete, given the relevance of
    <start>, w_0 .. w_{t-1} (<start> is never deleted)."""
    words = relevance[1:]
    count = min(top, len(words))
    if ranking == "random":
        return sorted(rng.choice(len(words), size=count, replace=False).tolist())
    order = np.argsort(-(np.abs(words) if ranking == "grad" else words), kind="stable")
    return sorted(order[:count].tolist())


@torch.no_grad()
def target_probabilities(captioner: Captioner, pixels: torch.Tensor, prefixes: Sequence[list[str]],
                         targets: Sequence[str]) -> np.ndarray:
    """P(target | image, prefix) for each (image row, prefix, target)."""
    vocab = captioner.vocab
    ids = [vocab.encode(p)[:-1] for p in prefixes]  # <start> + prefix
    longest = max(len(i) for i in ids)
    tokens = torch.tensor([i + [vocab.pad_id] * (longest - len(i)) for i in ids], device=pixels.device)
    log_probs = torch.log_softmax(captioner.model(pixels, tokens), dim=-1)  # [N, L, V]
    rows = torch.arange(len(ids), device=pixels.device)
    last = torch.tensor([len(i) - 1 for i in ids], device=pixels.device)
    wanted = torch.tensor([vocab.index(t) for t in targets], device=pixels.device)
    return log_probs[rows, last, wanted].exp().cpu().numpy()


def word_ablation(captioner: Captioner, predictions: Predictions, top: int = 3, skip: int = 5, seed: int = 0,
                  batch_size: int = 32) -> list[dict]:
    """The ablation table: one row per word type and ranking."""
    targets = ablation_targets(predictions, skip)
    rng = np.random.default_rng(seed)
    drops: dict[tuple[str, str], list[float]] = {(k, r): [] for k in ("stop", "object") for r in RANKINGS}
    batches = list(image_batches(targets, batch_size))
    for batch, images in zip(batches, predictions.images([[i for i, _ in batch] for batch in batches])):
        pictures = list(images)
        captions = [predictions.captions[i] for i, _ in batch]
        positions = [[t.position for t in group] for _, group in batch]
        relevance = {"lrp": explain_batch(captioner, pictures, captions, "lrp", words=positions),
                     "grad": explain_batch(captioner, pictures, captions, "gradcam", words=positions)}
        pixels = captioner.preprocess(pictures)
        rows, prefixes, words, keys = [], [], [], []
        for b, (i, group) in enumerate(batch):
            caption = predictions.captions[i].words
            for row, target in enumerate(group):
                prefix = caption[: target.position]
                rows.append(b), prefixes.append(prefix), words.append(caption[target.position]), keys.append(None)
                for ranking in RANKINGS:
                    source = relevance["lrp" if ranking == "random" else ranking][b]
                    values = source.preceding[row, : target.position + 1].numpy()
                    deleted = set(choose_deletions(values, top, ranking, rng))
                    rows.append(b), words.append(caption[target.position]), keys.append((target.kind, ranking))
                    prefixes.append([w for k, w in enumerate(prefix) if k not in deleted])
        probabilities = target_probabilities(captioner, pixels[rows], prefixes, words)
        original = None
        for probability, key in zip(probabilities, keys):
            if key is None:
                original = probability
            else:
                drops[key].append(float(original - probability))
    table = []
    for (kind, ranking), values in drops.items():
        baseline = None if ranking == "random" else np.array(drops[(kind, "random")])
        table.append({"words": kind, "ranking": ranking} | drop_statistics(np.array(values), baseline))
    return table


def drop_statistics(drops: np.ndarray, random_drops: np.ndarray | None = None) -> dict:
    """How often and how much a target's probability dropped: the share, the mean with its 95% interval
    (normal approximation) and, against the random deletions of the same targets, the p-value of a
    paired Wilcoxon signed-rank test (two-sided); empty cells carry a note."""
    from scipy.stats import wilcoxon

    n = len(drops)
    row = {"targets": n, "drop_share": float((drops > 0).mean()) if n else float("nan"),
           "mean_drop": float(drops.mean()) if n else float("nan"),
           "std_drop": float(drops.std()) if n else float("nan")}
    half = 1.96 * drops.std(ddof=1) / np.sqrt(n) if n > 1 else float("nan")
    row |= {"drop_low": row["mean_drop"] - half, "drop_high": row["mean_drop"] + half}
    if random_drops is None:
        row |= {"p_vs_random": float("nan"), "note": "the random baseline itself"}
    elif n and np.any(drops != random_drops):
        row["p_vs_random"] = float(wilcoxon(drops, random_drops).pvalue)
    else:
        row |= {"p_vs_random": float("nan"), "note": "no targets, or no difference from random"}
    return row


# ------------------------------------------------------------------------- the experiment
PAPER_ABLATION = {  # Table 2: share of targets whose probability drops (MSCOCO), %
    "adaptive": {("stop", "lrp"): 90.32, ("stop", "grad"): 90.25, ("stop", "random"): 78.32,
                 ("object", "lrp"): 92.06, ("object", "grad"): 92.97, ("object", "random"): 84.30},
    "gridtd": {("stop", "lrp"): 71.21, ("stop", "grad"): 73.65, ("stop", "random"): 17.49,
               ("object", "lrp"): 54.87, ("object", "grad"): 48.04, ("object", "random"): 11.76},
}
COLUMNS = ("words", "ranking", "targets", "drop_share", "mean_drop", "std_drop", "drop_low", "drop_high",
           "p_vs_random", "note?")


def ablation_findings(results: dict, arch: str) -> list[Finding]:
    table = Rows.of(results, "ablation", arch)
    if not table.rows:
        return [(CLAIM, NOT_MEASURED, "not measured")]

    def ablated(kind, ranking) -> str:
        """Does deleting the words ``ranking`` puts first lower the probability more than random
        deletions of the same targets? From the paired Wilcoxon test (p < 0.05) and the mean drops."""
        row, random = table.find(words=kind, ranking=ranking), table.find(words=kind, ranking="random")
        p, mean, baseline = table.value(row, "p_vs_random"), table.value(row, "mean_drop"), table.value(random, "mean_drop")
        if any(np.isnan(v) for v in (p, mean, baseline)):
            return NOT_MEASURED
        return INCONCLUSIVE if p >= 0.05 else HOLDS if mean > baseline else FAILS

    def drop_text(kind) -> str:
        rows = {r: table.find(words=kind, ranking=r) for r in RANKINGS}
        return f"{kind} words: mean drop " + ", ".join(
            f"{name} {table.value(rows[r], 'mean_drop'):.3f} {shown(table.interval(rows[r], 'drop'))}"
            + (f" (p {table.value(rows[r], 'p_vs_random'):.2g})" if r != "random" else "")
            for name, r in (("LRP", "lrp"), ("Grad*", "grad"), ("random", "random")))

    return [(CLAIM, all_of(*(ablated(k, r) for k in ("stop", "object") for r in ("lrp", "grad"))),
             "; ".join(drop_text(k) for k in ("stop", "object")))]


CLAIM = ("Deleting the preceding words that LRP and Grad* rank highest lowers the target word's probability more "
         "than deleting random ones")


def ablation_section(results: dict, archs: list[str]) -> list[str]:
    from .tables import markdown_table

    rows = []
    for arch in archs:
        table = Rows.of(results, "ablation", arch)
        for row in table.rows:
            paper = PAPER_ABLATION.get(arch, {}).get((row["words"], row["ranking"]), float("nan"))
            rows.append({"model": arch, "words": row["words"], "ranking": row["ranking"],
                         "targets": table.value(row, "targets"), "ours %": 100 * table.value(row, "drop_share"),
                         "mean drop": table.value(row, "mean_drop"), "paper % (COCO)": paper})
    return ["## Table 2 — word ablation: probability of the target word drops (%)", "",
            markdown_table(rows) if rows else "not measured\n", ""]


def _show_table(rows, bench, options: dict) -> None:
    from .tables import markdown_table

    print(markdown_table(rows))


@register_experiment(Experiment(
    name="ablation", verb="ablation", title="Word ablation", papers="Table 2, Table IV", order=1,
    options=(Option("top", 3, "Preceding words deleted per target.", "int", 1, 1000),
             Option("skip", 5, "Targets start at this caption position (paper: 5).", "int", 0, 1000),
             Option("seed", 0, "Seed of the random baseline.", "int", 0)),
    columns=COLUMNS, demo=lambda quick, seed: {"seed": seed}, findings=ablation_findings, section=ablation_section,
    show=_show_table))
def ablation(bench, top: int = 3, skip: int = 5, seed: int = 0) -> list[dict]:
    """Word ablation (Table 2, Table IV): delete the top preceding words by LRP, by |Grad*| or at
    random and report how often, and how much, the target word's probability drops."""
    from .tables import plot_bars, write_table

    rows = word_ablation(bench.captioner, bench.predictions, top, skip, seed)
    reason = ("no object words are known (pass --synonyms)" if bench.predictions.synonyms is None
              else f"no caption has such a word at position ≥ {skip} (lower --skip)")
    rows = [row | ({"note": reason} if not row["targets"] else {}) for row in rows]
    write_table(bench.out, "ablation", rows, f"Word ablation: top-{top} preceding words deleted "
                f"(targets at position ≥ {skip}): {bench.scope}")
    plot_bars([r for r in rows if r["targets"]], ("words", "ranking"), "drop_share", bench.out / "ablation.png",
              "share of targets whose probability drops")
    return rows
