"""Sanity checks of the explanations, per word of a caption.

* **Cascading model-parameter randomisation** (Adebayo et al. 2018, "Sanity checks for saliency
  maps", NeurIPS): the model's blocks are re-initialised one after another, from the output layer
  down through the decoder and into the encoder, and after each step the same words of the same
  caption are explained again. A method whose maps stay similar to the trained model's does not
  depend on what the model learned. Similarity per word: Spearman's rank correlation of the image
  maps (signed and of their absolute values, as Adebayo et al.), the SSIM of the max-normalised
  maps, and Spearman's correlation of the preceding-word relevance (words with ≥ 3 preceding tokens).
  Re-initialisation is each module's own ``reset_parameters`` after ``torch.manual_seed(seed + 1)``,
  as Quantus's ``MPRT`` does it (``tests/test_faithfulness.py`` compares the two).
* **Input invariance** (Kindermans et al. 2019, "The (un)reliability of saliency methods"): a copy
  of the model whose first convolution absorbs a constant shift of its input (bias ``b − c·ΣW``,
  padding with ``c``) computes exactly the same function of the shifted input ``x + c`` as the model
  of ``x``. A method that explains the two differently reacts to something the model ignores.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..explain import Explanation
from ..models import Captioner
from .context import Mention, Predictions, explain_mentions
from .intervals import NOT_MEASURED, below, bootstrap_mean_interval, shown
from .registry import Experiment, Finding, Option, Rows, register_experiment

MIN_PRECEDING = 3  # a rank correlation of preceding-word relevance needs a few tokens


# ------------------------------------------------------------------------- similarities
def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two maps (flattened); NaN where either is constant."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b)[0])


SSIM_WINDOW = 7  # scikit-image's default: a 7×7 uniform window
SSIM_K1, SSIM_K2 = 0.01, 0.03  # Wang et al. 2004, eq. 7 and 9


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM (Wang et al. 2004, "Image quality assessment: from error visibility to structural
    similarity") of two 2-D maps, each divided by its largest |value| first (so maps of different scales
    compare; data range 2); NaN where either map is all zero.

    Computed as scikit-image's ``structural_similarity`` does by default — local means, variances and
    the covariance in 7×7 uniform windows (reflected at the border, sample covariance N/(N−1)), the SSIM
    map averaged over the pixels at least 3 from the border — so scikit-image is not needed at run time
    (``tests/test_faithfulness.py`` compares the two)."""
    from scipy.ndimage import uniform_filter

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"SSIM compares two 2-D maps of one shape, not {a.shape} and {b.shape}")
    if min(a.shape) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs maps of at least {SSIM_WINDOW}×{SSIM_WINDOW} pixels, not {a.shape}")
    if not np.abs(a).max() or not np.abs(b).max():
        return float("nan")
    x, y = a / np.abs(a).max(), b / np.abs(b).max()
    mean = lambda image: uniform_filter(image, size=SSIM_WINDOW, mode="reflect")  # noqa: E731
    n = SSIM_WINDOW ** 2
    unbiased = n / (n - 1)
    mu_x, mu_y = mean(x), mean(y)
    var_x = unbiased * (mean(x * x) - mu_x * mu_x)
    var_y = unbiased * (mean(y * y) - mu_y * mu_y)
    cov_xy = unbiased * (mean(x * y) - mu_x * mu_y)
    data_range = 2.0
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    border = (SSIM_WINDOW - 1) // 2
    return float(ssim_map[border:-border, border:-border].mean())


def similarities(original: Explanation, other: Explanation) -> dict[str, float]:
    """How alike two single-word explanations are (see the module docstring)."""
    a, b = original.image[0].numpy(), other.image[0].numpy()
    position = original.positions[0]
    preceding_a, preceding_b = original.preceding[0, : position + 1].numpy(), other.preceding[0, : position + 1].numpy()
    return {
        "spearman": spearman(a, b),
        "spearman_abs": spearman(np.abs(a), np.abs(b)),
        "ssim": ssim(a, b),
        "preceding_spearman": spearman(preceding_a, preceding_b) if position + 1 >= MIN_PRECEDING else float("nan"),
    }


