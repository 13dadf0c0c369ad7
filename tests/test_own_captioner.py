"""Explaining captioners people already have: every architecture × encoder conserves relevance,
decoders written with standard PyTorch layers are canonised into equivalent rule-bearing ones (and
restored), the audit passes where LRP is sound and catches a planted product where it is not."""
import json

import pytest
import torch
from torch import nn

import captionlens as cl
from captionlens.explain import explain
from captionlens.explain.audit import audit_lrp, zero_biases
from captionlens.explain.canonize import StandardLSTM, StandardLSTMCell, canonized
from captionlens.models import ARCHITECTURES, ENCODERS
from captionlens.models.decoder import Decoder, StepOutput
from captionlens.models.layers import AttentionWeights, ChannelAffine, Gate, GridMemory
from captionlens.models.registry import register_architecture

WORDS = "a red blue circle square left of two".split()
CAPTION = "a red circle left of a blue square".split()
SMALL = {"shapes": {"image_size": 32}, "vgg16": {"image_size": 32}, "resnet50": {"image_size": 64, "grid_size": 3},
         "resnet101": {"image_size": 64, "grid_size": 2}, "efficientnet_lite0": {"image_size": 64}}


def captioner(arch, encoder="shapes", seed=0):
    return cl.build_captioner(arch, encoder=encoder, vocab=WORDS, hidden_size=16, embed_size=12, seed=seed,
                              encoder_options=SMALL.get(encoder, {"image_size": 32}))


def image(size=32, seed=0):
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ decoders of standard layers
class TutorialStyleDecoder(Decoder):
    """Show-Attend-Tell as people write it: nn.LSTMCell, nn.Softmax attention with
    ``(cells * alpha.unsqueeze(2)).sum(dim=1)``, an nn.Sigmoid gate applied with ``*``, a mean
    written as ``.mean(dim=1)``, batch-norm on the initial state."""

    plant_product = False  # a plain product of two signals: LRP through it is wrong

    def __init__(self, vocab_size, feature_channels, **sizes):
        super().__init__(vocab_size, feature_channels, **sizes)
        d, a = self.hidden_size, self.attention_size
        self.init_h, self.init_c = nn.Linear(feature_channels, d), nn.Linear(feature_channels, d)
        self.init_norm = nn.BatchNorm1d(d)
        self.encoder_att, self.decoder_att, self.full_att = nn.Linear(feature_channels, a), nn.Linear(d, a), nn.Linear(a, 1)
        self.relu, self.softmax, self.sigmoid = nn.ReLU(), nn.Softmax(dim=1), nn.Sigmoid()
        self.f_beta = nn.Linear(d, feature_channels)
        self.mix = nn.Linear(d, feature_channels)
        self.decode_step = nn.LSTMCell(self.embed_size + feature_channels, d)

    def prepare(self, grid):
        cells = grid.flatten(2).transpose(1, 2)  # [B, L, C]
        return GridMemory(cells, cells.mean(dim=1), self.encoder_att(cells))

    def initial_state(self, memory):
        return self.init_norm(self.init_h(memory.global_feature)), self.init_c(memory.global_feature)

    def step(self, memory, words, state):
        h, c = state
        alpha = self.softmax(self.full_att(self.relu(memory.cell_keys + self.decoder_att(h).unsqueeze(1))).squeeze(2))
        context = (memory.cells * alpha.unsqueeze(2)).sum(dim=1)  # [B, C]
        context = self.sigmoid(self.f_beta(h)) * context
        if self.plant_product:
            context = context * self.mix(h)
        h, c = self.decode_step(torch.cat([self.embedding(words), context], dim=1), (h, c))
        return StepOutput(self.fc(self.dropout(h)), (h, c), alpha, None)

    @staticmethod
    def reorder_state(state, index):
        return tuple(t.index_select(0, index) for t in state)


class PlantedProductDecoder(TutorialStyleDecoder):
    plant_product = True


