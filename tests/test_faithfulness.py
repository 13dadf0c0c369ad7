"""Faithfulness and sanity checks (issue 12): region perturbation and cascading randomisation
against Quantus 0.6 on the same inputs, plain loops for patches and orders, planted cases with
known answers, and input invariance."""
import copy

import numpy as np
import pytest
import quantus
import torch
from torch import nn

from captionlens.experiments.context import explain_mentions
from captionlens.experiments.faithfulness import (aopc, other_words, patch_masks, patch_order, perturbation_curve,
                                                  region_perturbation, replacement_image, summarise, word_score)
from captionlens.experiments.sanity import (cascading_randomisation, input_invariance, randomisation_blocks,
                                            shift_absorbing_copy, spearman, ssim)
from captionlens.explain import explain_pixels
from captionlens.models import Captioner


@pytest.fixture(scope="module")
def bench(tiny_shapes, tmp_path_factory):
    from captionlens.data.bundle import open_data
    from captionlens.experiments.workbench import Workbench

    from captionlens.pipeline import pretrain_shapes_encoder, train_captioner
    from captionlens.train import TrainConfig

    root = tmp_path_factory.mktemp("faithfulness")
    data = open_data(tiny_shapes)
    weights = root / "encoder.safetensors"
    pretrain_shapes_encoder(weights, TrainConfig(epochs=1, batch_size=16), images=40, progress=False)
    cap = train_captioner(data, "gridtd", root / "run", encoder_weights=weights, hidden_size=16, embed_size=8,
                          train_config=TrainConfig(epochs=12, batch_size=8, learning_rate=1e-2, patience=12),
                          progress=False)  # a few seconds: captions with object words and other words
    return Workbench(cap, data, root / "results", split="train", limit=12, progress=False)


class WordLogit(nn.Module):
    """One word of one caption as a classifier (what Quantus evaluates): inputs [N, 3, H, W] ->
    the fc logits [N, V] at the word's step, the caption prefix fixed; computed in float64."""

    def __init__(self, model: nn.Module, token_ids: list[int], position: int) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("tokens", torch.tensor([token_ids[: position + 1]]))
        self.position = position

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.double(), self.tokens.expand(len(x), -1))[:, self.position]


def _double(cap: Captioner) -> Captioner:
    return Captioner(copy.deepcopy(cap.model).double(), cap.vocab, cap.config, cap.device)


def _word(bench, index: int = 0):
    mention = other_words(bench.predictions, index + 1)[index]
    caption = bench.predictions.captions[mention.image]
    pixels = bench.captioner.preprocess(list(next(bench.predictions.images([[mention.image]]))))
    return mention, caption, pixels


# ------------------------------------------------------------------------ patches, orders
def test_patches_cover_every_pixel_once_and_are_clipped_at_the_border():
    masks = patch_masks(10, 12, 4)
    assert masks.shape == (9, 10, 12)  # 3 rows (4, 4, 2 pixels) × 3 columns (4, 4, 4)
    assert (masks.sum(0) == 1).all()
    assert masks[2].sum() == 16 and masks[8].sum() == 8  # row-major; the last row is 2 pixels high


def test_patch_order_equals_a_plain_loop_over_patch_sums():
    heatmap = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
    sums = []
    for top in range(0, 16, 4):
        for left in range(0, 16, 4):
            sums.append(sum(float(heatmap[y, x]) for y in range(top, top + 4) for x in range(left, left + 4)))
    masks = patch_masks(16, 16, 4)
    assert list(patch_order(heatmap, masks, "morf")) == sorted(range(16), key=lambda i: -sums[i])
    assert list(patch_order(heatmap, masks, "lerf")) == sorted(range(16), key=lambda i: sums[i])
    order = patch_order(heatmap, masks, "random", np.random.default_rng(0))
    assert sorted(order) == list(range(16))
    with pytest.raises(ValueError, match="order must be one of"):
        patch_order(heatmap, masks, "sideways")


