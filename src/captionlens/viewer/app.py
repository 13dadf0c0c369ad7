"""``captionlens serve``: upload an image or pick one from the dataset, see its caption, click a word
and see its heatmaps and linguistic explanation by each method. A JSON API under ``/api/`` (OpenAPI at
``/openapi.json``) serves the page and scripts alike.

Safety: the server binds to 127.0.0.1 unless told otherwise; uploads over the size limit get 413 and
non-images 415; images are addressed by id only, so no path outside the dataset can be read; the page
writes every word with ``textContent``, never as HTML.

(No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at runtime.)
"""
import hashlib
import io
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..data.bundle import DataBundle, open_data
from ..explain import METHODS, explain, method_parameters, resolved_parameters
from ..explain.store import ExplanationStore
from ..models import Captioner
from ..report.figures import normalised
from ..report.html import heatmap_image, png_data_uri

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
CACHE_SIZE = 256


def _require_web_stack():
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
    except ImportError as error:
        raise ImportError("the viewer needs FastAPI, uvicorn and python-multipart: "
                          "pip install 'captionlens[viewer]'") from error


class ViewerState:
    """Images by id, captions by image, explanations cached; one lock around the model."""

    def __init__(self, captioner: Captioner, data: DataBundle | str | Path | None, dataset_images: int,
                 store: ExplanationStore | None = None) -> None:
        self.captioner = captioner
        self.store = store  # explanations of the dataset's images made by explain-split, read when they fit
        self.lock = threading.Lock()
        self.images: dict[str, Image.Image] = {}
        self.names: dict[str, str] = {}
        self.captions: dict[str, list[str]] = {}
        self.cache: OrderedDict = OrderedDict()
        self.paths: dict[str, Path] = {}  # dataset images: id -> file (the only files the viewer reads)
        self.dataset_numbers: dict[str, int] = {}  # dataset images: id -> the dataset's image id
        self.dataset_ids: list[str] = []
        if data is not None:
            bundle = data if isinstance(data, DataBundle) else open_data(data)
            for record in bundle.split("test")[:dataset_images]:
                image_id = f"data-{record.image_id}"
                self.names[image_id] = record.path.name
                self.dataset_ids.append(image_id)
                self.paths[image_id] = record.path
                self.dataset_numbers[image_id] = record.image_id

    def image(self, image_id: str) -> Image.Image | None:
        if image_id in self.images:
            return self.images[image_id]
        path = self.paths.get(image_id)
        if path is None:
            return None
        with Image.open(path) as opened:
            self.images[image_id] = opened.convert("RGB")
        return self.images[image_id]


