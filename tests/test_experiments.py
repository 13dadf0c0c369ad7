"""The experiments' measures on planted cases with known answers."""
import json

import numpy as np
import pytest
import torch

from captionlens.data.coco import Box
from captionlens.data.synonyms import Synonyms
from captionlens.experiments.correctness import box_mask, correctness
from captionlens.experiments.hallucination import auc_table, chair, mean_average_precision
from captionlens.experiments.tables import write_table

SYNONYMS = Synonyms({"circle": "circle", "circles": "circle", "square": "square", "star": "star"})


def test_box_mask_scales_from_image_to_heatmap():
    mask = box_mask([Box("circle", 32, 0, 32, 32)], image_size=(64, 64), map_size=(8, 8))
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, 4:] = True
    assert torch.equal(mask, expected)


def test_pointing_game_and_energy_pointing_game_on_planted_maps():
    """A map equal to the box mask scores pointing game 1 and EBPG (correctness at threshold 0) 1; a
    maximum outside scores 0; a uniform map scores the share of the image the box covers."""
    from captionlens.experiments.correctness import pointing_game, uniform_map

    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[2:5, 2:6] = True
    as_mask = mask.float()
    assert pointing_game(as_mask, mask) == 1.0 and correctness(as_mask, mask)[0] == 1.0
    peak_outside = as_mask.clone()
    peak_outside[9, 9] = 5.0
    assert pointing_game(peak_outside, mask) == 0.0
    assert correctness(peak_outside, mask)[0] == pytest.approx(12 / 17)  # EBPG: energy inside / all energy
    assert pointing_game(uniform_map(10, 10), mask) == pytest.approx(12 / 100)
    assert pointing_game(-peak_outside, mask, negative=True) == 0.0 and np.isnan(pointing_game(-as_mask, mask))
    energy = torch.rand(10, 10, generator=torch.Generator().manual_seed(0)) - 0.3  # EBPG from its definition
    positive = energy.clamp(min=0)
    assert correctness(energy, mask)[0] == pytest.approx(float(positive[mask].sum() / positive.sum()))


def test_f1_iou_on_planted_maps_and_against_sklearn():
    """A map equal to the box mask scores F1-IoU 1, a map covering a quarter of the box 2·¼/(1+¼) = 0.4,
    a uniform map 2|B|/(N+|B|); on random maps it equals sklearn's F1 of the binarised pixels."""
    from sklearn.metrics import f1_score

    from captionlens.experiments.correctness import f1_iou, uniform_map

    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[2:6, 2:6] = True  # 16 pixels
    assert f1_iou(mask.float(), mask) == 1.0
    corner = torch.zeros(10, 10)
    corner[2:4, 2:4] = 1.0  # 4 of the 16, nothing outside: precision 1, recall 1/4
    assert f1_iou(corner, mask) == pytest.approx(2 * 0.25 / 1.25)
    assert f1_iou(uniform_map(10, 10), mask) == pytest.approx(2 * 16 / (100 + 16))
    assert np.isnan(f1_iou(-corner, mask)) and f1_iou(-corner, mask, negative=True) == pytest.approx(0.4)
    generator = torch.Generator().manual_seed(1)
    for _ in range(20):
        heatmap = torch.randn(10, 10, generator=generator)
        pointed = (heatmap >= 0.5 * heatmap.max()).flatten().numpy()
        assert f1_iou(heatmap, mask) == pytest.approx(f1_score(mask.flatten().numpy(), pointed))


def test_correctness_of_planted_heatmaps():
    mask = torch.zeros(10, 10, dtype=torch.bool)
    mask[2:5, 2:5] = True
    inside = torch.zeros(10, 10)
    inside[3, 3], inside[2, 4] = 2.0, 1.0
    assert np.allclose(correctness(inside, mask), 1.0)  # all positive mass in the box
    outside = torch.zeros(10, 10)
    outside[8, 8] = 1.0
    assert np.allclose(correctness(outside, mask), 0.0)
    mixed = inside.clone()
    mixed[8, 8] = 1.0  # 3 in the box, 1 outside; at threshold 0.6 only the peak (inside) is kept
    curve = correctness(mixed, mask, thresholds=(0.0, 0.6))
    assert curve == pytest.approx([0.75, 1.0])
    # negative scores are ignored, unless the negative part is asked for
    signed = -inside
    assert np.isnan(correctness(signed, mask)).all()
    assert np.allclose(correctness(signed, mask, negative=True), 1.0)


def test_the_map_free_baselines_on_planted_boxes():
    from captionlens.experiments.correctness import centre_map, uniform_map

    left_half = box_mask([Box("circle", 0, 0, 32, 64)], image_size=(64, 64), map_size=(16, 16))
    assert np.allclose(correctness(uniform_map(16, 16), left_half, thresholds=(0.0, 0.5, 0.9)), 0.5)  # its area
    middle = box_mask([Box("circle", 24, 24, 16, 16)], image_size=(64, 64), map_size=(16, 16))
    area = float(middle.float().mean())
    at_zero = correctness(centre_map(16, 16), middle)[0]
    assert area < at_zero < 1  # the centre prior beats the uniform map on a centred object, but is no oracle
    corner = box_mask([Box("circle", 0, 0, 16, 16)], image_size=(64, 64), map_size=(16, 16))
    assert correctness(centre_map(16, 16), corner)[0] < float(corner.float().mean())  # and loses on a corner one


