import pytest

from captionlens.data.vocab import SPECIAL_TOKENS, Vocabulary, tokenize


def test_tokenize_lowercases_and_drops_punctuation():
    assert tokenize("A red Circle, to the LEFT.") == ["a", "red", "circle", "to", "the", "left"]


def test_build_keeps_words_at_min_count_most_frequent_first():
    captions = [["a", "dog"], ["a", "cat"], ["a", "dog", "runs"]]
    vocab = Vocabulary.build(captions, min_count=2)
    assert vocab.words == [*SPECIAL_TOKENS, "a", "dog"]
    assert vocab.index("cat") == vocab.unk_id
    assert "dog" in vocab and "cat" not in vocab


def test_encode_decode_round_trip(tmp_path):
    vocab = Vocabulary.build([["a", "red", "circle"]])
    ids = vocab.encode(["a", "red", "circle"])
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert vocab.decode(ids + [vocab.pad_id, vocab.index("red")]) == ["a", "red", "circle"]
    vocab.to_json(tmp_path / "vocab.json")
    assert Vocabulary.from_json(tmp_path / "vocab.json").words == vocab.words


def test_vocabulary_rejects_missing_special_tokens():
    with pytest.raises(ValueError):
        Vocabulary(["a", "b"])
