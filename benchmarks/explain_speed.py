"""Speed of explaining all words of a caption at the papers' size, measured side by side in one run.

By default VGG16 at 224×224 (random weights), grid-TD decoder with hidden/embedding 512, a vocabulary of
10 000 words, a 15-word caption. Three ways to get the 15 explanations:

* LRP, batched: one forward, one batched backward carrying the 15 relevance seeds;
* a plain input-gradient pass for the same 15 words (gradient × input, as captionlens runs it);
* a per-word loop of the same LRP rules: a forward and a backward for each word.

Prints the median of --repeats timings of each (LRP and the gradient pass interleaved) and the
ratios. Targets (issue 3): LRP ≤ 1.5× the gradient pass and ≥ 10× faster than the per-word loop.

Then, per pixel method, the two backwards of ``engine.words_backward``: the words as a batch the
kernels see (``torch.func.vmap`` over ``torch.autograd.grad``) against convolutions word by word
(``is_grads_batched=True``, PyTorch's legacy vmap), interleaved, with the largest difference of the
maps relative to the largest |map|. Targets (issue 29): ≤ 0.6× with identical maps, LRP ≤ 1.1× the
gradient pass with both as a batch. captionlens uses whichever measured faster: the batch for LRP,
and for the gradient methods the batch up to 128×128 pixels, word by word above in float32 (run it
with ``--image-size 64`` to see the other side), the batch at every size in bfloat16.

Then, per pixel method, bfloat16 (all of the model, and the image encoder only: "bf16-vision") against
float32 side by side (interleaved, median of --repeats), with each word's Pearson correlation and LRP's
conservation error (|pixels + words − logit| / the largest
logit, with biases zeroed and ε → 0, where LRP conserves). Target (issue 29): bf16 ≤ 0.4× fp32 with
every word's map correlating ≥ 0.999. Beside it, in brackets, how far fp32's own maps move when the
image gets noise of 1e-3: a model whose maps change with that (a deep network with random weights, such
as ResNet-101 here) cannot have bf16 maps that follow fp32's either.

    python benchmarks/explain_speed.py [--repeats 3] [--threads N] [--arch gridtd]
    python benchmarks/explain_speed.py --arch sat --encoder resnet101 --image-size 256   # the SAT tutorial's size
    python benchmarks/explain_speed.py --no-bf16   # float32 only (a CPU without bfloat16 units)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import platform
import statistics
import time

import torch
from torch import nn

import captionlens as cl
from captionlens.explain import engine, native_bf16
from captionlens.models import ARCHITECTURES, ENCODERS

PIXEL_METHODS = ("lrp", "gradient_x_input", "guided_backprop", "guided_gradcam")
REDUCED = ("bf16", "bf16-vision")  # the reduced precisions, each against fp32


def papers_size(arch: str = "gridtd", encoder: str = "vgg16", image_size: int = 224):
    """What the benchmarks here measure at the papers' size: a captioner (hidden/embedding 512, a
    vocabulary of 10 000 words, random weights, Kaiming-initialised convolutions: PyTorch's default init
    starves VGG16's pixels of relevance), a random image [3, S, S] and the vocabulary (a caption is its
    first words)."""
    vocab = [f"word{i}" for i in range(10_000 - 4)]
    cap = cl.build_captioner(arch, encoder=encoder, vocab=vocab, hidden_size=512, embed_size=512, seed=0,
                             encoder_options={"image_size": image_size})
    for module in cap.model.encoder.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    image = torch.rand(3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    return cap, image, vocab


def machine() -> str:
    """Which CPU and PyTorch gave the figures printed after it (ratios compare across machines, times do not)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    except OSError:
        model = ""
    return (f"{model or platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, PyTorch "
            f"{torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), native bf16: {native_bf16()}")


