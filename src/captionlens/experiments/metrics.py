"""Object metrics: object-word precision/recall against ground-truth objects, and the hallucination
rate of one object word with a Wilson 95% interval. (Caption metrics: ``caption_metrics.py``.)"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..data.synonyms import Synonyms


@dataclass
class ObjectScores:
    precision: float  # mentioned categories that are in the image / all mentioned
    recall: float  # image categories that are mentioned / all image categories
    mentioned: int
    present: int


def object_precision_recall(captions: Sequence[Sequence[str]], image_objects: Sequence[set[str]],
                            synonyms: Synonyms) -> ObjectScores:
    """Micro-averaged over images, each category counted once per image."""
    correct = mentioned = present = 0
    for words, objects in zip(captions, image_objects, strict=True):
        named = synonyms.categories_in(words)
        correct += len(named & objects)
        mentioned += len(named)
        present += len(objects)
    return ObjectScores(correct / mentioned if mentioned else 0.0, correct / present if present else 0.0,
                        mentioned, present)


@dataclass
class Rate:
    rate: float
    low: float  # Wilson 95% interval
    high: float
    count: int  # events
    total: int  # trials


def wilson_interval(count: int, total: int, z: float = 1.96) -> Rate:
    if total == 0:
        return Rate(float("nan"), float("nan"), float("nan"), 0, 0)
    p = count / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return Rate(p, max(0.0, centre - half), min(1.0, centre + half), count, total)


def hallucination_rate(captions: Sequence[Sequence[str]], image_objects: Sequence[set[str]],
                       synonyms: Synonyms, word_category: str, partner_category: str) -> Rate:
    """How often ``word_category`` is named for images that contain ``partner_category`` but not
    ``word_category`` (the biased co-occurrence the model learned, like the papers' 'shirt')."""
    hits = total = 0
    for words, objects in zip(captions, image_objects, strict=True):
        if partner_category in objects and word_category not in objects:
            total += 1
            hits += word_category in synonyms.categories_in(words)
    return wilson_interval(hits, total)


from .caption_metrics import bleu  # noqa: E402,F401  (its old home; caption metrics live in caption_metrics.py)
