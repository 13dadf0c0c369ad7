"""The explanation store and explain-split: the round trip equals cl.explain for every method; a store
never mixes models or parameters; killed with SIGKILL mid-image and run again it ends exactly as an
uninterrupted run; two torchrun processes (gloo) write the same store as one process."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import captionlens as cl
from captionlens.cli import app
from captionlens.data.bundle import open_data
from captionlens.explain import methods_for
from captionlens.explain.store import ExplanationStore, StoreMismatch
from captionlens.experiments.explain_split import explain_split

runner = CliRunner()
TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(scope="module")
def tiny(tiny_shapes, tmp_path_factory):
    """A tiny untrained grid-TD run folder whose captions are a few words long."""
    data = open_data(tiny_shapes)
    vocab = sorted({w for r in data.split("train") for c in r.captions for w in c})
    cap = cl.build_captioner("gridtd", encoder="shapes", vocab=vocab, hidden_size=16, embed_size=8, seed=0)
    with torch.no_grad():
        cap.model.decoder.fc.bias[cap.vocab.index("circle")] += 4.0
    cap.config.max_length = 4
    run = tmp_path_factory.mktemp("store-run") / "run"
    cap.save(run)
    return cl.load(run), data, run


def test_a_transformers_positions_share_and_rollout_round_trip(tiny_shapes, tmp_path):
    data = open_data(tiny_shapes)
    vocab = sorted({w for r in data.split("train") for c in r.captions for w in c})
    cap = cl.build_captioner("transformer", encoder="shapes", vocab=vocab, hidden_size=16, embed_size=16, seed=0,
                             architecture_options={"layers": 1, "heads": 2})
    with torch.no_grad():  # captions of a few words
        cap.model.decoder.fc.bias[cap.vocab.index("circle")] += 4.0
    cap.config.max_length = 4
    explain_split(cap, data, tmp_path / "t.zarr", "test", ["lrp", "rollout"], "all", batch_size=2, limit=2,
                  progress=False)
    store = cl.ExplanationStore.open(tmp_path / "t.zarr")
    for image_id in store.image_ids():
        words = store.words(image_id)
        assert words
        path = next(r.path for r in data.split("test") if r.image_id == image_id)
        direct = cl.explain(cap, path, words, "lrp")
        assert torch.allclose(store.explanation(image_id, "lrp").extra["positions"], direct.extra["positions"], atol=1e-6)
        assert torch.allclose(store.explanation(image_id, "rollout").preceding,
                              cl.explain(cap, path, words, "rollout").preceding, atol=1e-6)


def store_content(path: Path) -> dict:
    """Everything a store holds, as plain data (arrays as bytes), for exact comparison."""
    store = ExplanationStore.open(path)
    content = {"attributes": store.attributes}
    for image_id in store.image_ids():
        content[image_id] = {"caption": store.caption(image_id)}
        for method in store.methods(image_id):
            group = store._root[f"images/{image_id}/{method}"]
            content[image_id][method] = {name: np.asarray(group[name][...]).tobytes() for name in sorted(group.array_keys())}
    return content


def test_round_trip_equals_explain_for_every_method(tiny, tmp_path):
    cap, data, _ = tiny
    methods = methods_for(cap.model)
    explain_split(cap, data, tmp_path / "s.zarr", "test", methods, "all", batch_size=3, limit=5,
                  progress=False)
    store = cl.ExplanationStore.open(tmp_path / "s.zarr")  # the public reading API
    records = data.split("test")[:5]
    assert store.image_ids() == sorted(r.image_id for r in records)
    for record in records:
        words = store.words(record.image_id)
        assert store.positions(record.image_id) == list(range(len(words)))
        for method in methods:
            direct = cl.explain(cap, record.path, words, method)
            stored = store.explanation(record.image_id, method)
            scale = float(direct.image.abs().max()) or 1.0
            assert torch.allclose(stored.image, direct.image, atol=2e-3 * scale), method  # float16 of map / max|map|
            assert torch.allclose(stored.grid, direct.grid, atol=1e-5), method
            assert torch.allclose(stored.preceding, direct.preceding, atol=1e-5), method
            assert torch.allclose(stored.score, direct.score, atol=1e-5), method
            for position in range(len(words)):
                assert np.allclose(store.image_map(record.image_id, position, method), stored.image[position].numpy())
                assert store.score(record.image_id, position, method) == pytest.approx(float(stored.score[position]))
                assert store.preceding(record.image_id, position, method).shape == (len(words) + 1,)
        assert store.beta(record.image_id, 0) == pytest.approx(float(cl.explain(cap, record.path, words, "attention")
                                                                     .extra["beta"][0]), abs=1e-5)
    first = records[0].image_id
    word = store.words(first)[0]
    assert (first, 0) in store.query(word=word) and all(store.words(i)[p] == word for i, p in store.query(word=word))
    with pytest.raises(KeyError, match="not in the store"):
        store.words(123456789)


def test_what_a_writer_remembers_equals_what_a_reader_reads(tiny, tmp_path, monkeypatch):
    """The explanations a store keeps after writing them are those read back from disk, bit for bit,
    and the memory it keeps them in stays within its bound."""
    store_module = importlib.import_module("captionlens.explain.store")  # cl.explain is the function

    cap, data, _ = tiny
    methods = ["lrp", "gradcam", "attention"]
    writer = explain_split(cap, data, tmp_path / "s.zarr", "test", methods, "all", batch_size=3, limit=5,
                           progress=False)
    reader = ExplanationStore.open(tmp_path / "s.zarr")
    for image_id in reader.image_ids():
        for method in methods:
            kept, read = writer.explanation(image_id, method), reader.explanation(image_id, method)
            assert kept.words == read.words and kept.positions == read.positions and kept.extra.keys() == read.extra.keys()
            for a, b in [(kept.image, read.image), (kept.grid, read.grid), (kept.preceding, read.preceding),
                         (kept.score, read.score), *zip(kept.extra.values(), read.extra.values())]:
                assert torch.equal(a, b), method
    one = store_module._nbytes(reader.explanation(reader.image_ids()[0], "lrp"))
    monkeypatch.setattr(store_module, "CACHE_BYTES", 3 * one)
    small = ExplanationStore.open(tmp_path / "s.zarr")
    for image_id in small.image_ids():
        for method in methods:
            small.explanation(image_id, method)
            assert small._cached_bytes == sum(store_module._nbytes(e) for e in small._cache.values())
            assert small._cached_bytes <= 3 * one or len(small._cache) == 1


def test_a_store_never_mixes_models_or_parameters(tiny, tmp_path):
    cap, data, _ = tiny
    explain_split(cap, data, tmp_path / "s.zarr", "test", ["lrp"], "all", batch_size=4, limit=2, progress=False)
    other = cl.build_captioner("gridtd", encoder="shapes", vocab=cap.vocab.words[4:], hidden_size=16, embed_size=8,
                               seed=1)
    with pytest.raises(StoreMismatch, match="another model"):
        explain_split(other, data, tmp_path / "s.zarr", "test", ["lrp"], "all", limit=2, progress=False)
    with pytest.raises(StoreMismatch, match="parameters"):
        explain_split(cap, data, tmp_path / "s.zarr", "test", ["lrp"], "all", limit=2, progress=False,
                      parameters={"lrp": {"epsilon": 0.5}})
    with pytest.raises(StoreMismatch, match="words"):
        explain_split(cap, data, tmp_path / "s.zarr", "test", ["lrp"], "objects", limit=2, progress=False)
    result = runner.invoke(app, ["explain-split", "--model", str(tiny[2]), "--data", str(tiny_data_folder(data)),
                                 "--store", str(tmp_path / "s.zarr"), "--epsilon", "0.5", "--limit", "2",
                                 "--methods", "lrp", "--workers", "0"])
    assert result.exit_code != 0 and "another --store" in result.output
    with pytest.raises(FileNotFoundError, match="explain-split"):
        ExplanationStore.open(tmp_path / "missing.zarr")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.csv").write_text("precious")
    with pytest.raises(ValueError, match="is not an explanation store"):  # an existing folder is never overwritten
        explain_split(cap, data, tmp_path / "results", "test", ["lrp"], "all", limit=1, progress=False)
    assert (tmp_path / "results" / "table.csv").read_text() == "precious"


def _create_at_once(path: str, barrier) -> str:
    barrier.wait()
    store = ExplanationStore.create(path, "model", "test", "all", {"lrp": {"epsilon": 0.1}})
    return store.attributes["model"]


def test_processes_creating_one_store_at_once_all_open_it(tmp_path):
    """Creation is a rename into place: no process deletes what another has just made."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    barrier = context.Manager().Barrier(6)
    with context.Pool(6) as pool:
        models = pool.starmap(_create_at_once, [(str(tmp_path / "s.zarr"), barrier)] * 6)
    assert models == ["model"] * 6
    store = ExplanationStore.open(tmp_path / "s.zarr")
    assert store.image_ids() == [] and store.verify() == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]  # no staging folders left behind


