"""Shared fixtures: tiny generated data, so every test runs on any machine in seconds."""
from __future__ import annotations

import pytest
import torch

from captionlens.data.shapes import ShapesConfig, write_shapes_dataset

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory):
    """A 60-image shapes world (40 train / 10 val / 10 test) in the real formats."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), ShapesConfig(train=40, val=10, test=10, seed=3),
                                progress=False)


def demo_test_image(index: int) -> str:
    """The file name `captionlens demo` (full size) gives its test split's ``index``-th image."""
    from captionlens.data.shapes import image_file_name
    from captionlens.demo import FULL

    return image_file_name(FULL.data, "test", index)


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory):
    """A folder laid out like `captionlens demo --out runs/demo` leaves it — runs/demo/{data, encoder,
    adaptive, gridtd, results/gridtd/explanations.zarr} — but tiny (a 60-image world, captioners trained
    for seconds), so the documentation's examples run against it as a user runs them after the demo.
    Two of this world's test images are copied to the names of the full demo's first two test images
    (``demo_test_image(0)``, ``demo_test_image(1)``), which the documentation's examples read."""
    import shutil

    import captionlens as cl
    from captionlens.data.bundle import open_data
    from captionlens.experiments.explain_split import explain_split
    from captionlens.pipeline import pretrain_shapes_encoder
    from captionlens.train import TrainConfig

    root = tmp_path_factory.mktemp("workspace")
    demo = root / "runs" / "demo"
    data = open_data(write_shapes_dataset(demo / "data", ShapesConfig(train=40, val=10, test=10, seed=3),
                                          progress=False))
    for record, name in zip(data.split("test"), (demo_test_image(0), demo_test_image(1))):
        shutil.copy(record.path, demo / "data" / "images" / name)
    encoder = demo / "encoder" / "shapes_encoder.safetensors"
    pretrain_shapes_encoder(encoder, TrainConfig(epochs=1, batch_size=16), images=40, progress=False)
    for architecture in ("adaptive", "gridtd"):
        cl.train_captioner(data, architecture, demo / architecture, encoder_weights=encoder, hidden_size=16,
                           embed_size=8, train_config=TrainConfig(epochs=12, batch_size=8, learning_rate=1e-2,
                                                                  patience=12), progress=False)
    explain_split(cl.load(demo / "gridtd"), data, demo / "results" / "gridtd" / "explanations.zarr",
                  methods=("lrp", "gradcam", "attention"), limit=4, progress=False)
    _save_hf_stand_in(root / "models" / "vit-gpt2")
    return root


def _save_hf_stand_in(folder):
    """A tiny ViT + GPT-2 VisionEncoderDecoder saved as a user's save_pretrained folder would be (random
    weights; the documentation's Hugging Face examples read it)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64),
        transformers.GPT2Config(vocab_size=12, n_positions=32, n_embd=32, n_layer=1, n_head=4, add_cross_attention=True,
                                is_decoder=True, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 1, 0, 2
    transformers.VisionEncoderDecoderModel(config).save_pretrained(folder)
    words = ["<pad>", "<s>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "star", "and", "small"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                         eos_token="</s>", unk_token="<unk>").save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
