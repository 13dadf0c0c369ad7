"""Importing the Show-Attend-Tell tutorial's checkpoints: the tutorial's model layout is built here
(classes named as the tutorial's ``models.py`` and torchvision's ResNet, random weights), saved the
way the tutorial saves it, imported, and its teacher-forced logits compared with the original's."""
import json
import os
import sys
import types

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from captionlens.cli import app
from captionlens.explain import explain
from captionlens.explain.audit import audit_lrp
from captionlens.models import Captioner
from captionlens.models.sat_tutorial import import_sat_tutorial, read_checkpoint

WORDS = ["a", "man", "riding", "horse", "on", "beach", "dog", "red"]


# ------------------------------------------------------------------- the tutorial's layout, rebuilt
class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck (attribute names as torchvision's)."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def resnet50_children():
    """What ``list(torchvision.models.resnet50().children())[:-2]`` holds."""
    layers, inplanes = [], 64
    for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), nn.BatchNorm2d(planes * 4))
        stage = [Bottleneck(inplanes, planes, stride, downsample)]
        inplanes = planes * 4
        stage += [Bottleneck(inplanes, planes) for _ in range(blocks - 1)]
        layers.append(nn.Sequential(*stage))
    return [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1),
            *layers]


class Encoder(nn.Module):
    def __init__(self, encoded_image_size=14):
        super().__init__()
        self.enc_image_size = encoded_image_size
        self.resnet = nn.Sequential(*resnet50_children())
        self.adaptive_pool = nn.AdaptiveAvgPool2d((encoded_image_size, encoded_image_size))

    def forward(self, images):
        return self.adaptive_pool(self.resnet(images)).permute(0, 2, 3, 1)  # [B, s, s, 2048]


class Attention(nn.Module):
    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)
        self.relu = nn.ReLU()
        self.softmax = nn.Softmax(dim=1)

    def forward(self, encoder_out, decoder_hidden):
        scores = self.full_att(self.relu(self.encoder_att(encoder_out) + self.decoder_att(decoder_hidden).unsqueeze(1)))
        alpha = self.softmax(scores.squeeze(2))
        return (encoder_out * alpha.unsqueeze(2)).sum(dim=1), alpha


class DecoderWithAttention(nn.Module):
    def __init__(self, attention_dim, embed_dim, decoder_dim, vocab_size, encoder_dim=2048, dropout=0.5):
        super().__init__()
        self.encoder_dim, self.attention_dim, self.embed_dim = encoder_dim, attention_dim, embed_dim
        self.decoder_dim, self.vocab_size, self.dropout = decoder_dim, vocab_size, dropout
        self.attention = Attention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, embed_dim)
        self.dropout = nn.Dropout(p=self.dropout)
        self.decode_step = nn.LSTMCell(embed_dim + encoder_dim, decoder_dim, bias=True)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)
        self.sigmoid = nn.Sigmoid()
        self.fc = nn.Linear(decoder_dim, vocab_size)

    def forward(self, encoder_out, captions, decode_length):
        """Teacher forcing for captions of one length: predictions [B, decode_length, V]."""
        encoder_out = encoder_out.view(encoder_out.shape[0], -1, self.encoder_dim)
        embeddings = self.embedding(captions)
        mean = encoder_out.mean(dim=1)
        h, c = self.init_h(mean), self.init_c(mean)
        predictions = []
        for t in range(decode_length):
            awe, _ = self.attention(encoder_out, h)
            awe = self.sigmoid(self.f_beta(h)) * awe
            h, c = self.decode_step(torch.cat([embeddings[:, t], awe], dim=1), (h, c))
            predictions.append(self.fc(self.dropout(h)))
        return torch.stack(predictions, dim=1)


FAKE_MODULES = {"models": (Encoder, DecoderWithAttention, Attention), "torchvision.models.resnet": (Bottleneck,)}


@pytest.fixture()
def tutorial_classes(monkeypatch):
    """The classes importable under the tutorial's module names while the test saves a checkpoint."""
    for name in ("torchvision", "torchvision.models"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    for module_name, classes in FAKE_MODULES.items():
        module = types.ModuleType(module_name)
        for cls in classes:
            monkeypatch.setattr(cls, "__module__", module_name)
            setattr(module, cls.__name__, cls)
        monkeypatch.setitem(sys.modules, module_name, module)


def tutorial_model(seed=0):
    torch.manual_seed(seed)
    word_map = {w: i + 1 for i, w in enumerate(WORDS)}
    word_map.update({"<unk>": len(word_map) + 1, "<start>": len(word_map) + 2, "<end>": len(word_map) + 3, "<pad>": 0})
    encoder, decoder = Encoder(encoded_image_size=3), DecoderWithAttention(16, 12, 20, len(word_map))
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.2, 0.6)
                module.bias.normal_(0, 0.1)
        for parameter in decoder.parameters():
            parameter.normal_(0, 0.1)
    return encoder.eval(), decoder.eval(), word_map