def tiny_data_folder(data) -> Path:
    return data.root


CRASHING = """
import os, signal, sys
from captionlens.cli import app
from captionlens.explain.store import ExplanationStore

calls = {"n": 0}
original = ExplanationStore.write_explanation

def dying(self, image_id, explanation):
    calls["n"] += 1
    if calls["n"] == int(os.environ["DIE_AT"]):  # half an explanation on disk, then SIGKILL
        group = self._image(image_id).create_group(explanation.method)
        group.create_array("image", shape=(2,), dtype="float32")[...] = 1.0
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, image_id, explanation)

ExplanationStore.write_explanation = dying
app(sys.argv[1:])
"""


def test_killed_mid_image_and_rerun_equals_an_uninterrupted_run(tiny, tmp_path):
    _, data, run = tiny
    command = ["explain-split", "--model", str(run), "--data", str(data.root), "--methods", "lrp,gradcam,attention",
               "--batch-size", "2", "--limit", "6", "--workers", "0"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    script = tmp_path / "crash.py"
    script.write_text(CRASHING)
    reference = tmp_path / "reference.zarr"
    done = subprocess.run([sys.executable, str(script), *command, "--store", str(reference)], env=env | {"DIE_AT": "0"},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    crashed = tmp_path / "crashed.zarr"
    killed = subprocess.run([sys.executable, str(script), *command, "--store", str(crashed)], env=env | {"DIE_AT": "5"},
                            capture_output=True, text=True)
    assert killed.returncode == -9  # SIGKILL, mid-image
    partial = ExplanationStore.open(crashed)
    on_disk = [(i, m) for i in partial.image_ids() for m in ("lrp", "gradcam", "attention")
               if f"images/{i}/{m}" in partial._root]
    unfinished = [(i, m) for i, m in on_disk if not partial.has(i, m)]
    assert len(unfinished) == 1  # the half-written explanation is on disk, and not read as complete
    with pytest.raises(KeyError, match="no complete"):
        partial.explanation(*unfinished[0])
    again = subprocess.run([sys.executable, str(script), *command, "--store", str(crashed)], env=env | {"DIE_AT": "0"},
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert store_content(crashed) == store_content(reference)


@pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun is installed with torch")
def test_two_processes_write_the_same_store_as_one(tiny, tmp_path):
    _, data, run = tiny
    command = ["-m", "captionlens", "explain-split", "--model", str(run), "--data", str(data.root), "--methods",
               "lrp,guided_gradcam,attention", "--batch-size", "2", "--limit", "7", "--workers", "0"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *command, "--store", str(tmp_path / "one.zarr")], env=env,
                         capture_output=True, text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([str(TORCHRUN), "--standalone", "--nproc_per_node", "2", *command,
                          "--store", str(tmp_path / "two.zarr")], env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr
    assert len(ExplanationStore.open(tmp_path / "two.zarr").image_ids()) == 7
    assert store_content(tmp_path / "two.zarr") == store_content(tmp_path / "one.zarr")


def test_experiments_read_a_store_and_never_recompute(tiny, tmp_path, monkeypatch):
    from captionlens.experiments.workbench import Workbench

    cap, data, _ = tiny
    explain_split(cap, data, tmp_path / "s.zarr", "test", ["lrp", "gradcam", "guided_gradcam", "attention"],
                  "all", limit=6, progress=False)

    def never(*args, **kwargs):
        raise AssertionError("recomputed")
    monkeypatch.setattr("captionlens.experiments.explain_split.explain_batch", never)
    monkeypatch.setattr("captionlens.experiments.captioning.split_features", never)  # captions come from the store
    bench = Workbench(cap, data, tmp_path / "out", "test", limit=6, progress=False, store=tmp_path / "s.zarr")
    result = bench.hallucination(min_count=0)
    assert result["true_positives"] + result["false_positives"] == len(bench.predictions.mentions()) > 0
    assert [c.words for c in bench.predictions.captions] == [ExplanationStore.open(tmp_path / "s.zarr").words(r.image_id)
                                                             for r in bench.predictions.records]


def test_report_and_viewer_read_the_store(tiny, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from captionlens.report.html import build_report
    from captionlens.viewer.app import create_app

    cap, data, _ = tiny
    store = explain_split(cap, data, tmp_path / "s.zarr", "test", ["lrp", "attention"], "all", limit=3,
                          progress=False)
    records = data.split("test")[:3]

    def never(*args, **kwargs):
        raise AssertionError("recomputed")
    monkeypatch.setattr("captionlens.report.html.explain", never)
    monkeypatch.setattr("captionlens.viewer.app.explain", never)
    report = build_report(cap, [r.path for r in records], tmp_path / "r.html", ["lrp", "attention"], store=store,
                          image_ids=[r.image_id for r in records])
    assert " ".join(store.words(records[0].image_id)) in report.read_text()
    client = TestClient(create_app(cap, data, store=store))
    image_id = f"data-{records[0].image_id}"
    caption = client.post("/api/caption", data={"image_id": image_id}).json()
    assert caption["words"] == store.words(records[0].image_id)
    result = client.post("/api/explain", json={"image_id": image_id, "word_index": 1, "method": "lrp"}).json()
    assert result["source"] == "store"
    assert result["score"] == pytest.approx(store.score(records[0].image_id, 1, "lrp"))


def test_images_without_object_words_are_stored_as_empty_explanations(tiny, tmp_path):
    cap, data, _ = tiny
    store = explain_split(cap, data, tmp_path / "s.zarr", "test", ["lrp", "gradcam"], "objects", limit=4,
                          progress=False)
    empty = [i for i in store.image_ids() if not store.positions(i)]
    with_objects = [i for i in store.image_ids() if store.positions(i)]
    assert with_objects  # the planted bias names circles
    for image_id in store.image_ids():
        for method in ("lrp", "gradcam"):
            explanation = store.explanation(image_id, method)
            assert len(explanation.words) == len(store.positions(image_id)) == explanation.image.shape[0]
            assert explanation.parameters["precision"] == "fp32"
    assert all(store.explanation(i, "lrp").image.shape[0] == 0 for i in empty)
    record = data.split("test")[5]  # and one written by hand: a caption with no object word at all
    store.write_caption(record.image_id, record.path.name, ["a", "red"], cap.vocab.encode(["a", "red"]), [], 0.0)
    store.write_explanation(record.image_id, cl.explain(cap, record.path, ["a", "red"], "lrp", words=[]))
    assert store.has(record.image_id, "lrp") and store.explanation(record.image_id, "lrp").words == []