def test_the_bootstrap_auc_equals_sklearn_draw_by_draw():
    """All draws scored at once by ranks equal roc_auc_score on each draw, ties included."""
    from sklearn.metrics import roc_auc_score

    from captionlens.experiments.hallucination import bootstrap_rows, rank_auc

    rng = np.random.default_rng(1)
    labels, values = rng.integers(0, 2, 30), rng.integers(0, 6, 30).astype(float)  # many ties
    rows = bootstrap_rows(30, 200, seed=0)
    ours = rank_auc(labels[rows], values[rows])
    for row, auc in zip(rows, ours):
        if labels[row].min() == labels[row].max():
            assert np.isnan(auc)
        else:
            assert auc == pytest.approx(roc_auc_score(labels[row], values[row]), abs=1e-12)


def test_auc_intervals_and_ablation_statistics_on_planted_cases():
    from captionlens.experiments.ablation import drop_statistics
    from captionlens.experiments.hallucination import auc_interval

    labels = np.array([1] * 20 + [0] * 20)
    assert auc_interval(labels, labels.astype(float)) == (1.0, 1.0)  # a perfect score stays perfect
    noise = np.random.default_rng(3).random(40)
    low, high = auc_interval(labels, noise)
    assert low < 0.5 < high and high - low > 0.1  # a random score: an interval around chance
    assert np.isnan(auc_interval(np.ones(5), noise[:5])[0])
    rng = np.random.default_rng(0)
    random_drops = rng.normal(0, 0.01, 200)
    strong = drop_statistics(random_drops + 0.05, random_drops)
    assert strong["drop_low"] > 0 and strong["p_vs_random"] < 1e-6  # deletions that matter, clearly
    same = drop_statistics(random_drops + rng.normal(0, 0.01, 200), random_drops)
    assert same["p_vs_random"] > 0.01 and same["drop_low"] < 0 < same["drop_high"]
    baseline = drop_statistics(random_drops)
    assert np.isnan(baseline["p_vs_random"]) and baseline["note"] == "the random baseline itself"


def test_auc_of_perfect_and_reversed_rankings():
    labels = np.array([1, 1, 0, 0])
    table = auc_table(labels, {"perfect": np.array([0.9, 0.8, 0.1, 0.2]), "reversed": np.array([0.1, 0.2, 0.9, 0.8])})
    assert table == {"perfect": 1.0, "reversed": 0.0}
    assert np.isnan(auc_table(np.array([1, 1]), {"x": np.array([0.1, 0.2])})["x"])


def test_chair_counts_hallucinated_objects_and_captions():
    captions = [["a", "circle", "and", "a", "square"], ["two", "circles"], ["a", "star"]]
    objects = [{"circle"}, {"circle"}, {"square"}]
    result = chair(captions, objects, SYNONYMS)
    assert result["chair_i"] == pytest.approx(2 / 4)  # square (image 1) and star (image 3) are hallucinated
    assert result["chair_s"] == pytest.approx(2 / 3)


def test_map_is_one_for_a_perfect_ranking_and_skips_one_class_words():
    words = ["circle", "circle", "circle", "square", "square"]
    labels = np.array([1, 0, 1, 1, 1])
    perfect = mean_average_precision(words, labels, np.array([0.9, 0.1, 0.8, 0.5, 0.4]))
    assert perfect["map"] == 1.0 and list(perfect["per_word"]) == ["circle"]
    worst = mean_average_precision(words, labels, np.array([0.1, 0.9, 0.2, 0.5, 0.4]))
    assert worst["map"] < 1.0


def test_tables_are_written_as_csv_json_and_markdown(tmp_path):
    rows = [{"method": "lrp", "auc": 0.64}, {"method": "attention", "auc": float("nan")}]
    paths = write_table(tmp_path, "auc", rows, title="AUC")
    assert paths["csv"].read_text().splitlines() == ["method,auc", "lrp,0.64", "attention,"]
    # strict JSON: json.loads with parse_constant raising proves no NaN/Infinity token is written
    strict = json.loads(paths["json"].read_text(), parse_constant=lambda token: pytest.fail(f"{token} in JSON"))
    assert strict == [{"method": "lrp", "auc": 0.64}, {"method": "attention", "auc": None}]
    assert "| lrp | 0.64 |" in paths["md"].read_text() and "| attention | n/a |" in paths["md"].read_text()
    with pytest.raises(ValueError):
        write_table(tmp_path, "empty", [])


# ------------------------------------------------------------------------------ caption metrics
def test_caption_metrics_with_the_coco_scorers_and_offline_bertscore():
    from captionlens.experiments.caption_metrics import caption_metrics

    references = [["A red circle on the left.", "a circle"], ["Two blue squares."]]
    perfect = caption_metrics(["a red circle on the left", "two blue squares"], references, bertscore_model="minilm")
    wrong = caption_metrics(["a green hexagon", "three stars"], references, bertscore_model="minilm")
    for name in ("BLEU-1", "METEOR", "ROUGE-L", "CIDEr", "BERTScore-F(idf)"):
        assert perfect[name] > wrong[name], name
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and perfect["ROUGE-L"] == pytest.approx(1.0)
    assert perfect["SPICE"].startswith("not available:")


