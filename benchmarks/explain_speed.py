"""Speed of explaining all words of a caption at the papers' size, measured side by side in one run.

By default VGG16 at 224×224 (random weights), grid-TD decoder with hidden/embedding 512, a vocabulary of
10 000 words, a 15-word caption. Three ways to get the 15 explanations:

* LRP, batched: one forward, one batched backward carrying the 15 relevance seeds;
* a plain input-gradient pass for the same 15 words (batched the same way: gradient × input);
* a per-word loop of the same LRP rules: a forward and a backward for each word.

Prints the median of --repeats timings of each and the ratios. Targets (issue 3): LRP ≤ 1.5× the
gradient pass and ≥ 10× faster than the per-word loop.

Then, per pixel method, side by side (interleaved, median of --repeats): max-pooling's backward as a
scatter onto the saved winners (``rules.winner_takes_all``, today) against the pooling's own backward
under vmap (before issue 29), with the largest difference of the maps (0: identical); and bfloat16
against float32, with each word's Pearson correlation and LRP's conservation error. Targets
(issue 29): each method ≤ 0.6× of the previous time, LRP ≤ 1.1× the gradient pass, bf16 ≤ 0.4× fp32
with every word's map correlating ≥ 0.999.

    python benchmarks/explain_speed.py [--repeats 3] [--threads N] [--arch gridtd]
    python benchmarks/explain_speed.py --arch sat --encoder resnet101 --image-size 256   # the SAT tutorial's size
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from unittest import mock

import torch
from torch import nn

import captionlens as cl
from captionlens.explain import gradients, native_bf16, rules
from captionlens.models import ARCHITECTURES, ENCODERS

PIXEL_METHODS = ("lrp", "gradient_x_input", "guided_backprop", "guided_gradcam")


def timed(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


@contextlib.contextmanager
def pooling_own_backward():
    """Max-pooling as before issue 29: no rule (its ordinary backward, looped by vmap) for LRP, and no
    scatter hook for the gradient methods."""
    lrp_module = sys.modules["captionlens.explain.lrp"]
    rules_without_pool = {k: v for k, v in rules.RULES.items() if k is not nn.MaxPool2d}
    with mock.patch.dict(rules.RULES, rules_without_pool, clear=True), \
            mock.patch.object(lrp_module, "NEUTRAL", (*rules.NEUTRAL, nn.MaxPool2d)), \
            mock.patch.object(gradients, "max_pool_hooks", lambda model: []):
        yield


def side_by_side(first, second, repeats: int) -> tuple[float, float, object, object]:
    """Median seconds of two functions run alternately (after one warm-up each), and their last results."""
    results = [first(), second()]
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for i, function in enumerate((first, second)):
            began = time.perf_counter()
            results[i] = function()
            times[i].append(time.perf_counter() - began)
    return statistics.median(times[0]), statistics.median(times[1]), results[0], results[1]


def pearson_per_word(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [float(torch.corrcoef(torch.stack([x.flatten(), y.flatten()]).double())[0, 1]) for x, y in zip(a, b)]


def conservation_error(explanation) -> float:
    total = explanation.image.sum(dim=(1, 2)) + explanation.preceding.sum(dim=1)
    return float(((total - explanation.score).abs() / explanation.score.abs()).max())


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

    print("max-pooling's backward: scatter onto the saved winners (today) vs the pooling's own backward (before)")
    today = {}
    for method in PIXEL_METHODS:
        def before(method=method):
            with pooling_own_backward():
                return cl.explain(cap, image, caption, method=method)
        now, then, new, old = side_by_side(lambda: cl.explain(cap, image, caption, method=method), before, args.repeats)
        today[method] = now
        difference = float((new.image - old.image).abs().max() / old.image.abs().max().clamp(min=1e-30))
        print(f"  {method:18s} {now:7.2f} s vs {then:7.2f} s  ratio {now / then:5.2f}  (target ≤ 0.6)  "
              f"largest map difference {difference:.1e} of the map's max")
    print(f"  LRP / gradient pass {today['lrp'] / today['gradient_x_input']:.2f}x   (target ≤ 1.1)")

    print(f"bfloat16 vs float32 (native bf16 here: {native_bf16()})")
    for method in PIXEL_METHODS:
        fast, full, half, single = side_by_side(
            lambda method=method: cl.explain(cap, image, caption, method=method, precision="bf16"),
            lambda method=method: cl.explain(cap, image, caption, method=method), args.repeats)
        correlation = min(pearson_per_word(half.image, single.image))
        line = (f"  {method:18s} bf16 {fast:7.2f} s vs fp32 {full:7.2f} s  ratio {fast / full:5.2f}  (target ≤ 0.4)  "
                f"lowest per-word Pearson {correlation:.4f} (target ≥ 0.999)")
        if method == "lrp":  # what bias terms and ε absorb, relative to the word's logit, at most over the words
            line += f"  conservation error bf16 {conservation_error(half):.1e}, fp32 {conservation_error(single):.1e}"
        print(line)


if __name__ == "__main__":
    main()
