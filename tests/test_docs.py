"""The README and docs/: short, linked, and every command they show exists and accepts its arguments."""

import functools
import math
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
    while re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # an environment variable set for the command
        words = words[1:]
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


DEMO_COLUMNS = [("clean", 0), ("pgd", 10), ("pgd", 20), ("pgd", 50), ("pgd", 100), ("apgd-ce", 100), ("apgd-t", 100),
                ("autoattack", 100)]
BRANCHES = {"-": "-", "MBN_clean": "clean", "MBN_adv": "adv"}


def _demo_mismatches(readme: str) -> list[str]:
    """What in the README's demo table, or in the two differences its text quotes, differs from
    data/results/demo/results.csv (what `make demo` last produced)."""
    import pandas as pd

    table = pd.read_csv(ROOT / "data" / "results" / "demo" / "results.csv")
    section = readme.split("## What make demo printed", 1)[1]
    lines = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")][2:]
    rows = {(cells[0].split()[0], BRANCHES[cells[2].strip()]): [c.strip() for c in cells[3:]] for cells in lines}
    value = lambda run, branch, attack, steps: 100 * table.loc[
        (table["name"] == run) & (table["branch"] == branch) & (table["attack"] == attack) & (table["steps"] == steps),
        "accuracy"].item()
    wrong = [] if {run for run, _ in rows} == set(table["name"]) else ["the runs differ"]
    wrong += [f"{run} {branch}" for (run, branch), cells in rows.items()
              if cells != [f"{value(run, branch, a, s):.1f}" for a, s in DEMO_COLUMNS]]
    pgd = value("adv0clean", "-", "pgd", 100) - value("adv100clean", "-", "pgd", 100)
    aa = value("adv0clean", "-", "autoattack", 100) - value("adv100clean", "-", "autoattack", 100)
    text = " ".join(readme.split())
    if f"costs {pgd:.1f} points under targeted PGD-100 and {aa:.1f} under" not in text:
        wrong.append("the quoted differences")
    robust = [(run, branch) for run, branch in rows if run != "standard" and branch != "clean"]
    pgd_gap = max(value(*key, "clean", 0) - value(*key, "pgd", 100) for key in robust)
    aa_gaps = [value(*key, "clean", 0) - value(*key, "autoattack", 100) for key in robust]
    if (f"PGD-100 within {math.ceil(pgd_gap)} points of clean); AutoAttack takes "
            f"{round(min(aa_gaps))}-{round(max(aa_gaps))}.") not in text:
        wrong.append("the quoted gaps")
    return wrong


def test_the_readmes_demo_numbers_are_those_of_the_committed_demo_table():
    assert _demo_mismatches((ROOT / "README.md").read_text()) == []


@pytest.mark.parametrize("old, new, caught", [
    ("| 82.4 | 82.2 | 67.5 |", "| 82.5 | 82.2 | 67.5 |", "adv0clean -"),  # PGD-50 of 100% adv + 0% clean
    ("costs 1.4 points", "costs 1.5 points", "the quoted differences"),
    ("within 8 points", "within 6 points", "the quoted gaps"),  # the README said 6 before this test
])
def test_the_demo_check_catches_a_changed_number(old, new, caught):
    readme = (ROOT / "README.md").read_text()
    assert old in readme
    assert _demo_mismatches(readme.replace(old, new)) == [caught]