def test_spice_and_bertscore_say_why_they_are_not_available(tmp_path):
    from captionlens.experiments.caption_metrics import bertscore, spice

    assert "--spice-corenlp" in spice({}, {}, None)
    assert "stanford-corenlp-3.6.0.jar" in spice({}, {}, tmp_path)
    assert "nothing is downloaded" in bertscore(["a"], [["a"]], None)
    assert "no model folder" in bertscore(["a"], [["a"]], tmp_path / "missing")


# --------------------------------------------------------------------------- on a tiny model
@pytest.fixture(scope="module")
def bench(tiny_shapes, tmp_path_factory):
    import captionlens as cl
    from captionlens.data.bundle import open_data
    from captionlens.experiments.workbench import Workbench

    data = open_data(tiny_shapes)
    vocab = sorted({w for r in data.split("train") for c in r.captions for w in c})
    cap = cl.build_captioner("gridtd", encoder="shapes", vocab=vocab, hidden_size=16, embed_size=8, seed=0)
    with torch.no_grad():  # make the untrained model name a circle first, so object words occur
        cap.model.decoder.fc.bias[cap.vocab.index("circle")] += 6.0
    return Workbench(cap, data, tmp_path_factory.mktemp("results"), split="train", limit=20, progress=False)


def test_workbench_hallucination_correctness_and_map(bench):
    result = bench.hallucination(min_count=0)
    assert result["true_positives"] + result["false_positives"] > 0
    explained = {"lrp", "lrp_max", "guided_gradcam", "guided_gradcam_abs", "gradcam", "attention", "one_minus_beta"}
    assert set(result["auc"]) == set(result["stratified_auc"]) == explained | {"probability", "entropy"}
    assert set(result["added_value"]) == set(result["added_value_interval"]) == explained  # beyond confidence
    assert 0 <= result["chair"]["chair_i"] <= 1
    rows = bench.correctness()
    assert [r["curve"] for r in rows] == ["attention", "gradcam", "guided_gradcam", "gradient_x_input", "lrp", "n_lrp",
                                          "n_guided_gradcam", "uniform", "centre"]
    for row in rows:  # the 95% bootstrap intervals of the means bracket the means
        for key in ("0.0", "ebpg", "pointing_game", "f1_iou"):
            if row[key] == row[key]:
                assert row[f"{key}_low"] - 1e-12 <= row[key] <= row[f"{key}_high"] + 1e-12
                assert 0 <= row[key] <= 1
        assert row["ebpg"] == row["0.0"] or row["ebpg"] != row["ebpg"]  # EBPG is correctness at threshold 0
    average = bench.mean_average_precision(min_count=0)
    for name in ("hallucination_auc.csv", "chair.md", "correctness.json", "correctness.png", "hallucination_roc.png",
                 "map.csv"):
        assert (bench.out / name).is_file(), name
    assert average["map"] != average["map"] or 0 <= average["map"] <= 1


def test_explanations_are_computed_once_into_the_store_and_read_back(bench, monkeypatch):
    mentions = bench.predictions.mentions()[:3]
    first = bench.explanations("lrp", mentions)
    images = {bench.predictions.records[m.image].image_id for m in mentions}
    assert all(bench.store.has(i, "lrp") for i in images)

    def never(*args, **kwargs):
        raise AssertionError("explained again")
    monkeypatch.setattr("captionlens.experiments.explain_split.explain_batch", never)
    again = bench.explanations("lrp", mentions)  # read from the store, not recomputed
    assert all(torch.equal(first[m].image, again[m].image) for m in mentions)
    monkeypatch.undo()
    # and equal the explanation of that word computed alone (maps kept as float16 of map / max|map|)
    import captionlens as cl
    from captionlens.data.images import load_image

    m = mentions[0]
    alone = cl.explain(bench.captioner, load_image(bench.predictions.records[m.image].path),
                       bench.predictions.captions[m.image], "lrp", words=[m.position])
    assert torch.allclose(alone.image, first[m].image, atol=1e-3 * float(alone.image.abs().max()))
    assert torch.allclose(alone.preceding, first[m].preceding, atol=1e-6)
    assert torch.allclose(alone.score, first[m].score, atol=1e-6)


# ------------------------------------------------------------------------------- word ablation
def test_deletions_follow_the_ranking_and_never_touch_start():
    from captionlens.experiments.ablation import choose_deletions

    relevance = np.array([9.0, 0.1, -3.0, 0.5, 0.2])  # <start>, w0 .. w3
    rng = np.random.default_rng(0)
    assert choose_deletions(relevance, 2, "lrp", rng) == [2, 3]  # w2 (0.5) and w3 (0.2): highest signed
    assert choose_deletions(relevance, 2, "grad", rng) == [1, 2]  # |−3| and 0.5: highest magnitude
    random = choose_deletions(relevance, 3, "random", rng)
    assert len(random) == 3 and set(random) <= {0, 1, 2, 3}
    assert choose_deletions(relevance[:2], 3, "lrp", rng) == [0]  # fewer words than asked


