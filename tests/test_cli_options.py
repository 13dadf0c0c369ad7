"""Every number the command line takes is checked on the way in (issue 28): sizes ≥ 1, limits ≥ 0,
rates and tolerances finite, ports in range, devices that exist — and the CLI is one registry of
verbs with one error handler (issue 26)."""
from __future__ import annotations

import inspect
import math
import types
import typing

import pytest
import typer
from typer.models import OptionInfo
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from captionlens.cli import app
from captionlens.cli.options import ArchitectureOptions
from captionlens.models.registry import ARCHITECTURES

runner = CliRunner()


def commands(typer_app: typer.Typer, prefix: str = ""):
    """(verb, the function typer calls) for every registered verb, sub-apps included."""
    for info in typer_app.registered_commands:
        yield f"{prefix}{info.name or info.callback.__name__.replace('_', '-')}", info.callback
    for group in typer_app.registered_groups:
        yield from commands(group.typer_instance, f"{prefix}{group.name} ")


def options_of(callback) -> list[tuple[str, type, object]]:
    """(name, base type, typer's OptionInfo) of every option of a verb (its groups expanded)."""
    found = []
    for name, parameter in inspect.signature(callback).parameters.items():
        hint = parameter.annotation
        if typing.get_origin(hint) is not typing.Annotated:
            continue
        base, *extras = typing.get_args(hint)
        if typing.get_origin(base) in (typing.Union, types.UnionType):
            base = next(a for a in typing.get_args(base) if a is not type(None))
        info = next((e for e in extras if isinstance(e, OptionInfo)), None)
        if info is not None:
            found.append((name, base, info))
    return found


ALL = dict(commands(app))
NUMERIC = [(verb, name, info) for verb, callback in ALL.items() for name, base, info in options_of(callback)
           if base in (int, float)]


def test_every_verb_is_there():
    assert {"data shapes", "data flickr30k", "data coco", "data coco2017", "train", "pretrain-encoder", "caption",
            "explain", "explain-split", "audit", "import sat-tutorial", "evaluate", "correctness", "hallucination",
            "map", "ablation", "masking", "faithfulness", "sanity", "finetune", "report", "serve", "demo"} <= set(ALL)


def test_every_numeric_option_is_checked():
    unchecked = [f"{verb} --{name}" for verb, name, info in NUMERIC if not getattr(info.parser, "checked", None)]
    assert len(NUMERIC) > 60 and not unchecked, unchecked


def test_every_architecture_option_reaches_train():
    declared = {name for decoder in ARCHITECTURES.values() for name in decoder.options}
    assert declared and declared <= {name for name, _, _ in options_of(ALL["train"])}
    assert set(ArchitectureOptions.__dataclass_fields__) == declared


values = st.one_of(st.integers(-10**12, 10**12).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.sampled_from(["nan", "inf", "-inf", "1e999", "", "  ", "0x10", "1_000", "abc", "-0", "1e9"]))


@settings(max_examples=300, derandomize=True, deadline=None)
@given(index=st.integers(0, 10_000), text=values)
def test_numeric_options_refuse_or_return_a_number_in_range(index, text):
    verb, name, info = NUMERIC[index % len(NUMERIC)]
    kind, low, high = info.parser.checked
    try:
        value = info.parser(text)
    except ValueError:
        return
    assert math.isfinite(value), (verb, name, text)
    assert (low is None or value >= low) and (high is None or value <= high), (verb, name, text, value)
    assert kind == "float" or isinstance(value, int)


