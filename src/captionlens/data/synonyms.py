"""Object words: which words and multi-word phrases of a caption name which object category.

A synonym list maps phrases to categories: ``"dogs" -> dog``, ``"teddy bear" -> teddy bear``,
``"baby bird" -> bird``. A caption is matched left to right, longest phrase first, so "hot dog"
names a hot dog and not a dog, and "baby bird" a bird and not a person (the double-word rules of
CHAIR, Rohrbach et al. 2018). Phrases listed under ``ignore`` are consumed without naming anything.

Two file formats are read (JSON):

- ``{"categories": {"teddy bear": ["teddy bear", "teddy bears", "teddybear"], ...}, "ignore": [...]}``
  (the format of the lists that ship with captionlens), and
- ``{"puppy": "dog", "teddy bears": "teddy bear", ...}``: phrase -> category.

Two lists ship as package data: ``coco`` (the 80 COCO categories with CHAIR's synonyms, plurals added)
and ``flickr30k`` (the papers' frequent Flickr30K words and the clothes words of Table III).
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .vocab import tokenize

BUILTIN = ("coco", "flickr30k")
# dataset name -> the built-in list used when a dataset folder names none
DEFAULT_FOR_DATASET = {"coco": "coco", "coco2017": "coco", "flickr30k": "flickr30k"}


@dataclass(frozen=True)
class ObjectWord:
    """An object phrase found in a caption: ``words[start: position + 1]``."""

    start: int
    position: int  # the phrase's last word, its head noun ("teddy bear" -> "bear"): the word explained
    category: str


class Synonyms:
    """Phrase -> category lookup with longest-first matching on tokenised captions."""

    def __init__(self, phrases: Mapping[str, str], ignore: Iterable[str] = (), source: str = "") -> None:
        self.source = source  # where the list came from, for tables and messages
        self._category: dict[tuple[str, ...], str | None] = {}
        for phrase, category in phrases.items():
            tokens = tuple(tokenize(phrase))
            if not tokens or not isinstance(category, str) or not category:
                raise ValueError(f"synonyms{f' in {source}' if source else ''}: bad entry {phrase!r}: {category!r}")
            self._category[tokens] = category
        for phrase in ignore:
            self._category.setdefault(tuple(tokenize(phrase)), None)
        self._longest = max((len(p) for p in self._category), default=0)
        self.categories = sorted({c for c in self._category.values() if c is not None})

    def __len__(self) -> int:
        return len(self.categories)

    def find(self, words: Sequence[str]) -> list[ObjectWord]:
        """The object phrases of a caption, left to right, longest match first, not overlapping."""
        found, start = [], 0
        while start < len(words):
            for length in range(min(self._longest, len(words) - start), 0, -1):
                phrase = tuple(words[start: start + length])
                if phrase in self._category:
                    category = self._category[phrase]
                    if category is not None:
                        found.append(ObjectWord(start, start + length - 1, category))
                    start += length
                    break
            else:
                start += 1
        return found

    def categories_in(self, words: Sequence[str]) -> set[str]:
        """The categories a caption names."""
        return {o.category for o in self.find(words)}

    def category(self, phrase: str) -> str | None:
        """The category of one word or phrase (``None`` when it names none)."""
        return self._category.get(tuple(tokenize(phrase)))

    # ------------------------------------------------------------------------------ files
    @classmethod
    def from_data(cls, data: object, source: str) -> "Synonyms":
        """From the parsed JSON of either format (see the module docstring)."""
        if isinstance(data, dict) and "categories" in data:
            categories, ignore = data["categories"], data.get("ignore", [])
            if not isinstance(categories, dict) or not all(
                    isinstance(v, list) and all(isinstance(p, str) for p in v) for v in categories.values()):
                raise ValueError(f"{source}: 'categories' must map each category to a list of phrases")
            if not isinstance(ignore, list) or not all(isinstance(p, str) for p in ignore):
                raise ValueError(f"{source}: 'ignore' must be a list of phrases")
            phrases: dict[str, str] = {}
            for category, names in categories.items():
                for phrase in [category, *names]:
                    if phrases.setdefault(phrase, category) != category:
                        raise ValueError(f"{source}: the phrase {phrase!r} is listed under both "
                                         f"{phrases[phrase]!r} and {category!r}")
            return cls(phrases, ignore, source)
        if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
            return cls(data, (), source)
        raise ValueError(f"{source} is not a synonym list: give a JSON object mapping phrases to categories, "
                         'or {"categories": {category: [phrases]}}')

    @classmethod
    def from_json(cls, path: str | Path) -> "Synonyms":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no synonyms file at {path} (--synonyms)")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
        return cls.from_data(data, str(path))

    @classmethod
    def builtin(cls, name: str) -> "Synonyms":
        """One of the lists that ship with captionlens: ``coco`` or ``flickr30k``."""
        if name not in BUILTIN:
            raise ValueError(f"no built-in synonym list {name!r}; choose one of {', '.join(BUILTIN)}")
        text = resources.files(__package__).joinpath("synonyms", f"{name}.json").read_text()
        return cls.from_data(json.loads(text), f"built-in {name} list")

    @classmethod
    def load(cls, spec: str | Path) -> "Synonyms":
        """A built-in list by name (``coco``, ``flickr30k``) or a JSON file by path."""
        return cls.builtin(str(spec)) if str(spec) in BUILTIN else cls.from_json(spec)
