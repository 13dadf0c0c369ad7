"""The viewer under load and under hostile uploads (issue 14), measured in one run against a real
`captionlens serve` process on 127.0.0.1 (nothing leaves this machine; every loop is bounded).

1. start-up: the server's RSS after it started and captioned one image (the baseline);
2. (after 3.) 20 concurrent clients for --seconds (60): each picks a test image, captions it and explains a word
   with a method, again and again; errors (anything but 200) and latency percentiles are printed;
3. RSS after 200 distinct uploads, then after ten 12000×12000 PNG uploads (a few hundred KB on the
   wire, 430 MB if decoded) — target: both ≤ 1.5× the baseline; these run before the load, so they
   measure what uploads cost. The load runs in two halves to show its memory stops growing.
4. attacks (issue 28), each while one well-behaved client captions a test image again and again:
   a 100 MB JSON body to /api/explain (declared, then chunked without Content-Length), a 300 MB chunked
   upload to /api/caption, and 1100 connections that send half a request's headers and wait. Printed:
   RSS against the baseline (target ≤ 1.5×) and the well-behaved client's slowest answer (target ≤ 2 s).

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


def _stream(size: int, piece: int = 1 << 20):
    sent = 0
    while sent < size:
        yield b"\0" * piece
        sent += piece


def _oversized_json(base: str) -> str:
    codes = []
    with httpx.Client(base_url=base, timeout=60) as session:
        body = b'{"image_id": "' + b"x" * (100 << 20) + b'"}'
        codes.append(session.post("/api/explain", content=body, headers={"content-type": "application/json"}).status_code)
        codes.append(session.post("/api/explain", content=_stream(100 << 20),
                                  headers={"content-type": "application/json"}).status_code)
    return f"answered {codes}"


def _chunked_upload(base: str) -> str:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.sendall(b"POST /api/caption HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Type: multipart/form-data; boundary=B\r\n\r\n")
    head = b'--B\r\nContent-Disposition: form-data; name="file"; filename="big.png"\r\n\r\n'
    sent = 0
    try:
        for chunk in [head, *_stream(300 << 20)]:
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            sent += len(chunk)
    except OSError:
        pass
    try:
        answer = sock.recv(200).split(b"\r\n")[0].decode()
    except OSError:
        answer = "(closed)"
    sock.close()
    return f"{sent / 2**20:.0f} MB of 300 sent before the server answered {answer!r}"


def _idle_connections(base: str, count: int = 1100, hold: float = 15.0) -> str:
    host, port = base.removeprefix("http://").split(":")
    held, refused = [], 0
    for _ in range(count):
        try:
            sock = socket.create_connection((host, int(port)), timeout=5)
            sock.sendall(b"GET /api/images HTTP/1.1\r\nHost: x\r\n")  # never finished
            held.append(sock)
        except OSError:
            refused += 1
    time.sleep(hold)
    closed = 0
    for sock in held:
        sock.settimeout(0.01)
        try:
            closed += sock.recv(1) == b""
        except OSError:
            pass
        sock.close()
    return f"{len(held)} opened ({refused} refused); after {hold:.0f} s the server had closed {closed}"


def attacks(base: str, pid: int, baseline: float) -> None:
    """Each attack in a thread while one well-behaved client captions; RSS and its slowest answer."""
    first = httpx.get(f"{base}/api/images").json()[0]["id"]
    for name, attack in (("100 MB JSON bodies", _oversized_json), ("300 MB chunked upload", _chunked_upload),
                         ("1100 half-sent connections", _idle_connections)):
        outcome: dict = {}
        thread = threading.Thread(target=lambda: outcome.setdefault("text", attack(base)))
        thread.start()
        slowest, answered, failed = 0.0, 0, 0
        with httpx.Client(base_url=base, timeout=30) as session:
            while thread.is_alive():
                began = time.perf_counter()
                try:
                    ok = session.post("/api/caption", data={"image_id": first}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                slowest = max(slowest, time.perf_counter() - began)
                answered, failed = answered + ok, failed + (not ok)
                time.sleep(0.05)
        thread.join()
        rss = rss_mib(pid)
        print(f"  {name}: {outcome.get('text')}; RSS {rss:.0f} MiB = {rss / baseline:.2f}x the baseline (target ≤ 1.5); "
              f"the other client: {answered} answered, {failed} failed, slowest {slowest:.2f} s (target ≤ 2)")


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
            print("attacks:")
            attacks(base, server.pid, baseline)
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
