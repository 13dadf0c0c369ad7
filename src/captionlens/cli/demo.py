"""``captionlens demo``: the whole pipeline on the embedded shapes world."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from ..models.registry import ARCHITECTURES
from .app import command, console
from .options import DeviceOption, SeedOption, comma_list


@command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the data, the runs and summary.json: new, empty, or a demo's.")] = Path("runs/demo"),
    quick: Annotated[bool, typer.Option(help="Small sizes: the whole pipeline in about two minutes (a smoke test).")] = False,
    seed: SeedOption = 0,
    archs: Annotated[str, typer.Option(help=f"Comma-separated architectures to train and compare ({', '.join(sorted(ARCHITECTURES))}).")] = "adaptive,gridtd",
    device: DeviceOption = None,
) -> None:
    """Generate the shapes world, pretrain the encoder, train the captioners (the papers' two by
    default; --archs adaptive,gridtd,sat adds Show-Attend-Tell, --archs adaptive,gridtd,transformer a
    transformer, --archs adaptive,gridtd,vit-gpt2 a Hugging Face ViT-GPT2 trained from the pixels, with
    the hf extra), caption the test split, run the papers' experiments and print a summary (also
    written to OUT/summary.json).

    Example: captionlens demo --quick --archs adaptive,gridtd,sat --out runs/demo-quick
    """
    from rich.table import Table

    from ..demo import run_demo

    chosen = tuple(comma_list(archs, ARCHITECTURES, "architecture"))
    summary = run_demo(out, quick, seed, device, log=console.print, archs=chosen)
    table = Table(title=f"captionlens demo — test split, beam 3 ({summary['seconds_with_experiments']:.0f} s)")
    for column in ("model", "BLEU-4", "BLEU-4 shuffled", "obj. precision", "obj. recall", "hallucination (95% CI)"):
        table.add_column(column)
    for arch in chosen:
        s = summary[arch]
        h = s["hallucination"]
        table.add_row(arch, f"{s['bleu4']:.3f}", f"{s['bleu4_shuffled_features']:.3f}", f"{s['object_precision']:.3f}",
                      f"{s['object_recall']:.3f}",
                      f"{h['rate']:.1%} [{h['low']:.1%}, {h['high']:.1%}] of {h['total']} ('{h['word']}' for '{h['partner']}')")
    Console().print(table)
    console.print(f"summary: {out / 'summary.json'}; results: {out / 'RESULTS.md'}; report: {out / 'report.html'}")