def timed(function, repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        function()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def side_by_side(functions, repeats: int) -> tuple[list[float], list]:
    """Median seconds of the functions run in turn (after one warm-up each), and their last results."""
    results = [function() for function in functions]
    times: list[list[float]] = [[] for _ in functions]
    for _ in range(repeats):
        for i, function in enumerate(functions):
            began = time.perf_counter()
            results[i] = function()
            times[i].append(time.perf_counter() - began)
    return [statistics.median(t) for t in times], results


def pearson_per_word(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    return [float(torch.corrcoef(torch.stack([x.flatten(), y.flatten()]).double())[0, 1]) for x, y in zip(a, b)]


def lowest_pearson(a: torch.Tensor, b: torch.Tensor) -> str:
    """The lowest per-word Pearson correlation of two stacks of maps, and how many words had a map
    that is constant (all zero: no correlation is defined), if any."""
    found = pearson_per_word(a, b)
    defined = [r for r in found if r == r]
    text = f"{min(defined):.4f}" if defined else "undefined"
    return text + (f" ({len(found) - len(defined)} constant maps left out)" if len(defined) < len(found) else "")


@contextlib.contextmanager
def batching(kernels_see_words: bool):
    """Explanations computed inside this block with ``engine.words_backward(..., kernels_see_words)``,
    whichever the method would use; yields the list of what the method asked for."""
    current, asked = engine.words_backward, []

    def words_backward(*args, **options):
        asked.append(options.pop("kernels_see_words", True))
        return current(*args, **options, kernels_see_words=kernels_see_words)
    engine.words_backward = words_backward
    try:
        yield asked
    finally:
        engine.words_backward = current


def conservation_errors(cap, image, caption) -> dict[str, float]:
    """LRP's conservation error |pixels + words (+ learned positions) − logit| / the largest logit, in
    each precision, where LRP conserves: on a copy with every bias zeroed, ε → 0."""
    conserving = cap.with_model(copy.deepcopy(cap.model))
    with torch.no_grad():
        for name, parameter in conserving.model.named_parameters():
            if name.endswith("bias"):
                parameter.zero_()
    errors = {}
    for precision in ("fp32", *REDUCED):
        e = cl.explain(conserving, image, caption, method="lrp", epsilon=1e-9, precision=precision)
        total = e.image.sum(dim=(1, 2)) + e.preceding.sum(dim=1) + sum(e.extra.values(), 0)  # learned positions
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
    parser.add_argument("--no-bf16", action="store_true",
                        help="skip bfloat16 against float32 (where the CPU has no bfloat16 units it only shows bf16 slower)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine())
    cap, image, vocab = papers_size(args.arch, args.encoder, args.image_size)
    caption = vocab[: args.words]

    (lrp, gradient), _ = side_by_side([lambda: cl.explain(cap, image, caption, method="lrp"),
                                       lambda: cl.explain(cap, image, caption, method="gradient_x_input")], args.repeats)
    loop = timed(lambda: [cl.explain(cap, image, caption, method="lrp", words=[t]) for t in range(args.words)],
                 max(1, args.repeats // 2))
    print(f"{args.arch}, {args.encoder} {args.image_size}x{args.image_size}, hidden/embed 512, vocab 10k, {args.words} words, {args.threads} threads")
    print(f"  LRP, batched over words     {lrp:7.2f} s")
    print(f"  input-gradient pass         {gradient:7.2f} s")
    print(f"  LRP, per-word loop          {loop:7.2f} s")
    print(f"  LRP / gradient pass         {lrp / gradient:7.2f}x   (target ≤ 1.5)")
    print(f"  per-word loop / LRP batched {loop / lrp:7.2f}x   (target ≥ 10)")

    print("words as a batch the kernels see (torch.func.vmap) vs convolutions word by word (is_grads_batched), fp32,"
          " every method both ways interleaved in one loop")
    asked: dict[tuple[str, bool], list[bool]] = {}

    def run(method, kernels_see_words):
        with batching(kernels_see_words) as asking:
            explanation = cl.explain(cap, image, caption, method=method)
        asked[method, kernels_see_words] = list(asking)
        return explanation
    ways = [(method, kernels_see_words) for method in PIXEL_METHODS for kernels_see_words in (True, False)]
    times, results = side_by_side([lambda way=way: run(*way) for way in ways], args.repeats)
    timed_as = dict(zip(ways, times))
    explained_as = dict(zip(ways, results))
    for method in PIXEL_METHODS:
        batched, looped = timed_as[method, True], timed_as[method, False]
        as_batch, word_by_word = explained_as[method, True], explained_as[method, False]
        difference = float((as_batch.image - word_by_word.image).abs().max() / word_by_word.image.abs().max())
        wanted = asked[method, True]
        used = "batch" if all(wanted) else "word by word" if not any(wanted) else "both"
        print(f"  {method:18s} batch {batched:7.2f} s vs word by word {looped:7.2f} s  ratio {batched / looped:5.2f}  "
              f"(target ≤ 0.6)  max |difference| / max |map| {difference:.1e}  (captionlens uses: {used})")
    print(f"  LRP / gradient pass, both as a batch {timed_as['lrp', True] / timed_as['gradient_x_input', True]:7.2f}x   "
          f"(target ≤ 1.1)")

    if args.no_bf16:
        return
    print(f"bfloat16 vs float32 (native bf16 here: {native_bf16()}): bf16 all of the model, bf16-vision the image "
          "encoder only")
    nudged = (image + 1e-3 * torch.randn(image.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    for method in PIXEL_METHODS:
        times, results = side_by_side([lambda method=method, precision=precision: cl.explain(
            cap, image, caption, method=method, precision=precision) for precision in REDUCED + ("fp32",)], args.repeats)
        full, single = times[-1], results[-1]
        stability = lowest_pearson(cl.explain(cap, nudged, caption, method=method).image, single.image)
        print(f"  {method:18s} fp32 {full:7.2f} s  [fp32 itself, image ± 1e-3 noise: lowest Pearson {stability}]")
        for precision, fast, half in zip(REDUCED, times, results):
            print(f"    {precision:12s} {fast:7.2f} s  ratio {fast / full:5.2f}  (target ≤ 0.4)  "
                  f"lowest per-word Pearson {lowest_pearson(half.image, single.image)} (target ≥ 0.999)")
        if method == "lrp":
            errors = conservation_errors(cap, image, caption)
            print("    conservation error (biases 0, ε → 0) " + ", ".join(f"{p} {e:.1e}" for p, e in errors.items()))

if __name__ == "__main__":
    main()
