"""Region perturbation ("pixel flipping"; Samek et al. 2017, "Evaluating the visualization of what a
deep neural network has learned", IEEE TNNLS) for the words of a caption.

For one explained word and one heatmap, the image is cut into ``patch`` × ``patch`` regions at the
model's input size, ranked by the sum of their relevance and replaced one after another — most
relevant first (MoRF), least relevant first (LeRF) or in a random order — by a blurred copy of the
image or by the dataset's mean colour. After each step the model is re-run with the caption prefix
fixed (teacher forcing) and the word's fc logit and probability are recorded: ``f(x^(0)) ..
f(x^(L))``.

* AOPC (Samek et al., eq. 12): ``1/(L+1) Σ_{k=0..L} f(x^(0)) − f(x^(k))`` — large for MoRF when the
  map finds the evidence first, small for LeRF;
* ABPC, the area between the curves (Schulz et al. 2020): ``AOPC_MoRF − AOPC_LeRF``;
* the random order is the baseline a map must beat; every mean has a 95% bootstrap interval over
  words, and ``morf_minus_random`` is the paired per-word difference with its interval.

Patches and orders follow Quantus's ``RegionPerturbation`` (0.6): non-overlapping patches in
row-major order (clipped at a border the patch size does not divide), ranked by relevance sums;
``tests/test_faithfulness.py`` checks the curves against Quantus on the same inputs.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from tqdm import tqdm

from ..models import Captioner
from .context import Mention, Predictions, image_batches
from .intervals import NOT_MEASURED, above, bootstrap_mean_interval, shown, with_interval
from .registry import Experiment, Finding, Option, Rows, register_experiment

ORDERS = ("morf", "lerf", "random")
REPLACEMENTS = ("blur", "mean")
ScoreFunction = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # pixels [N,3,H,W] -> logit, prob [N]


def patch_masks(height: int, width: int, patch: int) -> torch.Tensor:
    """Boolean masks [P, H, W] of the non-overlapping ``patch``-sized regions, row-major (the last
    row and column are narrower where ``patch`` does not divide the side)."""
    if patch < 1:
        raise ValueError(f"the patch size must be ≥ 1, got {patch}")
    masks = []
    for top in range(0, height, patch):
        for left in range(0, width, patch):
            mask = torch.zeros(height, width, dtype=torch.bool)
            mask[top: top + patch, left: left + patch] = True
            masks.append(mask)
    return torch.stack(masks)


def patch_order(heatmap: torch.Tensor, masks: torch.Tensor, order: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """The patch indices [P] in the order they are removed: by the summed relevance of each patch,
    largest first ("morf") or smallest first ("lerf"), or a random permutation ("random", needs
    ``rng``). Ties keep the row-major order."""
    if order == "random":
        if rng is None:
            raise ValueError("a random order needs a numpy Generator (rng)")
        return rng.permutation(len(masks))
    sums = (masks.double() * heatmap.double().unsqueeze(0)).sum(dim=(1, 2)).numpy()  # [P]
    if order == "morf":
        return np.argsort(-sums, kind="stable")
    if order == "lerf":
        return np.argsort(sums, kind="stable")
    raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")


def gaussian_blur(pixels: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [N, C, H, W] (reflect padding, kernel radius 3σ)."""
    radius = max(1, int(round(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=pixels.dtype, device=pixels.device)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    channels = pixels.shape[1]
    padded = F.pad(pixels, (radius, radius, 0, 0), mode="reflect")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    padded = F.pad(out, (0, 0, radius, radius), mode="reflect")
    return F.conv2d(padded, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)


def replacement_image(pixels: torch.Tensor, mode: str, mean: torch.Tensor | None = None,
                      sigma: float = 4.0) -> torch.Tensor:
    """What removed regions show, [N, C, H, W] like ``pixels``: a blurred copy ("blur", Gaussian σ in
    pixels) or the dataset's mean colour ("mean": ``mean`` [C], in the same normalised space)."""
    if mode == "blur":
        return gaussian_blur(pixels, sigma)
    if mode == "mean":
        if mean is None:
            raise ValueError('the "mean" replacement needs the dataset mean colour')
        return mean.to(pixels).view(1, -1, 1, 1).expand_as(pixels).clone()
    raise ValueError(f"replacement must be one of {', '.join(REPLACEMENTS)}, got {mode!r}")


@torch.no_grad()
def perturbation_curve(score: ScoreFunction, pixels: torch.Tensor, replacement: torch.Tensor, masks: torch.Tensor,
                       order: np.ndarray, regions: int, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The scores after 0, 1, .., ``regions`` patches of ``order`` are replaced: (logits, probabilities),
    each [regions + 1]. ``pixels``/``replacement``: [C, H, W]; ``score`` maps a batch of inputs to the
    explained word's (logit, probability)."""
    regions = min(regions, len(order))
    removed = torch.cumsum(masks[torch.as_tensor(order[:regions], dtype=torch.long)].float(), dim=0) > 0  # [R, H, W]
    removed = torch.cat([torch.zeros_like(removed[:1]), removed])  # step 0: the image itself
    logits, probabilities = [], []
    for start in range(0, len(removed), batch_size):
        chunk = removed[start: start + batch_size].unsqueeze(1).to(pixels.device)  # [n, 1, H, W]
        inputs = torch.where(chunk, replacement.unsqueeze(0), pixels.unsqueeze(0))
        logit, probability = score(inputs)
        logits.append(logit.double().cpu())
        probabilities.append(probability.double().cpu())
    return torch.cat(logits).numpy(), torch.cat(probabilities).numpy()


def aopc(curve: np.ndarray) -> float:
    """Samek et al.'s AOPC of one curve f(x^(0)) .. f(x^(L)): the mean drop over the L + 1 steps."""
    return float(np.mean(curve[0] - curve))


def word_score(captioner: Captioner, token_ids: Sequence[int], position: int, model: torch.nn.Module | None = None
               ) -> ScoreFunction:
    """The score function of word ``position`` of a caption (``token_ids``: <start> w_1 .. <end>):
    inputs [N, 3, H, W] -> its fc logit and softmax probability [N], prefix fixed (teacher forcing)."""
    network = model if model is not None else captioner.model
    tokens = torch.tensor(list(token_ids[: position + 1]), device=captioner.device)
    target = int(token_ids[position + 1])

    dtype = next(network.parameters()).dtype

    def score(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = network(pixels.to(dtype), tokens.unsqueeze(0).expand(len(pixels), -1))[:, position]  # [N, V]
        return logits[:, target], torch.softmax(logits.double(), dim=-1)[:, target]

    return score


@dataclass
class Curves:
    """Every curve of one experiment: ``logit``/``probability`` [words, methods + random, orders, steps+1]
    (the random row holds its one random order in every order slot)."""

    methods: list[str]  # the maps' methods, then "random"
    orders: list[str]
    logit: np.ndarray
    probability: np.ndarray


def summarise(curves: Curves, kinds: Sequence[str]) -> list[dict]:
    """One row per word kind ("object", "other", "all") and method: AOPC of MoRF and LeRF, ABPC,
    and the paired MoRF difference to the random order, on logits (and ``*_prob`` on
    probabilities), means with 95% bootstrap intervals over words."""
    kinds_array = np.asarray(kinds)
    random = curves.methods.index("random")
    rows = []
    for kind in ("object", "other", "all"):
        chosen = np.ones(len(kinds_array), bool) if kind == "all" else kinds_array == kind
        if kind == "all" and len(set(kinds)) < 2 or not chosen.any():
            continue
        for m, method in enumerate(curves.methods):
            row: dict = {"words": kind, "method": method, "count": int(chosen.sum())}
            for suffix, values in (("", curves.logit), ("_prob", curves.probability)):
                per_word = {order: np.array([aopc(c) for c in values[chosen, m, o]])
                            for o, order in enumerate(curves.orders)}
                random_morf = np.array([aopc(c) for c in values[chosen, random, 0]])
                measures = {"aopc_morf": per_word["morf"], "aopc_lerf": per_word["lerf"],
                            "abpc": per_word["morf"] - per_word["lerf"]}
                if method != "random":
                    measures["morf_minus_random"] = per_word["morf"] - random_morf
                for name, per in measures.items():
                    low, high = bootstrap_mean_interval(per)
                    row |= {f"{name}{suffix}": float(per.mean()), f"{name}{suffix}_low": low,
                            f"{name}{suffix}_high": high}
            rows.append(row)
    return rows


def plot_curves(curves: Curves, kinds: Sequence[str], path) -> None:
    """Mean logit drop f(x^(0)) − f(x^(k)) against k: MoRF solid, LeRF dashed, random dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    if len(kinds):
        drops = curves.logit[:, :, :, :1] - curves.logit  # [W, M, O, S]
        steps = np.arange(drops.shape[-1])
        colours = plt.get_cmap("tab10")
        for m, method in enumerate(curves.methods):
            if method == "random":
                ax.plot(steps, drops[:, m, 0].mean(0), ":", color="black", label="random")
                continue
            ax.plot(steps, drops[:, m, 0].mean(0), "-", color=colours(m), label=f"{method} MoRF")
            ax.plot(steps, drops[:, m, 1].mean(0), "--", color=colours(m), label=f"{method} LeRF")
    ax.set_xlabel("patches removed")
    ax.set_ylabel("mean drop of the word's logit")
    ax.set_title(f"Region perturbation, {len(kinds)} words")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def other_words(predictions: Predictions, count: int, seed: int = 0) -> list[Mention]:
    """A sample of ``count`` words that are not object words: one random position per caption, in
    image order (``category`` empty, ``true_positive`` False)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for index, caption in enumerate(predictions.captions):
        if len(chosen) >= count:
            break
        objects = {o.position for o in predictions.synonyms.find(caption.words)} if predictions.synonyms else set()
        candidates = [p for p in range(len(caption.words)) if p not in objects]
        if candidates:
            position = int(rng.choice(candidates))
            chosen.append(Mention(index, position, caption.words[position], "", False))
    return chosen


def dataset_mean(captioner: Captioner, predictions: Predictions, batch_size: int = 64) -> torch.Tensor:
    """The mean colour [3] of the predictions' images, normalised as the model's inputs are."""
    indices = list(range(len(predictions.records)))
    total, count = torch.zeros(3, dtype=torch.float64), 0
    for images in predictions.images([indices[i: i + batch_size] for i in range(0, len(indices), batch_size)]):
        total += images.double().sum(dim=(0, 2, 3)) / 255
        count += images.shape[0] * images.shape[2] * images.shape[3]
    encoder = captioner.model.encoder
    return ((total / max(count, 1)).float() - torch.tensor(encoder.mean)) / torch.tensor(encoder.std)


def region_perturbation(captioner: Captioner, predictions: Predictions, explanations: dict[str, dict],
                        mentions: Sequence[Mention], patch: int = 8, regions: int = 100, replacement: str = "blur",
                        seed: int = 0, progress: bool = True) -> Curves:
    """MoRF and LeRF curves of every mention for each method's map (``explanations[method][mention]``
    is its single-word Explanation) and one random order per mention."""
    if replacement not in REPLACEMENTS:
        raise ValueError(f"replacement must be one of {', '.join(REPLACEMENTS)}, got {replacement!r}")
    rng = np.random.default_rng(seed)
    methods = list(explanations)
    side = predictions.image_size
    masks = patch_masks(side, side, patch)
    steps = min(regions, len(masks)) + 1
    shape = (len(mentions), len(methods) + 1, 2, steps)
    curves = Curves(methods + ["random"], ["morf", "lerf"], np.zeros(shape), np.zeros(shape))
    mean = dataset_mean(captioner, predictions) if replacement == "mean" else None
    index = {m: k for k, m in enumerate(mentions)}
    batches = list(image_batches(mentions, 16))
    images = predictions.images([[i for i, _ in batch] for batch in batches])
    bar = tqdm(total=len(mentions), desc="region perturbation", disable=not progress)
    for batch, decoded in zip(batches, images):
        pixels = captioner.preprocess(list(decoded))
        removed_with = replacement_image(pixels, replacement, mean, sigma=patch / 2)
        for row, (image, group) in enumerate(batch):
            for mention in group:
                k = index[mention]
                score = word_score(captioner, predictions.captions[image].token_ids, mention.position)
                run = lambda order: perturbation_curve(score, pixels[row], removed_with[row], masks,  # noqa: E731
                                                       order, steps - 1)
                for m, method in enumerate(methods):
                    heatmap = explanations[method][mention].image[0].float()
                    for o, order in enumerate(("morf", "lerf")):
                        curves.logit[k, m, o], curves.probability[k, m, o] = run(patch_order(heatmap, masks, order))
                logit, probability = run(rng.permutation(len(masks)))
                curves.logit[k, -1], curves.probability[k, -1] = logit, probability  # both order slots
                bar.update(1)
    bar.close()
    return curves


# ------------------------------------------------------------------------- the experiment
COLUMNS = ("words", "method", "count", "aopc_*", "abpc*", "morf_minus_random*", "note?")
CLAIM = ("Region perturbation (beyond the papers): removing the regions LRP ranks first lowers the object word's "
         "logit faster than a random order (AOPC, MoRF)")


def faithfulness_findings(results: dict, arch: str) -> list[Finding]:
    table = Rows.of(results, "faithfulness", arch)
    if not table.rows:
        return [(CLAIM, NOT_MEASURED, "not measured")]

    def perturbed(method) -> tuple[float, float]:
        return table.interval(table.find(words="object", method=method), "morf_minus_random")

    return [(CLAIM, above(perturbed("lrp"), (0.0, 0.0)), "MoRF AOPC minus random, per word: " + ", ".join(
        f"{m} {shown(perturbed(m), 2)}" for m in ("lrp", "gradcam", "guided_gradcam", "attention")))]


def faithfulness_section(results: dict, archs: list[str]) -> list[str]:
    from .tables import markdown_table

    lines = ["## Region perturbation (Samek et al. 2017) — beyond the papers", "",
             "AOPC of the word's logit when its most (MoRF) or least (LeRF) relevant regions are removed first; "
             "ABPC = MoRF − LeRF; `MoRF − random` is the paired margin over a random order. Means with 95% "
             "bootstrap intervals over words; curves in `results/<arch>/faithfulness.png`.", ""]
    for arch in archs:
        rows = results.get("faithfulness", {}).get(arch, [])
        if rows:
            lines += [f"**{arch}**", "", markdown_table([
                {"words": r.get("words"), "method": r.get("method"), "n": r.get("count"),
                 "AOPC MoRF": with_interval(r, "aopc_morf"), "AOPC LeRF": with_interval(r, "aopc_lerf"),
                 "ABPC": with_interval(r, "abpc"), "MoRF − random": with_interval(r, "morf_minus_random")}
                for r in rows]), ""]
    return lines


def _show_faithfulness(rows, bench, options: dict) -> None:
    from .tables import markdown_table

    print(markdown_table([{k: v for k, v in r.items() if not k.endswith(("_low", "_high")) and "_prob" not in k}
                          for r in rows]))
    print(f"intervals and probabilities: {bench.out / 'faithfulness.md'}")


WORDS = Option("words", 100, "Most correctly named object words to perturb.", "int", 0, 1_000_000)
OTHER = Option("other", 50, "Other (non-object) words to perturb, one per caption.", "int", 0, 1_000_000,
               flag="other-words")
METHODS = Option("methods", None, "Comma-separated explanation methods (default: every method the model has).",
                 "methods")


@register_experiment(Experiment(
    name="faithfulness", verb="faithfulness", title="Region perturbation", papers="Samek et al. 2017", order=7,
    options=(WORDS, OTHER, Option("patch", 8, "Side of the square regions removed, in pixels at the model's input "
                                  "size.", "int", 1, 4096),
             Option("regions", 100, "Regions removed one after another (the curve's length).", "int", 1, 100_000),
             Option("replacement", "blur", "What a removed region shows: a blurred copy of the image or the "
                    "dataset's mean colour.", "choice", choices=("blur", "mean")),
             Option("seed", 0, "Seed of the random order and of the other words' sample.", "int", 0), METHODS),
    columns=COLUMNS, findings=faithfulness_findings, section=faithfulness_section, show=_show_faithfulness,
    demo=lambda quick, seed: {"words": 3 if quick else 12, "other": 2 if quick else 6, "regions": 8 if quick else 32,
                              "seed": seed}))
def faithfulness(bench, words: int = 100, other: int = 50, patch: int = 8, regions: int = 100,
                 replacement: str = "blur", seed: int = 0, methods: tuple[str, ...] | None = None) -> list[dict]:
    """Region perturbation (Samek et al. 2017): remove PATCH×PATCH regions most relevant first (MoRF),
    least relevant first (LeRF) or in random order, re-run the model with the caption prefix fixed
    and follow the word's logit; AOPC per order, ABPC = MoRF − LeRF and MoRF's margin over random,
    with 95% intervals over words. Object words' explanations come from (and go to) the explanation
    store. Writes faithfulness.{csv,json,md}, faithfulness.png and faithfulness_curves.npz."""
    from ..explain import methods_for
    from ..io import atomic_write
    from .tables import write_table

    mentions, kinds = bench.sample_words(words, other, seed)
    methods = methods or methods_for(bench.captioner.model)
    explanations = {method: bench.word_explanations(method, mentions) for method in methods}
    curves = region_perturbation(bench.captioner, bench.predictions, explanations, mentions, patch, regions,
                                 replacement, seed, bench.progress)
    rows = summarise(curves, kinds)
    if not mentions:
        rows = [{"words": "none", "note": "no caption word to perturb"}]
    write_table(bench.out, "faithfulness", rows,
                f"Region perturbation ({patch}×{patch} patches replaced by {'a blurred copy' if replacement == 'blur' else 'the dataset mean'}, "
                f"{curves.logit.shape[-1] - 1} steps): AOPC of the word's logit, most relevant first (MoRF) and "
                f"least relevant first (LeRF), ABPC = MoRF − LeRF; 95% bootstrap intervals over words: {bench.scope}")
    records = bench.predictions.records

    def write(tmp) -> None:  # the curves [words, methods, orders, steps] and who is who
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, logit=curves.logit, probability=curves.probability,
                                methods=np.array(curves.methods), orders=np.array(curves.orders),
                                kinds=np.array(kinds), words=np.array([m.word for m in mentions]),
                                image_ids=np.array([records[m.image].image_id for m in mentions]),
                                positions=np.array([m.position for m in mentions]))

    atomic_write(bench.out / "faithfulness_curves.npz", write)
    plot_curves(curves, kinds, bench.out / "faithfulness.png")
    return rows
