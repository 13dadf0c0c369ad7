"""Caption a split and score it: BLEU, object precision/recall against the boxes' categories, the
biased word's hallucination rate, and the same BLEU with image features shuffled across images
(a model that uses the image loses much of its score)."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch

from ..data.bundle import DataBundle
from ..features import grid_features
from ..models import Captioner
from .caption_metrics import bleu
from .metrics import hallucination_rate, object_precision_recall


def split_features(captioner: Captioner, data: DataBundle, split: str, progress: bool = True,
                   workers: int = 0) -> torch.Tensor:
    """The encoder grids ``[N, C, h, w]`` of every image of ``split`` (cached on disk)."""
    records = data.split(split)
    grids = grid_features(captioner.model.encoder, [r.path for r in records], data.cache_dir,
                          f"{captioner.config.encoder}-{split}", device=captioner.device, progress=progress,
                          workers=workers)
    return torch.from_numpy(np.asarray(grids, dtype=np.float32))


def evaluate_captioner(captioner: Captioner, data: DataBundle, split: str = "test", beam_size: int = 3,
                       shuffle_seed: int = 0, progress: bool = True) -> dict:
    """The demo's summary numbers for one model on one split."""
    records = data.split(split)
    grids = split_features(captioner, data, split, progress)
    references = [r.captions for r in records]
    words = [c.words for c in captioner.caption_features(grids, beam_size)]
    shuffled = torch.from_numpy(np.random.default_rng(shuffle_seed).permutation(len(records)))
    shuffled_words = [c.words for c in captioner.caption_features(grids[shuffled], beam_size)]
    result = {
        "images": len(records),
        "bleu4": bleu(words, references)[3],
        "bleu4_shuffled_features": bleu(shuffled_words, references)[3],
    }
    if data.instance_files and data.synonyms is not None:
        truth = data.ground_truth("boxes")
        objects = [truth.objects(r) for r in records]
        scores = object_precision_recall(words, objects, data.synonyms)
        result.update(object_precision=scores.precision, object_recall=scores.recall)
        if data.shapes_config:
            word, partner = data.shapes_config["bias_word"], data.shapes_config["bias_partner"]
            rate = hallucination_rate(words, objects, data.synonyms, word, partner)
            result.update(hallucination_rate=rate.rate, hallucination=asdict(rate) | {"word": word, "partner": partner})
    result["examples"] = [{"image": str(r.path.name), "caption": " ".join(w)} for r, w in zip(records[:5], words)]
    return result
