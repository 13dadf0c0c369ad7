"""RESULTS.md: the papers' tables with our numbers beside theirs, and each finding of the papers
checked against our numbers — the verdicts are computed here from the results, never written by hand.
"""
from __future__ import annotations

from .intervals import FAILS, HOLDS, with_interval
from .registry import Finding, Rows, ordered
from .tables import markdown_table

ARCHITECTURES = ("adaptive", "gridtd")


def findings(results: dict, arch: str) -> list[Finding]:
    """(the papers' claim, its verdict on our data, the numbers behind it), from every registered
    experiment's findings. Verdicts come from 95% intervals (``intervals.py``): "holds", "does not
    hold", "inconclusive" (the intervals overlap) or "not measured" (the experiment did not run or had
    nothing to measure). A column an experiment does not declare is an error, never "not measured"."""
    return [finding for experiment in ordered() if experiment.findings
            for finding in experiment.findings(results, arch)]


def results_markdown(results: dict, seconds: float, quick: bool) -> str:
    archs = list(results.get("metrics", {})) or list(ARCHITECTURES)  # the demo's --archs, in order
    lines = ["# captionlens demo results", "",
             f"The papers' experiments on the embedded shapes world ({', '.join(archs)}), written by "
             f"`captionlens demo{' --quick' if quick else ''}` in {seconds:.0f} s. The papers' numbers come "
             "from Flickr30K / MSCOCO with VGG16; ours from a generated world with a planted co-occurrence "
             "bias, so compare directions and orderings, not values.", ""]
    lines += ["## Do the papers' findings hold here?", "",
              "Each verdict compares 95% intervals (bootstrap over images or mentions; Wilson for rates; the paired "
              "Wilcoxon test for ablation; Student-t over fine-tuning seeds): **holds** when they are separated in "
              "the papers' direction, **does not hold** when separated the other way, **inconclusive** when they "
              "overlap. The intervals cover the sampling of images and mentions for these trained models: a "
              "captioner trained with another seed is another model, whose verdicts can differ — even reverse "
              "where it has not learned to look (attention correctness near the uniform map's).", ""]
    for arch in archs:
        lines += [f"**{arch}**", "", "| finding | holds here? | our numbers |", "|---|---|---|"]
        for claim, verdict, numbers in findings(results, arch):
            shown = {HOLDS: "holds", FAILS: "**does not hold**"}.get(verdict, verdict)
            lines.append(f"| {claim} | {shown} | {numbers} |")
        lines.append("")
    for experiment in ordered():
        if experiment.section:
            lines += experiment.section(results, archs)
    lines += architectures_markdown(results, archs)
    return "\n".join(lines)


def architectures_markdown(results: dict, archs: list[str]) -> list[str]:
    """How each method fares on each architecture, side by side (the demo's --archs): localisation,
    region perturbation and hallucination detection, with 95% intervals."""
    if len(archs) < 2:
        return []
    methods = ("lrp", "gradcam", "guided_gradcam", "attention", "rollout")
    rows = []
    for arch in archs:
        correctness = Rows.of(results, "correctness", arch)
        faithfulness = Rows.of(results, "faithfulness", arch)
        intervals = (results.get("hallucination", {}).get(arch) or {}).get("auc_interval", {})
        for method in methods:
            at0 = correctness.find(curve=method)
            perturbed = faithfulness.find(words="object", method=method)
            if not at0 and not perturbed:
                continue  # a method this architecture does not have (rollout: transformers only)
            auc = intervals.get(method) or [None, None]
            rows.append({"model": arch, "method": method,
                         "correctness (thr. 0)": with_interval(at0, "0.0"),
                         "MoRF − random": with_interval(perturbed, "morf_minus_random"),
                         "hallucination AUC": "" if auc[0] is None else f"[{auc[0]:.3g}, {auc[1]:.3g}]"})
    return ["## The architectures side by side — beyond the papers", "",
            "Each method's localisation (correctness at threshold 0), region perturbation (MoRF AOPC minus random, "
            "object words) and hallucination detection (AUC) on every trained architecture, with 95% intervals. "
            "For the transformer, 'attention' is its last layer's cross-attention averaged over heads and 'rollout' "
            "attention rollout through all its layers (Abnar & Zuidema 2020); LRP uses `attention_rule=\"cp\"`.", "",
            markdown_table(rows), ""]
