"""``captionlens caption``, ``explain``, ``explain-split``, ``audit`` and ``report``: captions and their
explanations, for a few images or a whole split."""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ..data.images import default_workers
from .app import command, console
from .options import (BeamOption, DataOption, DatasetOptions, DeviceOption, LimitOption, LRPOptions, MaxWordsOption,
                      ModelOption, PrecisionOption, WordsPerPassOption, WorkersOption, comma_list, integers,
                      methods_help, number, whole)

DEFAULT_METHODS = "lrp,gradcam,guided_gradcam,attention"


def _methods(text: str | None) -> list[str] | None:
    from ..explain import METHODS

    return comma_list(text, METHODS, "method")


IMAGES_HELP = "Image files, folders (their images) or quoted glob patterns ('photos/*.jpg')."


def _report_failures(failed: list[tuple[Path, str]], total: int, verb: str) -> None:
    """After a batch of images: say which failed and why, and exit non-zero if any did."""
    if failed:
        console.print(f"[bold red]{len(failed)} of {total} images could not be {verb}:[/]", highlight=False)
        for path, why in failed:
            console.print(f"  {path}: {why}", highlight=False, markup=False)
        raise typer.Exit(code=1)


@command()
def caption(
    model: ModelOption,
    images: Annotated[list[Path], typer.Argument(help=IMAGES_HELP)],
    beam_size: BeamOption = 3,
    max_length: Annotated[Optional[int], typer.Option(help="Longest caption in words (default: the model's).", parser=whole(1, 1000))] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines with words and scores.")] = False,
    device: DeviceOption = None,
) -> None:
    """Print one caption per image. A folder stands for its images; an image that cannot be read is
    reported at the end (exit code 1) after the others are captioned.

    Example: captionlens caption --model runs/demo/gridtd runs/demo/data/images/shapes_003400.png
             captionlens caption --model runs/demo/gridtd photos/ --json
    """
    from ..api import load
    from ..data.images import ImageLoadError, image_files, load_image

    captioner = load(model, device)
    files = image_files(images)
    failed: list[tuple[Path, str]] = []
    for start in range(0, len(files), 32):  # a chunk of images in memory at a time
        readable = []
        for path in files[start: start + 32]:
            try:
                readable.append((path, load_image(path)))
            except ImageLoadError as error:
                failed.append((path, str(error)))
        if not readable:
            continue
        captions = captioner.caption([picture for _, picture in readable], beam_size=beam_size, max_length=max_length)
        for (path, _), result in zip(readable, captions):
            if as_json:
                print(json.dumps({"image": str(path), "words": result.words, "score": result.score}))
            else:
                print(f"{path}\t{result.text}")
            if not result.words:
                console.print(f"{path}: the caption is empty (the model said <end> first; --beam-size 1 may "
                              "give one)", style="yellow", highlight=False)
    _report_failures(failed, len(files), "captioned")


@command()
def explain(
    model: ModelOption,
    images: Annotated[list[Path], typer.Argument(help=IMAGES_HELP)],
    out: Annotated[Path, typer.Option(help="Folder for one sub-folder of results per image: new, empty, or one explain wrote.")],
    lrp: LRPOptions,
    methods: Annotated[str, typer.Option(help=methods_help(DEFAULT_METHODS))] = DEFAULT_METHODS,
    caption: Annotated[Optional[str], typer.Option(help="Explain this caption instead of the model's own (beam search).")] = None,
    words: Annotated[Optional[str], typer.Option(help="Comma-separated word positions (0-based) to explain; default: all.")] = None,
    include_end: Annotated[bool, typer.Option(help="Also explain the <end> token.")] = False,
    beam_size: BeamOption = 3,
    precision: PrecisionOption = "fp32",
    max_words_per_pass: WordsPerPassOption = None,
    max_words: MaxWordsOption = 100,
    device: DeviceOption = None,
) -> None:
    """Explain every word of each image's caption with several methods. Writes, per image:
    caption.txt, explanation.json (words, scores, preceding-word relevance per method, rule
    parameters), one .npz of heatmaps per method and figure.png (rows = words, columns = methods).
    A folder stands for its images; an image that cannot be read or explained (an empty caption) is
    reported at the end (exit code 1) after the others are explained.

    Example: captionlens explain --model runs/demo/gridtd img.png --methods lrp,gradcam,attention --out explained/
             captionlens explain --model runs/demo/gridtd photos/ --out explained/
    """
    from tqdm import tqdm

    from ..api import explain_image, load
    from ..data.images import image_files
    from ..errors import CaptionlensError
    from ..io import claim_output_folder

    chosen = _methods(methods)
    positions = integers(words, "--words")
    parameters = lrp.parameters()
    files = image_files(images)
    captioner = load(model, device)
    claim_output_folder(out, "explanations")
    failed: list[tuple[Path, str]] = []
    stems = [path.stem for path in files]  # a.jpg and a.png in one folder get a.jpg/ and a.png/
    for path in tqdm(files, desc="explaining", disable=len(files) < 2):
        name = path.stem if stems.count(path.stem) == 1 else path.name
        try:
            folder = explain_image(captioner, path, out / name, chosen, caption, positions, include_end,
                                   parameters, beam_size, precision.value, max_words_per_pass, max_words,
                                   progress=True)
        except (CaptionlensError, ValueError, IndexError) as error:  # this image only: go on with the others
            failed.append((path, str(error)))
            continue
        console.print(f"{path}: {(folder / 'caption.txt').read_text().strip()} -> {folder}")
    _report_failures(failed, len(files), "explained")


