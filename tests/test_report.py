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


# --------------------------------------------------------------------------------- colour scales
def _explanation(maps, words):
    import torch

    from captionlens.explain import Explanation

    k = len(words)
    return Explanation("lrp", list(words), list(range(k)), ["<start>", *words], torch.stack(maps),
                       torch.zeros(k, 2, 2), torch.zeros(k, k + 1), torch.ones(k), {})


def test_constant_zero_and_signed_maps_are_drawn_on_their_intended_scales():
    import matplotlib
    import numpy as np

    from captionlens.display.scales import DIVERGING, SEQUENTIAL, ZERO, heatmap_image, map_scale

    constant, zero = np.full((8, 8), 0.02), np.zeros((8, 8))
    signed = np.zeros((8, 8))
    signed[0, 0], signed[7, 7] = 2.0, -1.0
    assert (map_scale(constant).kind, map_scale(constant).high, map_scale(constant).label) == (SEQUENTIAL, 0.02, "0 … 0.02")
    assert (map_scale(zero).kind, map_scale(zero).label) == (ZERO, "all zero")
    assert (map_scale(signed).kind, map_scale(signed).low, map_scale(signed).high) == (DIVERGING, -2.0, 2.0)
    magma, bwr = matplotlib.colormaps["magma"], matplotlib.colormaps["bwr"]
    pixels = np.asarray(heatmap_image(constant)) / 255
    assert np.allclose(pixels, magma(1.0), atol=1 / 255)  # the top of the sequential scale, not solid red
    assert np.asarray(heatmap_image(zero))[..., 3].max() == 0  # transparent: nothing drawn
    pixels = np.asarray(heatmap_image(signed)) / 255
    assert np.allclose(pixels[0, 0], bwr(1.0), atol=1 / 255) and np.allclose(pixels[7, 7], bwr(0.25), atol=1 / 255)
    assert np.allclose(pixels[3, 3], bwr(0.5), atol=1 / 255)  # zero is the white middle
    attention = np.random.default_rng(0).uniform(0.01, 0.02, (8, 8))
    assert map_scale(attention, "attention").kind == SEQUENTIAL  # non-negative maps are never diverging
    assert map_scale(constant, "lrp").kind == DIVERGING  # a signed method stays diverging in every row
    assert map_scale(constant, "gradcam", {"relu": True}).kind == SEQUENTIAL  # ReLU'd Grad-CAM is non-negative


def test_a_map_whose_maximum_is_an_outlier_is_drawn_with_the_cut_and_says_so():
    """Evidence spread over the image plus one outlier pixel (1.2% of the mass): the scale ends where
    the top 2% of the mass begins (Captum's outlier_perc=2, checked against a plain loop), the
    evidence is drawn saturated instead of near-white, and the label prints the cut and the maximum."""
    import matplotlib
    import numpy as np

    from captionlens.display.scales import OUTLIER_SHARE, heatmap_image, map_scale

    planted = np.full((64, 64), 0.1)
    planted[5, 5] = 5.0
    scale = map_scale(planted, "gradient_x_input")
    magnitudes, running, cut = sorted(np.abs(planted).ravel()), 0.0, None
    for value in magnitudes:  # the cumulative-sum threshold from its definition
        running += value
        if running >= (1 - OUTLIER_SHARE) * np.abs(planted).sum():
            cut = value
            break
    assert (scale.low, scale.high, scale.peak) == (-cut, cut, 5.0) and cut == 0.1
    assert scale.label == "±0.1 (max 5)"
    pixels = np.asarray(heatmap_image(planted, scale=scale)) / 255
    bwr = matplotlib.colormaps["bwr"]
    assert np.allclose(pixels[0, 0], bwr(1.0), atol=1 / 255)  # the spread evidence: saturated, not white
    unclipped = np.asarray(heatmap_image(planted, scale=map_scale(planted, "gradient_x_input", outlier_share=0))) / 255
    assert np.allclose(unclipped[0, 0], bwr(0.5 + 0.5 * 0.1 / 5), atol=1 / 255)  # scaled by the max: nearly white
    assert map_scale(planted, "attention").label == "0 … 0.1 (max 5)"  # non-negative maps the same way


def test_figures_keep_the_aspect_ratio_mark_zero_maps_and_grow_taller_for_long_captions(tmp_path):
    import torch
    from PIL import Image

    from captionlens.report.figures import explanation_figure
    from captionlens.report.html import image_section

    wide = Image.new("RGB", (200, 100), (30, 160, 30))
    maps = [torch.zeros(16, 16), torch.full((16, 16), 0.5), torch.linspace(-1, 1, 256).view(16, 16)]
    short = explanation_figure(wide, [_explanation(maps, ["a", "b", "c"])], tmp_path / "short.png")
    square = explanation_figure(wide.resize((100, 100)), [_explanation(maps, ["a", "b", "c"])], tmp_path / "sq.png")
    words = [f"w{i}" for i in range(12)]
    long = explanation_figure(wide, [_explanation([maps[i % 3] for i in range(12)], words)], tmp_path / "long.png",
                              rows_per_group=8)
    with Image.open(short) as a, Image.open(square) as b, Image.open(long) as c:
        assert a.height < b.height  # a wide photo gives flatter rows than a square one
        # 12 words: four times the rows of 3, as wide (panels never shrink; titles again at row 9)
        assert c.width == a.width and 3.6 * a.height < c.height < 4.4 * a.height
    page = image_section("wide.png", wide, [_explanation(maps, ["a", "b", "c"])])
    assert page.count('class="scale zero">all zero') == 1 and "±0.5" in page  # LRP: signed, even where ≥ 0
    assert "±0.992 (max 1)" in page and "blue −m … white 0 … red +m" in page  # the top 2% of the ramp's mass clipped
    assert 'style="width:160px;height:80px"' in page  # the tile in the photo's aspect ratio


