"""Explain every image of a split into an explanation store, in fixed batches, resumably, and — under
``torchrun`` — sharded over the ranks.

The split is cut into batches of ``batch_size`` images in dataset order; batch b is done by rank
b mod world size. A batch always holds the same images, whether one process or eight run and
whether it runs for the first time or after a crash, so every number in the store is the same as in
an uninterrupted single-process run. A batch whose images are all complete is skipped.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from ..data.bundle import DataBundle
from ..data.images import decoded_batches, normalise
from ..data.karpathy import ImageRecord
from ..data.synonyms import Synonyms
from ..distributed import Ranks, current
from ..errors import integer
from ..explain import explain_batch, resolve_precision, resolved_parameters
from ..explain.store import ExplanationStore
from ..models import Caption, Captioner

DEFAULT_METHODS = ("lrp", "gradcam", "guided_gradcam", "attention")


def explained_positions(words: Sequence[str], mode: str, synonyms: Synonyms | None) -> list[int]:
    """Every word (``all``) or the object words (``objects``: the head word of each object phrase)."""
    if mode == "all":
        return list(range(len(words)))
    if synonyms is None:
        raise ValueError("--words objects needs a synonym list (--synonyms) to know the object words")
    return [o.position for o in synonyms.find(words)]


def fill(captioner: Captioner, store: ExplanationStore, records: Sequence[ImageRecord], captions: Sequence[Caption],
         pixels, methods: dict[str, dict], max_words_per_pass: int | str | None = None) -> None:
    """Write the explanations of one batch of images (their ``captions`` already in the store) by each
    method that the store does not yet hold completely for every one of them. ``pixels``: the
    images decoded at the model's input size, uint8 [B, 3, S, S]; ``methods``: each method's
    resolved parameters (precision included)."""
    ids = [r.image_id for r in records]
    positions = [store.positions(i) for i in ids]
    for method, parameters in methods.items():
        if all(store.has(i, method) for i in ids):
            continue
        explanations = explain_batch(captioner, list(pixels), list(captions), method, words=positions,
                                     max_words_per_pass=max_words_per_pass, **parameters)
        for image_id, explanation in zip(ids, explanations):
            store.write_explanation(image_id, explanation)  # kept if another writer completed it meanwhile


def stored_caption(store: ExplanationStore, image_id: int) -> Caption:
    record = store.caption(image_id)
    return Caption(record["words"], record["token_ids"], record["caption_score"])


def open_store(captioner: Captioner, path: str | Path, split: str, words: str, methods: dict[str, dict],
               ranks: Ranks) -> ExplanationStore:
    """Rank 0 creates (or checks and reopens) the store; the other ranks open it after it."""
    with ranks.main_first():
        store = (ExplanationStore.create(path, captioner.fingerprint(), split, words, methods) if ranks.is_main
                 else ExplanationStore.open(path, "r+"))
    return store


def explain_split(captioner: Captioner, data: DataBundle, store_path: str | Path, split: str = "test",
                  methods: Sequence[str] = DEFAULT_METHODS, words: str = "all", batch_size: int = 8,
                  limit: int | None = None, beam_size: int = 3, workers: int = 0,
                  parameters: dict[str, dict] | None = None, progress: bool = True, precision: str = "fp32",
                  max_words_per_pass: int | str | None = None) -> ExplanationStore:
    """Caption the split's images (beam search) and explain every word (or every object word) by each
    method into the store at ``store_path``; this rank's share of the batches under torchrun.

    Another process writing the same store (a second command on it) shares the work: a batch whose
    images it is writing is skipped and taken up at the end, once its lock is free, if still unfinished."""
    ranks = current()
    if limit is not None:
        integer("limit", limit, 1)  # a limit of -1 once dropped the last image silently
    integer("batch_size", batch_size, 1)
    records = data.split(split)[:limit]
    if not records:
        raise ValueError(f"the {split!r} split of {data.name} has no images")
    precision = resolve_precision(precision, captioner.device, captioner.model)
    chosen = {m: resolved_parameters(m, precision, **(parameters or {}).get(m, {})) for m in methods}
    store = open_store(captioner, store_path, split, words, chosen, ranks)
    batches = [records[i: i + batch_size] for i in range(0, len(records), batch_size)]
    def unfinished(batch: list[ImageRecord]) -> bool:
        return not all(store.has_caption(r.image_id) and all(store.has(r.image_id, m) for m in chosen) for r in batch)

    def explain_batch_into_store(batch: list[ImageRecord], pixels: torch.Tensor) -> None:
        encoder = captioner.model.encoder
        captions = captioner.caption_pixels(normalise(pixels.to(captioner.device), encoder.mean, encoder.std),
                                            beam_size)
        for record, caption in zip(batch, captions):
            store.write_caption(record.image_id, record.path.name, caption.words, caption.token_ids,
                                explained_positions(caption.words, words, data.synonyms), caption.score)
        fill(captioner, store, batch, [stored_caption(store, r.image_id) for r in batch], pixels, chosen,
             max_words_per_pass)

    todo = [b for b in ranks.shard(batches) if unfinished(b)]
    images = decoded_batches([[r.path for r in batch] for batch in todo], captioner.image_size, workers)
    busy_elsewhere = []
    for batch, pixels in tqdm(zip(todo, images), total=len(todo), desc=f"explain {split} (rank {ranks.rank})",
                              disable=not progress or not ranks.is_main):
        with store.claim([r.image_id for r in batch]) as ours:
            if not ours:
                busy_elsewhere.append(batch)
            elif unfinished(batch):
                explain_batch_into_store(batch, pixels)
    for batch in busy_elsewhere:  # wait for the other writer; do what it left undone
        with store.claim([r.image_id for r in batch], wait=True):
            if unfinished(batch):
                explain_batch_into_store(batch, next(decoded_batches([[r.path for r in batch]],
                                                                     captioner.image_size, 0)))
    ranks.barrier()
    return store
