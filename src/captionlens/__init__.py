"""captionlens: explain image-captioning models beyond attention.

    import captionlens as cl
    cap = cl.load("runs/demo/gridtd")
    captions = cap.caption(["img.png"], beam_size=3)
"""
from .api import Captioner, build_captioner, build_encoder, load, train_captioner
from .models import Caption, CaptionerConfig

__version__ = "0.1.0"
__all__ = ["Caption", "Captioner", "CaptionerConfig", "build_captioner", "build_encoder", "load", "train_captioner"]
