"""The explanation engine's acceptance tests, on both architectures: conservation, the explainer's
forward equals the model's, gradients equal autograd, no accumulation across words or images, and
planted models whose answers are known."""
import sys

import pytest
import torch
from torch import nn

import captionlens as cl
from captionlens.explain import explain, explain_batch, methods_for
from captionlens.explain.engine import trace
from captionlens.explain.lrp import rule_hooks
from captionlens.explain.rules import LRPParameters
from captionlens.models.encoders import Encoder
from captionlens.models.registry import register_encoder

ARCHS = ["adaptive", "gridtd", "sat", "transformer"]
PAPER_ARCHS = ["adaptive", "gridtd"]  # with the grid projection V, v_g and a visual sentinel
WORDS = "a red blue circle square left of two".split()
CAPTION = "a red circle to the left of a blue square".split()  # 'to', 'the' are <unk>
SEEN = ["<unk>" if w in ("to", "the") else w for w in CAPTION]  # how the explanations label CAPTION


def captioner(arch, encoder="shapes", zero_biases=False, seed=0):
    options = {"layers": 2, "heads": 2, "encoder_layers": 1} if arch == "transformer" else {}
    cap = cl.build_captioner(arch, encoder=encoder, vocab=WORDS, hidden_size=16, embed_size=12, seed=seed,
                             encoder_options={"image_size": 32}, architecture_options=options)
    if zero_biases:
        with torch.no_grad():
            for name, parameter in cap.model.named_parameters():
                if name.endswith("bias"):
                    parameter.zero_()
    cap.model.double()
    return cap


def image(seed=0):
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------- conservation
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("encoder", ["shapes", "vgg16"])
def test_lrp_conserves_the_logit_of_every_word(arch, encoder):
    cap = captioner(arch, encoder, zero_biases=True)
    exp = explain(cap, image(), CAPTION, method="lrp", epsilon=1e-9, alpha=1.0, beta=0.0, include_end=True)
    # a transformer's learned positions take their share, reported apart (none for the LSTMs)
    assert ("positions" in exp.extra) == (arch == "transformer")
    total = exp.image.sum(dim=(1, 2)) + exp.preceding.sum(dim=1) + exp.extra.get("positions", 0)
    assert exp.score.abs().min() > 1e-6
    assert torch.allclose(total, exp.score, rtol=1e-4, atol=0)
    # and relevance really reaches both the pixels and the words
    assert (exp.image.abs().sum(dim=(1, 2)) > 0).all() and (exp.preceding.abs().sum(dim=1) > 0).all()


def test_lrp_with_biases_and_epsilon_loses_relevance_but_stays_finite():
    cap = captioner("gridtd")
    exp = explain(cap, image(), CAPTION, method="lrp")
    assert torch.isfinite(exp.image).all() and torch.isfinite(exp.preceding).all()


# ---------------------------------------------------------------- explainer forward == model forward
@pytest.mark.parametrize("arch", ARCHS)
def test_the_explainer_runs_the_model_itself(arch):
    cap = captioner(arch)
    pixels = cap.preprocess([image(), image(1)]).double()
    ids = torch.tensor([cap.vocab.encode(CAPTION[:5])[:-1], cap.vocab.encode(CAPTION[5:])[:-1]])
    expected = cap.model(pixels, ids)
    traced = trace(cap.model, pixels, ids, rule_hooks(cap.model, LRPParameters()))
    assert (traced.output.logits - expected).abs().max() <= 1e-6
    assert not cap.model.encoder.features[0]._forward_hooks  # hooks are gone afterwards


def test_hooks_attached_before_one_that_fails_are_removed():
    from captionlens.explain.engine import forward_hooks
    first = nn.Linear(2, 2)

    def hook(module, inputs, output):
        return None
    with pytest.raises(AttributeError):
        with forward_hooks([(first, hook), (object(), hook)]):  # the second cannot take a hook
            pass
    assert not first._forward_hooks


