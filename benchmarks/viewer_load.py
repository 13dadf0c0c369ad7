"""The viewer under load and under hostile uploads (issue 14), measured in one run against a real
`captionlens serve` process on 127.0.0.1 (nothing leaves this machine; every loop is bounded).

1. start-up: the server's RSS after it started and captioned one image (the baseline);
2. (after 3.) 20 concurrent clients for --seconds (60): each picks a test image, captions it and explains a word
   with a method, again and again; errors (anything but 200) and latency percentiles are printed;
3. RSS after 200 distinct uploads, then after ten 12000×12000 PNG uploads (a few hundred KB on the
   wire, 430 MB if decoded) — target: both ≤ 1.5× the baseline; these run before the load, so they
   measure what uploads cost. The load runs in two halves to show its memory stops growing.

The server runs with --rate-limit 1000 here: the 20 clients share one address, and the default limit
(20 requests/s per client) would rightly answer most of them 429.

    python benchmarks/viewer_load.py [--seconds 60] [--clients 20]
"""
from __future__ import annotations

import argparse
import io
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

PYTHON = sys.executable


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def png(width: int, height: int, seed: int) -> bytes:
    buffer = io.BytesIO()
    if width * height > 10_000_000:  # a huge but highly compressible image: small on the wire
        Image.new("L", (width, height), seed % 256).save(buffer, format="PNG", optimize=True)
    else:
        pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def setup(root: Path) -> tuple[Path, Path]:
    data, run = root / "data", root / "run"
    subprocess.run([PYTHON, "-m", "captionlens", "data", "shapes", "--out", str(data), "--train", "40", "--val", "8",
                    "--test", "50"], check=True, capture_output=True)
    code = f"""
import captionlens as cl
from captionlens.data.bundle import open_data
words = sorted({{w for r in open_data({str(data)!r}).split("train") for c in r.captions for w in c}})
cap = cl.build_captioner("gridtd", encoder="shapes", vocab=words, hidden_size=192, embed_size=128, seed=0)
cap.config.max_length = 12
cap.save({str(run)!r})
"""
    subprocess.run([PYTHON, "-c", code], check=True, capture_output=True)
    return data, run


def load(base: str, seconds: float, clients: int) -> None:
    images = [i["id"] for i in httpx.get(f"{base}/api/images").json()]
    methods = ["lrp", "gradcam", "attention", "guided_gradcam"]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=base, timeout=60) as session:
            while time.monotonic() < stop:
                image_id = rng.choice(images)
                for request in (lambda: session.post("/api/caption", data={"image_id": image_id}),):
                    began = time.perf_counter()
                    answer = request()
                    with lock:
                        latencies.append(time.perf_counter() - began)
                    if answer.status_code != 200:
                        with lock:
                            errors.append(f"caption {answer.status_code}")
                        continue
                    words = answer.json()["words"]
                    if not words:
                        continue
                    began = time.perf_counter()
                    answer = session.post("/api/explain", json={"image_id": image_id,
                                                                "word_index": rng.randrange(len(words)),
                                                                "method": rng.choice(methods)})
                    with lock:
                        latencies.append(time.perf_counter() - began)
                        if answer.status_code != 200:
                            errors.append(f"explain {answer.status_code}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ordered = sorted(latencies)
    print(f"  {clients} clients, {seconds:.0f} s: {len(latencies)} requests ({len(latencies) / seconds:.1f}/s), "
          f"{len(errors)} errors{' ' + str(sorted(set(errors))) if errors else ''}")
    print(f"  latency: median {statistics.median(ordered):.3f} s, p95 {ordered[int(0.95 * (len(ordered) - 1))]:.3f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data, run = setup(Path(folder))
        port = free_port()
        server = subprocess.Popen([PYTHON, "-m", "captionlens", "serve", "--model", str(run), "--data", str(data),
                                   "--port", str(port), "--rate-limit", "1000"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                if server.poll() is not None:
                    raise RuntimeError(f"the server stopped: {server.stderr.read().decode()[-2000:]}")
                try:
                    httpx.get(f"{base}/api/methods", timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            first = httpx.get(f"{base}/api/images").json()[0]["id"]
            assert httpx.post(f"{base}/api/caption", data={"image_id": first}, timeout=60).status_code == 200
            baseline = rss_mib(server.pid)
            print(f"start-up + one caption: RSS {baseline:.0f} MiB")
            with httpx.Client(base_url=base, timeout=120) as session:
                for k in range(200):
                    answer = session.post("/api/caption", files={"file": (f"u{k}.png", png(320, 240, k), "image/png")})
                    assert answer.status_code == 200, answer.text
                after_uploads = rss_mib(server.pid)
                huge = png(12000, 12000, 7)
                codes = [session.post("/api/caption", files={"file": ("huge.png", huge, "image/png")}).status_code
                         for _ in range(10)]
                after_huge = rss_mib(server.pid)
            print(f"after 200 distinct uploads: RSS {after_uploads:.0f} MiB = {after_uploads / baseline:.2f}x "
                  "the baseline (target ≤ 1.5)")
            print(f"after ten 12000×12000 uploads ({len(huge) / 1024:.0f} KB each, answered {sorted(set(codes))}): "
                  f"RSS {after_huge:.0f} MiB = {after_huge / baseline:.2f}x (target ≤ 1.5)")
            print("load:")
            load(base, args.seconds / 2, args.clients)
            halfway = rss_mib(server.pid)
            load(base, args.seconds / 2, args.clients)
            after_load = rss_mib(server.pid)
            print(f"  RSS after half the load {halfway:.0f} MiB, after all of it {after_load:.0f} MiB "
                  f"({after_load / baseline:.2f}x the baseline: the explanation engine's working memory and the "
                  "explanation cache, at most 256 entries)")
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == "__main__":
    main()
