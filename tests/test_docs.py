"""The documentation's code runs (issues 23 and 26): every ```python block of README.md and of the pages
under docs/ is executed, the blocks of one page in order and in one namespace (as a reader pastes them
into one session), in a folder laid out like the demo's output (``demo_workspace``); every
``captionlens`` command in a ```bash block names a verb and options that exist; and the site builds
with ``mkdocs build --strict`` (broken links and references fail it). A renamed function, a wrong
keyword, a dropped flag or a path the demo does not write fails here, not in a reader's terminal."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
BASH = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)


def pages() -> list[Path]:
    return [p for p in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))] if BLOCK.search(p.read_text())]


def test_the_readme_has_python_examples():
    assert ROOT / "README.md" in pages()


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs(page, demo_workspace, tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "demo").symlink_to(demo_workspace / "runs" / "demo")
    (tmp_path / "models").symlink_to(demo_workspace / "models")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace: dict = {"__name__": "__docs__"}
    text = page.read_text()
    for match in BLOCK.finditer(text):
        line = text[: match.start()].count("\n") + 2
        code = compile(match.group(1), f"{page.relative_to(ROOT)}, block at line {line}", "exec")
        exec(code, namespace)  # noqa: S102  (our own documentation)
    assert os.getcwd() == str(tmp_path)


def commands_in(text: str) -> list[list[str]]:
    """Every captionlens command line of the page's bash blocks, as tokens (after the program name)."""
    found = []
    for block in BASH.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0]
            for segment in re.split(r"&&|;", line):
                tokens = shlex.split(segment.replace("[", " ").replace("]", " ").replace("|", " "))
                for k, token in enumerate(tokens):
                    if token.endswith("captionlens") and (k == 0 or tokens[k - 1] == "-m"):
                        found.append([t for t in tokens[k + 1:] if t != "..." and t != "…"])
                        break
    return found


@pytest.mark.parametrize("page", [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_command_exists(page):
    from captionlens.cli import app

    group = typer.main.get_command(app)
    problems = []
    for tokens in commands_in(page.read_text()):
        command, rest = group, list(tokens)
        while hasattr(command, "commands") and rest and not rest[0].startswith("-"):
            name = rest.pop(0)
            if name not in command.commands:
                problems.append(f"no verb {name!r} in `captionlens {' '.join(tokens)}`")
                break
            command = command.commands[name]
        else:
            flags = {opt for param in getattr(command, "params", []) for opt in getattr(param, "opts", [])}
            flags |= {opt for param in getattr(command, "params", []) for opt in getattr(param, "secondary_opts", [])}
            flags |= {"--help", "-h"}
            problems += [f"`captionlens {' '.join(tokens)}`: no option {t.split('=')[0]}"
                         for t in rest if t.startswith("--") and t.split("=")[0] not in flags]
    assert not problems, "\n".join(problems)


def test_the_site_builds_strictly(tmp_path):
    """mkdocs build --strict: every page in the navigation, every link and anchor resolving, the API
    reference rendered from the docstrings."""
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, env=os.environ | {"NO_MKDOCS_2_WARNING": "1"},
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "explain_batch" in api and "register_experiment" in api


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150
    text = "\n".join(lines)
    assert "NOTES.md" not in text and not re.search(r"issue \d", text)


def test_every_demo_image_named_is_one_the_demo_writes():
    """The examples, the prose and the CLI's --help name images of the full demo's test split by file
    name (``runs/demo/data/images/shapes_NNNNNN.png``); the demo numbers them train, val, test. When the
    demo's sizes change, its first test image gets another number (it did on 2026-12-06: 004500 became
    003400), and a name left behind reads a missing file in a reader's terminal — while the examples
    here still ran, on a workspace whose files were copied to the old names."""
    from captionlens.demo import FULL
    from conftest import demo_test_image

    written = {demo_test_image(index) for index in range(FULL.data.test)}
    texts = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "src").rglob("*.py"))]
    named = [(path.relative_to(ROOT), name) for path in texts
             for name in re.findall(r"runs/demo/data/images/(shapes_\d{6}\.png)", path.read_text())]
    assert named, "no page names a demo image: the pattern is out of date"
    outside = [f"{path}: {name}" for path, name in named if name not in written]
    assert not outside, (f"not in the demo's test split ({demo_test_image(0)} .. "
                         f"{demo_test_image(FULL.data.test - 1)}): {outside}")
