"""A self-contained HTML report: one file, images embedded as data URIs, inline CSS and JS, no network.

Per image: the caption and, for each word, the heatmaps of every method side by side — each on its
scale (``scales.py``: signed maps blue–white–red around 0, non-negative maps sequential from 0, all-zero
maps marked), its scale printed under it, laid over the image in its own aspect ratio with an opacity
slider — and the preceding words coloured by their normalised relevance as in the papers' Fig. 4. When experiment results are given, their tables and plots follow. Every word and file name
is HTML-escaped.
"""
from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..data.images import ImageInput, load_image
from ..explain import METHODS, Explanation, explain, methods_for, resolved_parameters
from ..explain.store import ExplanationStore
from ..io import atomic_write_text
from ..models import Captioner
from ..explain.methods import METHOD_INFO, in_column_order, linguistic_method
from .figures import normalised, title, word_colour, word_label
from ..display.scales import LEGEND, ZERO, display_size, heatmap_image, map_scale, png_data_uri

DEFAULT_METHODS = tuple(in_column_order(METHOD_INFO))  # every method (those the model has: rollout needs a transformer)
DISPLAY = 160  # pixels per heatmap tile

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;margin-top:2em} table{border-collapse:collapse}
td,th{padding:3px 6px;vertical-align:middle} th{font-weight:600;font-size:.85em}
.tile{position:relative}
.tile img{position:absolute;left:0;top:0;width:100%;height:100%;image-rendering:auto}
.scale{font-size:.7em;color:#555;text-align:center} .zero{color:#b00000;font-weight:700}
.tile img.map{opacity:var(--opacity,.55)} .word{font-weight:700;text-align:right;font-size:1.05em}
.words{min-width:22em;max-width:40em}
.tok{display:inline-block;padding:0 4px;margin:1px;border-radius:3px;font-family:monospace;font-size:.85em}
.data td,.data th{border:1px solid #ccc;font-size:.85em} .caption{font-size:1.1em;margin:.3em 0 .8em}
"""
SCRIPT = """
function setOpacity(v){document.documentElement.style.setProperty('--opacity',v);
document.getElementById('opacity-value').textContent=Number(v).toFixed(2);}
"""




def _tokens_html(explanation: Explanation, row: int) -> str:
    position = explanation.positions[row]
    values = normalised(explanation.preceding[row, : position + 1])
    return " ".join(
        f'<span class="tok" style="background:{word_colour(v)}" title="{v:+.2f}">{html.escape(t)}</span>'
        for t, v in zip(explanation.tokens[: position + 1], values))


def image_section(name: str, picture: Image.Image, explanations: Sequence[Explanation],
                  caption: Sequence[str] | None = None) -> str:
    """One image's table: rows = words (as explained: a word the model does not know is <unk>),
    columns = image, methods, preceding words; above it the caption as given."""
    by_method = {e.method: e for e in explanations}
    methods = in_column_order(by_method)
    first = by_method[methods[0]]
    linguistic = by_method.get(linguistic_method(by_method))
    width, height = display_size(picture, DISPLAY)  # the photo's own aspect ratio
    background = png_data_uri(picture.convert("RGB").resize((width, height), Image.BILINEAR))
    tile = f'<div class="tile" style="width:{width}px;height:{height}px">'
    header = "".join(f"<th>{html.escape(title(m))}</th>" for m in methods)
    if linguistic is not None:
        header += f"<th>preceding words ({html.escape(title(linguistic.method))})</th>"
    rows = []
    for row, word in enumerate(first.words):
        cells = [f'<td class="word">{html.escape(word_label(first, row))}</td>', f'<td>{tile}<img src="{background}" alt="image"></div></td>']
        for method in methods:
            heatmap = by_method[method].image[row].numpy()
            scale = map_scale(heatmap, method, by_method[method].parameters)
            overlay = png_data_uri(heatmap_image(heatmap, (width, height), scale))
            mark = " zero" if scale.kind == ZERO else ""
            cells.append(f'<td>{tile}<img src="{background}" alt="image">'
                         f'<img class="map" src="{overlay}" alt="{html.escape(method)} heatmap of '
                         f'{html.escape(word)}"></div><div class="scale{mark}">{html.escape(scale.label)}</div></td>')
        if linguistic is not None:
            cells.append(f'<td class="words">{_tokens_html(linguistic, row)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    caption = html.escape(" ".join(caption if caption is not None else first.tokens[1:]))
    return (f"<h2>{html.escape(name)}</h2><p class=\"caption\">{caption}</p><p class=\"scale\">{html.escape(LEGEND)}</p>"
            f"<table><tr><th></th><th>image</th>{header}</tr>{''.join(rows)}</table>")


def results_section(results_dir: Path) -> str:
    """The experiments' tables (from their JSON files) and plots, per architecture folder."""
    parts = ["<h2>Experiments</h2>"]
    folders = [results_dir, *sorted(p for p in results_dir.iterdir() if p.is_dir() and not (p / "zarr.json").is_file())]
    for folder in folders:
        tables = sorted(folder.glob("*.json"))
        plots = sorted(folder.glob("*.png"))
        if not tables and not plots:
            continue
        parts.append(f"<h3>{html.escape(folder.name)}</h3>")
        for table in tables:
            rows = json.loads(table.read_text())
            if isinstance(rows, list) and rows and isinstance(rows[0], dict):
                parts.append(f"<h4>{html.escape(table.stem)}</h4>" + _data_table(rows))
        for plot in plots:
            with Image.open(plot) as image:
                parts.append(f'<figure><img src="{png_data_uri(image)}" alt="{html.escape(plot.stem)}" '
                             f'style="max-width:560px"><figcaption>{html.escape(plot.stem)}</figcaption></figure>')
    return "".join(parts)


def _data_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(row.get(c, '')))}</td>" for c in columns) + "</tr>"
                   for row in rows)
    return f'<table class="data"><tr>{head}</tr>{body}</table>'


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def stored_or_explained(captioner: Captioner, picture: Image.Image, words: Sequence[str], method: str,
                        store: ExplanationStore | None = None, image_id: int | None = None,
                        positions: Sequence[int] | None = None, **parameters) -> Explanation:
    """Every word's explanation by ``method`` (the words at ``positions`` only, when given): from the
    store when it holds this image with this caption, every word explained and the same parameters;
    computed otherwise."""
    wanted = resolved_parameters(method, **parameters)
    if positions is not None:
        return explain(captioner, picture, words, method, words=list(positions), **parameters)
    if (store is not None and image_id is not None and store.has_caption(image_id) and store.has(image_id, method)
            and store.words(image_id) == list(words) and store.positions(image_id) == list(range(len(words)))
            and store.parameters(method) == wanted):
        return store.explanation(image_id, method)
    return explain(captioner, picture, words, method, **parameters)


