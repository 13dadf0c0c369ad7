"""Explanations for every word of a caption: LRP, Grad-CAM, Guided Grad-CAM, guided backprop,
gradient × input, attention and attention rollout, all with the same shapes (see ``Explanation``).

    exp = explain(cap, image, "a red circle".split(), method="lrp", epsilon=0.01)
    exp.image      # [T, H, W]    exp.grid  # [T, h, w]
    exp.preceding  # [T, T+1]     exp.score # [T]

The methods register themselves (``methods.register_method``) in ``lrp.py``, ``gradients.py`` and
``attention.py``; ``explainer.py`` runs them; ``rules.py`` holds each LRP rule once.
"""
from . import attention, gradients, lrp  # noqa: F401  (registers the methods)
from .explainer import (MAX_WORDS, PRECISION_CHOICES, PRECISIONS, explain, explain_batch, explain_pixels,
                        huge_page_buffers, method_parameters, native_bf16, resolve_precision, resolved_parameters)
from .explanation import Explanation
from .methods import METHOD_INFO, METHODS, MethodInfo, method_info, methods_for

__all__ = ["MAX_WORDS", "METHOD_INFO", "METHODS", "PRECISION_CHOICES", "PRECISIONS", "Explanation", "MethodInfo", "explain", "explain_batch",
           "explain_pixels", "huge_page_buffers", "method_info", "method_parameters", "methods_for", "native_bf16", "resolve_precision",
           "resolved_parameters"]