def test_aopc_is_samek_et_al_equation_12():
    curve = np.array([3.0, 2.0, 2.5, 0.0])
    assert aopc(curve) == pytest.approx(((3 - 3) + (3 - 2) + (3 - 2.5) + (3 - 0)) / 4)


# --------------------------------------------------------------------- Quantus cross-checks
@pytest.mark.parametrize("replacement", ["blur", "mean"])
@pytest.mark.parametrize("order", ["morf", "lerf"])
def test_region_perturbation_equals_quantus(bench, replacement, order):
    cap = _double(bench.captioner)
    mention, caption, pixels = _word(bench)
    heatmap = explain_pixels(cap, pixels, [caption], "lrp", [[mention.position]])[0].image[0].float()
    replaced = replacement_image(pixels, replacement, torch.tensor([0.1, -0.2, 0.3]))
    masks = patch_masks(64, 64, 8)
    regions = 20
    logits, _ = perturbation_curve(word_score(cap, caption.token_ids, mention.position), pixels[0], replaced[0], masks,
                                   patch_order(heatmap, masks, order), regions)
    source = replaced.numpy().reshape(1, -1)

    def replace_from_source(arr, indices, **kwargs):  # Quantus's perturb_func protocol: flat indices per sample
        arr = arr.copy()
        rows = np.arange(arr.shape[0])[:, None]
        arr[rows, indices] = source[rows, indices]
        return arr

    metric = quantus.RegionPerturbation(patch_size=8, order=order, regions_evaluation=regions, abs=False,
                                        normalise=False, perturb_func=replace_from_source, disable_warnings=True)
    token = caption.token_ids[mention.position + 1]
    theirs = metric(model=WordLogit(cap.model, caption.token_ids, mention.position).eval(), x_batch=pixels.numpy(),
                    y_batch=np.array([token]), a_batch=heatmap[None, None].numpy(), device="cpu", softmax=False,
                    channel_first=True)[0]  # f(x0) − f(x_k), k = 1 .. regions
    np.testing.assert_allclose(logits[0] - logits[1:], theirs, atol=1e-6)
    assert aopc(logits) == pytest.approx(np.sum(theirs) / (regions + 1), abs=1e-6)
    assert np.abs(theirs).max() > 1e-5  # the perturbations do move the logit (far more than the tolerance)


def test_cascading_randomisation_equals_quantus_mprt(bench):
    cap = _double(bench.captioner)
    mention, caption, pixels = _word(bench, 1)
    token = caption.token_ids[mention.position + 1]
    word_model = WordLogit(cap.model, caption.token_ids, mention.position).eval()

    def explain_func(model, inputs, targets, **kwargs):
        explainer = Captioner(model.model, cap.vocab, cap.config)
        inputs = torch.as_tensor(inputs, dtype=torch.float64)
        return np.stack([e.image.numpy() for e in explain_pixels(explainer, inputs, [caption] * len(inputs),
                                                                   "gradient_x_input", [[mention.position]] * len(inputs))])

    seed = 7
    metric = quantus.MPRT(similarity_func=quantus.similarity_func.correlation_spearman, layer_order="top_down",
                          seed=seed, abs=False, normalise=False, disable_warnings=True)
    theirs = metric(model=word_model, x_batch=pixels.numpy(), y_batch=np.array([token]), a_batch=None,
                    explain_func=explain_func, device="cpu", softmax=False, channel_first=True)
    layers = [name for name in theirs if name != "original"]
    assert len(layers) >= 10
    rows = cascading_randomisation(cap, bench.predictions, [mention], ["gradient_x_input"], seed=seed,
                                   blocks=[name.removeprefix("model.") for name in layers], progress=False)
    ours = [row["spearman"] for row in rows]
    np.testing.assert_allclose(ours, [theirs[name][0] for name in layers], atol=1e-6)
    assert max(ours) - min(ours) > 0.1  # the similarity does change along the cascade