def test_ablating_words_the_model_does_not_use_changes_nothing(tiny_shapes):
    import captionlens as cl
    from captionlens.data.bundle import open_data
    from captionlens.experiments.ablation import word_ablation
    from captionlens.experiments.context import predict

    data = open_data(tiny_shapes)
    vocab = sorted({w for r in data.split("train") for c in r.captions for w in c})
    cap = cl.build_captioner("adaptive", encoder="shapes", vocab=vocab, hidden_size=16, embed_size=8, seed=0)
    hidden, embed = 16, 8
    with torch.no_grad():  # the next word depends on the image only: no embeddings, no recurrence, no memory
        gates = cap.model.decoder.lstm.gates
        gates.weight[:, :embed] = 0
        gates.weight[:, embed + hidden:] = 0
        gates.bias[hidden: 2 * hidden] = -1e4  # forget gate shut
        cap.model.decoder.fc.bias[cap.vocab.end_id] = -1e4  # long captions ...
        cap.model.decoder.fc.bias[cap.vocab.index("circle")] += 20  # ... of object words: targets exist
    predictions = predict(cap, data, "test", beam_size=1, progress=False)
    rows = word_ablation(cap, predictions, top=3, skip=5)
    assert sum(r["targets"] for r in rows) > 0
    for row in rows:
        if row["targets"]:
            assert row["drop_share"] == 0 and abs(row["mean_drop"]) < 1e-6, row


# ------------------------------------------------------------------------------ feature masking
def test_top_pixels_and_masked_images():
    from PIL import Image

    from captionlens.experiments.masking import masked_image, top_pixels

    heatmap = torch.tensor([[5.0, -4.0], [0.0, 1.0]])
    assert top_pixels(heatmap, 0.25, "positive").tolist() == [[True, False], [False, False]]
    assert top_pixels(heatmap, 0.5, "negative").tolist() == [[False, True], [True, False]]
    random = top_pixels(heatmap, 0.5, "random", np.random.default_rng(0))
    assert random.sum() == 2
    image = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]], [[0, 0, 255], [0, 0, 255]]], dtype=np.uint8))
    out = np.asarray(masked_image(image, np.array([[True, False], [False, False]])))
    assert out[0, 0].tolist() == [0, 0, 255] and out[1, 1].tolist() == [0, 0, 255]  # filled with the rest's mean


def test_workbench_ablation_and_masking_tables_with_intervals(bench):
    rows = bench.ablation(top=2, skip=1)
    assert {(r["words"], r["ranking"]) for r in rows} == {(k, r) for k in ("stop", "object")
                                                          for r in ("lrp", "grad", "random")}
    masking = bench.masking(fraction=0.2, limit=5)
    assert {r["method"] for r in masking} <= {"lrp", "guided_gradcam", "gradcam", "attention", "random"}
    assert all(0 <= r["vanished_low"] <= r["vanished"] <= r["vanished_high"] <= 1 for r in masking)  # Wilson
    assert (bench.out / "ablation.csv").is_file() and (bench.out / "masking.md").is_file()


# -------------------------------------------------------------------------------- fine-tuning
def test_reweighted_loss_is_equation_12():
    from captionlens.experiments.finetune import reweighted_loss

    torch.manual_seed(0)
    logits, targets = torch.randn(2, 3, 5), torch.tensor([[1, 2, 0], [3, 4, 4]])
    weights = torch.rand(2, 5) + 0.5
    ce = torch.nn.functional.cross_entropy
    expected = 0.3 * ce(logits.reshape(-1, 5), targets.reshape(-1), ignore_index=0) + 0.7 * ce(
        (logits * weights[:, None]).reshape(-1, 5), targets.reshape(-1), ignore_index=0)
    assert torch.allclose(reweighted_loss(logits, targets, weights, 0.3, pad_id=0), expected)
    plain = reweighted_loss(logits, targets, torch.ones(2, 5), 0.5, pad_id=0)
    assert torch.allclose(plain, ce(logits.reshape(-1, 5), targets.reshape(-1), ignore_index=0))


def test_lrp_weights_are_one_plus_the_mean_normalised_relevance(bench):
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    import captionlens as cl
    from captionlens.experiments.finetune import _captions, lrp_weights

    cap = bench.captioner
    pixels = cap.preprocess([r.path for r in bench.predictions.records[:2]])
    weights = lrp_weights(cap, pixels)
    caption = _captions(cap, pixels)[0]
    explained = cl.explain(cap, pixels[0] * torch.tensor(cap.model.encoder.std).view(3, 1, 1)
                           + torch.tensor(cap.model.encoder.mean).view(3, 1, 1), caption, "lrp")
    expected = torch.ones(len(cap.vocab))
    means: dict[int, list[float]] = {}
    for row, word in enumerate(explained.words):
        if word not in ENGLISH_STOP_WORDS:
            heatmap = explained.image[row]
            means.setdefault(cap.vocab.index(word), []).append(float(heatmap.mean() / heatmap.abs().max()))
    for index, values in means.items():
        expected[index] = 1 + np.mean(values)
    assert torch.allclose(weights[0], expected, atol=1e-4)


def test_frequency_weights_and_true_positive_rates(bench):
    from captionlens.experiments.finetune import _captions, frequency_weights, true_positive_rates

    rates = true_positive_rates(bench.predictions)
    mentions = bench.predictions.mentions()
    word = mentions[0].word
    assert rates[word] == pytest.approx(np.mean([m.true_positive for m in mentions if m.word == word]))
    cap = bench.captioner
    pixels = cap.preprocess([r.path for r in bench.predictions.records[:2]])
    weights = frequency_weights(cap, pixels, {word: 0.25})
    caption = _captions(cap, pixels)[0]
    assert weights[0, cap.vocab.index(word)] == (1.25 if word in caption.words else 1.0)
    assert ((weights == 1) | (weights == 1.25)).all()


