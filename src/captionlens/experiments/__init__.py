"""The papers' experiments and the field's checks of explanations, one module each, each registered
with what it measures, its options, its table's columns, its findings and its part of RESULTS.md
(``registry.py``); ``workbench.py`` holds what they share (captions and explanations, computed once).

Registered (in this order): metrics (``caption_metrics.py``), ablation, correctness, hallucination and
map (``hallucination.py``), masking, finetune, faithfulness, sanity, visual_share
(``visual_words.py``).
"""
from . import (  # noqa: F401
    ablation, caption_metrics, correctness, faithfulness, finetune, hallucination, masking, sanity, visual_words)
from .registry import EXPERIMENTS, Experiment, Option, experiment, ordered

__all__ = ["EXPERIMENTS", "Experiment", "Option", "experiment", "ordered"]
