"""Vocabulary and tokenizer (Karpathy-style: lower case, alphanumeric tokens)."""
from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from ..io import atomic_write_text, read_json

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)
_NON_WORD = re.compile(r"[^a-z0-9]+")


def tokenize(text: str) -> list[str]:
    """``"A red circle, left."`` -> ``["a", "red", "circle", "left"]`` (lower case, punctuation dropped)."""
    return _NON_WORD.sub(" ", text.lower()).split()


class Vocabulary:
    """Words by index; ``<pad>`` = 0, ``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3, then the corpus
    words by descending count (ties alphabetically)."""

    def __init__(self, words: Iterable[str]) -> None:
        self.words: list[str] = list(words)
        if tuple(self.words[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"a vocabulary starts with {SPECIAL_TOKENS}")
        self._index = {word: i for i, word in enumerate(self.words)}
        if len(self._index) != len(self.words):
            raise ValueError("the vocabulary lists a word twice")

    @classmethod
    def build(cls, captions: Iterable[list[str]], min_count: int = 1) -> "Vocabulary":
        """Keep the words seen at least ``min_count`` times (the paper: 3 for Flickr30K, 5 for COCO).
        Build it on the training split only."""
        counts = Counter(word for caption in captions for word in caption)
        kept = sorted((w for w, n in counts.items() if n >= min_count and w not in SPECIAL_TOKENS),
                      key=lambda w: (-counts[w], w))
        return cls([*SPECIAL_TOKENS, *kept])

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self._index

    def index(self, word: str) -> int:
        """The word's index; ``<unk>``'s for a word not in the vocabulary."""
        return self._index.get(word, self.unk_id)

    def encode(self, words: list[str]) -> list[int]:
        """``[<start>, w_1 .. w_n, <end>]`` as indices."""
        return [self.start_id, *(self.index(w) for w in words), self.end_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first ``<end>``, without ``<start>`` and ``<pad>``."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i not in (self.start_id, self.pad_id):
                words.append(self.words[i])
        return words

    def to_json(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps({"words": self.words}, indent=0))

    @classmethod
    def from_json(cls, path: str | Path) -> "Vocabulary":
        data = read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("words"), list) or \
                not all(isinstance(w, str) for w in data["words"]):
            raise ValueError(f"{path} is not a vocabulary: it must hold {{\"words\": [strings]}}")
        try:
            return cls(data["words"])
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