def test_finetune_tunes_a_copy_of_the_decoder_reproducibly(bench):
    from captionlens.experiments.finetune import FinetuneConfig, finetune

    cap = bench.captioner
    before = {k: v.clone() for k, v in cap.model.state_dict().items()}
    config = FinetuneConfig("lrp", steps=2, batch_size=4, learning_rate=1e-2, seed=1)
    tuned = finetune(cap, bench.data, config, progress=False)
    again = finetune(cap, bench.data, config, progress=False)
    assert all(torch.equal(before[k], v) for k, v in cap.model.state_dict().items())  # original untouched
    changed = [k for k, v in tuned.model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed and all(k.startswith("decoder.") for k in changed)  # the encoder stays frozen
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in tuned.model.state_dict().items())
    with pytest.raises(ValueError, match="frequency"):
        finetune(cap, bench.data, FinetuneConfig("frequency", steps=1), progress=False)
    with pytest.raises(ValueError, match="mode"):
        FinetuneConfig("magic")


def test_journal_variant_explains_once_zeroes_articles_and_tunes_one_epoch(bench, monkeypatch):
    from captionlens.experiments import finetune as module
    from captionlens.experiments.finetune import FinetuneConfig, finetune, journal_weight_maps

    cap = bench.captioner
    maps = journal_weight_maps(cap, bench.data, images=6, batch_size=4, progress=False)
    assert len(maps) == 6
    captions = cap.caption([r.path for r in bench.data.split("train")[:6]])
    for entries, caption in zip(maps, captions):
        assert set(entries) == {cap.vocab.index(w) for w in caption.words}  # every word of its caption
        assert all(entries[cap.vocab.index(w)] == 0 for w in caption.words if w in module.ARTICLES)
        assert all(-1 <= value - 1 <= 1 for i, value in entries.items() if cap.vocab.words[i] not in module.ARTICLES)
    calls = []
    monkeypatch.setattr(module, "lrp_weight_maps", lambda *a, **k: calls.append(1) or [])  # never explained again
    config = FinetuneConfig("lrp_journal", steps=99, batch_size=4, learning_rate=1e-2, seed=1, epoch_images=6)
    record: list[float] = []
    tuned = finetune(cap, bench.data, config, progress=False, journal_maps=maps, m_record=record)
    again = finetune(cap, bench.data, config, progress=False, journal_maps=maps)
    assert not calls
    assert all(torch.equal(v, again.model.state_dict()[k]) for k, v in tuned.model.state_dict().items())
    expected = sorted(v - 1 for entries in maps for v in entries.values() if v != 0)
    assert sorted(record) == pytest.approx(expected)  # one epoch: each image's words once


def test_workbench_finetune_table(bench):
    rows = bench.finetune(modes=("lrp", "lrp_journal", "plain"), seeds=(0, 1), steps=1, batch_size=4, min_count=0,
                          train_limit=6)
    assert [r["model"] for r in rows] == ["original", "lrp", "lrp_journal", "plain"]
    for row in rows[1:3]:  # the distribution of m − 1 over the LRP-weighted words
        assert row["m-1_p05"] <= row["m-1_mean"] <= row["m-1_p95"] and row["m-1_abs_mean"] >= 0
    assert "m-1_mean" not in rows[3]
    assert rows[1]["BLEU-4_low"] <= rows[1]["BLEU-4"] <= rows[1]["BLEU-4_high"]
    full = bench.finetune(modes=("plain",), seeds=(0,), steps=1, batch_size=4, min_count=0, train_limit=10,
                          full_metrics=True)
    assert {"METEOR", "BERTScore-F(idf)", "BLEU-1"} <= full[1].keys()
    assert [r["runs"] for r in rows] == [1, 2, 2, 2]
    assert {"BLEU-4", "CIDEr", "TP%", "mAP", "hallucination_rate", "BLEU-4_std"} <= rows[1].keys()
    assert (bench.out / "finetune.md").is_file()


