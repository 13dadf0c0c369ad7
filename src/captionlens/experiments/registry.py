"""The registry of experiments: each declares, in its own module, what it is called, which of the
papers' tables it reproduces, its options, the columns of its table, its findings and its section of
RESULTS.md. The command line's verbs, the demo and RESULTS.md are generated from here, so a new
experiment is one module with one ``register_experiment`` — nothing else to edit.

    @register_experiment(Experiment(name="masking", verb="masking", title="Feature masking", papers="Fig. 4",
                                    options=(Option("fraction", 0.1, "Share of the pixels masked.", "float", 0, 1),),
                                    columns=("method", "masked", "vanished", ...), ...))
    def masking(bench, fraction=0.1, ...): ...   # -> its table's rows (or a dict holding them)

Findings read an experiment's table through ``Rows``, which refuses a column the experiment did not
declare: a renamed column is an error in the tests, never a verdict silently turned "not measured".
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Finding = tuple[str, str, str]  # (the papers' claim, its verdict, the numbers behind it)


@dataclass(frozen=True)
class Option:
    """One option of an experiment: a keyword of its run function and a flag of its verb.

    ``kind``: "int", "float", "str", "bool", "path", "choice" (one of ``choices``), "choices" (the flag
    repeated, several of ``choices``), "methods" (comma-separated explanation methods) or "ints"
    (comma-separated whole numbers). Numbers are checked against [low, high] (open ends where asked)."""

    name: str
    default: Any
    help: str
    kind: str = "int"
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    flag: str | None = None  # the command line's name when it is not --<name>

    @property
    def cli_name(self) -> str:
        return self.flag or self.name.replace("_", "-")


@dataclass(frozen=True)
class Experiment:
    """What the rest of captionlens knows about one experiment."""

    name: str  # its key in results.json and the file names of its tables
    verb: str  # its command: captionlens <verb>
    title: str
    papers: str  # which table or figure of the papers (or the source beyond them)
    order: int  # where it comes in the demo, in RESULTS.md and in the list of verbs
    run: Callable[..., Any] = None  # run(bench: Workbench, **options) -> rows, or a dict holding them
    options: tuple[Option, ...] = ()
    # the columns of its main table that findings or RESULTS.md read: "name", "prefix*" for a family of
    # columns, a trailing "?" for one a table may lack (a bias rate where no bias is planted)
    columns: tuple[str, ...] = ()
    demo: Callable[[bool, int], dict] = lambda quick, seed: {}  # the options the demo runs it with
    findings: Callable[[dict, str], list[Finding]] | None = None  # (results.json, architecture) -> findings
    section: Callable[[dict, list[str]], list[str]] | None = None  # (results.json, architectures) -> Markdown
    show: Callable[[Any, Any, dict], None] | None = None  # what its verb prints: (result, bench, options)
    aliases: tuple[str, ...] = ()  # other names of it on the Workbench (bench.mean_average_precision)
    description: str = ""  # the verb's --help


EXPERIMENTS: dict[str, Experiment] = {}


def register_experiment(experiment: Experiment) -> Callable[[Callable], Callable]:
    """Register ``experiment`` with the decorated function as its ``run``."""

    def decorator(run: Callable) -> Callable:
        if experiment.name in EXPERIMENTS:
            raise ValueError(f"experiment {experiment.name!r} is registered twice")
        complete = Experiment(**{**experiment.__dict__, "run": run,
                                 "description": experiment.description or (run.__doc__ or "").strip()})
        EXPERIMENTS[experiment.name] = complete
        return run

    return decorator


def ordered() -> list[Experiment]:
    """The registered experiments in their order (the demo runs them so; RESULTS.md shows them so)."""
    return sorted(EXPERIMENTS.values(), key=lambda e: e.order)


def experiment(name: str) -> Experiment:
    """The experiment registered as ``name`` (or under one of its aliases)."""
    for registered in EXPERIMENTS.values():
        if name == registered.name or name in registered.aliases:
            return registered
    raise ValueError(f"unknown experiment {name!r}; choose one of: {', '.join(EXPERIMENTS)}")


class MissingColumn(KeyError):
    """A finding asked for a column its experiment does not declare (or its table does not have)."""


@dataclass
class Rows:
    """An experiment's rows as findings and RESULTS.md read them: ``find(curve="lrp")`` is the first
    matching row (an empty one when none matches: a method this model lacks); ``value(row, column)``
    its value, NaN where the row leaves it empty — and ``MissingColumn`` for a column the experiment
    did not declare."""

    experiment: str
    rows: Sequence[dict]
    columns: Sequence[str] = field(default_factory=tuple)

    @classmethod
    def of(cls, results: dict, name: str, arch: str, key: str | None = None) -> "Rows":
        table = results.get(name, {}).get(arch) or []
        if key is not None:
            table = (table or {}).get(key, []) if isinstance(table, dict) else []
        return cls(name, table, EXPERIMENTS[name].columns if name in EXPERIMENTS else ())

    def find(self, **match) -> dict:
        for column in match:
            self._declared(column)
        return next((r for r in self.rows if all(r.get(k) == v for k, v in match.items())), {})

    def value(self, row: dict, column: str) -> Any:
        optional = self._declared(column)
        if row and column not in row and not optional and not any(column in r for r in self.rows):
            raise MissingColumn(f"the {self.experiment} table has no column {column!r} (its columns: "
                                f"{', '.join(sorted({k for r in self.rows for k in r}))})")
        value = row.get(column)
        return float("nan") if value is None else value

    def interval(self, row: dict, column: str) -> tuple[float, float]:
        """(low, high) of ``column``: the columns ``column_low`` and ``column_high``."""
        return self.value(row, f"{column}_low"), self.value(row, f"{column}_high")

    def _declared(self, column: str) -> bool:
        """Whether ``column`` is declared optional; MissingColumn when it is not declared at all."""
        if not self.columns:
            return True
        for declared in self.columns:
            name = declared.rstrip("?")
            if column == name or (name.endswith("*") and column.startswith(name[:-1])):
                return declared.endswith("?")
        raise MissingColumn(f"the {self.experiment} experiment declares no column {column!r}; declared: "
                            f"{', '.join(self.columns)}")
