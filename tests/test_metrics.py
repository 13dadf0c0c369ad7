"""Metrics on planted cases with known answers."""
import pytest

from captionlens.data.synonyms import Synonyms
from captionlens.experiments.metrics import bleu, hallucination_rate, object_precision_recall, wilson_interval

SYNONYMS = Synonyms({"circle": "circle", "circles": "circle", "disk": "circle", "square": "square", "box": "square"})


def test_bleu_of_a_reference_is_one_and_of_nonsense_is_zero():
    refs = [[["a", "red", "circle", "on", "the", "left"], ["a", "circle"]]] * 2
    assert bleu([refs[0][0], refs[0][0]], refs)[3] == pytest.approx(1.0)
    assert bleu([["zebra"] * 6, ["zebra"] * 6], refs)[3] < 1e-6
    with pytest.raises(ValueError):
        bleu([["a"]], [])


def test_object_precision_recall_counts_categories_once_per_image():
    captions = [["a", "disk", "and", "two", "circles"], ["a", "box", "and", "a", "circle"]]
    objects = [{"circle", "square"}, {"square"}]
    assert SYNONYMS.categories_in(captions[0]) == {"circle"}
    scores = object_precision_recall(captions, objects, SYNONYMS)
    assert (scores.mentioned, scores.present) == (3, 3)
    assert scores.precision == pytest.approx(2 / 3) and scores.recall == pytest.approx(2 / 3)


def test_hallucination_rate_only_counts_images_with_the_partner_and_without_the_word():
    captions = [["a", "circle", "and", "a", "square"], ["a", "circle"], ["a", "box"], ["a", "square"]]
    objects = [{"circle"}, {"circle"}, {"circle", "square"}, {"star"}]
    rate = hallucination_rate(captions, objects, SYNONYMS, "square", "circle")
    assert (rate.count, rate.total, rate.rate) == (1, 2, 0.5)
    assert rate.low < 0.5 < rate.high


def test_wilson_interval_matches_the_formula():
    # 20 of 100: the textbook Wilson 95% interval is [0.1333, 0.2888]
    rate = wilson_interval(20, 100)
    assert rate.low == pytest.approx(0.1333, abs=1e-3) and rate.high == pytest.approx(0.2888, abs=1e-3)
