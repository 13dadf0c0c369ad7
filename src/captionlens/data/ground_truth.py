"""Which objects an image holds, for labelling a caption's object words true or false positive, and
the subsets of a split that the papers evaluate on.

Two sources of ground truth:

- ``boxes``: the categories of the image's COCO boxes (``instances_*.json``); the only source that
  can also say *where* the objects are (correctness, Fig. 3).
- ``references``: the categories named in any of the image's reference captions (through the synonym
  list). This is how Flickr30K, which has no boxes, is labelled in the papers' Table 3 / Fig. 7.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .coco import ObjectAnnotations
from .karpathy import ImageRecord
from .synonyms import Synonyms

SOURCES = ("auto", "boxes", "references")


class ObjectsUnavailable(ValueError):
    """The ground truth an experiment needs is not available; the message says why and what fixes it."""


class GroundTruth:
    """``objects(record)``: the categories the image holds; ``source`` and ``description`` say how that was decided."""

    source: str
    description: str

    def objects(self, record: ImageRecord) -> set[str]:
        raise NotImplementedError


class BoxGroundTruth(GroundTruth):
    source = "boxes"

    def __init__(self, annotations: ObjectAnnotations, files: Sequence[str]) -> None:
        self.annotations = annotations
        self.description = f"boxes of {', '.join(files)}"

    def objects(self, record: ImageRecord) -> set[str]:
        return self.annotations.categories_in(record.image_id)


class ReferenceGroundTruth(GroundTruth):
    source = "references"

    def __init__(self, synonyms: Synonyms) -> None:
        self.synonyms = synonyms
        self.description = f"object words of the reference captions ({synonyms.source})"

    def objects(self, record: ImageRecord) -> set[str]:
        return set().union(*(self.synonyms.categories_in(c) for c in record.captions))


# ------------------------------------------------------------------------------------- subsets
# The journal paper's Table III: Flickr30K test images whose references mention clothes, evaluated for
# hallucinations of the biased word "shirt" (the clothes words other than "shirt").
NAMED_SUBSETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "clothes": (("kilt", "jacket", "uniform", "coat", "dress", "suit", "jersey", "outfit", "polka", "bikini",
                 "swimsuit", "plaid", "bib", "skirt"), ("shirt",)),
}


@dataclass(frozen=True)
class Subset:
    """The images whose reference captions mention at least one of ``words`` and none of ``exclude``.

    A word matches itself and every phrase of its category in the synonym list ("dress" also matches
    "dresses"); so ``Subset(clothes words, exclude=("shirt",))`` keeps the images with clothes but no
    shirt in their references, where saying "shirt" is a hallucination."""

    words: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    name: str = ""

    @classmethod
    def named(cls, name: str) -> "Subset":
        if name not in NAMED_SUBSETS:
            raise ValueError(f"no subset named {name!r}; choose one of {', '.join(NAMED_SUBSETS)} "
                             "or give --subset-words")
        words, exclude = NAMED_SUBSETS[name]
        return cls(words, exclude, name)

    @classmethod
    def from_options(cls, name: str | None, words: str | None, exclude: str | None) -> "Subset | None":
        """From the CLI's ``--subset NAME`` or ``--subset-words a,b --exclude-word c`` (``None``: the whole split)."""
        excluded = tuple(w.strip().lower() for w in (exclude or "").split(",") if w.strip())
        if name and words:
            raise ValueError("give --subset or --subset-words, not both")
        if name:
            subset = cls.named(name)
            return cls(subset.words, excluded or subset.exclude, name)
        chosen = tuple(w.strip().lower() for w in (words or "").split(",") if w.strip())
        if not chosen:
            if excluded:
                raise ValueError("--exclude-word needs --subset or --subset-words")
            return None
        return cls(chosen, excluded)

    def describe(self) -> str:
        label = f"'{self.name}' subset: " if self.name else "subset: "
        text = f"{label}references mention {', '.join(self.words)}"
        return text + (f" and not {', '.join(self.exclude)}" if self.exclude else "")

    def select(self, records: Iterable[ImageRecord], synonyms: Synonyms | None) -> list[ImageRecord]:
        wanted, unwanted = self._matcher(self.words, synonyms), self._matcher(self.exclude, synonyms)
        return [r for r in records if any(wanted(c) for c in r.captions) and not any(unwanted(c) for c in r.captions)]

    @staticmethod
    def _matcher(words: Sequence[str], synonyms: Synonyms | None):
        plain = set(words)
        categories = {c for c in (synonyms.category(w) for w in words) if c} if synonyms else set()

        def matches(caption: Sequence[str]) -> bool:
            return bool(plain & set(caption)) or bool(categories and categories & synonyms.categories_in(caption))
        return matches