class WordsChoice(str, Enum):
    all = "all"
    objects = "objects"


@command(name="explain-split")
def explain_split(
    model: ModelOption,
    data: DataOption,
    dataset: DatasetOptions,
    store: Annotated[Path, typer.Option(help="The explanation store to write (Zarr); rerun the same command to resume.")],
    lrp: LRPOptions,
    split: Annotated[str, typer.Option(help="Split to explain.")] = "test",
    methods: Annotated[str, typer.Option(help=methods_help(DEFAULT_METHODS))] = DEFAULT_METHODS,
    words: Annotated[WordsChoice, typer.Option(help="Explain every word of each caption, or only its object words.")] = "all",
    limit: LimitOption = None,
    batch_size: Annotated[int, typer.Option(help="Images explained together (fixed, so results do not depend on the number of processes).", parser=whole(1, 4096))] = 8,
    beam_size: BeamOption = 3,
    precision: PrecisionOption = "fp32",
    max_words_per_pass: WordsPerPassOption = None,
    workers: WorkersOption = default_workers(),
    device: DeviceOption = None,
) -> None:
    """Caption every image of a split and explain each word (or object word) with each method into an
    explanation store that the experiments, the report and the viewer read. Killed at any moment and
    run again, it continues where it stopped; two commands on one store share the work. Under
    torchrun, each process explains its share:

        torchrun --nproc_per_node 2 -m captionlens explain-split --model RUN --data DIR --store S.zarr

    Example: captionlens explain-split --model runs/f30k-gridtd --data data/f30k --store runs/f30k-gridtd/test.zarr
    """
    from ..api import load
    from ..distributed import process_group
    from ..experiments.explain_split import explain_split as run_explain_split

    chosen = _methods(methods)
    parameters = {"lrp": lrp.parameters()} if "lrp" in chosen else {}
    with process_group(device) as ranks:
        captioner = load(model, ranks.device(device))
        result = run_explain_split(captioner, dataset.open(data), store, split, chosen, words.value, batch_size,
                                   limit, beam_size, workers, parameters, precision=precision.value,
                                   max_words_per_pass=max_words_per_pass)
        if ranks.is_main:
            if result.repaired:
                console.print(f"repaired {len(result.repaired)} explanations marked complete that were not "
                              f"(written again): {result.repaired[0]}{' ...' if len(result.repaired) > 1 else ''}")
            console.print(f"{len(result.image_ids())} images explained by {', '.join(chosen)} -> {store}")