# ------------------------------------------------------------------------------ planted cases
def test_a_model_that_ignores_the_image_has_flat_curves_for_every_method(bench):
    from captionlens.explain import methods_for

    blind = Captioner(copy.deepcopy(bench.captioner.model), bench.captioner.vocab, bench.captioner.config)
    projection = blind.model.decoder.projection
    with torch.no_grad():  # the decoder sees only the projections' biases, whatever the image
        projection.cell_proj.weight.zero_()
        projection.global_proj.weight.zero_()
    mentions = other_words(bench.predictions, 4)  # words of the trained model's captions, scored by the blind one
    methods = methods_for(blind.model)
    explanations = {m: explain_mentions(blind, bench.predictions, mentions, m) for m in methods}
    curves = region_perturbation(blind, bench.predictions, explanations, mentions, regions=10, progress=False)
    assert curves.logit.shape == (4, len(methods) + 1, 2, 11)  # methods + random, MoRF/LeRF, the image + 10 steps
    assert np.abs(curves.logit - curves.logit[..., :1]).max() < 1e-5  # float32 rounding of other batch sizes only
    assert all(abs(r["aopc_morf"]) < 1e-5 for r in summarise(curves, ["other"] * 4))


def test_the_true_input_gradient_beats_random_maps_on_morf():
    generator = torch.Generator().manual_seed(0)
    weight = torch.rand(3, 32, 32, generator=generator) ** 4  # a few pixels matter a lot
    pixels = torch.rand(3, 32, 32, generator=generator) + 0.5

    def score(inputs):  # a linear "model": the logit is Σ w·x
        logit = (inputs * weight).sum(dim=(1, 2, 3))
        return logit, torch.sigmoid(logit)

    x = pixels.clone().requires_grad_(True)
    gradient = torch.autograd.grad(score(x[None])[0].sum(), x)[0].sum(0)  # [H, W], the true input gradient
    masks = patch_masks(32, 32, 4)
    zeros = torch.zeros_like(pixels)
    ours = aopc(perturbation_curve(score, pixels, zeros, masks, patch_order(gradient, masks, "morf"), 30)[0])
    rng = np.random.default_rng(0)
    random = [aopc(perturbation_curve(score, pixels, zeros, masks, patch_order(gradient, masks, "random", rng), 30)[0])
              for _ in range(20)]
    assert ours > max(random)


def test_randomising_every_layer_takes_lrp_far_from_the_trained_maps(bench):
    mentions = other_words(bench.predictions, 6)
    rows = cascading_randomisation(bench.captioner, bench.predictions, mentions, ["lrp"], seed=3, progress=False)
    assert rows[0]["block"] == "decoder.fc" and rows[-1]["block"] == "encoder.features.0"
    # the αβ rule's maps are input-driven (Sixt et al. 2020): with only the decoder random they keep the
    # trained maps' ranks (up to sign); once the encoder is random too they lose most of them
    assert rows[0]["spearman_abs"] > 0.9
    assert rows[-1]["spearman_abs"] < 0.6 and rows[-1]["spearman_abs"] < rows[0]["spearman_abs"] - 0.3


def test_blocks_run_from_the_output_layer_down(bench):
    mention, caption, pixels = _word(bench)
    blocks = [name for name, _ in randomisation_blocks(bench.captioner, pixels, torch.tensor([caption.token_ids[:-1]]))]
    assert blocks[:2] == ["decoder.fc", "decoder.language_lstm"]
    assert blocks.index("decoder.projection") < blocks.index("encoder.features.15") < blocks.index("encoder.features.0")


def test_randomisation_leaves_the_model_and_the_random_state_alone(bench):
    before = {k: v.clone() for k, v in bench.captioner.model.state_dict().items()}
    state = torch.random.get_rng_state()
    cascading_randomisation(bench.captioner, bench.predictions, other_words(bench.predictions, 2), ["gradcam"],
                            progress=False)
    assert all(torch.equal(before[k], v) for k, v in bench.captioner.model.state_dict().items())
    assert torch.equal(state, torch.random.get_rng_state())


