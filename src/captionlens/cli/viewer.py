"""``captionlens serve``: the interactive viewer on this machine."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .app import command, console
from .options import DatasetOptions, DeviceOption, ModelOption, number, whole


@command()
def serve(
    model: ModelOption,
    dataset: DatasetOptions,
    data: Annotated[Optional[Path], typer.Option(help="Dataset folder whose test images can be picked.")] = None,
    host: Annotated[str, typer.Option(help="Interface to bind; the default serves this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.", parser=whole(1, 65535))] = 8000,
    max_upload_mb: Annotated[float, typer.Option(help="Largest accepted upload (MB); larger ones get 413, cut off while they stream.", parser=number(0, 1024, low_open=True))] = 10.0,
    max_upload_megapixels: Annotated[float, typer.Option(help="Largest accepted upload in pixels (checked before decoding); larger ones get 413.", parser=number(0, 1000, low_open=True))] = 25.0,
    max_uploads: Annotated[int, typer.Option(help="Uploads kept (as files); the least recently used go first.", parser=whole(1, 100_000))] = 100,
    rate_limit: Annotated[float, typer.Option(help="API requests per second per client (bursts of twice that); more get 429.", parser=number(0, 1e6, low_open=True))] = 20.0,
    header_timeout: Annotated[float, typer.Option(help="Seconds a client has to send a request's headers before its connection is closed.", parser=number(0, 3600, low_open=True))] = 10.0,
    max_connections: Annotated[Optional[int], typer.Option(help="Open connections at most (default: what the open-file limit allows); more are closed at once.", parser=whole(1, 1_000_000))] = None,
    store: Annotated[Optional[Path], typer.Option(help="Explanation store of this model (explain-split): explanations of --data's images are read from it.")] = None,
    device: DeviceOption = None,
) -> None:
    """The interactive viewer: upload or pick an image, see its caption, click a word to see its
    heatmaps by each method and its linguistic explanation; change ε, α/β and the method; download
    the heatmap PNG and the explanation JSON. JSON API under /api/, OpenAPI at /openapi.json. Needs
    the viewer extra of captionlens (FastAPI, uvicorn, python-multipart).

    Example: captionlens serve --model runs/demo/gridtd --data runs/demo/data   (then open http://127.0.0.1:8000)
    """
    from ..api import load
    from ..explain.store import ExplanationStore
    from ..extras import require
    from ..viewer.app import ViewerLimits, create_app
    from ..viewer import server

    require("uvicorn", "viewer")
    bundle = dataset.open(data) if data is not None else None
    captioner = load(model, device)
    explanations = ExplanationStore.open(store) if store is not None else None
    if explanations is not None:
        explanations.check(captioner.fingerprint())
    limits = ViewerLimits(max_upload_bytes=int(max_upload_mb * 1024 * 1024),
                          max_upload_pixels=int(max_upload_megapixels * 1e6), max_uploads=max_uploads,
                          requests_per_second=rate_limit)
    application = create_app(captioner, bundle, store=explanations, limits=limits)
    console.print(f"captionlens viewer on http://{host}:{port}")
    server.serve(application, host, port, header_timeout, max_connections)