def create_app(captioner: Captioner, data: DataBundle | str | Path | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, dataset_images: int = 50,
               store: ExplanationStore | None = None):
    """The FastAPI application for ``captioner`` (and the test images of ``data``: an opened dataset
    or a dataset folder; explanations of them are read from ``store`` where it holds them)."""
    _require_web_stack()
    from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, Field

    state = ViewerState(captioner, data, dataset_images, store)
    app = FastAPI(title="captionlens viewer", version="1",
                  description="Caption images and explain every word of the caption.")
    page = (Path(__file__).parent / "static" / "index.html").read_text()

    @app.middleware("http")
    async def limit_upload_size(request: Request, call_next):
        length = request.headers.get("content-length")
        if request.url.path == "/api/caption" and length and int(length) > max_upload_bytes + 64 * 1024:
            return JSONResponse({"detail": f"upload larger than {max_upload_bytes} bytes"}, status_code=413)
        return await call_next(request)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/api/methods")
    def methods() -> dict[str, list[str]]:
        """The explanation methods and the parameters each takes."""
        return {name: method_parameters(name) for name in sorted(METHODS)}

    @app.get("/api/images")
    def images() -> list[dict]:
        """The dataset's test images and the uploaded ones: id and file name."""
        ids = state.dataset_ids + [i for i in state.images if i not in state.dataset_ids]
        return [{"id": i, "name": state.names[i]} for i in ids]

    @app.get("/api/images/{image_id}", responses={200: {"content": {"image/png": {}}}})
    def image(image_id: str) -> Response:
        """An image by id, as PNG."""
        picture = state.image(image_id)
        if picture is None:
            raise HTTPException(404, f"no image with id {image_id!r}")
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png")

    @app.post("/api/caption")
    def caption(file: UploadFile | None = File(None), image_id: str | None = Form(None),
                beam_size: int = Form(3, ge=1, le=10)) -> dict:
        """Caption an uploaded image (multipart ``file``) or a known one (``image_id``)."""
        if file is not None:
            content = file.file.read(max_upload_bytes + 1)
            if len(content) > max_upload_bytes:
                raise HTTPException(413, f"upload larger than {max_upload_bytes} bytes")
            try:
                with Image.open(io.BytesIO(content)) as opened:
                    picture = opened.convert("RGB")
            except (UnidentifiedImageError, OSError):
                raise HTTPException(415, "the upload is not an image that Pillow can read (PNG, JPEG, ...)") from None
            image_id = "upload-" + hashlib.sha1(content).hexdigest()[:16]
            state.images[image_id] = picture
            state.names[image_id] = Path(file.filename or "upload").name
        elif image_id is None:
            raise HTTPException(422, "send a multipart 'file' or an 'image_id'")
        picture = state.image(image_id)
        if picture is None:
            raise HTTPException(404, f"no image with id {image_id!r}")
        number = state.dataset_numbers.get(image_id)
        if state.store is not None and number is not None and state.store.has_caption(number):
            stored = state.store.caption(number)  # the caption its stored explanations belong to
            words, score = stored["words"], stored["caption_score"]
        else:
            with state.lock:
                result = state.captioner.caption([picture], beam_size=beam_size)[0]
            words, score = result.words, result.score
        state.captions[image_id] = words
        return {"image_id": image_id, "name": state.names[image_id], "words": words, "score": score}

    class ExplainRequest(BaseModel):
        image_id: str
        word_index: int = Field(ge=0, description="0-based position of the word in the caption")
        method: str = "lrp"
        epsilon: float = Field(0.01, ge=0)
        alpha: float = 1.0
        beta: float = Field(0.0, ge=0)
        first_layer: str = "alphabeta"
        relu: bool = False
        caption: list[str] | None = Field(None, description="the caption to explain; default: the image's caption")

    @app.post("/api/explain")
    def explain_word(request: ExplainRequest) -> dict:
        """The explanation of one word: heatmap (PNG data URI, blue–white–red), grid, score and the
        relevance of <start> and each preceding word."""
        if request.method not in METHODS:
            raise HTTPException(400, f"unknown method {request.method!r}; choose from {', '.join(sorted(METHODS))}")
        picture = state.image(request.image_id)
        if picture is None:
            raise HTTPException(404, f"no image with id {request.image_id!r}")
        words = request.caption or state.captions.get(request.image_id)
        if not words:
            raise HTTPException(400, "caption the image first (POST /api/caption) or send a caption")
        if request.word_index >= len(words):
            raise HTTPException(400, f"word_index {request.word_index} is out of range for {len(words)} words")
        parameters = {k: getattr(request, k) for k in method_parameters(request.method)}
        key = (request.image_id, tuple(words), request.word_index, request.method, tuple(sorted(parameters.items())))
        if key not in state.cache:
            stored = _from_store(state, request.image_id, words, request.method, request.word_index, parameters)
            if stored is not None:
                (result, row), source = stored, "store"
            else:
                try:
                    with state.lock:
                        result = explain(state.captioner, picture, words, request.method, words=[request.word_index],
                                         **parameters)
                except ValueError as error:
                    raise HTTPException(400, str(error)) from None
                row, source = 0, "computed"
            state.cache[key] = _payload(result, row, request.word_index) | {"source": source}
            while len(state.cache) > CACHE_SIZE:
                state.cache.popitem(last=False)
        state.cache.move_to_end(key)
        return state.cache[key]

    return app


def _from_store(state: ViewerState, image_id: str, words: list[str], method: str, index: int, parameters: dict):
    """(explanation, row) from the explanation store when it holds this dataset image with this
    caption, this word and the same parameters; else None."""
    store, number = state.store, state.dataset_numbers.get(image_id)
    if store is None or number is None or not store.has(number, method) or store.words(number) != list(words):
        return None
    if index not in store.positions(number) or store.parameters(method) != resolved_parameters(method, **parameters):
        return None
    return store.explanation(number, method), store.positions(number).index(index)


def _payload(result, row: int, index: int) -> dict:
    heatmap = result.image[row].numpy()
    values = result.preceding[row, : index + 1]
    return {
        "word": result.words[row],
        "word_index": index,
        "method": result.method,
        "parameters": result.parameters,
        "score": float(result.score[row]),
        "heatmap_png": png_data_uri(heatmap_image(heatmap)),
        "heatmap_max_abs": float(abs(heatmap).max()),
        "grid": result.grid[row].tolist(),
        "preceding": [{"token": t, "relevance": float(v), "normalised": float(n)}
                      for t, v, n in zip(result.tokens[: index + 1], values.tolist(), normalised(values))],
        "extra": {k: v[row].tolist() for k, v in result.extra.items()},
    }
