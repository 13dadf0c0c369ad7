"""``captionlens train``, ``pretrain-encoder`` and ``import ...``: make a run folder."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import command, console, import_app
from .options import (Architecture, ArchitectureOptions, DataOption, DatasetOptions, DeviceOption, EncoderName,
                      SeedOption, WorkersOption, number, whole)
from ..data.images import default_workers

SizeOption = whole(1, 65_536)


@command()
def train(
    data: DataOption,
    dataset: DatasetOptions,
    arch: Annotated[Architecture, typer.Option(help="Decoder architecture (vit-gpt2: a Hugging Face ViT + GPT-2, trained from the pixels).")],
    out: Annotated[Path, typer.Option(help="Run folder to write (weights, config, vocab, metrics.jsonl): new, empty, or a run folder.")],
    architecture: ArchitectureOptions,
    encoder: Annotated[EncoderName, typer.Option(help="Image encoder.")] = "shapes",
    encoder_weights: Annotated[Optional[Path], typer.Option(help="Local encoder weights (torchvision's vgg16-397923af.pth, resnet50-0676ba61.pth, resnet101-63fe2227.pth). shapes: pretrained now if omitted; efficientnet_lite0: the efficientnet extra's ImageNet weights.")] = None,
    hidden_size: Annotated[int, typer.Option(help="LSTM hidden size (paper: 512); the transformer's d_model.", parser=SizeOption)] = 512,
    embed_size: Annotated[int, typer.Option(help="Word embedding size (paper: 512).", parser=SizeOption)] = 512,
    d_model: Annotated[Optional[int], typer.Option(help="Model width: sets --hidden-size and --embed-size (the transformer's d_model).", parser=SizeOption)] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout (default: the architecture's; 0.5 as in the papers, 0.1 for the transformer).", parser=number(0, 1, high_open=True))] = None,
    min_count: Annotated[Optional[int], typer.Option(help="Vocabulary min count (default: 5 for COCO, else 3).", parser=whole(1))] = None,
    epochs: Annotated[int, typer.Option(help="Most epochs.", parser=whole(1, 100_000))] = 20,
    batch_size: Annotated[int, typer.Option(help="Images per batch.", parser=whole(1, 1_000_000))] = 64,
    lr: Annotated[float, typer.Option(help="Adam learning rate.", parser=number(0, 10, low_open=True))] = 5e-4,
    patience: Annotated[int, typer.Option(help="Stop after this many epochs without a better validation loss.", parser=whole(1))] = 3,
    seed: SeedOption = 0,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out (with the same data and settings).")] = False,
    force: Annotated[bool, typer.Option(help="With --resume: continue even though the data or settings changed.")] = False,
    workers: WorkersOption = default_workers(),
    device: DeviceOption = None,
) -> None:
    """Train a captioner with teacher forcing on cached grid features (vit-gpt2: on the pixels). Under
    torchrun the model trains as DistributedDataParallel (--batch-size images per step across all processes; rank 0
    writes the run folder; --resume works the same):

        torchrun --nproc_per_node 4 -m captionlens train --data DIR --arch gridtd --out RUN

    Example: captionlens train --data data/shapes --arch gridtd --out runs/gridtd --hidden-size 256

    The demo's recipe, whose attention looks at the objects: --hidden-size 192 --embed-size 128 --epochs 14
    --batch-size 50 --lr 2e-3 --patience 2 --global-dropout 0.7

    A transformer captioner: captionlens train --data data/shapes --arch transformer --out runs/tf --layers 3 --heads 8 --d-model 256

    A Hugging Face ViT-GPT2 (needs the hf extra), trained end to end from the pixels — its ViT is its
    encoder, so --encoder does not apply; --hidden-size is its width: captionlens train --data data/shapes
    --arch vit-gpt2 --out runs/vit-gpt2 --hidden-size 128 --encoder-layers 3 --layers 2 --heads 4 --lr 1e-3
    """
    from ..distributed import process_group
    from ..pipeline import train_captioner
    from ..train import TrainConfig

    if d_model is not None:
        hidden_size = embed_size = d_model
    with process_group(device) as ranks:
        captioner = train_captioner(dataset.open(data), arch.value, out, encoder.value, encoder_weights, hidden_size,
                                    embed_size, dropout, min_count=min_count,
                                    train_config=TrainConfig(epochs, batch_size, lr, patience=patience, seed=seed),
                                    resume=resume, device=ranks.device(device), workers=workers,
                                    architecture_options=architecture.given(), force=force)
        if ranks.is_main:
            console.print(f"trained {arch.value} ({len(captioner.vocab)} words) on {ranks.world_size} "
                          f"process{'es' if ranks.active else ''} -> {out}")


@command(name="pretrain-encoder")
def pretrain_encoder(
    out: Annotated[Path, typer.Option(help="Weights file to write (.safetensors).")],
    images: Annotated[int, typer.Option(help="Unbiased generated scenes to train on.", parser=whole(8, 10_000_000))] = 4000,
    epochs: Annotated[int, typer.Option(help="Most epochs.", parser=whole(1, 100_000))] = 10,
    image_size: Annotated[int, typer.Option(help="Image side in pixels (as the dataset's).", parser=whole(32, 1024))] = 64,
    seed: SeedOption = 0,
    device: DeviceOption = None,
) -> None:
    """Pretrain the shapes encoder on multi-label presence of shapes and colours in generated,
    unbiased scenes (the role ImageNet plays for VGG16). `train --encoder shapes` does this by itself
    when no --encoder-weights are given.

    Example: captionlens pretrain-encoder --out shapes_encoder.safetensors
    """
    from dataclasses import replace

    from ..pipeline import ENCODER_TRAINING, pretrain_shapes_encoder

    if out.is_dir():
        raise ValueError(f"{out} is a folder: --out names the weights file to write (e.g. {out / 'encoder.safetensors'})")
    pretrain_shapes_encoder(out, replace(ENCODER_TRAINING, epochs=epochs, seed=seed), image_size, images,
                            device=device)
    console.print(f"wrote {out}")


@command(import_app, "sat-tutorial")
def import_sat_tutorial(
    checkpoint: Annotated[Path, typer.Option(help="The tutorial's BEST_checkpoint_*.pth.tar (or a state dict with encoder/decoder).")],
    word_map: Annotated[Path, typer.Option(help="The tutorial's WORDMAP_*.json.")],
    out: Annotated[Path, typer.Option(help="Run folder to write.")],
    image_size: Annotated[int, typer.Option(help="Side the images are resized to (the tutorial: 256).", parser=whole(32, 4096))] = 256,
    grid_size: Annotated[Optional[int], typer.Option(help="Encoder grid side (read from a pickled encoder; for a state dict default 14, the tutorial's).", parser=whole(1, 512))] = None,
) -> None:
    """Import a Show-Attend-Tell checkpoint of sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning as
    an ordinary run folder (architecture sat, encoder resnet101/resnet50). The pickled checkpoint is
    read with a restricted unpickler: only the tutorial's, torchvision's and torch's classes are
    accepted (as inert stand-ins); anything else is refused and nothing in it runs.

    Example: captionlens import sat-tutorial --checkpoint BEST_checkpoint_coco_5_cap_per_img_5_min_word_freq.pth.tar \
    --word-map WORDMAP_coco_5_cap_per_img_5_min_word_freq.json --out runs/sat
    """
    from ..models.sat_tutorial import import_sat_tutorial as run_import

    captioner = run_import(checkpoint, word_map, out, image_size, grid_size)
    c = captioner.config
    console.print(f"imported {c.architecture} on {c.encoder} ({len(captioner.vocab)} words, hidden {c.hidden_size}) -> {out}")
    console.print(f"next: captionlens explain --model {out} photo.jpg --out explained/   ·   captionlens audit --model {out}")


@command(import_app, "hf")
def import_hf(
    model: Annotated[Path, typer.Option(help="A local save_pretrained folder of a Hugging Face captioner (model, tokenizer and image processor files).")],
    out: Annotated[Path, typer.Option(help="Run folder to write (every verb takes it as --model).")],
    prompt: Annotated[Optional[str], typer.Option(help="LLaVA: the conversation around the image, with <image> where it goes (default: 'USER: <image>\\nDescribe the image. ASSISTANT:').")] = None,
    max_length: Annotated[int, typer.Option(help="Longest caption generated, in tokens.", parser=whole(1, 1000))] = 20,
) -> None:
    """Import a Hugging Face captioner — VisionEncoderDecoder (e.g. ViT + GPT-2), BLIP, GIT or LLaVA —
    from a local save_pretrained folder as a run folder that every verb takes (caption, explain,
    explain-split, the experiments, report, serve, audit). Offline only (nothing is downloaded) and never
    remote code. Needs the hf extra of captionlens (transformers).

    Example: captionlens import hf --model vit-gpt2/ --out runs/vit-gpt2
    """
    from ..api import from_hf

    captioner = from_hf(model, prompt=prompt, max_length=max_length)
    captioner.save(out)
    settings = captioner.settings
    console.print(f"imported {settings.model_class} ({settings.family}, {settings.vocab_size} tokens, images "
                  f"{settings.image_size}px) -> {out}")
    console.print(f"next: captionlens explain --model {out} photo.jpg --out explained/   ·   captionlens audit --model {out}")