MEASURES = ("spearman", "spearman_abs", "ssim", "preceding_spearman")


def _summary(values: list[dict[str, float]]) -> dict:
    """Mean and 95% bootstrap interval of each measure over words (NaNs left out)."""
    row: dict = {"words": len(values)}
    for measure in MEASURES:
        per = np.array([v[measure] for v in values], dtype=float)
        low, high = bootstrap_mean_interval(per)
        row |= {measure: float(np.nanmean(per)) if np.isfinite(per).any() else float("nan"),
                f"{measure}_low": low, f"{measure}_high": high}
    return row


# ------------------------------------------------------------------- randomisation
def randomisation_blocks(captioner: Captioner, pixels: torch.Tensor, token_ids: torch.Tensor
                         ) -> list[tuple[str, list[nn.Module]]]:
    """The model's named blocks in the order a cascading randomisation takes them: output layer
    first, down through the decoder, then the encoder from its top layer. A block is a decoder
    child (``decoder.fc``, ``decoder.attention`` ..), one layer of a decoder's layer list
    (``decoder.layers.2``) or an encoder unit three names deep (``encoder.features.17``,
    ``encoder.layer4.2``); its modules are those with parameters.
    The order is the reverse of the order in which one forward first calls each block."""
    model = captioner.model
    first_call: list[str] = []
    blocks: dict[str, list[nn.Module]] = {}
    named = dict(model.named_modules())
    for name, module in named.items():
        if list(module.parameters(recurse=False)) and hasattr(module, "reset_parameters"):
            parts = name.split(".")
            deep = parts[0] == "encoder" or isinstance(named.get(".".join(parts[:2])), nn.ModuleList)
            blocks.setdefault(".".join(parts[:3] if deep else parts[:2]), []).append(module)
    block_of = {id(m): block for block, modules in blocks.items() for m in modules}
    hooks = [m.register_forward_hook(lambda m, i, o: first_call.append(block_of[id(m)]))
             for modules in blocks.values() for m in modules]
    try:
        with torch.no_grad():
            model(pixels.to(next(model.parameters()).dtype), token_ids)
    finally:
        for hook in hooks:
            hook.remove()
    order = list(dict.fromkeys(first_call))[::-1]
    return [(block, blocks[block]) for block in order]


