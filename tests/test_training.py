"""Training: the loss falls, a tiny model overfits a tiny dataset (both architectures), and an
interrupted run resumes to exactly where an uninterrupted one gets."""
import json

import pytest
import torch

import captionlens as cl
from captionlens.data.bundle import open_data
from captionlens.pipeline import caption_loss, pad_captions, train_captioner
from captionlens.train import TrainConfig

ARCHS = ["adaptive", "gridtd"]
CAPTIONS = [["a", "red", "circle"], ["a", "blue", "square"], ["two", "red", "squares"], ["a", "blue", "circle", "left"]]


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_falls_and_a_tiny_model_overfits_a_tiny_dataset(arch):
    words = sorted({w for c in CAPTIONS for w in c})
    cap = cl.build_captioner(arch, encoder="shapes", vocab=words, hidden_size=48, embed_size=24, dropout=0.0, seed=0)
    torch.manual_seed(0)
    grids = torch.rand(len(CAPTIONS), 128, 4, 4)  # one distinct "image" per caption
    tokens = pad_captions([cap.vocab.encode(c) for c in CAPTIONS], cap.vocab.pad_id)
    decoder = cap.model.decoder
    optimizer = torch.optim.Adam(decoder.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss = caption_loss(decoder, (grids, tokens), cap.vocab.pad_id)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[10] < losses[0] and losses[-1] < 0.05 * losses[0]
    decoder.eval()
    assert [c.words for c in cap.caption_features(grids, beam_size=3)] == CAPTIONS  # memorised, image by image


def _small_config(**overrides):
    return TrainConfig(**({"epochs": 3, "batch_size": 16, "learning_rate": 3e-3, "patience": 5, "seed": 0} | overrides))


def test_train_writes_a_run_folder_and_resume_continues_exactly(tiny_shapes, tmp_path):
    data = open_data(tiny_shapes)
    weights = tmp_path / "encoder.safetensors"
    from captionlens.pipeline import pretrain_shapes_encoder

    pretrain_shapes_encoder(weights, TrainConfig(epochs=1, batch_size=16), images=40, progress=False)
    common = dict(encoder_weights=weights, hidden_size=32, embed_size=16, progress=False)

    full = train_captioner(data, "gridtd", tmp_path / "full", train_config=_small_config(), **common)
    names = {p.name for p in (tmp_path / "full").iterdir()}
    assert {"config.json", "vocab.json", "model.safetensors", "metrics.jsonl", "training_state.json",
            "training_state.safetensors"} <= names
    log = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [1, 2, 3]
    assert log[-1]["train_loss"] < log[0]["train_loss"]

    # "interrupted" after two epochs, then resumed for the third
    train_captioner(data, "gridtd", tmp_path / "resumed", train_config=_small_config(epochs=2), **common)
    resumed = train_captioner(data, "gridtd", tmp_path / "resumed", train_config=_small_config(), resume=True, **common)
    resumed_log = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in resumed_log] == [1, 2, 3]
    assert resumed_log[-1]["val_loss"] == pytest.approx(log[-1]["val_loss"], rel=1e-5)
    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_resume_without_state_is_a_clear_error(tiny_shapes, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train_captioner(tiny_shapes, "adaptive", tmp_path / "run", hidden_size=16, embed_size=8, resume=True,
                        train_config=_small_config(epochs=1), progress=False)


def test_vgg16_training_needs_local_weights(tiny_shapes, tmp_path):
    with pytest.raises(ValueError, match="never downloads"):
        train_captioner(tiny_shapes, "gridtd", tmp_path / "run", encoder="vgg16", progress=False)
