"""What the experiments share: a captioner's beam-search captions of a split (or of a subset of it),
the object words in them labelled true or false positive against the images' ground truth (COCO
boxes or the reference captions, through the synonym list), the model's probability of each
predicted word, and explanations computed in batches of images decoded by worker processes."""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from tqdm import tqdm

from ..data.bundle import DataBundle
from ..data.ground_truth import GroundTruth, ObjectsUnavailable, Subset
from ..data.images import decoded_batches
from ..data.karpathy import ImageRecord
from ..data.synonyms import Synonyms
from ..explain import Explanation, explain_pixels, resolved_parameters
from ..explain.store import ExplanationStore
from ..models import Caption, Captioner
from .captioning import caption_records
from .explain_split import fill


@dataclass(frozen=True)
class Mention:
    """An object word in a predicted caption (the head word of a phrase such as "teddy bear")."""

    image: int  # index into Predictions.records
    position: int  # word index in the caption
    word: str
    category: str
    true_positive: bool  # the image holds an object of this category


@dataclass
class Predictions:
    """The captions of a split's images; ``truth`` is ``None`` where the dataset has no ground truth
    for objects (``missing_truth`` then says why), so only the caption metrics can be computed."""

    records: list[ImageRecord]
    captions: list[Caption]
    synonyms: Synonyms | None
    truth: GroundTruth | None
    image_size: int  # the model's input side: images are decoded at this size
    workers: int = 0  # image-decoding worker processes
    missing_truth: str = ""

    def require_truth(self) -> GroundTruth:
        if self.truth is None:
            raise ObjectsUnavailable(self.missing_truth)
        return self.truth

    @cached_property
    def objects(self) -> list[set[str]]:
        """Ground-truth categories per image."""
        truth = self.require_truth()
        return [truth.objects(r) for r in self.records]

    def mentions(self) -> list[Mention]:
        """Every object word of every caption, labelled against the ground truth."""
        objects, found = self.objects, []
        for index, caption in enumerate(self.captions):
            for obj in self.synonyms.find(caption.words):
                found.append(Mention(index, obj.position, caption.words[obj.position], obj.category,
                                     obj.category in objects[index]))
        return found

    def frequent_mentions(self, min_count: int) -> list[Mention]:
        """Mentions of the object words predicted more than ``min_count`` times (the papers: 50)."""
        mentions = self.mentions()
        counts = Counter(m.word for m in mentions)
        return [m for m in mentions if counts[m.word] > min_count]

    def images(self, batches: Sequence[Sequence[int]]) -> Iterator[torch.Tensor]:
        """The images of each batch of record indices, decoded at the model's input size: uint8
        ``[B, 3, S, S]`` (what ``explain_batch`` and ``Captioner.preprocess`` take), in order."""
        paths = [[self.records[i].path for i in batch] for batch in batches]
        return decoded_batches(paths, self.image_size, self.workers)


def predict(captioner: Captioner, data: DataBundle, split: str = "test", beam_size: int = 3,
            limit: int | None = None, progress: bool = True, ground_truth: str = "auto",
            subset: Subset | None = None, workers: int = 0,
            known: Callable[[ImageRecord], Caption | None] | None = None) -> Predictions:
    """Caption ``split`` (the images of ``subset`` if given, then the first ``limit``) with beam
    search on the cached grid features; ``known(record)`` supplies captions already made (e.g. in an
    explanation store): when it knows them all, no image is encoded at all."""
    records = data.split(split)
    if not records:
        raise ValueError(f"the {split!r} split of {data.name} has no images")
    indices = list(range(len(records)))
    if subset is not None:
        chosen = {id(r) for r in subset.select(records, data.synonyms)}
        indices = [i for i in indices if id(records[i]) in chosen]
        if not indices:
            raise ValueError(f"no {split} image of {data.name} is in the {subset.describe()}")
    indices = indices[:limit]
    captions = [known(records[i]) if known else None for i in indices]
    if any(c is None for c in captions):
        captions = [k or c for k, c in zip(captions, caption_records(captioner, data, split, indices, beam_size,
                                                                     progress, workers))]
    try:
        truth, missing = data.ground_truth(ground_truth), ""
    except ObjectsUnavailable as error:
        truth, missing = None, str(error)
    return Predictions([records[i] for i in indices], captions, data.synonyms, truth, captioner.image_size, workers,
                       missing)


def image_batches(items: Sequence, batch_size: int) -> Iterator[list[tuple[int, list]]]:
    """Items (anything with an ``.image`` index) grouped by image, in batches of at most
    ``batch_size`` images: each batch is a list of (image index, its items)."""
    groups: dict[int, list] = {}
    for item in items:
        groups.setdefault(item.image, []).append(item)
    images = sorted(groups)
    for start in range(0, len(images), batch_size):
        yield [(image, groups[image]) for image in images[start: start + batch_size]]


