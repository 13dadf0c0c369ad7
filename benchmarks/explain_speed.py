"""Speed of explaining all words of a caption at the papers' size, measured side by side in one run.

By default VGG16 at 224×224 (random weights), grid-TD decoder with hidden/embedding 512, a vocabulary of
10 000 words, a 15-word caption. Three ways to get the 15 explanations:

* LRP, batched: one forward, one batched backward carrying the 15 relevance seeds;
* a plain input-gradient pass for the same 15 words (batched the same way: gradient × input);
* a per-word loop of the same LRP rules: a forward and a backward for each word.

Prints the median of --repeats timings of each and the ratios. Targets (issue 3): LRP ≤ 1.5× the
gradient pass and ≥ 10× faster than the per-word loop.

Then, per pixel method, bfloat16 against float32 side by side (interleaved, median of --repeats), with
each word's Pearson correlation and LRP's conservation error (|pixels + words − logit| / the largest
logit, with biases zeroed and ε → 0, where LRP conserves). Target (issue 29): bf16 ≤ 0.4× fp32 with every word's map correlating ≥ 0.999.

    python benchmarks/explain_speed.py [--repeats 3] [--threads N] [--arch gridtd]
    python benchmarks/explain_speed.py --arch sat --encoder resnet101 --image-size 256   # the SAT tutorial's size
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import captionlens as cl
from captionlens.explain import native_bf16
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


def conservation_errors(cap, image, caption) -> dict[str, float]:
    """LRP's conservation error |pixels + words − logit| / the largest logit, in fp32 and bf16, where
    LRP conserves: on a copy with every bias zeroed, ε → 0."""
    conserving = cap.with_model(copy.deepcopy(cap.model))
    with torch.no_grad():
        for name, parameter in conserving.model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
    errors = {}
    for precision in ("fp32", "bf16"):
        e = cl.explain(conserving, image, caption, method="lrp", epsilon=1e-9, precision=precision)
        total = e.image.sum(dim=(1, 2)) + e.preceding.sum(dim=1)
        errors[precision] = float((total - e.score).abs().max() / e.score.abs().max())
    return errors


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
    for module in cap.model.encoder.modules():  # PyTorch's default init starves VGG16's pixels of relevance
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
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

    print(f"bfloat16 vs float32 (native bf16 here: {native_bf16()})")
    for method in PIXEL_METHODS:
        fast, full, half, single = side_by_side(
            lambda method=method: cl.explain(cap, image, caption, method=method, precision="bf16"),
            lambda method=method: cl.explain(cap, image, caption, method=method), args.repeats)
        correlation = min(pearson_per_word(half.image, single.image))
        line = (f"  {method:18s} bf16 {fast:7.2f} s vs fp32 {full:7.2f} s  ratio {fast / full:5.2f}  (target ≤ 0.4)  "
                f"lowest per-word Pearson {correlation:.4f} (target ≥ 0.999)")
        if method == "lrp":
            errors = conservation_errors(cap, image, caption)
            line += f"  conservation error (biases 0, ε → 0) bf16 {errors['bf16']:.1e}, fp32 {errors['fp32']:.1e}"
        print(line)


if __name__ == "__main__":
    main()
