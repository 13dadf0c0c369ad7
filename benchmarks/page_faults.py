"""Page faults: explaining a caption with PyTorch's CPU allocator on 4 KiB pages against transparent huge
pages (``THP_MEM_ALLOC_ENABLE=0`` against ``1``, which importing captionlens sets unless the user did),
side by side in one run.

An explanation allocates and frees gigabytes of relevance and gradients; glibc hands buffers of more than
a few MB back to the kernel when they are freed, and every first touch of a fresh 4 KiB page is a page
fault the kernel serves by zeroing the page. PyTorch reads the setting once, at its first allocation,
so each setting runs in a fresh child process (the two alternate, --rounds times); each child times
``cl.explain`` (a warm-up, then the median of --repeats) per precision and counts the minor page faults
and the kernel (system) CPU time per call, and its peak RSS.

    python benchmarks/page_faults.py [--arch gridtd] [--encoder vgg16] [--image-size 224] [--method lrp]
    python benchmarks/page_faults.py --arch sat --encoder resnet101 --image-size 256   # the SAT tutorial's size
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

from captionlens import METHODS
from captionlens.models import ARCHITECTURES, ENCODERS

PRECISIONS = ("fp32", "bf16", "bf16-vision")

CHILD = textwrap.dedent("""
    import json, resource, statistics, sys, time
    import captionlens as cl
    import torch
    from captionlens.explain import huge_page_buffers

    benchmarks, arch, encoder, size, words, method, repeats, threads = sys.argv[1:]
    sys.path.insert(0, benchmarks)
    from explain_speed import papers_size

    torch.set_num_threads(int(threads))
    cap, image, vocab = papers_size(arch, encoder, int(size))
    caption, repeats = vocab[:int(words)], int(repeats)
    result = {"huge_pages": huge_page_buffers()}
    for precision in %r:
        cl.explain(cap, image, caption, method=method, precision=precision)  # warm-up
        seconds, faults, system = [], [], []
        for _ in range(repeats):
            before = resource.getrusage(resource.RUSAGE_SELF)
            began = time.perf_counter()
            cl.explain(cap, image, caption, method=method, precision=precision)
            seconds.append(time.perf_counter() - began)
            after = resource.getrusage(resource.RUSAGE_SELF)
            faults.append(after.ru_minflt - before.ru_minflt)
            system.append(after.ru_stime - before.ru_stime)
        result[precision] = {"seconds": statistics.median(seconds), "faults": statistics.median(faults),
                             "system": statistics.median(system)}
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))
""") % (PRECISIONS,)


def child(setting: str, args) -> dict:
    env = os.environ | {"THP_MEM_ALLOC_ENABLE": setting}
    done = subprocess.run([sys.executable, "-c", CHILD, str(Path(__file__).parent), args.arch, args.encoder, str(args.image_size),
                           str(args.words), args.method, str(args.repeats), str(args.threads)],
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def kernel_setting() -> str:
    """Linux's transparent-huge-page mode ("always [madvise] never": PyTorch's madvise is honoured
    unless it is "never")."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as mode:
            return mode.read().strip()
    except OSError:
        return "unknown (not Linux?)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="gridtd", choices=sorted(ARCHITECTURES))
    parser.add_argument("--encoder", default="vgg16", choices=sorted(ENCODERS))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--words", type=int, default=15)
    parser.add_argument("--method", default="lrp", choices=sorted(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="children per setting, alternating")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"{args.arch}, {args.encoder} {args.image_size}x{args.image_size}, {args.words} words, {args.method}, "
          f"{args.threads} threads; kernel THP: {kernel_setting()}")
    runs: dict[str, list[dict]] = {"0": [], "1": []}
    for _ in range(args.rounds):
        for setting in runs:
            runs[setting].append(child(setting, args))
    for setting, found in runs.items():
        print(f"  THP_MEM_ALLOC_ENABLE={setting} (huge-page buffers: {found[0]['huge_pages']}), "
              f"peak RSS {max(r['peak_rss_mib'] for r in found):.0f} MiB")
    median = {s: {p: {k: statistics.median(r[p][k] for r in found) for k in ("seconds", "faults", "system")}
                  for p in PRECISIONS} for s, found in runs.items()}
    print(f"  {'precision':12s} {'4 KiB pages':>12s} {'huge pages':>11s} {'ratio':>6s}   page faults / call   "
          f"kernel CPU-s / call   vs fp32: 4 KiB, huge")
    for precision in PRECISIONS:
        small, huge = median["0"][precision], median["1"][precision]
        print(f"  {precision:12s} {small['seconds']:10.2f} s {huge['seconds']:9.2f} s {huge['seconds'] / small['seconds']:6.2f}"
              f"   {small['faults']:8.0f} → {huge['faults']:6.0f}   {small['system']:7.2f} → {huge['system']:5.2f}"
              f"          {small['seconds'] / median['0']['fp32']['seconds']:5.2f}, "
              f"{huge['seconds'] / median['1']['fp32']['seconds']:5.2f}")


if __name__ == "__main__":
    main()