class ShowAndTellDecoder(Decoder):
    """An nn.LSTM (one layer, batch_first) stepped one word at a time, the image's mean feature as
    its initial input, and the context added with a plain ``+``."""

    def __init__(self, vocab_size, feature_channels, **sizes):
        super().__init__(vocab_size, feature_channels, **sizes)
        self.image_proj = nn.Linear(feature_channels, self.embed_size)
        self.lstm = nn.LSTM(self.embed_size, self.hidden_size, batch_first=True)

    def prepare(self, grid):
        cells = grid.flatten(2).transpose(1, 2)
        return GridMemory(cells, self.image_proj(cells.mean(dim=1)), cells)

    def initial_state(self, memory):
        zeros = memory.global_feature.new_zeros(1, memory.global_feature.shape[0], self.hidden_size)
        return zeros, zeros

    def step(self, memory, words, state):
        x = self.embedding(words) + memory.global_feature  # [B, E]
        out, (h, c) = self.lstm(x.unsqueeze(1), state)
        alpha = memory.cells.new_full(memory.cells.shape[:2], 1 / memory.cells.shape[1])
        return StepOutput(self.fc(self.dropout(out[:, 0])), (h, c), alpha, None)

    @staticmethod
    def reorder_state(state, index):
        return tuple(t.index_select(1, index) for t in state)


for name, cls in (("test_tutorial_style", TutorialStyleDecoder), ("test_planted_product", PlantedProductDecoder),
                  ("test_show_and_tell", ShowAndTellDecoder)):
    if name not in ARCHITECTURES:
        register_architecture(name)(cls)


def standard(arch, encoder="shapes"):
    cap = captioner(arch, encoder)
    with torch.no_grad():  # non-trivial batch-norm statistics (positive scales, as trained networks mostly have:
        for module in cap.model.modules():  # α=1, β=0 loses the relevance of a unit whose inputs all oppose it)
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
    return cap


# ------------------------------------------------------------------------------------ conservation
@pytest.mark.parametrize("arch", ["adaptive", "gridtd", "sat", "transformer", "test_tutorial_style",
                                  "test_show_and_tell"])
@pytest.mark.parametrize("encoder", sorted(SMALL))
def test_lrp_conserves_relevance_for_every_architecture_and_encoder(arch, encoder):
    cap = standard(arch, encoder)
    zero_biases(cap.model).double()
    size = SMALL[encoder]["image_size"]
    exp = explain(cap, image(size), CAPTION, method="lrp", epsilon=1e-9, alpha=1.0, beta=0.0, include_end=True)
    total = exp.image.sum(dim=(1, 2)) + exp.preceding.sum(dim=1) + exp.extra.get("positions", 0)  # transformer
    assert exp.score.abs().min() > 1e-9
    assert torch.allclose(total, exp.score, rtol=1e-4, atol=0)
    assert (exp.image.abs().sum(dim=(1, 2)) > 0).all()


def test_every_registered_encoder_is_covered():
    assert {name for name, cls in ENCODERS.items() if cls.__module__.startswith("captionlens.")} == set(SMALL)
    # the decoders on an encoder's grid; vit-gpt2 (a Hugging Face model trained from the pixels) is audited
    # in tests/test_vit_gpt2.py and, as every VisionEncoderDecoder, in tests/test_hf.py
    assert {name for name, cls in ARCHITECTURES.items() if cls.__module__.startswith("captionlens.")
            and not getattr(cls, "trained_from_pixels", False)} == {"adaptive", "gridtd", "sat", "transformer"}


# ------------------------------------------------------------------------- canonised == original
def _double(module):
    return module.double().eval()