def reinitialise(modules: Sequence[nn.Module], seed: int) -> None:
    """Each module's ``reset_parameters`` after ``torch.manual_seed(seed + 1)`` (Quantus's MPRT),
    without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        for module in modules:
            torch.manual_seed(seed + 1)
            module.reset_parameters()


def cascading_randomisation(captioner: Captioner, predictions: Predictions, mentions: Sequence[Mention],
                            methods: Sequence[str], seed: int = 0, blocks: Sequence[str] | None = None,
                            originals: dict[str, dict[Mention, Explanation]] | None = None,
                            progress: bool = True) -> list[dict]:
    """One row per randomisation step and method (step 0 = the trained model against itself is left
    out): the block randomised last, and the mean similarity of each word's explanation to the
    trained model's (with 95% intervals). ``blocks`` overrides the order (names from
    ``randomisation_blocks``, or any module names); ``originals`` reuses the trained model's
    explanations (e.g. from an explanation store)."""
    if not mentions:
        return []
    first = predictions.captions[mentions[0].image]
    probe = captioner.preprocess(list(next(predictions.images([[mentions[0].image]]))))
    tokens = torch.tensor([first.token_ids[:-1]], device=captioner.device)
    model = copy.deepcopy(captioner.model)
    randomised = captioner.with_model(model)
    named = dict(model.named_modules())
    steps = randomisation_blocks(randomised, probe, tokens) if blocks is None else \
        [(name, [named[name]]) for name in blocks]
    originals = originals or {}
    originals = {method: originals.get(method) or explain_mentions(captioner, predictions, mentions, method)
                 for method in methods}
    rows = []
    for step, (block, modules) in enumerate(tqdm(steps, desc="randomisation", disable=not progress), start=1):
        reinitialise(modules, seed)
        for method in methods:
            after = explain_mentions(randomised, predictions, mentions, method)
            values = [similarities(originals[method][m], after[m]) for m in mentions]
            rows.append({"step": step, "block": block, "method": method} | _summary(values))
    return rows


def plot_randomisation(rows: list[dict], path) -> None:
    """Adebayo et al.'s figure: the rank correlation of each method's maps with the trained model's
    after each cascading step — image maps (|values|, as Adebayo et al.) and preceding words."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(dict.fromkeys(r["block"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(2 * max(5, 0.4 * len(blocks) + 2), 4.4), sharey=True)
    for ax, measure, title in zip(axes, ("spearman_abs", "preceding_spearman"), ("image maps (|values|)", "preceding words")):
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            ax.plot([r["step"] for r in mine], [r[measure] for r in mine], "o-", ms=3, label=method)
        ax.set_xticks(range(1, len(blocks) + 1), blocks, rotation=70, ha="right", fontsize=7)
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_ylim(-0.5, 1.05)
        ax.set_title(f"{title}: randomised up to ↓", fontsize=9)
    axes[0].set_ylabel("Spearman ρ with the trained model's explanation")
    axes[0].legend(fontsize=7)
    fig.suptitle("Cascading randomisation, output layer first", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------- input invariance
def shift_absorbing_copy(captioner: Captioner, shift: float) -> Captioner:
    """A copy of the captioner whose first convolution takes ``x + shift`` and computes what the
    original computes of ``x``: the zero padding becomes padding with ``shift`` and the bias
    ``b − shift · Σ W`` (Kindermans et al. 2019)."""
    if not math.isfinite(shift):
        raise ValueError(f"the input shift must be a finite number, got {shift}")
    model = copy.deepcopy(captioner.model)
    name, conv = next(((n, m) for n, m in model.encoder.named_modules() if isinstance(m, nn.Conv2d)), (None, None))
    if conv is None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise ValueError("input invariance needs an encoder whose first layer is a Conv2d with numeric zero padding")
    absorbing = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                          conv.groups, bias=True, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        absorbing.weight.copy_(conv.weight)
        bias = conv.bias if conv.bias is not None else torch.zeros(conv.out_channels)
        absorbing.bias.copy_(bias - shift * conv.weight.sum(dim=(1, 2, 3)))
    pad_h, pad_w = conv.padding
    parent_name, _, child = name.rpartition(".")
    parent = model.encoder.get_submodule(parent_name) if parent_name else model.encoder
    # a convolution without padding (a ViT's patch projection) absorbs the shift in its bias alone and
    # stays the module its model reads; a padded one pads the shift value in front of it
    setattr(parent, child, absorbing if pad_h == pad_w == 0 else
            nn.Sequential(nn.ConstantPad2d((pad_w, pad_w, pad_h, pad_h), shift), absorbing))
    return captioner.with_model(model)


def input_invariance(captioner: Captioner, predictions: Predictions, mentions: Sequence[Mention],
                     methods: Sequence[str], shift: float = 1.0, tolerance: float = 1e-3,
                     originals: dict[str, dict[Mention, Explanation]] | None = None) -> list[dict]:
    """One row per method: how much its explanations of the shifted input through the absorbing
    model differ from the original's — relative L2 change of the image maps and of the preceding-word
    relevance (means over words), Spearman of the image maps — and ``changes`` (relative change
    above ``tolerance``). ``logit_change`` checks the construction: the largest change of any
    explained word's logit (float rounding only)."""
    shifted = shift_absorbing_copy(captioner, shift)
    originals = originals or {}
    rows = []
    for method in methods:
        before = originals.get(method) or explain_mentions(captioner, predictions, mentions, method)
        after = explain_mentions(shifted, predictions, mentions, method, shift=shift)
        relative = lambda a, b: float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a).clamp_min(1e-12))  # noqa: E731
        image = np.array([relative(before[m].image.double(), after[m].image.double()) for m in mentions])
        words = np.array([relative(before[m].preceding.double(), after[m].preceding.double()) for m in mentions])
        logit = max((float((before[m].score - after[m].score).abs().max()) for m in mentions), default=float("nan"))
        ranks = np.array([spearman(before[m].image.numpy(), after[m].image.numpy()) for m in mentions])
        image_change = float(image.mean()) if image.size else float("nan")
        words_change = float(words.mean()) if words.size else float("nan")
        rows.append({"method": method, "shift": shift, "words": len(mentions), "image_change": image_change,
                     "preceding_change": words_change,
                     "image_spearman": float(np.nanmean(ranks)) if np.isfinite(ranks).any() else float("nan"),
                     "logit_change": logit, "changes": bool(max(image_change, words_change) > tolerance)})
    return rows



