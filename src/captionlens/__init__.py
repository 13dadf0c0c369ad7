"""captionlens: explain image-captioning models beyond attention.

    import captionlens as cl
    cap = cl.load("runs/demo/gridtd")
    captions = cap.caption(["img.png"], beam_size=3)
    exp = cl.explain(cap, "img.png", captions[0], method="lrp")
"""
import os as _os

# Before torch is imported: PyTorch's CPU allocator reads THP_MEM_ALLOC_ENABLE once, at its first
# allocation, and with it asks Linux for transparent huge pages (madvise) for buffers of 2 MB and more.
# Explaining a caption allocates and frees gigabytes of relevance and gradients, and on 4 KiB pages every
# first touch of a fresh buffer is a page fault: ResNet-101's 15-word LRP took 561 000 faults and 1.3 s
# of kernel time a call (docs/benchmarks.md, "Page faults"). Export THP_MEM_ALLOC_ENABLE=0 to keep
# PyTorch's default; ``captionlens.explain.huge_page_buffers()`` tells which this process got.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from .api import (METHODS, AuditReport, Captioner, audit_lrp, Explanation, ExplanationStore, build_captioner, build_encoder, explain,
                  explain_batch, explain_image, from_hf, load, train_captioner)
from .explain import methods_for
from .models import Caption, CaptionerConfig
from .train import TrainConfig

__version__ = "0.1.0"
__all__ = ["METHODS", "AuditReport", "Caption", "audit_lrp", "Captioner", "CaptionerConfig", "Explanation", "ExplanationStore", "build_captioner", "build_encoder",
           "explain", "explain_batch", "explain_image", "from_hf", "load", "methods_for", "train_captioner", "TrainConfig"]
