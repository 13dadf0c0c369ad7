"""The documentation's code runs (issues 23 and 26): every ```python block of README.md and of the pages
under docs/ is executed, the blocks of one page in order and in one namespace (as a reader pastes them
into one session), in a folder laid out like the demo's output (``demo_workspace``). A renamed function,
a wrong keyword or a path the demo does not write fails here, not in a reader's terminal."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def pages() -> list[Path]:
    return [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))] if BLOCK.search(p.read_text())]


def test_the_readme_has_python_examples():
    assert ROOT / "README.md" in pages()


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs(page, demo_workspace, tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(demo_workspace / "runs" / "demo")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__docs__"}
    text = page.read_text()
    for match in BLOCK.finditer(text):
        line = text[: match.start()].count("\n") + 2
        code = compile(match.group(1), f"{page.relative_to(ROOT)}, block at line {line}", "exec")
        exec(code, namespace)  # noqa: S102  (our own documentation)
    assert os.getcwd() == str(tmp_path)
