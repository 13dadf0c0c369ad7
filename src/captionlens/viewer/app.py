"""``captionlens serve``: upload an image or pick one from the dataset, see its caption, click a word
and see its heatmaps and linguistic explanation by each method. A JSON API under ``/api/`` (OpenAPI at
``/openapi.json``) serves the page and scripts alike.

Safety: the server binds to 127.0.0.1 unless told otherwise; images are addressed by id only, so no
path outside the dataset can be read; the page writes every word with ``textContent``, never as HTML.
Nothing a client sends can exhaust the server (``ViewerLimits``): uploads are bounded in bytes (413)
and in pixels (413, checked before decoding), kept as files in a folder of bounded size and count
(least recently used evicted), decoded images are cached only at display and model size for a few
images; captions to explain are bounded in length; every invalid number is a 4xx; each client is
rate-limited (429).

(No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations at runtime.)
"""
import base64
import contextlib
import hashlib
import io
import shutil
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.bundle import DataBundle, open_data
from ..data.images import MAX_PIXELS, ImageLoadError, load_image, resized_pixels
from ..explain import explain, method_parameters, methods_for, resolved_parameters
from ..explain.store import ExplanationStore
from ..errors import integer, real
from ..extras import require
from .server import JSON_BODY_LIMIT, MULTIPART_OVERHEAD, BodyLimit
from ..models import Captioner
from ..explain.lrp import has_dot_product_attention
from ..report.figures import normalised, title
from ..display.scales import heatmap_image, map_scale, png_data_uri

MAX_UPLOAD_BYTES = 10 * 1024 * 1024


@dataclass(frozen=True)
class ViewerLimits:
    """What one client (or all of them) can make the server hold or do."""

    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_upload_pixels: int = 25_000_000  # e.g. 5000×5000; checked before the image is decoded
    max_uploads: int = 100  # uploads kept (files), least recently used evicted first
    max_upload_store_bytes: int = 200 * 1024 * 1024  # their total size on disk
    decoded_images: int = 8  # images kept decoded (at display and model size only)
    display_side: int = 1024  # the longest side of the image served to the page
    max_caption_words: int = 40  # a caption sent to /api/explain
    explanations_cached: int = 256
    requests_per_second: float = 20.0  # per client, with bursts of twice that
    dataset_images: int = 50

    def __post_init__(self) -> None:  # a NaN rate once answered every call 429
        for name in ("max_upload_bytes", "max_upload_pixels", "max_uploads", "max_upload_store_bytes", "decoded_images",
                     "display_side", "max_caption_words", "explanations_cached"):
            integer(name, getattr(self, name), 1)
        integer("dataset_images", self.dataset_images, 0)
        real("requests_per_second", self.requests_per_second, 0, low_open=True)


def _require_web_stack():
    """The viewer's packages (the ``viewer`` extra), or a clear error naming that extra."""
    require("fastapi", "viewer")
    require("pydantic", "viewer")
    require("python_multipart", "viewer")


class LRU(OrderedDict):
    """An OrderedDict that forgets its least recently used entries beyond ``size``. Its reading,
    writing and forgetting hold its own lock: the server's thread pool uses it from many threads."""

    def __init__(self, size: int, on_evict=None) -> None:
        super().__init__()
        self.size, self.on_evict = size, on_evict
        self.lock = threading.RLock()

    def get_recent(self, key):
        with self.lock:
            if key not in self:
                return None
            self.move_to_end(key)
            return self[key]

    def put(self, key, value) -> None:
        with self.lock:
            self[key] = value
            self.move_to_end(key)
            while len(self) > self.size:
                old_key, old_value = self.popitem(last=False)
                if self.on_evict:
                    self.on_evict(old_key, old_value)

    def discard(self, key) -> None:
        with self.lock:
            self.pop(key, None)


class RateLimiter:
    """A token bucket per client: ``rate`` requests per second, bursts of ``2 × rate``."""

    def __init__(self, rate: float, clients: int = 10_000) -> None:
        self.rate, self.burst = rate, 2 * rate
        self.buckets: LRU = LRU(clients)
        self.lock = threading.Lock()

    def allow(self, client: str) -> bool:
        now = time.monotonic()
        with self.lock:
            tokens, last = self.buckets.get_recent(client) or (self.burst, now)
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            allowed = tokens >= 1
            self.buckets.put(client, (tokens - 1 if allowed else tokens, now))
        return allowed