@command()
def audit(
    model: ModelOption,
    image: Annotated[Optional[Path], typer.Argument(help="Image to audit on (default: a random image).")] = None,
    caption: Annotated[Optional[str], typer.Option(help="Caption to audit (default: the model's own, greedy).")] = None,
    tolerance: Annotated[float, typer.Option(help="Flag a row whose relevance in and out differ by more than this × Σ|score|.", parser=number(0, 1, low_open=True))] = 1e-5,
    show_all: Annotated[bool, typer.Option("--all", help="List every module and operation, not only the flagged ones.")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Write the full report as JSON here.")] = None,
    device: DeviceOption = None,
) -> None:
    """Check LRP on your model before trusting its heatmaps: on a float64 copy with every bias zeroed
    and ε → 0, relevance must leave each module exactly as it entered. Prints, per module and per
    operation between modules (a `*` or `+` in a forward), the relevance entering and leaving it,
    flags where relevance is created or lost, and exits with 1 if anything is flagged.

    Example: captionlens audit --model runs/sat --all
    """
    from rich.table import Table

    from ..api import audit_lrp, load
    from ..io import write_json

    with console.status("auditing LRP on a float64, bias-free copy of the model …"):
        report = audit_lrp(load(model, device), image, caption, tolerance)
    rows = report.rows if show_all else report.flagged
    if rows:
        table = Table(title="relevance per module and operation (Σ over the caption's words)")
        for column in ("", "module / operation", "kind", "calls", "in", "out", "created"):
            table.add_column(column)
        for row in rows:
            table.add_row("[red]✗[/]" if row.flagged else ("sink" if row.sink else "✓"), row.name, row.kind,
                          str(row.calls), f"{row.relevance_in:.6g}", f"{row.relevance_out:.6g}", f"{row.created:.3g}")
        Console().print(table)
    if out is not None:
        write_json(out, report.to_dict())
    verdict = "[green]passed[/]" if report.passed else f"[red]failed[/]: {len(report.flagged)} flagged"
    console.print(f"audit {verdict} — caption '{' '.join(report.words)}': score {report.score:.6g}, relevance at the "
                  f"pixels {report.pixels:.6g} + words {report.embeddings:.6g}"
                  + (f" + positions {report.positions:.6g}" if report.positions else "")
                  + f" = {report.conservation:.6%} of it")
    if caption is None:
        console.print("(the model's own greedy caption of " + ("this image" if image else "a random image")
                      + "; `captionlens caption` uses beam search and may say another: --caption audits that one)",
                      highlight=False)
    if not report.passed:
        raise typer.Exit(code=1)


@command()
def report(
    model: Annotated[Optional[Path], typer.Option("--model", "--run", help="Run folder of a trained captioner "
                                                                           "(--run: the older name, still accepted).")] = None,
    out: Annotated[Path, typer.Option(help="The HTML file to write.")] = Path("report.html"),
    images: Annotated[Optional[list[Path]], typer.Option("--images", help="Images to explain (repeat the option); default: the first --count test images of --data.")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder to take test images from.")] = None,
    image_root: Annotated[Optional[Path], typer.Option(help="Image root of --data, overriding the folder's (--images names image files here).")] = None,
    store: Annotated[Optional[Path], typer.Option(help="Explanation store of this model (explain-split) to read captions and explanations of --data's images from.")] = None,
    count: Annotated[int, typer.Option(help="How many test images when --images is not given.", parser=whole(1, 10_000))] = 4,
    results: Annotated[Optional[Path], typer.Option(help="Folder of experiment tables and plots to include (e.g. OUT/results of the demo).")] = None,
    methods: Annotated[str, typer.Option(help=methods_help("attention,gradcam,guided_gradcam,guided_backprop,gradient_x_input,lrp"))] = "attention,gradcam,guided_gradcam,guided_backprop,gradient_x_input,lrp",
    caption: Annotated[Optional[str], typer.Option(help="Explain this caption (for every image) instead of the model's own.")] = None,
    words: Annotated[Optional[str], typer.Option(help="Comma-separated word positions (0-based) to explain; default: all.")] = None,
    beam_size: BeamOption = 3,
    explained: Annotated[Optional[Path], typer.Option(help="An `explain --out` folder: report what it holds, explaining nothing again (no --model needed).")] = None,
    device: DeviceOption = None,
) -> None:
    """Write one self-contained HTML file (images embedded, no network needed): per image the caption
    and every word's heatmaps by each method with an opacity slider, the preceding words coloured by
    relevance, and the experiments' tables and plots when --results is given.

    Example: captionlens report --model runs/demo/gridtd --data runs/demo/data --results runs/demo/results
             captionlens report --model runs/f30k-gridtd --images photo.jpg --caption "a dog on a bench"
             captionlens report --explained explained/ --out explained.html
    """
    from ..api import load
    from ..explain.store import ExplanationStore
    from ..report.html import build_report, build_report_from_explained

    chosen_methods = _methods(methods)
    if out.is_dir():
        raise ValueError(f"{out} is a folder: --out names the HTML file to write (e.g. {out / 'report.html'})")
    if explained is not None:
        console.print(f"report: {build_report_from_explained(explained, out, results_dir=results)}")
        return
    if model is None:
        raise ValueError("give --model (a run folder), or --explained (an `explain --out` folder)")
    chosen, image_ids = list(images or []), None
    if not chosen:
        if data is None:
            raise ValueError("give --images, or --data to take test images from")
        records = DatasetOptions(image_root).open(data).split("test")[:count]
        chosen, image_ids = [r.path for r in records], [r.image_id for r in records]
    captioner = load(model, device)
    explanations = None
    if store is not None:
        explanations = ExplanationStore.open(store)
        explanations.check(captioner.fingerprint())
    captions = None if caption is None else [captioner.tokenize(caption)] * len(chosen)
    path = build_report(captioner, chosen, out, chosen_methods, captions=captions, results_dir=results,
                        store=explanations, image_ids=image_ids, beam_size=beam_size, progress=True,
                        positions=integers(words, "--words"))
    console.print(f"report: {path}")