# ------------------------------------------------------------------------- gradients == autograd
def _autograd_reference(cap, img, words):
    """Per-word autograd of the unmodified model: gradients at pixels, grid and embeddings."""
    pixels = cap.preprocess([img]).double().requires_grad_(True)
    ids = torch.tensor([cap.vocab.encode(words)])
    grids, embeddings = [], []
    h1 = cap.model.encoder.register_forward_hook(lambda m, i, o: grids.append(o))
    h2 = cap.model.decoder.embedding.register_forward_hook(lambda m, i, o: embeddings.append(o))
    logits = cap.model(pixels, ids[:, :-1])
    h1.remove(), h2.remove()
    rows = []
    for t in range(len(words)):
        g = torch.autograd.grad(logits[0, t, ids[0, t + 1]], [pixels, grids[0], *embeddings], retain_graph=True,
                                allow_unused=True)
        g = [torch.zeros_like(x) if gi is None else gi for gi, x in zip(g, [pixels, grids[0], *embeddings])]
        rows.append((g[0][0], g[1][0], torch.cat([e[0].reshape(-1, e.shape[-1]) for e in g[2:]])))
    # one embedding [1, E] per step (LSTMs) or all at once [1, S, E] (transformer) -> [S, E]
    return (pixels.detach()[0], grids[0].detach()[0],
            torch.cat([e[0].reshape(-1, e.shape[-1]) for e in embeddings]).detach(), rows)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_methods_equal_autograd(arch):
    cap = captioner(arch)
    img, words = image(2), CAPTION[:6]
    pixels, grid, embeddings, rows = _autograd_reference(cap, img, words)
    cam = explain(cap, img, words, method="gradcam")
    gxi = explain(cap, img, words, method="gradient_x_input")
    for t, (g_pixels, g_grid, g_embeddings) in enumerate(rows):
        weights = g_grid.mean(dim=(1, 2), keepdim=True)
        assert torch.allclose(cam.grid[t], (weights * grid).sum(0), atol=1e-5)
        assert torch.allclose(cam.preceding[t], g_embeddings.sum(-1), atol=1e-5)
        assert torch.allclose(gxi.image[t], (g_pixels * pixels).sum(0), atol=1e-5)
        assert torch.allclose(gxi.preceding[t], (g_embeddings * embeddings).sum(-1), atol=1e-5)