def explain_into_store(captioner: Captioner, predictions: Predictions, store: ExplanationStore,
                       mentions: Sequence[Mention], method: str, batch_size: int = 32,
                       progress: bool = True) -> "StoredExplanations":
    """The explanations of ``mentions`` by ``method`` with its default parameters: read from the
    store, after computing (in batches of images) and writing those it does not hold yet."""
    parameters = resolved_parameters(method)
    store.add_methods({method: parameters})
    records = predictions.records
    missing = sorted(i for i in {m.image for m in mentions} if not store.has(records[i].image_id, method))
    batches = [missing[i: i + batch_size] for i in range(0, len(missing), batch_size)]
    for batch, pixels in tqdm(zip(batches, predictions.images(batches)), total=len(batches),
                              desc=f"explain ({method})", disable=not progress):
        fill(captioner, store, [records[i] for i in batch], [predictions.captions[i] for i in batch], pixels,
             {method: parameters})
    return StoredExplanations(store, records, method)


class StoredExplanations:
    """``stored[mention]``: its single-word Explanation, read from the store when asked for (memory
    bounded by the store's small cache, not by the number of mentions)."""

    def __init__(self, store: ExplanationStore, records: Sequence[ImageRecord], method: str) -> None:
        self.store, self.records, self.method = store, records, method

    def __getitem__(self, mention: Mention) -> Explanation:
        image_id = self.records[mention.image].image_id
        explanation = self.store.explanation(image_id, self.method)
        if mention.position not in explanation.positions:
            raise ValueError(f"the store {self.store.path} did not explain word {mention.position} "
                             f"({mention.word!r}) of image {image_id}: it holds {self.store.attributes['words']} "
                             "words; make it with `explain-split --words all` or the same --synonyms")
        return row_of(explanation, explanation.positions.index(mention.position))


def row_of(explanation: Explanation, row: int) -> Explanation:
    """The single-word explanation in row ``row``."""
    return Explanation(explanation.method, [explanation.words[row]], [explanation.positions[row]], explanation.tokens,
                       explanation.image[row: row + 1], explanation.grid[row: row + 1],
                       explanation.preceding[row: row + 1], explanation.score[row: row + 1], explanation.parameters,
                       {k: v[row: row + 1] for k, v in explanation.extra.items()})


def word_probabilities(captioner: Captioner, predictions: Predictions, mentions: Sequence[Mention],
                       batch_size: int = 64) -> np.ndarray:
    """The model's softmax probability of each mentioned word at its position (teacher forcing on
    the predicted caption)."""
    return word_confidence(captioner, predictions, mentions, batch_size)[0]


@torch.no_grad()
def word_confidence(captioner: Captioner, predictions: Predictions, mentions: Sequence[Mention],
                    batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The model's own confidence in each mentioned word (teacher forcing on the predicted caption):
    its softmax probability and the entropy H = −Σ_v p_v log p_v (nats) of the next-word distribution
    at its position; two arrays [len(mentions)]."""
    probabilities, entropies = np.zeros(len(mentions)), np.zeros(len(mentions))
    index = {m: k for k, m in enumerate(mentions)}
    batches = list(image_batches(mentions, batch_size))
    for batch, images in zip(batches, predictions.images([[i for i, _ in batch] for batch in batches])):
        pixels = captioner.preprocess(list(images))
        ids = [predictions.captions[i].token_ids for i, _ in batch]
        longest = max(len(t) for t in ids)
        tokens = torch.tensor([t + [captioner.vocab.pad_id] * (longest - len(t)) for t in ids], device=pixels.device)
        log_probs = torch.log_softmax(captioner.model(pixels, tokens[:, :-1]), dim=-1)  # [B, T, V]
        for row, (_, group) in enumerate(batch):
            for mention in group:
                distribution = log_probs[row, mention.position]  # [V]
                probabilities[index[mention]] = float(distribution[tokens[row, mention.position + 1]].exp())
                entropies[index[mention]] = float(torch.special.entr(distribution.exp()).sum())  # 0·log 0 = 0
    return probabilities, entropies


def explain_mentions(captioner: Captioner, predictions: Predictions, mentions: Sequence[Mention], method: str,
                     shift: float = 0.0, batch_size: int = 32) -> dict[Mention, Explanation]:
    """Each mention's single-word explanation by ``method`` (default parameters), computed now in
    batches of images (nothing stored) — the inputs shifted by ``shift`` in the model's normalised
    input space (the input invariance test)."""
    found: dict[Mention, Explanation] = {}
    batches = list(image_batches(mentions, batch_size))
    for batch, decoded in zip(batches, predictions.images([[i for i, _ in b] for b in batches])):
        pixels = captioner.preprocess(list(decoded)) + shift
        positions = [[m.position for m in group] for _, group in batch]
        captions = [predictions.captions[image] for image, _ in batch]
        for (_, group), explanation in zip(batch, explain_pixels(captioner, pixels, captions, method, positions)):
            for row, mention in enumerate(group):
                found[mention] = row_of(explanation, row)
    return found