def save_tutorial_checkpoint(tmp_path, encoder, decoder, word_map):
    path = tmp_path / "BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pth.tar"
    torch.save({"epoch": 7, "epochs_since_improvement": 0, "bleu-4": 0.231, "encoder": encoder, "decoder": decoder,
                "encoder_optimizer": None, "decoder_optimizer": torch.optim.Adam(decoder.parameters(), lr=4e-4)}, path)
    (tmp_path / "WORDMAP.json").write_text(json.dumps(word_map))
    return path, tmp_path / "WORDMAP.json"


def assert_same_logits(captioner: Captioner, encoder, decoder, word_map):
    pixels = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    caption = ["a", "man", "riding", "a", "horse", "on", "unknownword"]
    theirs_ids = [word_map["<start>"], *(word_map.get(w, word_map["<unk>"]) for w in caption), word_map["<end>"]]
    encoder, decoder = encoder.double(), decoder.double()
    with torch.no_grad():
        theirs = decoder(encoder(pixels), torch.tensor([theirs_ids]), len(theirs_ids) - 1)  # [1, T, V]
        ours = captioner.model.double()(pixels, captioner.encode(caption)[:, :-1])  # [1, T, V]
    columns = [word_map[w] for w in captioner.vocab.words]  # our word i is their column columns[i]
    assert ours.shape == theirs.shape
    assert (ours - theirs[..., columns]).abs().max() <= 1e-5


# -------------------------------------------------------------------------------------------- tests
def test_a_tutorial_checkpoint_imports_with_equal_logits(tmp_path, tutorial_classes):
    encoder, decoder, word_map = tutorial_model()
    checkpoint, word_map_file = save_tutorial_checkpoint(tmp_path, encoder, decoder, word_map)
    for name in FAKE_MODULES:  # the import must not need (or run) the tutorial's code
        sys.modules.pop(name)
    captioner = import_sat_tutorial(checkpoint, word_map_file, out=tmp_path / "run")
    assert captioner.config.architecture == "sat" and captioner.config.encoder == "resnet50"
    assert captioner.config.encoder_options == {"image_size": 256, "grid_size": 3}
    assert_same_logits(captioner, encoder, decoder, word_map)
    assert_same_logits(Captioner.load(tmp_path / "run"), encoder, decoder, word_map)  # an ordinary run folder


def test_a_plain_state_dict_imports_too(tmp_path):
    encoder, decoder, word_map = tutorial_model(seed=1)
    path = tmp_path / "state.pth"
    torch.save({"encoder": encoder.state_dict(), "decoder": decoder.state_dict()}, path)
    (tmp_path / "map.json").write_text(json.dumps(word_map))
    assert_same_logits(import_sat_tutorial(path, tmp_path / "map.json", grid_size=3), encoder, decoder, word_map)


class Exploit:
    def __reduce__(self):
        return os.system, ("touch pwned-by-pickle",)


def test_a_checkpoint_with_foreign_code_is_refused_and_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"encoder": {}, "decoder": Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match=r"refers to (posix|os|nt)\.system"):
        read_checkpoint(tmp_path / "evil.pth")
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_the_cli_imports_and_the_run_is_explained(tmp_path, tutorial_classes):
    from PIL import Image

    encoder, decoder, word_map = tutorial_model(seed=2)
    checkpoint, word_map_file = save_tutorial_checkpoint(tmp_path, encoder, decoder, word_map)
    runner = CliRunner()
    result = runner.invoke(app, ["import", "sat-tutorial", "--checkpoint", str(checkpoint), "--word-map",
                                 str(word_map_file), "--out", str(tmp_path / "sat"), "--image-size", "64"])
    assert result.exit_code == 0, result.output
    captioner = Captioner.load(tmp_path / "sat")
    photo = tmp_path / "photo.png"
    Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()).save(photo)
    exp = explain(captioner, photo, "a man riding a horse", method="lrp")
    assert torch.isfinite(exp.image).all() and exp.image.abs().sum() > 0
    assert audit_lrp(captioner, photo, "a man riding a horse").passed
    bad = runner.invoke(app, ["import", "sat-tutorial", "--checkpoint", str(tmp_path / "missing.pth"), "--word-map",
                              str(word_map_file), "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "no checkpoint at" in bad.output and "Traceback" not in bad.output