# ------------------------------------------------------------------------------------ RESULTS.md
def _planted_results(lrp_auc: float) -> dict:
    def curve(name, value, half=0.02):
        return {"curve": name, "mentions": 9, "0.0": value, "0.0_low": value - half, "0.0_high": value + half}

    correctness = [curve(c, v) for c, v in [("attention", 0.2), ("gradcam", 0.3), ("guided_gradcam", 0.5), ("lrp", 0.6),
                                            ("n_lrp", 0.05), ("n_guided_gradcam", 0.45), ("gradient_x_input", 0.4),
                                            ("uniform", 0.1), ("centre", 0.12)]]
    ablation = [{"words": k, "ranking": r, "targets": 50, "drop_share": s, "mean_drop": d, "drop_low": d - 0.01,
                 "drop_high": d + 0.01, "p_vs_random": p}
                for k in ("stop", "object") for r, s, d, p in (("lrp", 0.9, 0.2, 1e-4), ("grad", 0.8, 0.15, 1e-3),
                                                               ("random", 0.5, 0.05, float("nan")))]
    finetune = [{"model": "original", "BLEU-4": 0.5, "TP%": 90.0, "hallucination_rate": 0.3},
                {"model": "lrp", "BLEU-4": 0.52, "BLEU-4_low": 0.51, "BLEU-4_high": 0.53, "hallucination_rate": 0.2,
                 "hallucination_rate_low": 0.18, "hallucination_rate_high": 0.22},
                {"model": "plain", "BLEU-4": 0.5, "hallucination_rate": 0.25, "hallucination_rate_low": 0.23,
                 "hallucination_rate_high": 0.27}]
    auc = {"lrp": lrp_auc, "lrp_max": 0.5, "guided_gradcam": 0.4, "guided_gradcam_abs": 0.6, "gradcam": 0.5,
           "attention": 0.55, "one_minus_beta": 0.52, "probability": 0.6, "entropy": 0.58}
    visual = {"object": {"median": 0.6, "low": 0.55, "high": 0.65, "words": 40},
              "function": {"median": 0.2, "low": 0.15, "high": 0.25, "words": 40}}
    masking = [{"method": "lrp", "masked": "positive", "vanished": 0.8, "vanished_low": 0.7, "vanished_high": 0.9},
               {"method": "lrp", "masked": "negative", "vanished": 0.05, "vanished_low": 0.01, "vanished_high": 0.1},
               {"method": "random", "masked": "random", "vanished": 0.1, "vanished_low": 0.05, "vanished_high": 0.2}]
    faithfulness = [{"words": "object", "method": m, "morf_minus_random": d, "morf_minus_random_low": d - 0.1,
                     "morf_minus_random_high": d + 0.1} for m, d in (("lrp", 1.0), ("gradcam", 0.5))]

    def step(block, method, rho):
        return {"step": 1, "block": block, "method": method, "spearman_abs": rho, "spearman_abs_low": rho - 0.05,
                "spearman_abs_high": rho + 0.05, "preceding_spearman": 0.1}

    randomisation = [step("decoder.fc", "lrp", 0.9), step("decoder.fc", "guided_gradcam", 0.9),
                     step("decoder.projection", "guided_gradcam", 0.2), step("decoder.projection", "lrp", 0.4),
                     step("encoder.features.0", "lrp", 0.1), step("encoder.features.0", "guided_gradcam", 0.1)]
    invariance = [{"method": "lrp", "changes": True, "image_change": 0.2, "preceding_change": 0.0,
                   "image_spearman": 0.9, "logit_change": 1e-7}]
    per_arch = {"correctness": correctness, "ablation": ablation, "masking": masking, "finetune": finetune,
                "hallucination": {"auc": auc, "auc_interval": {k: [v - 0.05, v + 0.05] for k, v in auc.items()},
                                  "added_value": {"lrp": 0.05}, "added_value_interval": {"lrp": [0.02, 0.08]},
                                  "stratified_auc_interval": {"lrp": [0.7, 0.8], "probability": [0.55, 0.65]}},
                "faithfulness": faithfulness, "sanity": {"randomisation": randomisation, "input_invariance": invariance},
                "visual_share": visual}
    return {name: {"adaptive": value, "gridtd": value} for name, value in per_arch.items()}


def test_verdicts_come_from_intervals_holds_fails_or_inconclusive():
    from captionlens.experiments.intervals import FAILS, HOLDS, INCONCLUSIVE, NOT_MEASURED
    from captionlens.experiments.results import findings, results_markdown

    verdicts = {claim: v for claim, v, _ in findings(_planted_results(lrp_auc=0.8), "gridtd")}
    assert set(verdicts.values()) == {HOLDS}, verdicts
    lrp_claim = "LRP identifies hallucinated words better than attention and 1−β"
    worse = _planted_results(lrp_auc=0.3)
    worse["hallucination"]["gridtd"]["auc_interval"]["lrp_max"] = [0.3, 0.4]  # both LRP scores below attention
    assert {c: v for c, v, _ in findings(worse, "gridtd")}[lrp_claim] == FAILS
    assert {c: v for c, v, _ in findings(_planted_results(lrp_auc=0.62), "gridtd")}[lrp_claim] == INCONCLUSIVE  # overlap
    assert all(v == NOT_MEASURED for _, v, _ in findings({}, "adaptive"))  # nothing measured: no verdict
    noisy = _planted_results(0.8)
    noisy["finetune"]["gridtd"][1]["hallucination_rate_high"] = 0.24  # the seeds' interval reaches plain's
    assert {c: v for c, v, _ in findings(noisy, "gridtd")}[
        "LRP-inference fine-tuning (ICML variant) hallucinates less than plain fine-tuning"] == INCONCLUSIVE
    weak = _planted_results(0.8)
    weak["ablation"]["gridtd"][0]["p_vs_random"] = 0.2  # not significant against random
    assert {c: v for c, v, _ in findings(weak, "gridtd")}[
        "Deleting the preceding words that LRP and Grad* rank highest lowers the target word's probability more "
        "than deleting random ones"] == INCONCLUSIVE
    blind = _planted_results(0.8)
    blind["correctness"]["gridtd"][0].update({"0.0_low": 0.03, "0.0_high": 0.06})  # attention below uniform
    assert {c: v for c, v, _ in findings(blind, "gridtd")}[
        "Attention localises objects better than a uniform map (a precondition of the comparison above)"] == FAILS
    persistent = _planted_results(0.8)
    persistent["sanity"]["gridtd"]["randomisation"][2].update(spearman_abs_low=0.8, spearman_abs_high=0.9)
    assert {c: v for c, v, _ in findings(persistent, "gridtd")}[
        "Sanity: Guided Grad-CAM's maps change once the decoder is random (the journal cites it as failing sanity "
        "checks: this would not hold)"] == FAILS  # the map survives the decoder's randomisation
    confident = _planted_results(0.3)  # the model's probability separates better than LRP, and LRP adds nothing
    confident["hallucination"]["gridtd"]["auc_interval"]["lrp_max"] = [0.3, 0.4]
    confident["hallucination"]["gridtd"]["added_value_interval"]["lrp"] = [-0.04, -0.01]
    verdicts = {c: v for c, v, _ in findings(confident, "gridtd")}
    assert verdicts["LRP detects hallucinated words better than the model's confidence"] == FAILS
    assert verdicts["LRP adds to the model's confidence (beyond probability, entropy, position and repetition)"] == FAILS
    linguistic = _planted_results(0.8)
    linguistic["visual_share"]["gridtd"]["function"].update(low=0.7, high=0.8)
    assert {c: v for c, v, _ in findings(linguistic, "gridtd")}[
        "Object words are explained by the image, function words by the preceding words (the papers' linguistic "
        "explanations)"] == FAILS
    text = results_markdown(_planted_results(0.8), 12.0, quick=True)
    assert "## Table 3" in text and "| holds |" in text and "0.64" in text  # the paper's LRP AUC beside ours
    assert "| gridtd | lrp |  | 0.050 [0.020, 0.080] |" in text and "## Which words are visual" in text
    assert "## Region perturbation" in text and "| encoder.features.0 | 0.10 / 0.10 | 0.10 / 0.10 |" in text
    assert "| lrp | yes |" in text  # input invariance


