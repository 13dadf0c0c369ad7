"""What every experiment shares on one captioner and one dataset split (or a subset of it): the
captions, computed once; each method's explanations of each word, computed once; the output folder
its tables (CSV + JSON + Markdown) and plots go to. The experiments themselves are registered in
their own modules (``registry.py``) and run on a Workbench: ``bench.hallucination(min_count=50)``
runs the registered "hallucination" experiment.

Explanations live in an explanation store (``--store``, by default ``OUT/explanations.zarr``): read
from it when it holds them, computed and written into it when not — so memory is bounded by a batch,
and a second experiment, or the same one after a crash, reuses what was computed.

Tables that label object words say which ground truth they used (``ground_truth``: ``boxes`` or
``references``), and every cell left empty says why in a ``note`` column."""
from __future__ import annotations

import shutil
from functools import cached_property
from pathlib import Path

from ..data.bundle import DataBundle
from ..data.ground_truth import Subset
from ..explain import Explanation, methods_for
from ..explain.store import ExplanationStore, StoreMismatch
from ..errors import integer
from ..io import claim_output_folder
from ..models import Captioner
from .context import Mention, Predictions, StoredExplanations, explain_into_store, explain_mentions, predict
from .explain_split import explained_positions, stored_caption


class Workbench:
    """``Workbench(captioner, data, out, split="test", limit=None, beam_size=3, ...)``; then
    ``bench.<experiment>(**options)`` for any registered experiment."""

    def __init__(self, captioner: Captioner, data: DataBundle, out: str | Path, split: str = "test",
                 limit: int | None = None, beam_size: int = 3, progress: bool = True, ground_truth: str = "auto",
                 subset: Subset | None = None, workers: int = 0, store: str | Path | None = None) -> None:
        if limit is not None:
            integer("limit", limit, 1)  # a limit of -1 once dropped the last image silently
        integer("beam_size", beam_size, 1)
        self.captioner, self.data, self.split = captioner, data, split
        self.out = claim_output_folder(out, "results")
        self.limit, self.beam_size, self.progress = limit, beam_size, progress
        self.ground_truth, self.subset, self.workers = ground_truth, subset, workers
        self.own_store = store is None
        self.store_path = self.out / "explanations.zarr" if store is None else Path(store)

    @cached_property
    def store(self) -> ExplanationStore:
        """The explanation store (created for the object words when missing). A store given by the
        user must match the model and split; the workbench's own store in OUT is replaced when not."""
        create = lambda: ExplanationStore.create(self.store_path, self.captioner.fingerprint(), self.split,  # noqa: E731
                                                 "objects", {}, any_words=True)
        try:
            return create()
        except StoreMismatch:
            if not self.own_store:
                raise
            shutil.rmtree(self.store_path)
            return create()

    @cached_property
    def predictions(self) -> Predictions:
        """The captions of the images: the store's where it has them, else made now and written to it."""
        store = self.store
        p = self.predict(self.captioner, known=lambda r: stored_caption(store, r.image_id)
                          if store.has_caption(r.image_id) else None)
        mode = store.attributes["words"]
        for record, caption in zip(p.records, p.captions):
            positions = explained_positions(caption.words, mode, p.synonyms) if p.synonyms or mode == "all" else []
            store.write_caption(record.image_id, record.path.name, caption.words, caption.token_ids, positions,
                                caption.score)
        return p

    def __getattr__(self, name: str):
        """``bench.<experiment>(**options)``: run a registered experiment (or one of its aliases) here."""
        if name.startswith("_"):
            raise AttributeError(name)
        from .registry import experiment

        try:
            found = experiment(name)
        except ValueError:
            raise AttributeError(f"{type(self).__name__} has no attribute or experiment {name!r}") from None
        return lambda *args, **options: found.run(self, *args, **options)

    def predict(self, captioner: Captioner, split: str | None = None, limit: int | None = None,
                 subset: bool = True, known=None) -> Predictions:
        return predict(captioner, self.data, split or self.split, self.beam_size, limit or self.limit, self.progress,
                       self.ground_truth, self.subset if subset else None, self.workers, known)

    @property
    def scope(self) -> str:
        """Which images the tables are about, for their titles."""
        p = self.predictions
        text = f"{len(p.records)} {self.split} images of {self.data.name}"
        text += f" ({self.subset.describe()})" if self.subset else ""
        return text + (f"; ground truth: {p.truth.description}" if p.truth else "")

    def labelled(self, rows: list[dict]) -> list[dict]:
        """Rows with the ground truth's source beside every number."""
        return [{**row, "ground_truth": self.predictions.require_truth().source} for row in rows]

    def available(self, table: dict[str, tuple]) -> list[str]:
        """The methods a table of (method, ...) entries uses that this captioner has (rollout: a
        transformer), sorted."""
        return sorted(set(methods_for(self.captioner.model)) & {entry[0] for entry in table.values()})

    def explanations(self, method: str, mentions: list[Mention]) -> StoredExplanations:
        """``explanations[mention]``: its explanation by ``method``, from the store (computed and
        written there first if missing)."""
        return explain_into_store(self.captioner, self.predictions, self.store, mentions, method,
                                  progress=self.progress)

    # ----------------------------------------------- faithfulness and sanity (beyond the papers)
    def word_explanations(self, method: str, mentions: list[Mention]) -> dict[Mention, Explanation]:
        """Each mention's explanation: from the store for the words it explains (object words, or
        all words of a store made with ``explain-split --words all``), computed now for the rest."""
        p = self.predictions
        stored_positions = {i: set(self.store.positions(p.records[i].image_id)) for i in {m.image for m in mentions}}
        stored = [m for m in mentions if m.position in stored_positions[m.image]]
        from_store, known = self.explanations(method, stored), set(stored)
        computed = explain_mentions(self.captioner, p, [m for m in mentions if m not in known], method)
        return {m: from_store[m] for m in stored} | computed

    def sample_words(self, words: int, other: int, seed: int) -> tuple[list[Mention], list[str]]:
        """Up to ``words`` correctly named object words and ``other`` other words, with their kinds."""
        from .faithfulness import other_words

        p = self.predictions
        objects = [m for m in p.mentions() if m.true_positive][:words] if p.truth is not None and p.synonyms else []
        others = other_words(p, other, seed)
        return objects + others, ["object"] * len(objects) + ["other"] * len(others)

    def biased_word(self) -> tuple[str, str | None] | None:
        """(biased word, the partner whose presence it is said for) of the shapes world's planted bias,
        or (the subset's excluded word, None)."""
        if self.subset is not None and self.subset.exclude:
            return self.subset.exclude[0], None
        if self.data.shapes_config:
            return self.data.shapes_config["bias_word"], self.data.shapes_config["bias_partner"]
        return None
