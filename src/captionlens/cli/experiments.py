"""One verb per registered experiment (``experiments/registry.py``), generated: its options come from
the experiment's declared ``Option``s, its help from its docstring, its output from its ``show``. Every
experiment verb also takes the dataset options, the experiment options (``--split``, ``--limit``,
``--subset``, ``--ground-truth``, ``--store`` ...) and ``--out``."""
from __future__ import annotations

import inspect
import keyword
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..experiments import ordered
from ..experiments.registry import Experiment, Option
from .app import app, command
from .options import (DataOption, DatasetOptions, ExperimentOptions, ModelOption, OutOption, choice, comma_list,
                      integers, methods_help, number, whole)


def _typed(option: Option, verb: str):
    """The annotation typer reads for one experiment option, and how its value reaches the run function."""
    names = (f"--{option.cli_name}",)
    keep = lambda value: value  # noqa: E731
    if option.kind in ("int", "float"):
        parser = (whole(option.low, option.high) if option.kind == "int" else
                  number(option.low, option.high, option.low_open, option.high_open))
        kind = Optional[int if option.kind == "int" else float] if option.default is None else \
            (int if option.kind == "int" else float)
        return Annotated[kind, typer.Option(*names, help=option.help, parser=parser)], keep
    if option.kind == "bool":
        return Annotated[bool, typer.Option(*names, help=option.help)], keep
    if option.kind == "path":
        return Annotated[Optional[Path], typer.Option(*names, help=option.help)], keep
    if option.kind == "str":
        return Annotated[Optional[str], typer.Option(*names, help=option.help)], keep
    if option.kind == "choice":
        enum = choice(f"{verb}_{option.name}", option.choices)
        return Annotated[enum, typer.Option(*names, help=option.help)], lambda value: value.value
    if option.kind == "choices":
        enum = choice(f"{verb}_{option.name}", option.choices)
        return (Annotated[Optional[list[enum]], typer.Option(*names, help=option.help)],
                lambda values: [v.value for v in values] if values else None)
    if option.kind == "methods":
        from ..explain import METHODS

        return (Annotated[Optional[str], typer.Option(*names, help=methods_help())],
                lambda text: tuple(comma_list(text, METHODS, "method")) if text is not None else None)
    if option.kind == "ints":
        return (Annotated[str, typer.Option(*names, help=option.help)],
                lambda text: integers(text, f"--{option.cli_name}"))
    raise TypeError(f"experiment option {option.name!r} has an unknown kind {option.kind!r}")


def _parameter(option: Option) -> str:
    """The verb's parameter of an option: named after its flag (``--words`` -> words), unless the flag is
    no Python name (``--lambda``)."""
    name = option.cli_name.replace("-", "_")
    return name if name.isidentifier() and not keyword.iskeyword(name) else option.name


def verb_for(experiment: Experiment):
    """The command of one experiment: a function whose signature typer reads."""
    declared = {_parameter(option): option for option in experiment.options}
    typed = {parameter: _typed(option, experiment.verb) for parameter, option in declared.items()}
    defaults = {parameter: option.default for parameter, option in declared.items()}

    def run(model, data, dataset, options, out, **given) -> None:
        from ..api import load
        from ..data.ground_truth import Subset
        from ..experiments.workbench import Workbench

        values = {declared[name].name: typed[name][1](value) for name, value in given.items()}
        subset = Subset.from_options(options.subset, options.subset_words, options.exclude_word)
        bench = Workbench(load(model, options.device), dataset.open(data), out, options.split, options.limit,
                          options.beam_size, ground_truth=options.ground_truth.value, subset=subset,
                          workers=options.workers, store=options.store)
        result = experiment.run(bench, **values)
        if experiment.show:
            experiment.show(result, bench, values)

    parameters = [inspect.Parameter("model", inspect.Parameter.KEYWORD_ONLY, annotation=ModelOption),
                  inspect.Parameter("data", inspect.Parameter.KEYWORD_ONLY, annotation=DataOption),
                  inspect.Parameter("dataset", inspect.Parameter.KEYWORD_ONLY, annotation=DatasetOptions),
                  inspect.Parameter("options", inspect.Parameter.KEYWORD_ONLY, annotation=ExperimentOptions),
                  inspect.Parameter("out", inspect.Parameter.KEYWORD_ONLY, annotation=OutOption,
                                    default=Path("results"))]
    parameters += [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation,
                                     default=defaults[name]) for name, (annotation, _) in typed.items()]
    run.__signature__ = inspect.Signature(parameters)
    run.__name__ = experiment.verb.replace("-", "_")
    run.__doc__ = (f"{experiment.description}\n\n    Example: captionlens {experiment.verb} --model runs/demo/gridtd "
                   f"--data runs/demo/data --out results/{experiment.name} --limit 100")
    return run


for _experiment in ordered():
    command(app, _experiment.verb)(verb_for(_experiment))
