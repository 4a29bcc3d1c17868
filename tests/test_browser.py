"""The explorer in a real browser: JupyterLab served on localhost, notebooks/explore.ipynb opened in headless
Chromium (Debian's package, driven by Playwright) against two real tiny runs made by the tests, all cells run,
every view's widgets changed once, each panel checked to redraw, screenshots saved. Waits are on conditions in
the page, never sleeps. Set ADVKIT_SKIP_BROWSER=1 to skip it on a machine without Chromium (CI installs it)."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from advkit.paths import project_root, runs_base

CHROMIUM = os.environ.get("ADVKIT_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT = 120_000  # ms: a generous bound for each wait (a loaded 2-core machine), not a sleep

pytestmark = pytest.mark.skipif(os.environ.get("ADVKIT_SKIP_BROWSER") == "1", reason="ADVKIT_SKIP_BROWSER=1")


def _served_notebook(folder: Path, runs_root: Path, claims_csv: Path) -> None:
    """A copy of the explorer (JupyterLab's autosave must never write outputs into the repository) whose
    parameters point at the test's runs and claims table."""
    notebook = json.loads((project_root() / "notebooks" / "explore.ipynb").read_text())
    for cell in notebook["cells"]:
        if "parameters" in cell["metadata"].get("tags", []):
            cell["source"] = f"runs_root = {str(runs_root)!r}\nclaims_csv = {str(claims_csv)!r}"
    folder.mkdir()
    (folder / "explore.ipynb").write_text(json.dumps(notebook))


def _claims_with_threat_models(path: Path) -> Path:
    """The committed claims table, with a threat_model column as the AutoAttack study writes it."""
    table = pd.read_csv(project_root() / "figures" / "study_claims.csv")
    pd.concat([table.assign(threat_model="targeted PGD"), table.head(3).assign(threat_model="AutoAttack")]
              ).to_csv(path, index=False)
    return path


@pytest.fixture
def jupyterlab(tmp_path, explorer_runs):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    served = tmp_path / "served"
    _served_notebook(served, explorer_runs, _claims_with_threat_models(tmp_path / "claims.csv"))
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)  # no news pop-up over the widgets
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    jupyter = Path(sys.executable).parent / "jupyter"
    proc = subprocess.Popen(
        [str(jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}", f"--IdentityProvider.token={token}",
         f"--ServerApp.root_dir={served}", f"--LabApp.user_settings_dir={tmp_path / 'settings'}",
         f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}", *(["--allow-root"] if os.geteuid() == 0 else [])],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "jupyter.log", "w"), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                _stop(proc)
                pytest.fail(f"JupyterLab did not start: {(tmp_path / 'jupyter.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield url, token
    _stop(proc)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and the kernels it started (its whole process group)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


class Page:
    """The explorer's widgets in the page, found by the CSS classes advkit.explore gives them."""

    def __init__(self, page, screenshots: Path) -> None:
        self.page, self.screenshots = page, screenshots

    def src(self, panel: str) -> str:
        return self.page.locator(f"img.advkit-{panel}").get_attribute("src") or ""

    def shown(self, panel: str) -> str:
        """Wait until the panel shows an image; return its source."""
        self.page.wait_for_function(
            "sel => { const e = document.querySelector(sel); return e && e.src && e.offsetParent !== null "
            "&& e.complete && e.naturalWidth > 0 }", arg=f"img.advkit-{panel}", timeout=TIMEOUT)
        return self.src(panel)

    def redrawn(self, panel: str, before: str) -> str:
        """Wait until the panel's image differs from ``before`` (a new PNG is a new blob URL)."""
        try:
            self.page.wait_for_function("([sel, old]) => { const e = document.querySelector(sel); "
                                        "return e && e.src && e.src !== old }", arg=[f"img.advkit-{panel}", before],
                                        timeout=TIMEOUT)
        except Exception:
            self.page.screenshot(path=str(self.screenshots / f"failed-{panel}.png"), full_page=True)
            raise AssertionError(f"the {panel} panel did not redraw; see {self.screenshots}") from None
        return self.src(panel)

    def select(self, name: str, label: str) -> None:
        self.page.locator(f".advkit-{name} select").select_option(label=label)

    def tab(self, title: str) -> None:
        self.page.locator(".lm-TabBar-tab", has_text=title).first.click()

    def output(self):
        return self.page.locator(".jp-OutputArea-output", has=self.page.locator(".widget-tab")).first


def test_explorer_in_jupyterlab_with_chromium(jupyterlab, tmp_path):
    assert Path(CHROMIUM).exists(), (
        f"{CHROMIUM} is missing: install Debian's chromium (make test does with apt-get) or set ADVKIT_SKIP_BROWSER=1")
    from playwright.sync_api import sync_playwright

    url, token = jupyterlab
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        ui = Page(browser.new_page(viewport={"width": 1500, "height": 1500}), shots)
        page = ui.page
        page.goto(f"{url}/lab/tree/explore.ipynb?token={token}")
        page.locator(".jp-Notebook").first.wait_for(timeout=TIMEOUT)
        page.get_by_text("| Idle").first.wait_for(timeout=TIMEOUT)  # the kernel is up
        page.locator(".jp-Notebook").first.click()
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_text("Run All Cells", exact=True).click()
        try:
            curves = ui.shown("curves")
        except Exception:
            page.screenshot(path=str(shots / "failed-start.png"), full_page=True)
            raise AssertionError(f"no plot appeared; see {shots}") from None
        status = page.locator(".widget-html-content", has_text="models selected").first
        assert "(2 kit runs)" in status.inner_text()
        ui.output().screenshot(path=str(shots / "explorer.png"))

        ui.select("threat-model", "untargeted PGD")  # robustness curves
        curves = ui.redrawn("curves", curves)
        ui.select("threat-model", "targeted PGD")  # back to the paper's protocol: the filter below changes it
        curves = ui.redrawn("curves", curves)

        ui.tab("BN statistics")  # Figures 5-6 of one run and layer
        statistics = ui.shown("statistics")
        assert page.locator(".advkit-BN-layer select").input_value() == "net.layer2.0.bn1"
        ui.select("BN-run", "mbn")
        statistics = ui.redrawn("statistics", statistics)

        ui.tab("adversarial examples")  # the viewer computes on demand
        page.locator("button.advkit-attack").click()
        examples = ui.shown("examples")
        page.locator(".advkit-iteration .noUi-handle").first.press("Home")
        examples = ui.redrawn("examples", examples)
        ui.select("run", "mbn")
        examples = ui.redrawn("examples", examples)
        ui.select("branch", "clean")
        examples = ui.redrawn("examples", examples)
        page.locator(".advkit-images input").fill("4")
        page.locator(".advkit-images input").press("Enter")
        examples = ui.redrawn("examples", examples)
        ui.output().screenshot(path=str(shots / "adversarial_viewer.png"))

        ui.select("filter-norm", "bn")  # a filter change: every view that shows runs redraws
        ui.redrawn("examples", examples)
        ui.redrawn("statistics", statistics)
        ui.redrawn("curves", curves)
        assert page.locator(".advkit-run select").input_value() != ""

        ui.tab("claims")
        claims = ui.shown("claims")
        ui.select("claims-threat-model", "AutoAttack")
        ui.redrawn("claims", claims)
        assert page.locator("table.advkit-claims tbody tr").count() == 3
        page.screenshot(path=str(shots / "claims.png"), full_page=True)
        errors = page.locator(".widget-html-content", has_text="error:").count()
        browser.close()
    assert errors == 0, "a view showed an error"
    assert all((shots / name).stat().st_size > 10_000 for name in ("explorer.png", "adversarial_viewer.png"))