def test_interval_helpers_on_planted_samples():
    from captionlens.experiments.intervals import bootstrap_mean_interval, t_interval

    low, high = bootstrap_mean_interval([0.0] * 50 + [1.0] * 50)
    assert 0.38 < low < 0.5 < high < 0.62
    assert bootstrap_mean_interval([0.3, 0.3, float("nan")]) == (0.3, 0.3)
    low, high = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, t(0.975, 2) = 4.303
    assert abs(low - (2 - 4.303 / 3 ** 0.5)) < 1e-3 and abs(high - (2 + 4.303 / 3 ** 0.5)) < 1e-3
    assert all(v != v for v in t_interval([1.0]))  # one seed: no interval


def test_masking_without_words_gives_the_same_table_with_no_rates(bench):
    from captionlens.experiments.masking import feature_masking

    rows = feature_masking(bench.captioner, bench.predictions, {"lrp": {}, "attention": {}}, [])
    assert {(r["method"], r["masked"]) for r in rows} == {("lrp", "positive"), ("lrp", "negative"),
                                                         ("attention", "positive"), ("attention", "negative"),
                                                         ("random", "random")}
    assert all(r["words"] == 0 and r["vanished"] != r["vanished"] for r in rows)


def _confounded_mentions(n: int = 400, seed: int = 0):
    """Planted mentions whose chance of being hallucinated grows with the word position, and a model
    confidence that knows the truth only noisily."""
    rng = np.random.default_rng(seed)
    positions = rng.integers(0, 12, n)
    labels = (rng.random(n) > positions / 14).astype(int)  # 1: true mention
    probability = 1 / (1 + np.exp(-((2 * labels - 1) + rng.normal(0, 1.5, n))))
    return rng, positions, labels, probability


def test_a_position_only_score_has_stratified_auroc_one_half():
    """A score that only tracks the word position separates true from hallucinated mentions (late words
    are hallucinated more often) but says nothing within a position: stratified AUROC exactly ½."""
    from sklearn.metrics import roc_auc_score

    from captionlens.experiments.confounders import stratified_auc, stratified_auc_interval

    _, positions, labels, _ = _confounded_mentions()
    assert roc_auc_score(labels, -positions) > 0.75
    assert stratified_auc(labels, -positions, positions) == 0.5
    assert stratified_auc_interval(labels, -positions, positions) == (0.5, 0.5)


def test_the_stratified_auroc_counts_pairs_within_strata_like_a_loop():
    """One stratum: sklearn's AUROC; several: the pairs of each stratum counted by a plain loop; a
    bootstrap draw given as multiplicities equals the AUROC of the resampled mentions."""
    from sklearn.metrics import roc_auc_score

    from captionlens.experiments.confounders import draw_weights, stratified_auc
    from captionlens.experiments.hallucination import bootstrap_rows

    rng, positions, labels, _ = _confounded_mentions(120, seed=3)
    values = np.round(rng.normal(size=120), 1)  # ties included
    assert stratified_auc(labels, values, np.zeros(120)) == pytest.approx(roc_auc_score(labels, values))
    wins = pairs = 0.0
    for i in range(120):
        for j in range(120):
            if labels[i] == 1 and labels[j] == 0 and positions[i] == positions[j]:
                pairs += 1
                wins += 1.0 if values[i] > values[j] else 0.5 if values[i] == values[j] else 0.0
    assert stratified_auc(labels, values, positions) == pytest.approx(wins / pairs)
    draw = bootstrap_rows(120, 3, 0)[1]
    assert stratified_auc(labels, values, positions, draw_weights(120, 3, 0))[1] == pytest.approx(
        float(stratified_auc(labels[draw], values[draw], positions[draw])))


