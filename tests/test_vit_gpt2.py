"""A ViT-GPT2 captioner trained in the shapes world (issue 25, part 1): `train --arch vit-gpt2` builds a
VisionEncoderDecoderModel from a small config and trains it end to end from pixels through the same
loop as the papers' decoders. Checked: the run folder every verb and ``cl.from_hf`` load (the same
model), an exact resume, DistributedDataParallel under torchrun, a caption that is a function of its
own image (what the shuffled-feature BLEU of a pixel captioner relies on), the shift-absorbing model of
the input-invariance check, and clear refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import captionlens as cl
from captionlens.cli import app

pytest.importorskip("transformers")  # the hf extra: in the test extra, so CI runs all of this

TINY = ["--arch", "vit-gpt2", "--hidden-size", "32", "--heads", "4", "--layers", "1", "--encoder-layers", "1",
        "--batch-size", "8", "--lr", "0.003", "--workers", "0"]


def train(data, out: Path, epochs: int, *extra: str) -> None:
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(out), "--epochs", str(epochs), *TINY,
                                      *extra])
    assert result.exit_code == 0, result.output


def weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "training_state.safetensors"))


@pytest.fixture(scope="module")
def trained(tiny_shapes, tmp_path_factory):
    run = tmp_path_factory.mktemp("vit") / "run"
    train(tiny_shapes, run, 3)
    return run


def test_a_trained_run_folder_is_a_hugging_face_model_every_verb_loads(trained, tiny_shapes, tmp_path):
    from captionlens.models.hf import HFCaptioner

    loaded = cl.load(trained)
    assert isinstance(loaded, HFCaptioner) and loaded.config.architecture == "vit-gpt2"
    hf = loaded.model.hf
    assert type(hf).__name__ == "VisionEncoderDecoderModel"
    assert hf.config.encoder.patch_size == 8 and hf.config.encoder.image_size == 64  # an 8×8 grid at 64 px
    assert hf.config.decoder.n_layer == 1 and hf.config.encoder.num_hidden_layers == 1
    assert [e["epoch"] for e in map(json.loads, (trained / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3]
    manifest = json.loads((trained / "manifest.json").read_text())["files"]
    assert {"config.json", "hf/config.json", "hf/model.safetensors", "hf/tokenizer.json"} <= set(manifest)
    # the run's hf/ folder is an ordinary save_pretrained folder: cl.from_hf loads the same model
    plain = cl.from_hf(trained / "hf")
    image = sorted((tiny_shapes / "images").glob("*.png"))[-1]
    assert plain.caption(image)[0].words == loaded.caption(image)[0].words
    # one token per word, at the vocabulary's ids
    vocabulary = loaded.vocab
    assert loaded.tokenize("A red circle") == ["a", "red", "circle"]
    assert vocabulary.words[:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    explained = cl.explain(loaded, image, "a red circle", method="lrp")
    assert explained.image.shape[0] == 3 and torch.isfinite(explained.image).all()
    result = CliRunner().invoke(app, ["audit", "--model", str(trained), str(image)])
    assert result.exit_code == 0 and "passed" in result.output, result.output


def test_resume_continues_exactly(trained, tiny_shapes, tmp_path):
    train(tiny_shapes, tmp_path / "run", 2)
    train(tiny_shapes, tmp_path / "run", 3, "--resume")
    straight, resumed = weights(trained), weights(tmp_path / "run")
    for name, value in straight.items():
        if name.startswith("model."):
            assert torch.equal(value, resumed[name]), name
    logs = [[json.loads(line)["val_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (trained, tmp_path / "run")]
    assert logs[0] == logs[1]


def test_a_caption_depends_on_its_own_image_alone(trained, tiny_shapes):
    """The shuffled-feature BLEU of a pixel captioner gives image i the caption of image shuffled[i]:
    right only if a caption is the same whichever images share its batch."""
    from captionlens.data.bundle import open_data
    from captionlens.experiments.captioning import caption_records, evaluate_captioner

    captioner, data = cl.load(trained), open_data(tiny_shapes)
    records = data.split("test")
    order = list(range(len(records)))
    alone = caption_records(captioner, data, "test", order, 3, False, 0)
    shuffled = list(np.random.default_rng(1).permutation(len(records)))
    together = caption_records(captioner, data, "test", shuffled, 3, False, 0, batch_size=4)
    assert [c.words for c in together] == [alone[i].words for i in shuffled]
    summary = evaluate_captioner(captioner, data, progress=False)
    assert summary["images"] == len(records) and 0 <= summary["bleu4_shuffled_features"] <= 1


def test_the_shift_absorbing_copy_of_a_vit_computes_the_same_logits(trained):
    from captionlens.experiments.sanity import shift_absorbing_copy

    captioner = cl.load(trained)
    shifted = shift_absorbing_copy(captioner, 1.0)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([[1, 4, 5, 6], [1, 5, 4, 6]])
    with torch.no_grad():
        before, after = captioner.model(pixels, tokens), shifted.model(pixels + 1.0, tokens)
    assert torch.allclose(before, after, atol=1e-4), (before - after).abs().max()
    assert not torch.allclose(before, shifted.model(pixels, tokens), atol=1e-3)  # the shift does reach the model
    conv = next(m for m in captioner.model.hf.encoder.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv is captioner.model.hf.encoder.embeddings.patch_embeddings.projection  # the original is untouched


def test_what_does_not_apply_is_refused_clearly(tiny_shapes, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--data", str(tiny_shapes), "--out", str(tmp_path / "a"), "--epochs", "1",
                                 *TINY, "--encoder-weights", str(tmp_path / "x.safetensors")])
    assert result.exit_code != 0 and "learns its own image encoder" in result.output, result.output
    result = runner.invoke(app, ["train", "--data", str(tiny_shapes), "--out", str(tmp_path / "b"), "--epochs", "1",
                                 "--arch", "vit-gpt2", "--hidden-size", "32", "--heads", "5", "--workers", "0"])
    assert result.exit_code != 0 and "multiple of --heads 5" in result.output, result.output
    assert "Traceback" not in result.output


TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun is installed with torch")
def test_two_processes_train_it_with_identical_ranks(tiny_shapes, tmp_path):
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", "captionlens", "train", "--data",
               str(tiny_shapes), "--out", str(tmp_path / "run"), "--epochs", "2", *TINY]
    done = subprocess.run(command, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "run" / "training_state.json").read_text())
    first, second = state["rank_weight_checksums"]
    assert state["world_size"] == 2 and first == second
    assert cl.load(tmp_path / "run").caption(sorted((tiny_shapes / "images").glob("*.png"))[0])


def test_without_the_hf_extra_the_demo_and_train_say_so_before_any_work(tiny_shapes, tmp_path, monkeypatch):
    from captionlens.demo import run_demo
    from captionlens.extras import MissingExtra
    from captionlens.models import vit_gpt2

    def missing(module, extra):
        raise MissingExtra(f"needs the package that provides '{module}': pip install 'captionlens[{extra}]'")

    monkeypatch.setattr(vit_gpt2, "require", missing)
    with pytest.raises(MissingExtra, match=r"captionlens\[hf\]"):
        run_demo(tmp_path / "demo", quick=True, archs=("adaptive", "vit-gpt2"), progress=False, log=lambda *a: None)
    assert not (tmp_path / "demo").exists()  # nothing generated, nothing trained
    with pytest.raises(MissingExtra, match=r"captionlens\[hf\]"):
        cl.train_captioner(tiny_shapes, "vit-gpt2", tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_fine_tuning_with_lrp_inference_tunes_its_language_model_alone(trained, tiny_shapes):
    from captionlens.data.bundle import open_data
    from captionlens.experiments.finetune import FinetuneConfig, finetune

    captioner = cl.load(trained)
    before = {k: v.clone() for k, v in captioner.model.hf.state_dict().items()}
    tuned = finetune(captioner, open_data(tiny_shapes), FinetuneConfig("lrp", steps=2, batch_size=4, learning_rate=1e-2),
                     progress=False)
    after = tuned.model.hf.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)  # GPT-2 tuned, the ViT as it was
    assert all(torch.equal(v, captioner.model.hf.state_dict()[k]) for k, v in before.items())  # the original untouched
