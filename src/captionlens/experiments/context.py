"""What the experiments share: a captioner's beam-search captions of a split, the object words in
them labelled true or false positive against the image's ground-truth objects (through the synonym
map), the model's probability of each predicted word, and explanations computed in batches of images."""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from ..data.bundle import DataBundle
from ..data.images import load_image
from ..data.karpathy import ImageRecord
from ..explain import Explanation, explain_batch
from ..models import Caption, Captioner
from .captioning import split_features


@dataclass(frozen=True)
class Mention:
    """An object word in a predicted caption."""

    image: int  # index into Predictions.records
    position: int  # word index in the caption
    word: str
    category: str
    true_positive: bool  # the image holds an object of this category


@dataclass
class Predictions:
    records: list[ImageRecord]
    captions: list[Caption]
    objects: list[set[str]]  # ground-truth categories per image
    synonyms: dict[str, str]
    explanations: dict[str, list[dict[int, Explanation]]] = field(default_factory=dict)

    def mentions(self) -> list[Mention]:
        found = []
        for index, caption in enumerate(self.captions):
            for position, word in enumerate(caption.words):
                category = self.synonyms.get(word)
                if category is not None:
                    found.append(Mention(index, position, word, category, category in self.objects[index]))
        return found

    def frequent_mentions(self, min_count: int) -> list[Mention]:
        """Mentions of the object words predicted more than ``min_count`` times (the papers: 50)."""
        mentions = self.mentions()
        counts = Counter(m.word for m in mentions)
        return [m for m in mentions if counts[m.word] > min_count]


def predict(captioner: Captioner, data: DataBundle, split: str = "test", beam_size: int = 3,
            limit: int | None = None, progress: bool = True) -> Predictions:
    """Caption ``split`` (its first ``limit`` images) with beam search on the cached grid features."""
    if data.objects is None or data.synonyms is None:
        raise ValueError(f"{data.root} needs an instances_*.json and a synonyms.json for the object experiments")
    records = data.split(split)[:limit]
    grids = split_features(captioner, data, split, progress)[: len(records)]
    captions = captioner.caption_features(grids, beam_size)
    return Predictions(records, captions, [data.objects.categories_in(r.image_id) for r in records], data.synonyms)


def image_batches(items: Sequence, batch_size: int) -> Iterator[list[tuple[int, list]]]:
    """Items (anything with an ``.image`` index) grouped by image, in batches of at most
    ``batch_size`` images: each batch is a list of (image index, its items)."""
    groups: dict[int, list] = {}
    for item in items:
        groups.setdefault(item.image, []).append(item)
    images = sorted(groups)
    for start in range(0, len(images), batch_size):
        yield [(image, groups[image]) for image in images[start: start + batch_size]]


def explain_mentions(captioner: Captioner, predictions: Predictions, mentions: Sequence[Mention], method: str,
                     batch_size: int = 32, progress: bool = True, **parameters) -> dict[Mention, Explanation]:
    """Explanations of the given mentions (one Explanation row each), batched over images."""
    result: dict[Mention, Explanation] = {}
    batches = list(image_batches(mentions, batch_size))
    for batch in tqdm(batches, desc=f"explain ({method})", disable=not progress):
        explanations = explain_batch(
            captioner, [load_image(predictions.records[i].path) for i, _ in batch],
            [predictions.captions[i] for i, _ in batch], method,
            words=[[m.position for m in group] for _, group in batch], **parameters)
        for (_, group), explanation in zip(batch, explanations):
            for row, mention in enumerate(group):
                result[mention] = row_of(explanation, row)
    return result


def row_of(explanation: Explanation, row: int) -> Explanation:
    """The single-word explanation in row ``row``."""
    return Explanation(explanation.method, [explanation.words[row]], [explanation.positions[row]], explanation.tokens,
                       explanation.image[row: row + 1], explanation.grid[row: row + 1],
                       explanation.preceding[row: row + 1], explanation.score[row: row + 1], explanation.parameters,
                       {k: v[row: row + 1] for k, v in explanation.extra.items()})


@torch.no_grad()
def word_probabilities(captioner: Captioner, predictions: Predictions, mentions: Sequence[Mention],
                       batch_size: int = 64) -> np.ndarray:
    """The model's softmax probability of each mentioned word at its position (teacher forcing on
    the predicted caption)."""
    probabilities = np.zeros(len(mentions))
    index = {m: k for k, m in enumerate(mentions)}
    for batch in image_batches(mentions, batch_size):
        pixels = captioner.preprocess([load_image(predictions.records[i].path) for i, _ in batch])
        ids = [predictions.captions[i].token_ids for i, _ in batch]
        longest = max(len(t) for t in ids)
        tokens = torch.tensor([t + [captioner.vocab.pad_id] * (longest - len(t)) for t in ids], device=pixels.device)
        log_probs = torch.log_softmax(captioner.model(pixels, tokens[:, :-1]), dim=-1)  # [B, T, V]
        for row, (_, group) in enumerate(batch):
            for mention in group:
                token = tokens[row, mention.position + 1]
                probabilities[index[mention]] = float(log_probs[row, mention.position, token].exp())
    return probabilities
