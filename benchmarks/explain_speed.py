"""Speed of explaining all words of a caption at the papers' size, measured side by side in one run.

By default VGG16 at 224×224 (random weights), grid-TD decoder with hidden/embedding 512, a vocabulary of
10 000 words, a 15-word caption. Three ways to get the 15 explanations:

* LRP, batched: one forward, one batched backward carrying the 15 relevance seeds;
* a plain input-gradient pass for the same 15 words (batched the same way: gradient × input);
* a per-word loop of the same LRP rules: a forward and a backward for each word.

Prints the median of --repeats timings of each and the ratios. Targets (issue 3): LRP ≤ 1.5× the
gradient pass and ≥ 10× faster than the per-word loop.

    python benchmarks/explain_speed.py [--repeats 3] [--threads N] [--arch gridtd]
    python benchmarks/explain_speed.py --arch sat --encoder resnet101 --image-size 256   # the SAT tutorial's size
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import captionlens as cl
from captionlens.models import ARCHITECTURES, ENCODERS


def timed(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--arch", default="gridtd", choices=sorted(ARCHITECTURES))
    parser.add_argument("--words", type=int, default=15)
    parser.add_argument("--encoder", default="vgg16", choices=sorted(ENCODERS))
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    vocab = [f"word{i}" for i in range(10_000 - 4)]
    cap = cl.build_captioner(args.arch, encoder=args.encoder, vocab=vocab, hidden_size=512, embed_size=512, seed=0,
                             encoder_options={"image_size": args.image_size})
    image = torch.rand(3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0))
    caption = vocab[: args.words]

    lrp = timed(lambda: cl.explain(cap, image, caption, method="lrp"), args.repeats)
    gradient = timed(lambda: cl.explain(cap, image, caption, method="gradient_x_input"), args.repeats)
    loop = timed(lambda: [cl.explain(cap, image, caption, method="lrp", words=[t]) for t in range(args.words)],
                 max(1, args.repeats // 2))
    print(f"{args.arch}, {args.encoder} {args.image_size}x{args.image_size}, hidden/embed 512, vocab 10k, {args.words} words, {args.threads} threads")
    print(f"  LRP, batched over words     {lrp:7.2f} s")
    print(f"  input-gradient pass         {gradient:7.2f} s")
    print(f"  LRP, per-word loop          {loop:7.2f} s")
    print(f"  LRP / gradient pass         {lrp / gradient:7.2f}x   (target ≤ 1.5)")
    print(f"  per-word loop / LRP batched {loop / lrp:7.2f}x   (target ≥ 10)")


if __name__ == "__main__":
    main()