@pytest.mark.parametrize("make,inputs", [
    (lambda: nn.LSTMCell(5, 4), lambda: (torch.randn(3, 5), (torch.randn(3, 4), torch.randn(3, 4)))),
    (lambda: nn.LSTMCell(5, 4, bias=False), lambda: (torch.randn(3, 5),)),
    (lambda: nn.LSTM(5, 4, batch_first=True), lambda: (torch.randn(3, 6, 5), (torch.randn(1, 3, 4), torch.randn(1, 3, 4)))),
    (lambda: nn.BatchNorm1d(4), lambda: (torch.randn(3, 4),)),
    (lambda: nn.BatchNorm2d(4), lambda: (torch.randn(3, 4, 5, 5),)),
    (lambda: nn.Sigmoid(), lambda: (torch.randn(3, 4),)),
    (lambda: nn.Softmax(dim=1), lambda: (torch.randn(3, 4),)),
])
def test_each_canonised_module_computes_what_the_original_does(make, inputs):
    from captionlens.explain.canonize import CANONIZERS

    torch.manual_seed(0)
    original = make().eval()
    if isinstance(original, nn.modules.batchnorm._BatchNorm):
        with torch.no_grad():
            original.running_mean.normal_()
            original.running_var.uniform_(0.5, 2)
            original.weight.normal_()
    replacement = CANONIZERS[type(original)](original).eval()
    assert isinstance(replacement, (StandardLSTMCell, StandardLSTM, ChannelAffine, Gate, AttentionWeights))
    args = inputs()
    expected, got = original(*args), replacement(*args)
    flat = lambda t: [t] if isinstance(t, torch.Tensor) else [x for item in t for x in flat(item)]  # noqa: E731
    for e, g in zip(flat(expected), flat(got), strict=True):
        assert e.shape == g.shape and (e - g).abs().max() <= 1e-6


@pytest.mark.parametrize("arch,encoder", [("test_tutorial_style", "resnet50"), ("test_show_and_tell", "efficientnet_lite0")])
def test_the_canonised_model_gives_the_same_logits_and_is_restored_afterwards(arch, encoder):
    cap = standard(arch, encoder)
    model = cap.model.eval()
    pixels = cap.preprocess(image(64))
    tokens = cap.encode(CAPTION)
    modules_before = dict(model.named_modules())
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(pixels, tokens)
        with canonized(model):
            assert not any(type(m) in (nn.LSTMCell, nn.LSTM, nn.BatchNorm1d, nn.BatchNorm2d, nn.Sigmoid, nn.Softmax)
                           for m in model.modules())
            got = model(pixels, tokens)
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert dict(model.named_modules()) == modules_before and "forward" not in vars(model.decoder)
    assert all(torch.equal(v, state_before[k]) for k, v in model.state_dict().items())


def test_unknown_modules_are_refused_by_name_and_unsupported_lstms_clearly():
    cap = captioner("sat")
    cap.model.decoder.lstm = nn.GRUCell(4, 4)  # never called: refused before the forward
    with pytest.raises(TypeError, match="'decoder.lstm' of type GRUCell"):
        explain(cap, image(), CAPTION, method="lrp")
    with pytest.raises(TypeError, match="num_layers > 1"):
        StandardLSTM(nn.LSTM(3, 4, num_layers=2, batch_first=True))


# ------------------------------------------------------------------------------------------ audit
@pytest.mark.parametrize("arch", ["adaptive", "gridtd", "sat", "test_tutorial_style", "test_show_and_tell"])
@pytest.mark.parametrize("encoder", sorted(SMALL))
def test_the_audit_passes_where_lrp_is_sound(arch, encoder):
    report = audit_lrp(standard(arch, encoder), caption=CAPTION)
    assert report.passed, [row.to_dict() for row in report.flagged]
    assert abs(report.conservation - 1) < 1e-5 and report.pixels != 0
    assert any(row.sink and row.kind == "Embedding" for row in report.rows)  # where words' relevance is read


def test_the_audit_catches_a_plain_product():
    report = audit_lrp(standard("test_planted_product"), caption=CAPTION)
    assert not report.passed
    flagged = [row.name for row in report.flagged]
    assert any(name.startswith("decoder") and name.endswith("mul") for name in flagged), flagged
    assert abs(report.conservation - 1) > 1e-3  # and the totals show it


def test_the_audit_leaves_the_model_untouched():
    cap = standard("sat", "resnet50")
    before = {k: v.clone() for k, v in cap.model.state_dict().items()}
    audit_lrp(cap)
    assert all(torch.equal(v, before[k]) for k, v in cap.model.state_dict().items())
    assert next(cap.model.parameters()).dtype == torch.float32