# ---------------------------------------------------------------------------- input invariance
def test_the_shift_absorbing_copy_computes_the_same_function(bench):
    cap = _double(bench.captioner)
    mention, caption, pixels = _word(bench)
    tokens = torch.tensor([caption.token_ids[:-1]])
    shifted = shift_absorbing_copy(cap, 1.5)
    expected = cap.model(pixels.double(), tokens)
    assert torch.allclose(shifted.model(pixels.double() + 1.5, tokens), expected, atol=1e-10)
    assert not torch.allclose(cap.model(pixels.double() + 1.5, tokens), expected, atol=1e-3)
    with pytest.raises(ValueError, match="finite"):
        shift_absorbing_copy(cap, float("nan"))


def test_input_invariance_flags_gradient_times_input_and_not_the_gradients(bench):
    cap = _double(bench.captioner)
    mentions = other_words(bench.predictions, 4)
    rows = {r["method"]: r for r in input_invariance(cap, bench.predictions, mentions,
                                                     ["gradcam", "guided_backprop", "gradient_x_input", "attention"])}
    assert not rows["gradcam"]["changes"] and not rows["guided_backprop"]["changes"] and not rows["attention"]["changes"]
    assert rows["gradient_x_input"]["changes"] and rows["gradient_x_input"]["image_change"] > 0.01
    assert max(r["logit_change"] for r in rows.values()) < 1e-9


# ----------------------------------------------------------------------------- summaries, verbs
def test_summaries_pair_each_method_with_the_random_order(bench):
    mentions = other_words(bench.predictions, 3)
    explanations = {m: explain_mentions(bench.captioner, bench.predictions, mentions, m) for m in ("lrp", "attention")}
    curves = region_perturbation(bench.captioner, bench.predictions, explanations, mentions, regions=6, progress=False)
    rows = summarise(curves, ["other"] * 3)
    lrp = next(r for r in rows if r["method"] == "lrp")
    random = next(r for r in rows if r["method"] == "random")
    assert lrp["morf_minus_random"] == pytest.approx(lrp["aopc_morf"] - random["aopc_morf"])
    assert lrp["abpc"] == pytest.approx(lrp["aopc_morf"] - lrp["aopc_lerf"])
    assert lrp["aopc_morf_low"] <= lrp["aopc_morf"] <= lrp["aopc_morf_high"]
    assert "morf_minus_random" not in random and random["abpc"] == 0


def test_ssim_equals_scikit_image():
    """Our SSIM (no scikit-image at run time) against scikit-image's structural_similarity (installed with
    the test extra through Quantus) on the max-normalised maps, for maps alike, unlike and of odd sizes."""
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(0)
    for shape in [(64, 64), (7, 9), (31, 20)]:
        a = rng.normal(size=shape)
        for b in (a + 0.3 * rng.normal(size=shape), rng.normal(size=shape) * 5, -a, a):
            expected = structural_similarity(a / np.abs(a).max(), b / np.abs(b).max(), data_range=2.0)
            assert ssim(a, b) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(ssim(np.zeros((8, 8)), rng.normal(size=(8, 8))))
    with pytest.raises(ValueError, match="at least 7"):
        ssim(np.ones((5, 8)), np.ones((5, 8)))


def test_spearman_of_constant_maps_is_undefined():
    assert np.isnan(spearman(np.zeros(5), np.arange(5)))
    assert spearman(np.arange(5), np.arange(5) ** 2) == pytest.approx(1.0)


def test_the_workbench_writes_every_table_and_plot(bench):
    rows = bench.faithfulness(words=3, other=2, regions=4, replacement="mean", methods=("lrp", "gradcam"))
    assert {r["method"] for r in rows} == {"lrp", "gradcam", "random"}
    result = bench.sanity(words=2, other=2, methods=("lrp", "attention"))
    assert {r["method"] for r in result["input_invariance"]} == {"lrp", "attention"}
    for name in ("faithfulness.md", "faithfulness.png", "faithfulness_curves.npz", "randomisation.md",
                 "randomisation.png", "input_invariance.md"):
        assert (bench.out / name).is_file(), name
