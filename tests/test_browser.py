"""The explorer in a real browser: JupyterLab served on localhost, notebooks/explore.ipynb opened in headless
Chromium (Debian's package, driven by Playwright), all cells run, a widget changed, the plot checked, a
screenshot saved. Set ADVKIT_SKIP_BROWSER=1 to skip it on a machine without Chromium (CI installs it)."""

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

import pytest

from advkit.paths import project_root, runs_base

CHROMIUM = os.environ.get("ADVKIT_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(os.environ.get("ADVKIT_SKIP_BROWSER") == "1", reason="ADVKIT_SKIP_BROWSER=1")


@pytest.fixture
def jupyterlab(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    served = tmp_path / "served"  # a copy: JupyterLab's autosave must never write outputs into the repository
    served.mkdir()
    notebook = json.loads((project_root() / "notebooks" / "explore.ipynb").read_text())
    for cell in notebook["cells"]:  # an empty runs root: the selection is the paper's models, whatever ran before
        if "parameters" in cell["metadata"].get("tags", []):
            cell["source"] = f"runs_root = {str(tmp_path / 'no-runs')!r}"
    (served / "explore.ipynb").write_text(json.dumps(notebook))
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


def _plot_source(page, timeout: float = 120_000) -> str:
    image = page.locator(".jp-OutputArea-output img").first
    image.wait_for(state="visible", timeout=timeout)
    return image.get_attribute("src")


def test_explorer_in_jupyterlab_with_chromium(jupyterlab):
    assert Path(CHROMIUM).exists(), (
        f"{CHROMIUM} is missing: install Debian's chromium (make test does with apt-get) or set ADVKIT_SKIP_BROWSER=1")
    from playwright.sync_api import sync_playwright

    url, token = jupyterlab
    screenshot = runs_base() / "explorer.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/lab/tree/explore.ipynb?token={token}")
        page.locator(".jp-Notebook").first.wait_for(timeout=120_000)
        page.get_by_text("| Idle").first.wait_for(timeout=120_000)  # the kernel is up
        page.locator(".jp-Notebook").first.click()
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_text("Run All Cells", exact=True).click()
        try:
            before = _plot_source(page)
        except Exception:
            page.screenshot(path=str(screenshot), full_page=True)
            raise AssertionError(f"no plot appeared; see {screenshot}") from None
        status = page.locator(".widget-html-content").first
        assert "models selected" in status.inner_text()
        norm = page.locator(".widget-dropdown", has_text="norm").locator("select")
        norm.select_option("gn")
        deadline = time.time() + 60
        while _plot_source(page) == before and time.time() < deadline:
            time.sleep(0.5)
        after = _plot_source(page)
        page.screenshot(path=str(screenshot), full_page=True)
        text = status.inner_text()
        browser.close()
    assert after != before, "the plot did not change after the widget changed"
    assert "1 models selected" in text, text
    assert screenshot.stat().st_size > 10_000
