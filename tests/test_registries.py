"""One registry per extension point (issue 26): a new experiment is one registration — its verb, its
place in the demo and in RESULTS.md follow — and a finding that reads a column its experiment does not
have is an error, never a quiet "not measured"."""
from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from captionlens.experiments import EXPERIMENTS, ordered
from captionlens.experiments.registry import Experiment, MissingColumn, Option, Rows, register_experiment
from captionlens.explain import METHOD_INFO, methods_for


def test_every_experiment_declares_what_the_rest_reads():
    for experiment in ordered():
        assert experiment.run and experiment.description and experiment.papers, experiment.name
        assert experiment.section, f"{experiment.name} has no RESULTS.md section"
    assert [e.name for e in ordered()] == ["metrics", "ablation", "correctness", "hallucination", "map", "masking",
                                           "finetune", "faithfulness", "sanity", "visual_share"]


def test_a_renamed_column_is_an_error_not_not_measured():
    table = Rows("correctness", [{"curve": "lrp", "0.0": 0.5, "0.0_low": 0.4, "0.0_high": 0.6}],
                 EXPERIMENTS["correctness"].columns)
    assert table.interval(table.find(curve="lrp"), "0.0") == (0.4, 0.6)
    with pytest.raises(MissingColumn, match="declares no column 'correctness_at_0'"):
        table.value(table.find(curve="lrp"), "correctness_at_0")
    renamed = Rows("correctness", [{"curve": "lrp", "0.0": 0.5, "thr0_low": 0.4, "thr0_high": 0.6}],
                   EXPERIMENTS["correctness"].columns)
    with pytest.raises(MissingColumn, match="has no column '0.0_low'"):
        renamed.interval(renamed.find(curve="lrp"), "0.0")
    assert renamed.value(renamed.find(curve="attention"), "0.0") != renamed.value({}, "0.0")  # NaN: not there


def test_a_new_experiment_is_one_registration(tmp_path, monkeypatch):
    """Registered in a test, it becomes a verb with its options checked and its output shown."""
    from captionlens.cli.experiments import verb_for
    from captionlens.cli.app import command

    shown = {}

    @register_experiment(Experiment(
        name="planted", verb="planted", title="A planted experiment", papers="this test", order=99,
        options=(Option("count", 3, "How many.", "int", 1, 10),), columns=("value",),
        show=lambda result, bench, options: shown.update(result=result, options=options)))
    def planted(bench, count: int = 3) -> list[dict]:
        """Count the test images, up to COUNT."""
        return [{"value": min(count, len(bench.predictions.records))}]

    try:
        app = typer.Typer()
        command(app, "planted")(verb_for(EXPERIMENTS["planted"]))
        app.command("noop")(lambda: None)  # a group of two: verbs are named
        import captionlens as cl
        from captionlens.data.shapes import ShapesConfig, write_shapes_dataset

        data = write_shapes_dataset(tmp_path / "data", ShapesConfig(train=2, val=1, test=4), progress=False)
        cl.build_captioner("gridtd", encoder="shapes", vocab=["a", "circle"], hidden_size=8, embed_size=8).save(tmp_path / "m")
        runner = CliRunner()
        result = runner.invoke(app, ["planted", "--model", str(tmp_path / "m"), "--data", str(data), "--out",
                                     str(tmp_path / "out"), "--count", "11"])
        assert result.exit_code == 2 and "--count" in result.output  # its bounds, checked by the CLI
        result = runner.invoke(app, ["planted", "--model", str(tmp_path / "m"), "--data", str(data), "--out",
                                     str(tmp_path / "out"), "--count", "2", "--workers", "0"])
        assert result.exit_code == 0, result.output
        assert shown == {"result": [{"value": 2}], "options": {"count": 2}}
        assert "Count the test images" in runner.invoke(app, ["planted", "--help"]).output
    finally:
        del EXPERIMENTS["planted"]


def test_every_method_declares_what_figures_and_scales_read():
    assert set(METHOD_INFO) == {"lrp", "gradcam", "guided_gradcam", "guided_backprop", "gradient_x_input",
                                "attention", "rollout"}
    orders = [info.order for info in METHOD_INFO.values()]
    assert len(set(orders)) == len(orders)
    assert METHOD_INFO["gradcam"].non_negative({"relu": True}) and not METHOD_INFO["gradcam"].non_negative({})
    assert METHOD_INFO["lrp"].parameters == {"epsilon": 0.01, "alpha": 1.0, "beta": 0.0, "first_layer": "alphabeta",
                                             "attention_rule": "cp"}
    assert all(info.title and info.citation for info in METHOD_INFO.values())
    import captionlens as cl

    lstm = cl.build_captioner("gridtd", encoder="shapes", vocab=["a"], hidden_size=8, embed_size=8)
    assert "rollout" not in methods_for(lstm.model)