def build_report(captioner: Captioner, images: Sequence[ImageInput], out: str | Path,
                 methods: Sequence[str] = DEFAULT_METHODS, captions: Sequence[Sequence[str]] | None = None,
                 results_dir: str | Path | None = None, title: str = "captionlens report", beam_size: int = 3,
                 store: ExplanationStore | None = None, image_ids: Sequence[int] | None = None,
                 progress: bool = False, positions: Sequence[int] | None = None, **lrp_parameters) -> Path:
    """Write the report for ``images`` (their model captions, or ``captions``; only the words at
    ``positions`` when given) to ``out``. With a ``store`` and the images' dataset ``image_ids``,
    captions and explanations of every word are read from it."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}; choose from {', '.join(sorted(METHODS))}")
    if methods is DEFAULT_METHODS:
        methods = [m for m in methods if m in methods_for(captioner.model)]
    from tqdm import tqdm

    sections = []
    steps = tqdm(total=len(images) * len(methods), desc="report", unit="map", disable=not progress)
    for index, image in enumerate(images):
        image_id = image_ids[index] if image_ids is not None else None
        picture = load_image(image, upright=image_id is None)  # a dataset image: as stored, like its store entry
        if captions is not None:
            words = list(captions[index])
        elif store is not None and image_id is not None and store.has_caption(image_id):
            words = store.words(image_id)
        else:
            words = captioner.caption([picture], beam_size)[0].words
        name = Path(image).name if isinstance(image, (str, Path)) else f"image {index + 1}"
        if not words:
            sections.append(f"<h2>{html.escape(name)}</h2><p>(empty caption)</p>")
            steps.update(len(methods))
            continue
        explanations = []
        for method in methods:  # one step per image and method: a report of 4 images × 6 methods takes minutes
            steps.set_postfix_str(f"{name}: {method}")
            explanations.append(stored_or_explained(captioner, picture, words, method, store, image_id, positions,
                                                    **(lrp_parameters if method == "lrp" else {})))
            steps.update()
        sections.append(image_section(name, picture, explanations, words))
    steps.close()
    return write_report(sections, out, title, results_dir)


def build_report_from_explained(folder: str | Path, out: str | Path, title: str = "captionlens report",
                                results_dir: str | Path | None = None) -> Path:
    """Write the report of what ``captionlens explain --out FOLDER`` wrote (one sub-folder per image:
    explanation.json and the heatmaps), without explaining anything again."""
    from ..io import read_json

    sections = []
    explained = sorted(p for p in Path(folder).iterdir() if (p / "explanation.json").is_file()) \
        if Path(folder).is_dir() else []
    if not explained:
        raise FileNotFoundError(f"no explanation.json in the sub-folders of {folder} (make them with "
                                "`captionlens explain --out FOLDER`)")
    for sub in explained:
        data = read_json(sub / "explanation.json")
        if not data.get("image"):
            sections.append(f"<h2>{html.escape(sub.name)}</h2><p>(explained from an array: no image file)</p>")
            continue
        explanations = [Explanation.from_dict(entry, sub / entry["heatmaps"]) for entry in data["methods"].values()]
        sections.append(image_section(sub.name, load_image(data["image"]), explanations, data["caption"]))
    return write_report(sections, out, title, results_dir)


def write_report(sections: Sequence[str], out: str | Path, title: str, results_dir: str | Path | None = None) -> Path:
    """The self-contained HTML page of ``sections`` (and the experiments' tables in ``results_dir``)."""
    sections = list(sections)
    if results_dir is not None and Path(results_dir).is_dir():
        sections.append(results_section(Path(results_dir)))
    document = (
        f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style><script>{SCRIPT}</script></head><body><h1>{html.escape(title)}</h1>"
        "<p>Red: evidence for the word, blue: evidence against it; each map on its own scale, printed under it "
        "(the top 2% of a map's mass drawn saturated). "
        "Preceding words: red ≥ 0.3, yellow (0, 0.3), blue ≤ 0 of the normalised relevance.</p>"
        "<p><label>overlay opacity <input type=\"range\" min=\"0\" max=\"1\" step=\"0.05\" value=\"0.55\" "
        "oninput=\"setOpacity(this.value)\"></label> <span id=\"opacity-value\">0.55</span></p>"
        + "".join(sections) + "</body></html>")
    out = Path(out)
    atomic_write_text(out, document)
    return out
