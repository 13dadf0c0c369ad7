"""``captionlens demo``: the whole pipeline on the embedded shapes world, end to end on a CPU.

Generate the data, pretrain the shapes encoder, train both captioners, caption the test split with
beam search and write ``OUT/summary.json``."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

from .data.bundle import open_data
from .data.shapes import ShapesConfig, write_shapes_dataset
from .experiments.captioning import evaluate_captioner
from .io import write_json
from .pipeline import ENCODER_TRAINING, pretrain_shapes_encoder, train_captioner
from .train import TrainConfig

ARCHITECTURES = ("adaptive", "gridtd")


@dataclass(frozen=True)
class DemoSize:
    data: ShapesConfig
    encoder: TrainConfig
    decoder: TrainConfig
    hidden_size: int
    embed_size: int
    encoder_images: int  # unbiased images the encoder is pretrained on


FULL = DemoSize(ShapesConfig(train=4000, val=500, test=1000), ENCODER_TRAINING,
                TrainConfig(epochs=20, batch_size=50, learning_rate=2e-3, patience=2), 192, 128, 4000)
QUICK = DemoSize(ShapesConfig(train=800, val=100, test=200), replace(ENCODER_TRAINING, epochs=5),
                 TrainConfig(epochs=6, batch_size=40, learning_rate=3e-3, patience=2), 96, 64, 800)


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0, device: str | None = None,
             progress: bool = True, log=print) -> dict:
    began = time.perf_counter()
    out = Path(out)
    size = QUICK if quick else FULL
    log(f"[1/4] generating the shapes world in {out / 'data'}")
    data = open_data(write_shapes_dataset(out / "data", replace(size.data, seed=seed), progress))
    log("[2/4] pretraining the shapes encoder on object presence in unbiased scenes")
    encoder_weights = out / "encoder" / "shapes_encoder.safetensors"
    pretrain_shapes_encoder(encoder_weights, replace(size.encoder, seed=seed), size.data.image_size,
                            size.encoder_images, progress, device)
    summary: dict = {}
    for step, architecture in enumerate(ARCHITECTURES, start=3):
        log(f"[{step}/4] training the {architecture} captioner in {out / architecture}")
        captioner = train_captioner(data, architecture, out / architecture, encoder_weights=encoder_weights,
                                    hidden_size=size.hidden_size,
                                    embed_size=size.embed_size, train_config=replace(size.decoder, seed=seed),
                                    device=device, progress=progress)
        summary[architecture] = evaluate_captioner(captioner, data, "test", beam_size=3, shuffle_seed=seed,
                                                   progress=progress)
    summary["seconds"] = round(time.perf_counter() - began, 1)
    summary["quick"] = quick
    write_json(out / "summary.json", summary)
    return summary