# ------------------------------------------------------------------------- the experiment
COLUMNS = ("step", "block", "method", "words", *(f"{m}*" for m in MEASURES), "note?")


def _two(value) -> str:
    """Two decimals; "n/a" for a value not defined (NaN, or None once read back from JSON)."""
    return "n/a" if value is None or value != value else f"{value:.2f}"


def sanity_findings(results: dict, arch: str) -> list[Finding]:
    table = Rows.of(results, "sanity", arch, key="randomisation")
    claims = ("Sanity (Adebayo et al.): LRP's maps depend on the model — rank correlation with the trained model's "
              "maps below 0.5 once every block is random",
              "Sanity: Guided Grad-CAM's maps change once the decoder is random (the journal cites it as failing "
              "sanity checks: this would not hold)")
    if not table.rows:
        return [(claim, NOT_MEASURED, "not measured") for claim in claims]

    def after_all(method, blocks: str) -> tuple[float, float]:
        """|ρ| interval at the last step that randomised ``blocks`` ("decoder" or "all")."""
        rows = [r for r in table.rows if r["method"] == method]
        if blocks == "decoder":
            rows = [r for r in rows if r["block"].startswith("decoder")]
        return table.interval(rows[-1] if rows else {}, "spearman_abs")

    return [(claims[0], below(after_all("lrp", "all"), (0.5, 0.5)),
             "rank correlation of the absolute maps after the last block: " + ", ".join(
                 f"{m} {shown(after_all(m, 'all'), 2)}" for m in ("lrp", "gradcam", "guided_gradcam", "guided_backprop"))),
            (claims[1], below(after_all("guided_gradcam", "decoder"), (0.5, 0.5)),
             "rank correlation of the absolute maps after randomising the decoder: " + ", ".join(
                 f"{m} {shown(after_all(m, 'decoder'), 2)}" for m in ("guided_gradcam", "guided_backprop", "lrp")))]


def sanity_section(results: dict, archs: list[str]) -> list[str]:
    from .tables import markdown_table

    lines = ["## Sanity checks — cascading randomisation (Adebayo et al. 2018)", "",
             "Spearman |ρ| between each method's image maps after re-initialising the model down to the named block "
             "and the trained model's (preceding words: ρ of their relevance). Near 1: the map ignores what the "
             "model learned. Plot: `results/<arch>/randomisation.png`.", ""]
    for arch in archs:
        rows = (results.get("sanity", {}).get(arch) or {}).get("randomisation", [])
        if rows:
            methods = list(dict.fromkeys(r["method"] for r in rows))
            table = []
            for block in dict.fromkeys(r["block"] for r in rows):
                mine = {r["method"]: r for r in rows if r["block"] == block}
                table.append({"randomised down to": block} | {
                    m: f"{_two(mine[m]['spearman_abs'])} / {_two(mine[m]['preceding_spearman'])}" for m in methods})
            lines += [f"**{arch}** (image |ρ| / preceding-word ρ)", "", markdown_table(table), ""]
    lines += ["## Sanity checks — input invariance (Kindermans et al. 2019)", "",
              "The input shifted by a constant, through a model whose first layer absorbs the shift (same function, "
              "`logit change` shows float rounding only): a method that changes reacts to something the model ignores.",
              ""]
    for arch in archs:
        rows = (results.get("sanity", {}).get(arch) or {}).get("input_invariance", [])
        if rows:
            lines += [f"**{arch}**", "", markdown_table([
                {"method": r["method"], "changes": "yes" if r["changes"] else "no", "image change": r["image_change"],
                 "preceding change": r["preceding_change"], "image ρ": r["image_spearman"],
                 "logit change": r["logit_change"]} for r in rows]), ""]
    return lines


