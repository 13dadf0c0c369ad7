"""Caption a split and score it: BLEU, object precision/recall against the boxes' categories, the
biased word's hallucination rate, and the same BLEU with image features shuffled across images
(a model that uses the image loses much of its score)."""
from __future__ import annotations

from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

from ..data.bundle import DataBundle
from ..data.images import decoded_batches, normalise
from ..features import grid_features
from ..models import Caption, Captioner
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


def caption_records(captioner: Captioner, data: DataBundle, split: str, indices: list[int], beam_size: int,
                     progress: bool, workers: int, batch_size: int = 32) -> list[Caption]:
    """Captions of the split's images at ``indices``: by beam search on the cached grid features, or —
    for a captioner that captions from pixels (a Hugging Face model's ``generate``) — from the images."""
    if captioner.caches_features:
        return captioner.caption_features(split_features(captioner, data, split, progress, workers)[indices],
                                          beam_size)
    records = data.split(split)
    chunks = [indices[start: start + batch_size] for start in range(0, len(indices), batch_size)]
    encoder = captioner.model.encoder
    captions: list[Caption] = []
    for pixels in tqdm(decoded_batches([[records[i].path for i in chunk] for chunk in chunks], captioner.image_size,
                                       workers), total=len(chunks), desc=f"caption {split}", disable=not progress):
        captions += captioner.caption_pixels(normalise(pixels.to(captioner.device), encoder.mean, encoder.std),
                                             beam_size)
    return captions


def evaluate_captioner(captioner: Captioner, data: DataBundle, split: str = "test", beam_size: int = 3,
                       shuffle_seed: int = 0, progress: bool = True) -> dict:
    """The demo's summary numbers for one model on one split."""
    records = data.split(split)
    references = [r.captions for r in records]
    shuffled = torch.from_numpy(np.random.default_rng(shuffle_seed).permutation(len(records)))
    if captioner.caches_features:
        grids = split_features(captioner, data, split, progress)
        words = [c.words for c in captioner.caption_features(grids, beam_size)]
        shuffled_words = [c.words for c in captioner.caption_features(grids[shuffled], beam_size)]
    else:  # a captioner from pixels: image i's features shuffled in are image shuffled[i]'s, and a caption
        # is a function of its image's features, so image i is given the caption of image shuffled[i]
        words = [c.words for c in caption_records(captioner, data, split, list(range(len(records))), beam_size,
                                                  progress, workers=0)]
        shuffled_words = [words[j] for j in shuffled.tolist()]
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
