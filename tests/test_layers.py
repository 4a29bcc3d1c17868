"""The house in tiers (issue 16): imports run down only, no circle, and the analysis tier imports no torch."""

import ast
import subprocess
import sys

from advkit import paths

PACKAGE = paths.project_root() / "advkit"
TIERS = {  # higher imports lower (or its own tier), never the other way
    0: {"validate", "paths", "paper"},  # leaf facts and checks: no torch, no other advkit module
    1: {"attacks", "autoattack", "fold", "norm", "models", "data", "distributed"},  # core: knows no runs
    2: {"config", "device", "rundir", "strategy", "train", "evaluate", "bnstats", "run", "examples", "external",
        "tblog"},  # experiment
    3: {"results", "plots", "study", "explore"},  # analysis: no torch
    4: {"cli", "sweep", "plan", "slots", "slurm", "figures", "bench"},  # face
}
TIER = {module: tier for tier, modules in TIERS.items() for module in modules}


def _imports(module: str) -> set[str]:
    """The advkit modules ``module`` imports anywhere in its file (functions included)."""
    found = set()
    for node in ast.walk(ast.parse((PACKAGE / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("advkit"):
            found |= {node.module.split(".")[1]} if "." in node.module else {a.name for a in node.names}
    return found & set(TIER)


def test_every_module_has_a_tier():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert modules == set(TIER)


def upward_imports(graph: dict[str, set[str]], tier: dict[str, int]) -> list[tuple[str, str]]:
    """(module, imported) pairs where a module imports one of a higher tier."""
    return sorted((m, i) for m, imported in graph.items() for i in imported if tier[i] > tier[m])


def import_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, trail: list[str]) -> list[str] | None:
        if state.get(m) == 1:
            return trail[trail.index(m):] + [m]
        if state.get(m) == 2:
            return None
        state[m] = 1
        for i in sorted(graph[m]):
            if circle := visit(i, trail + [m]):
                return circle
        state[m] = 2
        return None

    return next((c for m in sorted(graph) if (c := visit(m, []))), None)


def test_imports_run_down_the_tiers_and_make_no_circle():
    graph = {m: _imports(m) for m in TIER}
    assert not upward_imports(graph, TIER), f"imports up the tiers: {upward_imports(graph, TIER)}"
    assert import_circle(graph) is None, f"import circle: {' -> '.join(import_circle(graph))}"


def test_the_checker_catches_an_upward_import_and_a_circle():
    graph = {"norm": {"train"}, "train": {"norm", "config"}, "config": set()}  # core norm importing train
    assert upward_imports(graph, TIER) == [("norm", "train")]
    assert import_circle(graph) == ["norm", "train", "norm"]
    assert import_circle({"config": {"device"}, "device": {"rundir"}, "rundir": {"config"}}) == \
        ["config", "device", "rundir", "config"]  # a circle within one tier
    assert not upward_imports({"train": {"norm"}, "norm": set()}, TIER)
    assert import_circle({"train": {"norm", "config"}, "config": {"norm"}, "norm": set()}) is None  # a diamond


def test_the_analysis_tier_imports_without_torch():
    blocked = ("import sys\n"
               "class Blocker:  # any 'import torch' now raises ImportError\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] == 'torch': raise ImportError('torch is blocked')\n"
               "sys.meta_path.insert(0, Blocker())\n"
               "import advkit.results, advkit.plots, advkit.study, advkit.explore, advkit.rundir, advkit.paper\n"
               "assert 'torch' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-1500:]
    proof = subprocess.run([sys.executable, "-c", blocked.replace("advkit.results,", "advkit.train, advkit.results,")],
                           capture_output=True, text=True)
    assert proof.returncode != 0  # the block works: the experiment tier does need torch


BEFORE_RELAYER = "acf84566fc39a5d6778b4177aeb70b91a4a79d10"  # main before the re-layering of issue 16


def test_the_relayered_code_trains_bit_identical_weights(tmp_path):
    """Issue 16 changed no behaviour: a tiny MBN run of 100% adv + 50% clean (attack, Eq. 1, both branches,
    a mid-epoch checkpoint) trained by the code before the re-layering and by this code gives the same bits."""
    import os

    import torch

    from advkit import data, rundir, run
    from advkit.config import make_config

    archive = subprocess.run(["git", "-C", str(paths.project_root()), "archive", BEFORE_RELAYER, "advkit"],
                             capture_output=True)
    assert archive.returncode == 0, archive.stderr.decode()  # CI clones with history
    old = tmp_path / "before"
    old.mkdir()
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    kw = dict(epochs=1, n_train=128, batch_size=32, clean_ratio=0.5, norm="mbn", checkpoint_every_steps=3,
              train_steps=2)
    script = ("from advkit import train; from advkit.config import make_config\n"
              f"train.train(make_config('test', name='before', runs_root={str(tmp_path)!r}, **{kw!r}), "
              "show_progress=False)\n")
    env = os.environ | {"PYTHONPATH": str(old), "ADVKIT_DATA": str(data.default_root()),
                        "OMP_NUM_THREADS": str(torch.get_num_threads())}  # sums over other threads round otherwise
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    run.train_run(make_config("test", name="after", runs_root=str(tmp_path), **kw), show_progress=False)
    before, after = (rundir.load_checkpoint(tmp_path / n)["model"] for n in ("before", "after"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