def _show_sanity(result: dict, bench, options: dict) -> None:
    from .tables import markdown_table

    print(markdown_table([{k: v for k, v in r.items() if not k.endswith(("_low", "_high"))}
                          for r in result["input_invariance"]]))
    print(f"randomisation: {len(result['randomisation'])} rows in {bench.out / 'randomisation.md'}")


@register_experiment(Experiment(
    name="sanity", verb="sanity", title="Sanity checks", papers="Adebayo et al. 2018; Kindermans et al. 2019", order=8,
    options=(Option("words", 50, "Most correctly named object words to explain.", "int", 0, 1_000_000),
             Option("other", 25, "Other (non-object) words to explain, one per caption.", "int", 0, 1_000_000,
                    flag="other-words"),
             Option("seed", 0, "Seed of the re-initialisation and of the other words' sample.", "int", 0),
             Option("shift", 1.0, "Input invariance: the constant added to the normalised input.", "float", -1e3, 1e3),
             Option("methods", None, "Comma-separated explanation methods (default: every method the model has).",
                    "methods")),
    columns=COLUMNS, findings=sanity_findings, section=sanity_section, show=_show_sanity,
    demo=lambda quick, seed: {"words": 3 if quick else 10, "other": 2 if quick else 5, "seed": seed}))
def sanity(bench, words: int = 50, other: int = 25, seed: int = 0, shift: float = 1.0,
           methods: tuple[str, ...] | None = None) -> dict:
    """Sanity checks (Adebayo et al. 2018; Kindermans et al. 2019): re-initialise the model block by
    block from the output layer down and report, per method and step, the Spearman correlation and
    SSIM of each word's image map — and the correlation of its preceding-word relevance — with the
    trained model's; then explain a constant-shifted input through a model whose first layer
    absorbs the shift and report which methods change. Writes randomisation.{csv,json,md,png} and
    input_invariance.{csv,json,md}."""
    from ..explain import methods_for
    from .tables import write_table

    mentions, _ = bench.sample_words(words, other, seed)
    methods = methods or methods_for(bench.captioner.model)
    originals = {method: bench.word_explanations(method, mentions) for method in methods}
    steps = cascading_randomisation(bench.captioner, bench.predictions, mentions, methods, seed,
                                    originals=originals, progress=bench.progress)
    invariance = input_invariance(bench.captioner, bench.predictions, mentions, methods, shift, originals=originals)
    note = [] if mentions else [{"note": "no caption word to explain"}]
    write_table(bench.out, "randomisation", steps or note,
                f"Cascading randomisation (output layer first): similarity of each method's maps of "
                f"{len(mentions)} words to the trained model's, after each block is re-initialised; 95% "
                f"bootstrap intervals over words: {bench.scope}")
    write_table(bench.out, "input_invariance", invariance or note,
                f"Input invariance: inputs shifted by {shift} (normalised units) through a model whose first "
                f"layer absorbs the shift; relative change of the explanations: {bench.scope}")
    if steps:
        plot_randomisation(steps, bench.out / "randomisation.png")
    return {"randomisation": steps, "input_invariance": invariance}
