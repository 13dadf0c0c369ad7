"""captionlens: explain image-captioning models beyond attention.

    import captionlens as cl
    cap = cl.load("runs/demo/gridtd")
    captions = cap.caption(["img.png"], beam_size=3)
    exp = cl.explain(cap, "img.png", captions[0], method="lrp")
"""
from .api import (METHODS, AuditReport, Captioner, audit_lrp, Explanation, ExplanationStore, build_captioner, build_encoder, explain,
                  explain_batch, explain_image, from_hf, load, train_captioner)
from .explain import methods_for
from .models import Caption, CaptionerConfig
from .train import TrainConfig

__version__ = "0.1.0"
__all__ = ["METHODS", "AuditReport", "Caption", "audit_lrp", "Captioner", "CaptionerConfig", "Explanation", "ExplanationStore", "build_captioner", "build_encoder",
           "explain", "explain_batch", "explain_image", "from_hf", "load", "methods_for", "train_captioner", "TrainConfig"]
