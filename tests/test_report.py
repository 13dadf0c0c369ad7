"""The HTML report: self-contained (nothing fetched from anywhere), every word shown, everything escaped."""
import html
import json
import re
import shutil

import pytest

import captionlens as cl
from captionlens.report.html import build_report


@pytest.fixture(scope="module")
def captioner():
    return cl.build_captioner("adaptive", encoder="shapes", vocab="a red blue circle square".split(), hidden_size=12,
                              embed_size=8, seed=0)


def test_report_is_self_contained_complete_and_escaped(captioner, tiny_shapes, tmp_path):
    images = sorted((tiny_shapes / "images").glob("*.png"))[:2]
    odd = tmp_path / '<b>odd"&.png'
    shutil.copy(images[0], odd)
    results = tmp_path / "results" / "gridtd"
    results.mkdir(parents=True)
    (results / "hallucination_auc.json").write_text(json.dumps([{"score": "lrp<i>", "auc": 0.64}]))
    shutil.copy(images[1], results / "roc.png")
    captions = [["a", "<script>alert(1)</script>", "circle"], ["a", "red", "square"]]
    out = build_report(captioner, [odd, images[1]], tmp_path / "report.html", captions=captions,
                       results_dir=tmp_path / "results", methods=("attention", "lrp"))
    text = out.read_text()
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>odd" not in text and "&lt;b&gt;odd&quot;&amp;.png" in text
    assert "lrp<i>" not in text and "lrp&lt;i&gt;" in text
    assert re.search(r'\b(?:src|href)="(?!data:)', text) is None  # every image is embedded
    assert "http://" not in text and "https://" not in text and "<link" not in text
    for words in captions:  # each word's row; the one the model does not know was explained as <unk>
        for word in words:
            shown = word if word in captioner.vocab else "<unk>"
            assert f'<td class="word">{html.escape(shown)}</td>' in text
    assert text.count('class="map"') == 2 * 3 + 2 * 3  # 2 methods × 3 words × 2 images
    assert "overlay opacity" in text and "setOpacity" in text  # the slider


def test_report_rejects_unknown_methods(captioner, tiny_shapes, tmp_path):
    image = sorted((tiny_shapes / "images").glob("*.png"))[0]
    with pytest.raises(ValueError, match="saliency"):
        build_report(captioner, [image], tmp_path / "r.html", methods=("saliency",))
