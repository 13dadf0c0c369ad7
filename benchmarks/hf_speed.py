"""LRP on a Hugging Face captioner at a realistic size, measured side by side in one run (issue 24):
a ViT-S/16 at 224 px (384 wide, 12 layers, 6 heads) with a 6-layer GPT-2-sized decoder (768 wide, 12
heads, GPT-2's 50,257-token vocabulary) as a VisionEncoderDecoder, random weights, all 15 tokens of a
caption.

* LRP: one forward and one batched backward for the 15 tokens;
* the plain input-gradient pass, same tokens, same batching (what LRP's rules cost on top of it), the two
  interleaved;
* lxt's documented recipe — a forward and a backward for each token in turn — run with the same rules
  (so the maps are equal and only the recipe differs);
* peak memory of LRP with all tokens in one pass and with ``max_words_per_pass=4``, each in a fresh
  process: the process's peak and what explaining added to it;
* LRP in bfloat16 (all of the model: "bf16"; the ViT only: "bf16-vision") against float32, interleaved,
  with the lowest per-token Pearson correlation of the maps (issue 29's targets: ≤ 0.4×, ≥ 0.999).

Targets: LRP ≤ 1.3× the gradient pass; the per-token recipe ≥ 3× slower than one batched pass.

    python benchmarks/hf_speed.py [--threads 2] [--repeats 3]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from explain_speed import REDUCED, lowest_pearson, machine, side_by_side

TOKENS = 15


def build(seed: int = 0):
    import transformers as T
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(seed)
    encoder = T.ViTConfig(image_size=224, patch_size=16, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                          intermediate_size=1536)
    decoder = T.GPT2Config(vocab_size=50257, n_positions=128, n_embd=768, n_layer=6, n_head=12, add_cross_attention=True,
                           is_decoder=True, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    config = T.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id, config.eos_token_id = 0, 2, 1
    model = T.VisionEncoderDecoderModel(config).eval()
    words = [f"t{i}" for i in range(50257)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="t3"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = T.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="t0", eos_token="t1", pad_token="t2",
                                          unk_token="t3")
    import captionlens as cl

    return cl.from_hf(model, tokenizer)


def inputs(cap):
    import numpy as np

    image = np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    caption = [f"t{i}" for i in torch.randint(10, 50000, (TOKENS,), generator=torch.Generator().manual_seed(1)).tolist()]
    return image, caption


def peak(words_per_pass: int | None, threads: int) -> tuple[float, float]:
    """(peak RSS of the process, how far LRP on the 15 tokens raised it above the RSS it started from),
    MiB, in a fresh process. The peak is reset (Linux's /proc/self/clear_refs) once the model is
    built, so building it does not hide what explaining costs."""
    code = f"""
import torch, sys
sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
torch.set_num_threads({threads})
from hf_speed import build, inputs
import captionlens as cl
def status(field):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 1024
cap = build(); image, caption = inputs(cap)
cl.explain(cap, image, caption[:1], method="lrp")  # warm-up: one-time allocations out of the way
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS:")
cl.explain(cap, image, caption, method="lrp", max_words_per_pass={words_per_pass!r})
peak = status("VmHWM:")
print(peak, peak - before)
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    total, added = out.strip().splitlines()[-1].split()
    return float(total), float(added)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import captionlens as cl

    cap = build()
    image, caption = inputs(cap)
    print(machine())
    (lrp, gradient), _ = side_by_side([lambda: cl.explain(cap, image, caption, method="lrp"),  # interleaved
                                       lambda: cl.explain(cap, image, caption, method="gradient_x_input")], args.repeats)
    began = time.perf_counter()
    for k in range(TOKENS):
        cl.explain(cap, image, caption, method="lrp", words=[k])
    per_token = time.perf_counter() - began
    batched = cl.explain(cap, image, caption, method="lrp")
    alone = [cl.explain(cap, image, caption, method="lrp", words=[k]) for k in (0, 7, 14)]
    difference = max(float((a.image[0] - batched.image[k]).abs().max() / batched.image[k].abs().max())
                     for a, k in zip(alone, (0, 7, 14)))
    print(f"ViT-S/16 224 + 6-layer GPT-2-sized decoder, {TOKENS} tokens, {args.threads} threads, median of {args.repeats}:")
    print(f"  LRP, one forward + one batched backward   {lrp:7.2f} s")
    print(f"  input-gradient pass, same batching         {gradient:7.2f} s   LRP / gradient = {lrp / gradient:.2f}x "
          "(target ≤ 1.3)")
    print(f"  lxt's recipe: forward + backward per token {per_token:7.2f} s   per-token / batched = "
          f"{per_token / lrp:.2f}x (target ≥ 3); largest map difference {difference:.1e} of the map's max")
    (all_at_once, added_at_once), (bounded, added_bounded) = peak(None, args.threads), peak(4, args.threads)
    print(f"  peak RSS, LRP of {TOKENS} tokens in one pass {all_at_once:7.0f} MiB (+{added_at_once:.0f} MiB while "
          f"explaining); with max_words_per_pass=4 {bounded:7.0f} MiB (+{added_bounded:.0f} MiB)")
    times, results = side_by_side([lambda precision=precision: cl.explain(cap, image, caption, method="lrp",
                                                                          precision=precision) for precision in
                                   (*REDUCED, "fp32")], args.repeats)
    for precision, fast, half in zip(REDUCED, times, results):
        print(f"  LRP, {precision:12s} {fast:7.2f} s vs fp32 {times[-1]:7.2f} s  ratio {fast / times[-1]:.2f} (target ≤ 0.4)  "
              f"lowest per-token Pearson {lowest_pearson(half.image, results[-1].image)} (target ≥ 0.999)")


if __name__ == "__main__":
    main()