def _classic_guided_backprop(cap, img, words):
    """``_autograd_reference``'s rows with the classic guided backprop: every ReLU's backward clamped at 0."""
    handles = [m.register_full_backward_hook(lambda m, gi, go: (gi[0].clamp(min=0),))
               for m in cap.model.encoder.modules() if isinstance(m, nn.ReLU)]
    try:
        return _autograd_reference(cap, img, words)[3]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_guided_backprop_equals_the_classic_relu_hook_implementation(arch):
    cap = captioner(arch)
    img, words = image(3), CAPTION[:4]
    rows = _classic_guided_backprop(cap, img, words)
    guided = explain(cap, img, words, method="guided_backprop")
    ggc = explain(cap, img, words, method="guided_gradcam")
    cam = explain(cap, img, words, method="gradcam", relu=True)
    for t, (g_pixels, _, _) in enumerate(rows):
        assert torch.allclose(guided.image[t], g_pixels.sum(0), atol=1e-5)
    upsampled = nn.functional.interpolate(cam.grid[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert torch.allclose(ggc.image, guided.image * upsampled, atol=1e-6)


def test_the_gradient_methods_fold_batch_norms_without_changing_a_gradient():
    """The gradient methods run with each batch-norm folded into its convolution
    (``canonize.batch_norms_folded``): still autograd's gradients through the norms, here with statistics
    far from the identity, and the norms are back in place afterwards."""
    cap = cl.build_captioner("sat", encoder="resnet50", vocab=WORDS, hidden_size=16, embed_size=12, seed=0,
                             encoder_options={"image_size": 64, "grid_size": 2})
    generator = torch.Generator().manual_seed(0)
    norms = [m for m in cap.model.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.running_mean.copy_(0.2 * torch.randn(norm.num_features, generator=generator))
            norm.running_var.copy_(0.5 + 1.5 * torch.rand(norm.num_features, generator=generator))
            norm.weight.copy_(1 + 0.3 * torch.randn(norm.num_features, generator=generator))
            norm.bias.copy_(0.1 * torch.randn(norm.num_features, generator=generator))
    cap.model.double()
    img, words = torch.rand(3, 64, 64, generator=generator), CAPTION[:4]
    pixels, _, _, rows = _autograd_reference(cap, img, words)
    gxi = explain(cap, img, words, method="gradient_x_input")
    for t, (g_pixels, _, _) in enumerate(rows):
        expected = (g_pixels * pixels).sum(0)
        assert (gxi.image[t] - expected).abs().max() <= 1e-9 * expected.abs().max()
    guided_rows = _classic_guided_backprop(cap, img, words)
    guided = explain(cap, img, words, method="guided_backprop")
    for t, (g_pixels, _, _) in enumerate(guided_rows):
        expected = g_pixels.sum(0)
        assert expected.abs().max() > 0 and (guided.image[t] - expected).abs().max() <= 1e-9 * expected.abs().max()
    assert [m for m in cap.model.encoder.modules() if isinstance(m, nn.BatchNorm2d)] == norms


# ---------------------------------------------------------------------------------- independence
@pytest.mark.parametrize(("method", "arch"), [(m, a) for a in ARCHS for m in methods_for(captioner(a).model)])
def test_words_and_images_are_explained_independently(method, arch):
    cap = captioner(arch)
    full = explain(cap, image(), CAPTION, method=method)
    for t in (0, 4, len(CAPTION) - 1):
        alone = explain(cap, image(), CAPTION, method=method, words=[t])
        assert alone.words == [SEEN[t]]
        for name in ("image", "grid", "preceding", "score"):
            assert torch.allclose(getattr(alone, name)[0], getattr(full, name)[t], atol=1e-9), name
    other = "two blue squares".split()
    batch = explain_batch(cap, [image(), image(5)], [CAPTION, other], method=method)
    single = explain(cap, image(5), other, method=method)
    for name in ("image", "grid", "preceding", "score"):
        assert torch.allclose(getattr(batch[0], name), getattr(full, name), atol=1e-9), name
        assert torch.allclose(getattr(batch[1], name), getattr(single, name), atol=1e-9), name
    # the linguistic relevance of word t only involves <start> and the words before it
    assert torch.all(full.preceding.triu(diagonal=1) == 0)


# ---------------------------------------------------------------------------------- planted models
@register_encoder("patches")
class PatchEncoder(Encoder):
    """Test encoder: each grid cell sees exactly its own 8×8 patch (no overlapping receptive fields)."""

    out_channels = 4
    downsampling = 8

    def __init__(self, image_size: int = 32) -> None:
        super().__init__(image_size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.features = nn.Sequential(nn.Conv2d(3, 4, kernel_size=8, stride=8), nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.abs_()
            self.features[0].bias.zero_()


def _planted(arch):
    cap = cl.build_captioner(arch, encoder="patches", vocab=WORDS, hidden_size=8, embed_size=6, attention_size=8,
                             seed=1, encoder_options={"image_size": 32})
    with torch.no_grad():
        for name, parameter in cap.model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
        att = cap.model.decoder.attention
        att.hidden_proj.weight.zero_()  # scores depend on the cell only
        att.sentinel_proj.weight.zero_()
        att.feature_proj.weight.copy_(torch.eye(8) * 5)
        att.score.weight.fill_(10.0)
        cap.model.decoder.projection.cell_proj.weight.abs_()  # v_i > 0 where a_i > 0
    return cap.model.double() and cap


@pytest.mark.parametrize("arch", PAPER_ARCHS)
def test_planted_attention_on_one_cell_puts_attention_and_lrp_there(arch):
    cap = _planted(arch)
    img = torch.zeros(3, 32, 32)
    img[:, 8:16, 16:24] = 1.0  # cell (1, 2): the only non-zero patch
    attention = explain(cap, img, "a red circle".split(), method="attention")
    assert (attention.grid[:, 1, 2] > 0.99).all()
    lrp = explain(cap, img, "a red circle".split(), method="lrp")
    inside = lrp.image[:, 8:16, 16:24].abs().sum(dim=(1, 2))
    assert (inside > 0).all()
    assert torch.allclose(inside, lrp.image.abs().sum(dim=(1, 2)))  # all image relevance is in the patch
    assert (lrp.grid.abs().sum(dim=(1, 2)) == lrp.grid[:, 1, 2].abs()).all()


@pytest.mark.parametrize("arch", PAPER_ARCHS)
def test_a_word_that_does_not_depend_on_the_image_gets_no_image_relevance(arch):
    cap = captioner(arch, zero_biases=True)
    with torch.no_grad():
        cap.model.decoder.projection.cell_proj.weight.zero_()  # V = 0 and v_g = 0: the image is ignored
        cap.model.decoder.projection.global_proj.weight.zero_()
    exp = explain(cap, image(), CAPTION, method="lrp", epsilon=1e-9)
    assert exp.image.abs().max() == 0 and exp.grid.abs().max() == 0
    assert torch.allclose(exp.preceding.sum(1), exp.score, rtol=1e-4)  # everything goes to the words


def test_sat_relevance_reaches_the_image_through_the_initial_state_and_is_conserved():
    cap = captioner("sat", zero_biases=True)
    with torch.no_grad():  # the gate closes (σ(−40) ≈ 4e-18): the context carries no image any more
        cap.model.decoder.attention.f_beta.weight.zero_()
        cap.model.decoder.attention.f_beta.bias.fill_(-40.0)
    exp = explain(cap, image(), CAPTION, method="lrp", epsilon=1e-9, include_end=True)
    assert (exp.image.abs().sum(dim=(1, 2)) > 1e-6).all()  # only h_0, c_0 = init(mean a) bring the image in
    assert torch.allclose(exp.image.sum(dim=(1, 2)) + exp.preceding.sum(dim=1), exp.score, rtol=1e-4)
    assert "beta" not in explain(cap, image(), CAPTION, method="attention").extra  # no sentinel, no β


# ------------------------------------------------------------------------------------- bad input
def test_bad_requests_are_clear_errors():
    cap = captioner("gridtd")
    with pytest.raises(ValueError, match="choose one of"):
        explain(cap, image(), CAPTION, method="saliency")
    with pytest.raises(IndexError, match="out of range"):
        explain(cap, image(), CAPTION, words=[len(CAPTION)])
    with pytest.raises(TypeError, match="epsilon"):
        explain(cap, image(), CAPTION, method="gradcam", epsilon=0.1)


def test_explanations_save_and_load(tmp_path):
    from captionlens.explain import Explanation

    cap = captioner("adaptive")
    exp = explain(cap, image(), CAPTION, method="attention")
    exp.to_json(tmp_path / "attention.json")
    back = Explanation.load(tmp_path / "attention.json", exp.save_heatmaps(tmp_path))
    assert back.words == exp.words and back.tokens == ["<start>", *SEEN]
    assert torch.allclose(back.image, exp.image.float()) and torch.allclose(back.extra["beta"].double(), exp.extra["beta"])


# ------------------------------------------------------------------ passes, precision, no waste
@pytest.mark.parametrize("method", ["lrp", "gradcam", "guided_gradcam", "gradient_x_input"])
def test_words_split_over_several_passes_equal_one_pass(method):
    cap = captioner("gridtd")
    whole = explain(cap, image(), CAPTION, method=method)
    split = explain(cap, image(), CAPTION, method=method, max_words_per_pass=3)
    for name in ("image", "grid", "preceding", "score"):
        assert torch.allclose(getattr(whole, name), getattr(split, name), atol=1e-10), name
    with pytest.raises(ValueError, match="max_words_per_pass"):
        explain(cap, image(), CAPTION, method=method, max_words_per_pass=0)


def test_gradcam_never_backpropagates_into_the_encoder(monkeypatch):
    cap = captioner("adaptive")
    reference = explain(cap, image(), CAPTION, method="gradcam")
    for module in cap.model.encoder.modules():  # any backward through the CNN would now fail
        module.register_full_backward_hook(lambda *args: pytest.fail("backward reached the encoder"))
    again = explain(cap, image(), CAPTION, method="gradcam")
    assert torch.equal(reference.image, again.image) and torch.equal(reference.preceding, again.preceding)


@pytest.mark.parametrize("arch", ["gridtd", "sat", "transformer"])
def test_words_as_a_batch_and_convolutions_word_by_word_give_the_same_maps(monkeypatch, arch):
    """``engine.words_backward``'s two backwards (torch.func.vmap, is_grads_batched) are one linear map."""
    from captionlens.explain import engine

    cap = captioner(arch)
    backward, used = engine.words_backward, []

    def forced(kernels_see_words):
        def words_backward(*args, **options):
            used.append(options.pop("kernels_see_words"))
            return backward(*args, **options, kernels_see_words=kernels_see_words)
        return words_backward
    for method in ("lrp", "guided_backprop", "gradient_x_input"):
        maps = []
        for kernels_see_words in (True, False):
            used.clear()
            monkeypatch.setattr(engine, "words_backward", forced(kernels_see_words))
            maps.append(explain(cap, image(), CAPTION, method=method))
            assert used == [True]  # what each method uses on a 32×32 image: the batch
        for name in ("image", "grid", "preceding"):
            reference = getattr(maps[1], name)
            assert torch.allclose(getattr(maps[0], name), reference, atol=1e-6 * float(reference.abs().max())), name


def test_the_gradient_methods_go_word_by_word_only_on_large_images_in_fp32(monkeypatch):
    """Autograd's float32 convolution backward measured faster word by word above 128×128 pixels (and
    as a batch below; an encoder's own ``gradients_as_a_batch_up_to`` where it declares one), its
    bfloat16 one and LRP's rules as a batch at every size: ``gradients.words_as_a_batch``."""
    from captionlens.explain import engine, gradients

    backward, used = engine.words_backward, []

    def recording(*args, **options):
        used.append(options["kernels_see_words"])
        return backward(*args, **options)
    monkeypatch.setattr(engine, "words_backward", recording)
    assert 128 * 128 <= gradients.WORDS_AS_A_BATCH_UP_TO < 144 * 144  # the two sides below: one each way
    for side, precision in ((128, "fp32"), (144, "fp32"), (144, "bf16-vision")):
        cap = cl.build_captioner("gridtd", encoder="shapes", vocab=WORDS, hidden_size=8, embed_size=8, seed=0,
                                 encoder_options={"image_size": side})
        picture = torch.rand(3, side, side, generator=torch.Generator().manual_seed(0))
        for method in ("lrp", "gradient_x_input", "guided_backprop", "guided_gradcam"):
            used.clear()
            explain(cap, picture, CAPTION, method=method, precision=precision)
            small = side * side <= gradients.WORDS_AS_A_BATCH_UP_TO
            assert used == [method == "lrp" or small or precision != "fp32"], (side, precision, method)
    # an encoder may declare its own limit (batch-norm folded, the ResNets measured faster as a batch at 256 px)
    for encoder, largest in (("resnet50", 256), ("efficientnet_lite0", 224)):
        model = cl.build_captioner("sat", encoder=encoder, vocab=WORDS, hidden_size=8, embed_size=8, seed=0).model
        assert gradients.words_as_a_batch(model, torch.zeros(1, 3, largest, largest))
        assert not gradients.words_as_a_batch(model, torch.zeros(1, 3, largest + 32, largest + 32))


def test_auto_words_per_pass_is_sized_from_the_traced_forward_and_changes_no_map(monkeypatch):
    from captionlens.explain import engine

    cap = captioner("gridtd")
    whole = explain(cap, image(), CAPTION, method="lrp")
    passes = []
    backward = engine.words_backward
    monkeypatch.setattr(engine, "words_backward", lambda *a, **k: passes.append(len(a[2])) or backward(*a, **k))
    largest = {}
    trace = engine.trace
    monkeypatch.setattr(sys.modules["captionlens.explain.lrp"], "trace",
                        lambda *a, **k: largest.setdefault("trace", trace(*a, **k)))
    monkeypatch.setattr(engine, "AUTO_PASS_MEMORY", 0)  # below one word: one word a pass
    for budget_words in (3, 1):
        passes.clear(); largest.clear()
        explain(cap, image(), CAPTION, method="lrp", max_words_per_pass="auto")  # measures the forward
        saved = largest["trace"].largest_saved
        assert saved >= 4 * 64 * 64 * 4  # at least the first convolution's output of the 64-px image
        monkeypatch.setattr(engine, "AUTO_PASS_MEMORY", int(budget_words * engine.WORD_COST * saved) + 1)
        assert engine.auto_words_per_pass(saved) == budget_words
        passes.clear(); largest.clear()
        split = explain(cap, image(), CAPTION, method="lrp", max_words_per_pass="auto")
        assert max(passes) == budget_words and sum(passes) == len(CAPTION)
        for name in ("image", "grid", "preceding", "score"):
            assert torch.allclose(getattr(whole, name), getattr(split, name), atol=1e-10), name
    with pytest.raises(ValueError, match="max_words_per_pass"):
        explain(cap, image(), CAPTION, method="lrp", max_words_per_pass="many")


@pytest.mark.parametrize("precision", ["bf16", "bf16-vision"])
def test_bfloat16_maps_follow_float32_and_the_copy_follows_the_weights(precision):
    from captionlens.explain import explainer

    cap = captioner("gridtd", zero_biases=True)
    cap.model.float()
    full = explain(cap, image(), CAPTION, method="lrp", epsilon=1e-9)
    fast = explain(cap, image(), CAPTION, method="lrp", epsilon=1e-9, precision=precision)
    assert fast.image.dtype == torch.float32 and fast.parameters["precision"] == precision
    assert full.parameters["precision"] == "fp32"
    converted = cap._reduced_precision[precision][1]  # the copy that ran: each part in the dtype its precision names
    assert {p.dtype for p in converted.vision_module().parameters()} == {torch.bfloat16}
    assert {p.dtype for p in converted.decoder.parameters()} == {explainer.PRECISIONS[precision].language}
    assert {p.dtype for p in cap.model.parameters()} == {torch.float32}  # the captioner itself untouched
    convolutions = [m.weight for m in converted.vision_module().modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convolutions if w.shape[-1] > 1)
    assert all(m.weight.is_contiguous() for m in cap.model.modules() if isinstance(m, nn.Conv2d))  # fp32 as it was
    explain(cap, image(), CAPTION, precision="bf16" if precision == "bf16-vision" else "bf16-vision")
    assert cap._reduced_precision[precision][1] is converted  # each precision keeps its copy: none converted twice
    for row in range(len(CAPTION)):
        pair = torch.stack([full.image[row].flatten(), fast.image[row].flatten()]).double()
        assert torch.corrcoef(pair)[0, 1] > 0.99
    total = fast.image.sum(dim=(1, 2)) + fast.preceding.sum(dim=1)
    assert torch.allclose(total, fast.score, rtol=0, atol=0.02 * float(fast.score.abs().max()))  # within 2%
    with torch.no_grad():
        cap.model.decoder.fc.weight.mul_(2.0)  # the bf16 copy must not go stale
    doubled = explain(cap, image(), CAPTION, method="lrp", epsilon=1e-9, precision=precision)
    assert torch.allclose(doubled.score, 2 * fast.score, rtol=0.02)
    with pytest.raises(ValueError, match="precision"):
        explain(cap, image(), CAPTION, method="lrp", precision="fp8")


@pytest.mark.parametrize("arch", ARCHS)
def test_every_method_runs_with_the_image_encoder_in_bfloat16(arch):
    """bf16-vision for each architecture and method (attention, Grad-CAM's graph-less encoder and the
    pixel methods alike): the maps fp32's shape, finite, and following fp32's."""
    cap = captioner(arch)
    cap.model.float()
    for method in methods_for(cap.model):
        full = explain(cap, image(), CAPTION, method=method)
        fast = explain(cap, image(), CAPTION, method=method, precision="bf16-vision")
        assert fast.parameters["precision"] == "bf16-vision" and fast.image.dtype == torch.float32
        for name in ("image", "grid", "preceding", "score"):
            ours, reference = getattr(fast, name), getattr(full, name)
            assert ours.shape == reference.shape and torch.isfinite(ours).all(), (method, name)
            if reference.abs().max() == 0:  # attention gives the preceding words nothing
                assert ours.abs().max() == 0, (method, name)
            else:  # gradient × input, the least stable, correlates 0.978 with fp32's here
                pair = torch.stack([ours.flatten(), reference.flatten()]).double()
                assert torch.corrcoef(pair)[0, 1] > 0.95, (method, name)


def test_bf16_vision_runs_methods_that_stop_at_the_grid_in_fp32():
    """Grad-CAM and the model's attention read nothing of the encoder but its output, which bf16-vision
    computes in float32 for a float32 decoder: they get fp32's maps bit for bit, from the fp32 model
    (no bfloat16 copy made, no bfloat16 encoder forward), and record the precision asked for."""
    cap = captioner("sat")
    cap.model.float()
    for method in ("gradcam", "attention"):
        full = explain(cap, image(), CAPTION, method=method)
        vision = explain(cap, image(), CAPTION, method=method, precision="bf16-vision")
        assert vision.parameters["precision"] == "bf16-vision"
        for name in ("image", "grid", "preceding", "score"):
            assert torch.equal(getattr(vision, name), getattr(full, name)), (method, name)
    assert "bf16-vision" not in getattr(cap, "_reduced_precision", {})
    explain(cap, image(), CAPTION, method="guided_backprop", precision="bf16-vision")  # it enters the encoder
    assert "bf16-vision" in cap._reduced_precision


@pytest.mark.parametrize("method", ["lrp", "gradient_x_input", "guided_gradcam"])
def test_max_pooling_spread_as_one_product_changes_no_map(monkeypatch, method):
    """The 2×2 max-poolings' backward as one broadcast product (``rules.winner_takes_all``) gives
    every map bit for bit what the poolings' own backward gives, VGG16's five poolings included."""
    from captionlens.explain import gradients, rules

    cap = captioner("gridtd", encoder="vgg16")
    spread = explain(cap, image(), CAPTION, method=method)
    monkeypatch.setitem(rules.RULES, nn.MaxPool2d, lambda *args, **options: None)  # each its own backward
    monkeypatch.setattr(gradients, "max_pool_hooks", lambda model: [])
    ordinary = explain(cap, image(), CAPTION, method=method)
    for name in ("image", "grid", "preceding"):
        assert torch.equal(getattr(spread, name), getattr(ordinary, name)), name


@pytest.mark.parametrize("method", ["lrp", "gradient_x_input"])
@pytest.mark.parametrize("encoder", ["shapes", "resnet50"])
def test_bf16_vision_decodes_float32_features_and_rounds_only_the_encoders_backward(method, encoder):
    """bf16-vision's decoder reads the image encoder's float32 values (a copy run without a graph),
    its relevance or gradient flowing into the bfloat16 encoder's graph: the score and the preceding
    words' share, computed by the decoder alone, are fp32's; the pixel maps follow fp32's. (A ResNet:
    batch-norm folded first, which probes the encoder in bfloat16.)"""
    cap = captioner("transformer", encoder)
    cap.model.float()
    full = explain(cap, image(), CAPTION, method=method)
    vision = explain(cap, image(), CAPTION, method=method, precision="bf16-vision")
    everything = explain(cap, image(), CAPTION, method=method, precision="bf16")
    assert torch.allclose(vision.score, full.score, rtol=1e-5, atol=1e-6)
    assert torch.allclose(vision.preceding, full.preceding, rtol=1e-4, atol=1e-5 * float(full.preceding.abs().max()))
    assert (vision.preceding - full.preceding).abs().max() < (everything.preceding - full.preceding).abs().max() / 100
    pair = torch.stack([vision.image.flatten(), full.image.flatten()]).double()
    # gradient × input, the least stable: 0.978 here, and 0.92 through a ResNet of random weights
    assert torch.corrcoef(pair)[0, 1] > (0.99 if method == "lrp" else 0.95 if encoder == "shapes" else 0.85)
    layout = torch.channels_last if encoder == "shapes" else torch.contiguous_format  # the encoder's, as measured
    convolutions = [m.weight for m in cap._reduced_precision["bf16-vision"][1].vision_module().modules()
                    if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1]
    assert convolutions and all(w.is_contiguous(memory_format=layout) for w in convolutions)


def test_precision_auto_is_bf16_only_where_the_hardware_computes_it_and_records_what_ran(monkeypatch):
    from captionlens.explain import explainer

    cap = captioner("gridtd", zero_biases=True)
    cap.model.float()
    monkeypatch.setattr(explainer, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    assert explainer.resolve_precision("auto") == "fp32"
    plain = explain(cap, image(), CAPTION, method="lrp", epsilon=1e-9, precision="auto")
    assert plain.parameters["precision"] == "fp32"
    assert torch.equal(plain.image, explain(cap, image(), CAPTION, method="lrp", epsilon=1e-9).image)
    for flag in ("avx512_bf16", "amx_bf16"):
        monkeypatch.setattr(explainer, "cpu_flags", lambda flag=flag: frozenset({"avx2", flag}))
        fast = explain(cap, image(), CAPTION, method="lrp", epsilon=1e-9, precision="auto")
        assert fast.parameters["precision"] == "bf16-vision"
        assert torch.equal(fast.image, explain(cap, image(), CAPTION, method="lrp", epsilon=1e-9,
                                               precision="bf16-vision").image)
    for precision in ("fp32", "bf16", "bf16-vision"):
        assert explainer.resolve_precision(precision) == precision
    assert not explainer.native_bf16("meta")  # neither a CUDA GPU nor a CPU: no native bf16 claimed
    with pytest.raises(ValueError, match="fp32, bf16, bf16-vision, auto"):
        explainer.resolve_precision("fp16")


@pytest.mark.parametrize("setting, first, expected", [
    (None, "import captionlens", True),  # importing captionlens first asks PyTorch for huge pages
    ("0", "import captionlens", False),  # the user's own setting wins
    (None, "import torch; torch.ones(3) * 2; import captionlens", False),  # too late: torch has allocated
])
def test_importing_captionlens_first_gives_pytorch_huge_page_buffers(setting, first, expected):
    """PyTorch reads THP_MEM_ALLOC_ENABLE at its first allocation: captionlens sets it (unless the user
    did) before importing torch, and ``huge_page_buffers`` probes what the allocator does."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    program = f"{first}; from captionlens.explain import huge_page_buffers; print(huge_page_buffers())"
    found = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True)
    assert found.stdout.split() == [str(expected)]


def test_explaining_an_empty_caption_is_an_error_as_at_the_command_line():
    """cl.explain of a caption without words raises, naming what to do, instead of returning an
    empty Explanation; asking for no positions of a real caption still returns one of no words."""
    import captionlens as cl
    from captionlens.errors import InvalidValue

    cap = cl.build_captioner("gridtd", encoder="shapes", vocab="a red circle".split(), hidden_size=8, embed_size=4)
    image = torch.rand(3, 16, 16)
    with pytest.raises(InvalidValue, match="the caption is empty.*beam_size=1"):
        cl.explain(cap, image, [], "lrp")
    assert cl.explain(cap, image, [], "lrp", include_end=True).words == ["<end>"]
    assert cl.explain(cap, image, "a red circle".split(), "lrp", words=[]).words == []