# --------------------------------------------------------------------------------- real weights
def test_efficientnet_lite0_uses_the_packaged_imagenet_weights_offline():
    from captionlens.models.efficientnet import EfficientNetLite0Encoder
    from captionlens.models.encoders import build_encoder, load_state_dict_file

    path = EfficientNetLite0Encoder.default_weights()
    if path is None:
        pytest.skip("the efficientnet extra is not installed")
    state = load_state_dict_file(path)
    encoder = build_encoder("efficientnet_lite0").eval()
    assert torch.equal(encoder._blocks[15]._project_conv.weight, state["_blocks.15._project_conv.weight"])
    with torch.no_grad():
        grid = encoder(torch.zeros(1, 3, 224, 224))
    assert grid.shape == (1, 1280, 7, 7) and torch.isfinite(grid).all()


@pytest.mark.parametrize("method", ["gradcam", "guided_backprop", "guided_gradcam", "gradient_x_input", "attention"])
def test_every_method_explains_new_encoders_and_standard_decoders(method):
    for arch, encoder in (("sat", "efficientnet_lite0"), ("test_tutorial_style", "resnet50")):
        exp = explain(standard(arch, encoder), image(64), CAPTION, method=method)
        assert exp.image.shape == (len(CAPTION), 64, 64) and torch.isfinite(exp.image).all()
        assert exp.image.abs().sum() > 0


# ------------------------------------------------------------------- downstream, on the shapes world
def test_sat_trains_on_resnet_and_efficientnet_and_every_verb_takes_it(tiny_shapes, tmp_path):
    """train --arch sat with a ResNet-50 from a local torchvision-format file and with EfficientNet-Lite0's
    packaged weights; then caption, explain, audit and an experiment through the CLI, and the viewer."""
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from captionlens.cli import app
    from captionlens.models.resnet import ResNet50Encoder
    from captionlens.viewer.app import create_app

    runner = CliRunner()
    weights = tmp_path / "resnet50-random.pth"
    torch.save(ResNet50Encoder().state_dict(), weights)  # torchvision's layout (random weights: no download here)
    runs = {"resnet50": ["--encoder-weights", str(weights)], "efficientnet_lite0": []}
    for encoder, extra in runs.items():
        result = runner.invoke(app, ["train", "--data", str(tiny_shapes), "--arch", "sat", "--encoder", encoder, *extra,
                                     "--out", str(tmp_path / encoder), "--epochs", "1", "--hidden-size", "16",
                                     "--embed-size", "8", "--workers", "0"])
        assert result.exit_code == 0, result.output
        assert cl.load(tmp_path / encoder).config.encoder == encoder
    images = sorted((tiny_shapes / "images").glob("*.png"))[:1]
    run = str(tmp_path / "efficientnet_lite0")
    result = runner.invoke(app, ["explain", "--model", run, str(images[0]), "--out", str(tmp_path / "explained"),
                                 "--methods", "lrp,gradcam,guided_gradcam,attention", "--caption", "a red circle"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["audit", "--model", str(tmp_path / "resnet50"), str(images[0]), "--caption",
                                 "a red circle", "--out", str(tmp_path / "audit.json")])
    assert result.exit_code == 0 and "audit passed" in result.output, result.output
    assert json.loads((tmp_path / "audit.json").read_text())["passed"] is True
    result = runner.invoke(app, ["report", "--run", run, "--images", str(images[0]), "--out", str(tmp_path / "r.html")])
    assert result.exit_code == 0 and (tmp_path / "r.html").is_file(), result.output
    result = runner.invoke(app, ["hallucination", "--model", run, "--data", str(tiny_shapes), "--out",
                                 str(tmp_path / "hallucination"), "--split", "val", "--limit", "4", "--min-count", "0",
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    served = cl.load(run)
    with torch.no_grad():  # never <end> first: a caption with words to click
        served.model.decoder.fc.bias[served.vocab.end_id] = -1e4
    served.config.max_length = 4
    client = TestClient(create_app(served, tiny_shapes))
    upload = client.post("/api/caption", files={"file": ("x.png", images[0].read_bytes(), "image/png")}).json()
    for method in ("attention", "lrp"):
        response = client.post("/api/explain", json={"image_id": upload["image_id"], "word_index": 0, "method": method})
        assert response.status_code == 200, response.text
        assert "beta" not in response.json()["extra"]  # sat has no sentinel