def test_the_report_verb_takes_model_caption_and_beam_size_like_the_other_verbs(captioner, tiny_shapes, tmp_path):
    """`report --model` (``--run`` kept as its older name) explains the --caption given, for each image."""
    from typer.testing import CliRunner

    from captionlens.cli import app

    captioner.save(tmp_path / "run")
    image = sorted((tiny_shapes / "images").glob("*.png"))[0]
    result = CliRunner().invoke(app, ["report", "--model", str(tmp_path / "run"), "--images", str(image), "--caption",
                                      "a blue square", "--beam-size", "1", "--methods", "lrp", "--out",
                                      str(tmp_path / "r.html")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "r.html").read_text()
    assert all(f'<td class="word">{word}</td>' in text for word in ("a", "blue", "square"))
    assert "report: 100%" in result.output and "1/1" in result.output  # progress per image and method
    result = CliRunner().invoke(app, ["report", "--model", str(tmp_path / "run"), "--images", str(image), "--caption",
                                      "a blue square", "--words", "2", "--methods", "lrp,attention", "--out",
                                      str(tmp_path / "w.html")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "w.html").read_text()
    assert '<td class="word">square</td>' in text and '<td class="word">blue</td>' not in text  # only word 2
    result = CliRunner().invoke(app, ["report", "--run", str(tmp_path / "run"), "--images", str(image), "--beam-size",
                                      "0", "--out", str(tmp_path / "r2.html")])
    assert result.exit_code != 0 and "beam" in result.output.lower()


def test_the_notebook_api_plots_overlays_and_resamples_without_touching_the_backend(captioner, tmp_path):
    """exp.plot() returns a Figure and leaves a non-Agg backend as it was (explanation_figure too);
    exp.overlay is RGBA at the photo's size; exp.heatmap at the model's or the photo's size (bilinear);
    _repr_html_ shows every word; the photo size survives saving."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure
    from PIL import Image

    from captionlens.explain import Explanation
    from captionlens.report.figures import explanation_figure

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 160, 3), dtype=np.uint8))
    exp = cl.explain(captioner, photo, "a red circle", "lrp")
    previous = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        figure = exp.plot()
        assert isinstance(figure, Figure) and len(figure.axes) == 3
        assert [a.get_title() for a in figure.axes] == ["a (#1)", "red (#2)", "circle (#3)"]
        one = exp.plot("red", photo=photo)
        assert len(one.axes) == 1 and one.axes[0].get_xlabel().startswith("±")
        explanation_figure(photo, [exp], tmp_path / "f.png")
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(previous)
    assert exp.photo_size == (160, 90)
    assert exp.heatmap(1).shape == (captioner.image_size,) * 2 and exp.heatmap("red", "photo").shape == (90, 160)
    model_map = exp.image[1].numpy()
    expected = np.asarray(Image.fromarray(model_map, mode="F").resize((160, 90), Image.BILINEAR))
    assert np.array_equal(exp.heatmap("red", size="photo"), expected)
    rgba = exp.overlay(photo, "circle")
    assert rgba.shape == (90, 160, 4) and rgba.dtype == np.uint8 and (rgba[..., 3] == 255).all()
    page = exp._repr_html_()
    assert page.count("<img") == 3 and "circle" in page
    with pytest.raises(ValueError, match="not an explained word"):
        exp.heatmap("dog")
    exp.to_json(tmp_path / "e.json")
    again = Explanation.load(tmp_path / "e.json", exp.save_heatmaps(tmp_path))
    assert again.photo_size == (160, 90) and np.array_equal(np.load(tmp_path / "lrp.npy"), exp.image.numpy())


def test_repeated_words_carry_their_positions_in_figures_and_the_report(tmp_path):
    """"small" explained three times is "small #2", "small #4", "small #5" in the report's rows and
    the figure's labels; a word explained once keeps its plain name; the preceding-words column is wide."""
    import torch
    from PIL import Image

    from captionlens.report.figures import word_label
    from captionlens.report.html import image_section

    words = ["a", "small", "red", "small", "small"]
    explanation = _explanation([torch.rand(8, 8) - 0.5 for _ in words], words)
    assert [word_label(explanation, k) for k in range(5)] == ["a", "small #2", "red", "small #4", "small #5"]
    page = image_section("x.png", Image.new("RGB", (40, 40)), [explanation])
    assert '<td class="word">small #4</td>' in page and '<td class="word">red</td>' in page
    assert 'class="words"' in page and ".words{min-width:22em" in __import__("captionlens.report.html",
                                                                            fromlist=["STYLE"]).STYLE


def test_a_cut_that_does_not_show_at_three_digits_prints_no_maximum():
    """A near-uniform attention map clips a hair below its maximum: its label stays "0 … 0.0169"."""
    import numpy as np

    from captionlens.display.scales import map_scale

    attention = np.full((8, 8), 0.0169)
    attention[0, 0] = 0.01692  # 1.6% of the mass: above the cut
    scale = map_scale(attention, "attention")
    assert scale.high < scale.peak and scale.label == "0 … 0.0169"