class ViewerState:
    """Images by id (dataset files, and uploads kept as files), a few decoded images, captions and
    explanations cached within bounds; one lock around the model."""

    def __init__(self, captioner: Captioner, data: DataBundle | str | Path | None, limits: ViewerLimits,
                 store: ExplanationStore | None = None, upload_dir: Path | None = None) -> None:
        self.captioner, self.limits = captioner, limits
        self.store = store  # explanations of the dataset's images made by explain-split, read when they fit
        self.lock = threading.Lock()  # the model
        self.state_lock = threading.Lock()  # the dictionaries below
        self._given_upload_dir = Path(upload_dir) if upload_dir else None
        self._upload_dir: Path | None = None  # made on the first upload, removed with the state
        self.names: dict[str, str] = {}
        self.uploads: LRU = LRU(limits.max_uploads, self._forget_upload)  # id -> (file, bytes)
        self.decoded: LRU = LRU(limits.decoded_images)  # id -> (display image, model-size uint8 pixels)
        self.captions: LRU = LRU(limits.max_uploads + limits.dataset_images)
        self.cache: LRU = LRU(limits.explanations_cached)
        self.paths: dict[str, Path] = {}  # dataset images: id -> file (the only dataset files the viewer reads)
        self.dataset_numbers: dict[str, int] = {}  # dataset images: id -> the dataset's image id
        self.dataset_ids: list[str] = []
        if data is not None:
            bundle = data if isinstance(data, DataBundle) else open_data(data)
            for record in bundle.split("test")[:limits.dataset_images]:
                image_id = f"data-{record.image_id}"
                self.names[image_id] = record.path.name
                self.dataset_ids.append(image_id)
                self.paths[image_id] = record.path
                self.dataset_numbers[image_id] = record.image_id

    @property
    def upload_dir(self) -> Path:
        """The folder uploads are kept in, made when the first one arrives; it goes with the state
        (``close``, or when the state is collected or the process exits), errors or not."""
        if self._upload_dir is None:
            if self._given_upload_dir is not None:
                self._given_upload_dir.mkdir(parents=True, exist_ok=True)
                self._upload_dir = self._given_upload_dir
            else:
                self._upload_dir = Path(tempfile.mkdtemp(prefix="captionlens-uploads-"))
                weakref.finalize(self, shutil.rmtree, self._upload_dir, True)
        return self._upload_dir

    def path_of(self, image_id: str) -> Path | None:
        upload = self.uploads.get(image_id)
        return self.paths.get(image_id) or (upload[0] if upload else None)

    def forget_upload(self, image_id: str) -> None:
        with self.state_lock:
            entry = self.uploads.pop(image_id, None)
            if entry is not None:
                self._forget_upload(image_id, entry)

    def _forget_upload(self, image_id: str, entry) -> None:
        entry[0].unlink(missing_ok=True)
        self.names.pop(image_id, None)
        self.decoded.discard(image_id)
        self.captions.discard(image_id)

    def add_upload(self, content: bytes, name: str) -> str:
        """Keep an upload (already checked to be a small enough image) as a file; returns its id."""
        image_id = "upload-" + hashlib.sha1(content).hexdigest()[:16]
        with self.state_lock:
            if image_id not in self.uploads:
                path = self.upload_dir / f"{image_id}.bin"
                path.write_bytes(content)
                self.uploads.put(image_id, (path, len(content)))
                while sum(size for _, size in self.uploads.values()) > self.limits.max_upload_store_bytes:
                    oldest = next(iter(self.uploads))
                    self._forget_upload(oldest, self.uploads.pop(oldest))
            self.uploads.get_recent(image_id)
            self.names[image_id] = name
        return image_id

    def upload_ids(self) -> list[str]:
        with self.state_lock:
            return list(self.uploads)

    def pictures(self, image_id: str) -> tuple[Image.Image, torch.Tensor] | None:
        """(the image at display size, its pixels at the model's input size as uint8 [3, S, S]), or
        None for an unknown id. Decoded from the file on first use; a few are kept."""
        with self.state_lock:
            cached = self.decoded.get_recent(image_id)
            upload = self.uploads.get_recent(image_id)
        if cached is not None:
            return cached
        path = self.paths.get(image_id) or (upload[0] if upload else None)
        if path is None:
            return None
        # an upload is a user's photo (EXIF orientation applied); a dataset image is read as stored, like
        # its explanations in the store
        full = load_image(path, self.limits.max_upload_pixels if upload else MAX_PIXELS, upright=bool(upload))
        pixels = resized_pixels(full, self.captioner.image_size)  # exactly what `captionlens explain` feeds the model
        display = full.copy()
        display.thumbnail((self.limits.display_side, self.limits.display_side))
        with self.state_lock:
            self.decoded.put(image_id, (display, pixels))
        return display, pixels

    def close(self) -> None:
        if self._upload_dir is not None:
            shutil.rmtree(self._upload_dir, ignore_errors=True)