PROBE = [  # the probe's findings: each stops at the command line with a message naming the option
    (["train", "--data", "d", "--arch", "gridtd", "--out", "r", "--batch-size", "-4"], "--batch-size"),
    (["train", "--data", "d", "--arch", "gridtd", "--out", "r", "--batch-size", "0"], "--batch-size"),
    (["train", "--data", "d", "--arch", "gridtd", "--out", "r", "--epochs", "0"], "--epochs"),
    (["train", "--data", "d", "--arch", "gridtd", "--out", "r", "--patience", "0"], "--patience"),
    (["train", "--data", "d", "--arch", "gridtd", "--out", "r", "--lr", "nan"], "--lr"),
    (["train", "--data", "d", "--arch", "gridtd", "--out", "r", "--device", "foo"], "--device"),
    (["train", "--data", "d", "--arch", "gridtd", "--out", "r", "--device", "meta"], "--device"),
    (["train", "--data", "d", "--arch", "transformer", "--out", "r", "--layers", "1000000000"], "--layers"),
    (["explain-split", "--model", "m", "--data", "d", "--store", "s", "--limit", "-1"], "--limit"),
    (["evaluate", "--model", "m", "--data", "d", "--limit", "-1"], "--limit"),
    (["caption", "--model", "m", "x.png", "--max-length", "0"], "--max-length"),
    (["caption", "--model", "m", "x.png", "--max-length", "1e9"], "--max-length"),
    (["serve", "--model", "m", "--rate-limit", "nan"], "--rate-limit"),
    (["serve", "--model", "m", "--port", "99999"], "--port"),
    (["serve", "--model", "m", "--port", "-1"], "--port"),
    (["serve", "--model", "m", "--max-upload-mb", "inf"], "--max-upload-mb"),
    (["audit", "--model", "m", "--tolerance", "inf"], "--tolerance"),
    (["audit", "--model", "m", "--tolerance", "nan"], "--tolerance"),
    (["explain", "--model", "m", "x.png", "--out", "o", "--epsilon", "-1"], "--epsilon"),
]


@pytest.mark.parametrize("args,option", PROBE, ids=[" ".join(a[:1] + a[-2:]) for a, _ in PROBE])
def test_a_bad_number_is_a_message_not_a_run(args, option):
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit)
    assert option in result.output and "Traceback" not in result.output


def test_empty_lists_and_alpha_beta_are_refused_after_parsing(tmp_path):
    import captionlens as cl

    cl.build_captioner("gridtd", encoder="shapes", vocab=["a", "circle"], hidden_size=8, embed_size=8).save(tmp_path / "m")
    result = runner.invoke(app, ["finetune", "--model", str(tmp_path / "m"), "--data", str(tmp_path), "--seeds", ","])
    assert result.exit_code == 2 and "--seeds needs at least one number" in result.output
    result = runner.invoke(app, ["explain", "--model", str(tmp_path / "m"), "x.png", "--out", str(tmp_path / "o"),
                                 "--alpha", "2"])
    assert result.exit_code == 2 and "α − β = 1" in result.output
    result = runner.invoke(app, ["explain", "--model", str(tmp_path / "m"), "x.png", "--out", str(tmp_path / "o"),
                                 "--methods", ","])
    assert result.exit_code == 2 and "(none given)" in result.output


def test_the_error_handler_keeps_brackets_and_names_the_extra(monkeypatch, tmp_path):
    """A message with [brackets] (the extra to install) is printed as written, not eaten as markup."""
    import captionlens as cl
    import captionlens.viewer.app  # noqa: F401  (bound to the real require before the patch below)
    from captionlens.extras import MissingExtra

    def missing(*args, **kwargs):
        raise MissingExtra("the viewer needs fastapi: pip install 'captionlens[viewer]'")

    monkeypatch.setattr("captionlens.extras.require", missing)
    cl.build_captioner("gridtd", encoder="shapes", vocab=["a", "circle"], hidden_size=8, embed_size=8).save(tmp_path / "m")
    result = runner.invoke(app, ["serve", "--model", str(tmp_path / "m")])
    assert result.exit_code == 2 and "captionlens[viewer]" in result.output


def test_max_words_per_pass_takes_auto_or_a_positive_whole_number():
    parser = next(info.parser for name, _, info in options_of(ALL["explain-split"]) if name == "max_words_per_pass")
    assert parser("auto") == "auto" and parser(" AUTO ") == "auto" and parser("3") == 3
    for text in ("0", "-2", "1.5", "many", ""):
        with pytest.raises(ValueError):
            parser(text)
