"""``captionlens demo``: the whole pipeline on the embedded shapes world, end to end on a CPU.

Generate the data, pretrain the shapes encoder, train the captioners (the papers' two by default), caption the test split with
beam search (``OUT/summary.json``), then run the papers' experiments and the faithfulness and sanity checks on each model
(``OUT/results/<arch>/`` tables and plots, ``OUT/results.json``, ``OUT/RESULTS.md``)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from .data.bundle import open_data
from .data.shapes import ShapesConfig, write_shapes_dataset
from .experiments import ordered
from .experiments.captioning import evaluate_captioner
from .experiments.results import results_markdown
from .experiments.workbench import Workbench
from .io import atomic_write_text, claim_output_folder, write_json
from .report.html import build_report
from .pipeline import ENCODER_TRAINING, pretrain_shapes_encoder, train_captioner
from .train import TrainConfig

ARCHITECTURES = ("adaptive", "gridtd")  # the papers' two; `--archs adaptive,gridtd,sat,transformer,vit-gpt2` adds others


@dataclass(frozen=True)
class DemoSize:
    data: ShapesConfig
    encoder: TrainConfig
    decoder: TrainConfig
    hidden_size: int
    embed_size: int
    encoder_images: int  # unbiased images the encoder is pretrained on
    experiment_images: int  # test images the experiments use (each experiment's sizes: its ``demo`` entry)
    report_images: int
    global_dropout: float = 0.7  # adaptive, gridtd: share of training images whose v_g is withheld
    # a model that learns its own image encoder from the pixels (vit-gpt2): its width and its training
    pixel_width: int = 128
    pixel_training: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=30, batch_size=50, learning_rate=1e-3,
                                                                           patience=3))

    def recipe(self, architecture: str, encoder_weights: Path, seed: int) -> dict:
        """``train_captioner``'s keywords for one architecture of the demo."""
        from .models.registry import ARCHITECTURES, lookup

        registered = lookup(ARCHITECTURES, "architecture", architecture)
        options = {"global_dropout": self.global_dropout} if "global_dropout" in registered.options else {}
        if registered.trained_from_pixels:
            return dict(hidden_size=self.pixel_width, train_config=replace(self.pixel_training, seed=seed))
        return dict(encoder_weights=encoder_weights, hidden_size=self.hidden_size, embed_size=self.embed_size,
                    train_config=replace(self.decoder, seed=seed), architecture_options=options)


FULL = DemoSize(ShapesConfig(train=3000, val=400, test=600), ENCODER_TRAINING,
                TrainConfig(epochs=12, batch_size=50, learning_rate=2e-3, patience=2), 192, 128, 3000, 200, 4)
QUICK = DemoSize(ShapesConfig(train=800, val=100, test=200), replace(ENCODER_TRAINING, epochs=5),
                 TrainConfig(epochs=6, batch_size=40, learning_rate=3e-3, patience=2), 96, 64, 800, 60, 2,
                 pixel_width=64, pixel_training=TrainConfig(epochs=6, batch_size=40, learning_rate=2e-3, patience=2))


def run_demo(out: str | Path = "runs/demo", quick: bool = False, seed: int = 0, device: str | None = None,
             progress: bool = True, log=print, archs: tuple[str, ...] = ARCHITECTURES) -> dict:
    from .models.registry import ARCHITECTURES as REGISTERED, lookup

    for architecture in archs:  # an unknown name, or one whose extra is missing, fails before any work
        lookup(REGISTERED, "architecture", architecture).check_installed()
    if not archs:
        raise ValueError("the demo needs at least one architecture")
    began = time.perf_counter()
    steps = len(archs) + 3
    out = claim_output_folder(out, "demo")
    size = QUICK if quick else FULL
    log(f"[1/{steps}] generating the shapes world in {out / 'data'}")
    data = open_data(write_shapes_dataset(out / "data", replace(size.data, seed=seed), progress))
    encoder_weights = out / "encoder" / "shapes_encoder.safetensors"
    if any(not lookup(REGISTERED, "architecture", a).trained_from_pixels for a in archs):
        log(f"[2/{steps}] pretraining the shapes encoder on object presence in unbiased scenes")
        pretrain_shapes_encoder(encoder_weights, replace(size.encoder, seed=seed), size.data.image_size,
                                size.encoder_images, progress, device)
    else:
        log(f"[2/{steps}] no shapes encoder to pretrain: {', '.join(archs)} learn their own from the pixels")
    summary: dict = {}
    captioners = {}
    for step, architecture in enumerate(archs, start=3):
        log(f"[{step}/{steps}] training the {architecture} captioner in {out / architecture}")
        captioner = train_captioner(data, architecture, out / architecture, device=device, progress=progress,
                                    **size.recipe(architecture, encoder_weights, seed))
        summary[architecture] = evaluate_captioner(captioner, data, "test", beam_size=3, shuffle_seed=seed,
                                                   progress=progress)
        captioners[architecture] = captioner
    summary["seconds"] = round(time.perf_counter() - began, 1)
    summary["quick"] = quick
    write_json(out / "summary.json", summary)
    log(f"[{steps}/{steps}] the papers' experiments, faithfulness and sanity checks on {size.experiment_images} test images -> {out / 'RESULTS.md'}")
    results: dict = {experiment.name: {} for experiment in ordered()}
    for architecture, captioner in captioners.items():
        for name, value in run_experiments(captioner, data, out / "results" / architecture, size, seed,
                                           progress, quick).items():
            results[name][architecture] = value
    results["seconds"] = round(time.perf_counter() - began, 1)
    write_json(out / "results.json", results)
    atomic_write_text(out / "RESULTS.md", results_markdown(results, results["seconds"], quick))
    log(f"writing the report {out / 'report.html'}")
    shown = "gridtd" if "gridtd" in captioners else archs[-1]
    build_report(captioners[shown], [r.path for r in data.split("test")[: size.report_images]], out / "report.html",
                 results_dir=out / "results", title=f"captionlens demo: {shown} on the shapes world")
    summary["seconds_with_experiments"] = round(time.perf_counter() - began, 1)
    write_json(out / "summary.json", summary)
    return summary


def run_experiments(captioner, data, out: Path, size: DemoSize, seed: int = 0, progress: bool = True,
                    quick: bool = False) -> dict:
    """Every registered experiment on one captioner, in order, with the demo's options for it:
    {experiment name: its result}."""
    bench = Workbench(captioner, data, out, "test", size.experiment_images, beam_size=3, progress=progress)
    # Hallucination runs first: it explains the most object words, in the batches every later experiment
    # then reads from the store (the demo's numbers have always been computed in this order; another
    # order batches words differently and moves results in the 7th digit).
    first = [e for e in ordered() if e.name == "hallucination"]
    results = {e.name: e.run(bench, **e.demo(quick, seed)) for e in first + [e for e in ordered() if e not in first]}
    return {experiment.name: results[experiment.name] for experiment in ordered()}