def create_app(captioner: Captioner, data: DataBundle | str | Path | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, dataset_images: int = 50,
               store: ExplanationStore | None = None, limits: ViewerLimits | None = None,
               upload_dir: str | Path | None = None):
    """The FastAPI application for ``captioner`` (and the test images of ``data``: an opened dataset
    or a dataset folder; explanations of them are read from ``store`` where it holds them)."""
    _require_web_stack()
    from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from pydantic import BaseModel, Field

    limits = limits or ViewerLimits(max_upload_bytes=max_upload_bytes, dataset_images=dataset_images)
    state = ViewerState(captioner, data, limits, store, Path(upload_dir) if upload_dir else None)
    limiter = RateLimiter(limits.requests_per_second)
    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        state.close()  # the uploads folder goes with the server

    app = FastAPI(title="captionlens viewer", version="1", lifespan=lifespan,
                  description="Caption images and explain every word of the caption.")
    app.state.viewer = state
    page = (Path(__file__).parent / "static" / "index.html").read_text()

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if request.url.path.startswith("/api/"):
            if not limiter.allow(request.client.host if request.client else "unknown"):
                return JSONResponse({"detail": "too many requests: slow down"}, status_code=429,
                                    headers={"Retry-After": "1"})
        return await call_next(request)

    # bodies bounded on every endpoint, cut off while they stream (server.py)
    app.add_middleware(BodyLimit, limit_for=lambda path: limits.max_upload_bytes + MULTIPART_OVERHEAD
                       if path == "/api/caption" else JSON_BODY_LIMIT)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        """422 with what was wrong, without echoing the input (a NaN cannot even be written as JSON)."""
        return JSONResponse({"detail": [{"loc": [str(part) for part in e.get("loc", ())], "msg": str(e.get("msg")),
                                         "type": str(e.get("type"))} for e in error.errors()]}, status_code=422)

    def pictures_of(image_id: str):
        try:
            found = state.pictures(image_id)
        except ImageLoadError as error:  # said with the image's name, never the server's path to it
            message = str(error).replace(str(state.path_of(image_id)), repr(state.names.get(image_id, image_id)))
            state.forget_upload(image_id)  # a broken upload is not kept (nor listed)
            raise HTTPException(413 if "megapixels" in message else 415, message) from None
        if found is None:
            raise HTTPException(404, f"no image with id {image_id!r}")
        return found

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    available = methods_for(state.captioner.model)  # the model is fixed for the app's life

    @app.get("/api/methods")
    def methods() -> dict[str, list[str]]:
        """The explanation methods the model has and the parameters each takes."""
        return {name: method_parameters(name) for name in available}

    dot_product = has_dot_product_attention(state.captioner.model)

    @app.get("/api/controls")
    def controls() -> dict[str, dict]:
        """Per method: its readable title and the parameters that apply to this model (the attention
        rule only where the model has dot-product attention) — what the page shows."""
        return {name: {"title": title(name), "parameters": [p for p in method_parameters(name)
                                                              if p != "attention_rule" or dot_product]}
                for name in available}

    @app.get("/api/images")
    def images() -> list[dict]:
        """The dataset's test images and the uploads kept (at most ``max_uploads``): id and file name."""
        ids = state.dataset_ids + state.upload_ids()
        return [{"id": i, "name": state.names.get(i, i)} for i in ids]

    @app.get("/api/images/{image_id}", responses={200: {"content": {"image/png": {}}}})
    def image(image_id: str) -> Response:
        """An image by id, as PNG (at most ``display_side`` pixels on its longer side)."""
        display, _ = pictures_of(image_id)
        buffer = io.BytesIO()
        display.save(buffer, format="PNG")
        return Response(buffer.getvalue(), media_type="image/png")

    @app.post("/api/caption")
    def caption(file: UploadFile | None = File(None), image_id: str | None = Form(None, max_length=64),
                beam_size: int = Form(3, ge=1, le=10), caption: str | None = Form(None, max_length=2000)) -> dict:
        """Caption an uploaded image (multipart ``file``) or a known one (``image_id``); with
        ``caption``, take the user's own caption (tokenised as the model's vocabulary spells words)."""
        if file is not None:
            content = file.file.read(limits.max_upload_bytes + 1)
            if len(content) > limits.max_upload_bytes:
                raise HTTPException(413, f"upload larger than {limits.max_upload_bytes} bytes")
            try:  # size and format from the header, before anything is decoded
                with Image.open(io.BytesIO(content)) as opened:
                    width, height = opened.size
            except Exception:  # noqa: BLE001  Pillow raises many types for hostile bytes
                raise HTTPException(415, "the upload is not an image that Pillow can read (PNG, JPEG, ...)") from None
            if width * height > limits.max_upload_pixels:
                raise HTTPException(413, f"the upload is {width}×{height} pixels, more than the "
                                         f"{limits.max_upload_pixels / 1e6:.0f} megapixels allowed")
            image_id = state.add_upload(content, Path(file.filename or "upload").name[:200])
        elif image_id is None:
            raise HTTPException(422, "send a multipart 'file' or an 'image_id'")
        _, pixels = pictures_of(image_id)
        number = state.dataset_numbers.get(image_id)
        if caption is not None:
            words = state.captioner.tokenize(caption)
            if not words:
                raise HTTPException(422, "the caption has no words")
            if len(words) > limits.max_caption_words:
                raise HTTPException(422, f"the caption has {len(words)} words, more than {limits.max_caption_words}")
            state.captions.put(image_id, words)
            unknown = sorted({w for w in words if w not in state.captioner.vocab})
            return {"image_id": image_id, "name": state.names.get(image_id, image_id), "words": words, "score": None,
                    "unknown": unknown}
        if state.store is not None and number is not None and state.store.has_caption(number):
            stored = state.store.caption(number)  # the caption its stored explanations belong to
            words, score = stored["words"], stored["caption_score"]
        else:
            with state.lock:
                result = state.captioner.caption([pixels], beam_size=beam_size)[0]
            words, score = result.words, result.score
        state.captions.put(image_id, words)
        return {"image_id": image_id, "name": state.names.get(image_id, image_id), "words": words, "score": score,
                "unknown": []}

    class ExplainRequest(BaseModel):
        image_id: str = Field(max_length=64)
        word_index: int = Field(ge=0, le=limits.max_caption_words, description="0-based position of the word")
        method: str = Field("lrp", max_length=32)
        epsilon: float = Field(0.01, ge=0, le=1e6, allow_inf_nan=False)
        alpha: float = Field(1.0, ge=1, le=1e6, allow_inf_nan=False)
        beta: float = Field(0.0, ge=0, le=1e6, allow_inf_nan=False)
        first_layer: str = Field("alphabeta", max_length=16)
        attention_rule: str = Field("cp", max_length=16, description="cp or attnlrp (dot-product attention)")
        relu: bool = False
        caption: list[str] | None = Field(None, max_length=limits.max_caption_words,
                                          description="the caption to explain; default: the image's caption")
        downloads: bool = Field(False, description="also the map at the photo's shape (PNG) and as .npy")

    @app.post("/api/explain")
    def explain_word(request: ExplainRequest) -> dict:
        """The explanation of one word: heatmap (PNG data URI on its scale: blue–white–red when signed,
        sequential from 0 when non-negative, transparent when all zero; ``scale`` says which), grid, score and the
        relevance of <start> and each preceding word."""
        if request.method not in available:
            raise HTTPException(400, f"unknown method {request.method!r} for this model; choose from {', '.join(available)}")
        if request.caption is not None and any(len(w) > 64 for w in request.caption):
            raise HTTPException(422, "caption words are at most 64 characters long")
        display, pixels = pictures_of(request.image_id)
        words = request.caption or state.captions.get_recent(request.image_id)
        if not words:
            raise HTTPException(400, "caption the image first (POST /api/caption) or send a caption")
        if request.word_index >= len(words):
            raise HTTPException(400, f"word_index {request.word_index} is out of range for {len(words)} words")
        parameters = {k: getattr(request, k) for k in method_parameters(request.method)}
        key = (request.image_id, tuple(words), request.word_index, request.method, tuple(sorted(parameters.items())))
        cached = state.cache.get_recent(key)
        if cached is None:
            stored = _from_store(state, request.image_id, words, request.method, request.word_index, parameters)
            if stored is not None:
                (result, row), source = stored, "store"
            else:
                try:
                    with state.lock:
                        result = explain(state.captioner, pixels, words, request.method, words=[request.word_index],
                                         **parameters)
                except ValueError as error:
                    raise HTTPException(400, str(error)) from None
                row, source = 0, "computed"
            heatmap = result.image[row].numpy()
            cached = (_payload(result, row, request.word_index) | {"source": source}, heatmap)
            state.cache.put(key, cached)
        payload, heatmap = cached
        if request.downloads:  # made only when asked: the page's six tiles a click never use them
            return payload | downloads(heatmap, map_scale(heatmap, payload["method"], payload["parameters"]),
                                       display.size)
        return payload

    return app