def test_a_score_equal_to_confidence_adds_nothing_and_an_informative_one_does():
    """The regression's added value: the model's own probability as the score adds nothing (interval
    around 0); a score that knows the truth beyond the confidence adds AUROC (interval above 0)."""
    from captionlens.experiments.confounders import added_value

    rng, positions, labels, probability = _confounded_mentions()
    confounders = np.column_stack([probability, positions])
    value, low, high = added_value(labels, probability, confounders)
    assert abs(value) < 0.005 and low <= 0 <= high
    informative = (2 * labels - 1) + rng.normal(0, 1.5, len(labels))
    value, low, high = added_value(labels, informative, confounders)
    assert value > 0.01 and low > 0
    assert np.isnan(added_value(np.ones(10), np.arange(10.0), np.zeros((10, 1)))[0])  # one class: undefined


def test_repetitions_count_earlier_names_of_the_category_in_the_caption():
    from captionlens.experiments.confounders import repetitions
    from captionlens.experiments.context import Mention

    mentions = [Mention(0, 5, "circles", "circle", True), Mention(0, 1, "circle", "circle", True),
                Mention(1, 2, "circle", "circle", False), Mention(0, 3, "square", "square", True)]
    assert repetitions(mentions).tolist() == [1, 0, 0, 0]


def test_word_confidence_is_the_probability_and_entropy_of_the_next_word_distribution(bench):
    """Against scipy: each mention's probability and entropy from one image's teacher-forced logits."""
    from scipy.stats import entropy

    from captionlens.experiments.context import word_confidence

    p = bench.predictions
    mentions = p.mentions()[:4]
    probabilities, entropies = word_confidence(bench.captioner, p, mentions, batch_size=2)
    for k, mention in enumerate(mentions):
        caption = p.captions[mention.image]
        pixels = bench.captioner.preprocess(list(next(iter(p.images([[mention.image]])))))
        with torch.no_grad():
            logits = bench.captioner.model(pixels, torch.tensor([caption.token_ids[:-1]]))[0, mention.position]
        distribution = torch.softmax(logits.double(), dim=-1).numpy()
        assert probabilities[k] == pytest.approx(distribution[caption.token_ids[mention.position + 1]], rel=1e-5)
        assert entropies[k] == pytest.approx(entropy(distribution), rel=1e-5)


def test_visual_share_of_planted_explanations_and_word_classes():
    """A word explained by the image alone has share 1, by the preceding words alone 0; |relevance| of
    both signs counts; later columns (words after it) do not."""
    from captionlens.explain import Explanation
    from captionlens.experiments.visual_words import share_table, visual_share, word_class

    def planted(image: float, words: list[float]) -> Explanation:
        pixels = torch.zeros(1, 4, 4)
        pixels[0, 0, 0], pixels[0, 1, 1] = image, -image / 2
        return Explanation("lrp", ["circle"], [2], ["<start>", "a", "red", "circle"], pixels, torch.zeros(1, 2, 2),
                           torch.tensor([words]), torch.ones(1))

    assert visual_share(planted(2.0, [0.0, 0.0, 0.0, 0.0])) == 1.0
    assert visual_share(planted(0.0, [0.5, -0.5, 1.0, 0.0])) == 0.0
    assert visual_share(planted(2.0, [0.0, -1.0, 2.0, 99.0])) == pytest.approx(3 / 6)  # column 3 is after the word
    assert np.isnan(visual_share(planted(0.0, [0.0, 0.0, 0.0, 0.0])))
    assert [word_class(w, o) for w, o in (("circle", True), ("red", False), ("left", False), ("the", False),
                                          ("small", False))] == ["object", "colour", "relation", "function", "other"]
    table = share_table({"object": [0.9, 0.8, 0.7, float("nan")], "function": []})
    assert table["object"]["median"] == pytest.approx(0.8) and table["object"]["words"] == 3
    assert table["object"]["low"] <= 0.8 <= table["object"]["high"] and np.isnan(table["function"]["median"])


def test_workbench_visual_share_per_word_class(bench):
    """On the workbench: every class that occurs in the captions has words, shares within [0, 1], and the
    object words' shares equal visual_share of their stored LRP explanations."""
    from captionlens.experiments.visual_words import CLASSES, sample_by_class, visual_share

    result = bench.visual_share(per_class=6)
    assert set(result) == set(CLASSES)
    sample = sample_by_class(bench.predictions, 6)
    for name in CLASSES:
        assert result[name]["words"] == len(sample[name]) <= 6
        if result[name]["words"]:
            assert 0 <= result[name]["low"] <= result[name]["median"] <= result[name]["high"] <= 1
    stored = bench.word_explanations("lrp", sample["object"])
    shares = [visual_share(stored[m]) for m in sample["object"]]
    assert result["object"]["median"] == pytest.approx(float(np.median(shares)))
    assert (bench.out / "visual_share.md").is_file()


def test_the_demo_scales_the_papers_min_count_to_its_test_images():
    """The papers count an object word frequent when predicted more than 50 times among Flickr30K's
    1000 test images; the demo's experiments caption 200 (60 in --quick) and scale it, so that whether
    a word qualifies does not hinge on the CPU the demo trained on — hallucination, mAP and
    fine-tuning alike."""
    from captionlens.demo import FULL
    from captionlens.experiments.hallucination import demo_min_count
    from captionlens.experiments.registry import EXPERIMENTS

    assert demo_min_count(False) == 50 * FULL.experiment_images // 1000
    for name in ("hallucination", "map", "finetune"):
        assert EXPERIMENTS[name].demo(False, 0)["min_count"] == demo_min_count(False), name
        assert EXPERIMENTS[name].demo(True, 0)["min_count"] == demo_min_count(True), name
