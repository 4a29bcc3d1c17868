"""The README and docs/: short, linked, and every command they show exists and accepts its arguments."""

import functools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from advkit import config, paths, sweep

ROOT = paths.project_root()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands(page: Path) -> list[str]:
    """The commands of a page's ```bash blocks (continuation lines joined, comments dropped)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.extend(part.strip() for part in line.split("&&"))
    return commands


def test_the_readme_is_short_links_every_docs_page_and_holds_no_placeholder():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 160
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, f"{page.name} is not linked from the README"
    for target in re.findall(r"\]\(((?:docs|figures)/[^)#]+)", readme):
        assert (ROOT / target).exists(), target
    assert not re.search(r"\b[A-Z]{4,}_[A-Z]{4,}\b", readme), "a placeholder is left in the README"


@functools.cache
def _help_works(module: str, *subcommand: str) -> bool:
    return subprocess.run([sys.executable, "-m", module, *subcommand, "--help"], capture_output=True,
                          cwd=ROOT).returncode == 0


def _parameters(words: list[str]) -> dict:
    return {words[i + 1]: yaml.safe_load(words[i + 2]) for i, w in enumerate(words) if w == "-p"}


def _check(command: str) -> None:
    words = shlex.split(command)
    program = words[0].removeprefix(".venv/bin/")
    if program == "make":
        targets = re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), re.MULTILINE)
        assert words[1] in targets, command
    elif program == "advkit":
        assert _help_works("advkit.cli", words[1]), command
        if words[1] == "run":
            config.config_from_parameters(_parameters(words))
        if words[1] == "sweep":
            sweep.load_sweep(ROOT / words[2])
        if words[1] == "evaluate":
            config.config_from_parameters(_parameters(words) | {"arch": words[words.index("--arch") + 1]})
    elif program == "papermill":
        notebook = next(w for w in words[1:] if w.endswith(".ipynb"))
        assert (ROOT / notebook).exists(), command
        if notebook.endswith("experiment.ipynb"):
            config.config_from_parameters(_parameters(words))
    elif program in ("python", "python3", "torchrun") or program.endswith("python"):
        module = words[words.index("-m") + 1]
        if module.startswith("advkit"):
            assert _help_works(module), command
    else:
        assert program in ("mkdir", "pip", "conda", "apt-get", "tensorboard", "jupyter"), f"unchecked: {command}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_shown_exists_and_accepts_its_arguments(page):
    for command in _commands(page):
        _check(command)