def npy_data_uri(array: np.ndarray) -> str:
    """``array`` as a .npy file in a data URI (what ``np.load`` reads back)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return "data:application/octet-stream;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _from_store(state: ViewerState, image_id: str, words: list[str], method: str, index: int, parameters: dict):
    """(explanation, row) from the explanation store when it holds this dataset image with this
    caption, this word and the same parameters; else None."""
    store, number = state.store, state.dataset_numbers.get(image_id)
    if store is None or number is None or not store.has(number, method) or store.words(number) != list(words):
        return None
    if index not in store.positions(number) or store.parameters(method) != resolved_parameters(method, **parameters):
        return None
    return store.explanation(number, method), store.positions(number).index(index)


def downloads(heatmap: np.ndarray, scale, photo_size: tuple[int, int]) -> dict:
    """The map to download: as a PNG at the photo's shape (``photo_size``, the served image's) on the
    page's scale, and as .npy at the model's input size (float32)."""
    return {"heatmap_photo_png": png_data_uri(heatmap_image(heatmap, tuple(photo_size), scale)),
            "heatmap_npy": npy_data_uri(heatmap.astype(np.float32))}


def _payload(result, row: int, index: int) -> dict:
    """What the page shows of one word's explanation, the map as a PNG at the model's size (laid over
    the image)."""
    heatmap = result.image[row].numpy()
    scale = map_scale(heatmap, result.method, result.parameters)
    values = result.preceding[row, : index + 1]
    return {
        "word": result.words[row],
        "word_index": index,
        "method": result.method,
        "title": title(result.method),
        "parameters": result.parameters,
        "score": float(result.score[row]),
        "heatmap_png": png_data_uri(heatmap_image(heatmap, scale=scale)),
        "heatmap_max_abs": float(abs(heatmap).max()),
        "scale": scale.to_dict(),  # diverging, sequential or zero, with its printed label
        "grid": result.grid[row].tolist(),
        "preceding": [{"token": t, "relevance": float(v), "normalised": float(n)}
                      for t, v, n in zip(result.tokens[: index + 1], values.tolist(), normalised(values))],
        "extra": {k: v[row].tolist() for k, v in result.extra.items()},
    }
