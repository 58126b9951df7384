"""Real-browser check: JupyterLab from the project's venv, opened in headless Chromium.

1. Copy the notebooks folder (notebooks and their jupytext pairs) to a temporary folder,
   outputs cleared (so nothing committed is touched, and a fresh output can only come from
   this run).
2. Start JupyterLab as `make lab` does (same settings, loopback, random token, free port).
3. In Debian's Chromium, driven by Playwright, check the first view a learner gets: the
   file browser lists every lesson once, no "Jupyter news" pop-up appears; open
   00_setup.ipynb, run its first code cell (Shift+Enter), wait until its output shows the
   mode line, and check that the output holds no standard-error block (TensorFlow log).
4. Save a screenshot to runs/browser-check.png; stop JupyterLab (its whole process group).

Usage: make browser-check   (needs `chromium` on PATH: apt-get install chromium)
Exit code 0 on success; a message and exit code 1 otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NOTEBOOK = "00_setup.ipynb"
EXPECTED = "mode: smoke"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cleared_copy(src: Path, dst: Path) -> None:
    """Copy the notebooks folder; every .ipynb with its outputs cleared."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
    for path in dst.glob("*.ipynb"):
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            if cell["cell_type"] == "code":
                cell["outputs"], cell["execution_count"] = [], None
        path.write_text(json.dumps(nb))


def lab_args() -> list[str]:
    """The JupyterLab options `make lab` uses (from the Makefile's LAB_ARGS)."""
    text = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    line = next(t for t in text.splitlines() if t.startswith("LAB_ARGS"))
    return [a for a in line.split(":=", 1)[1].split() if not a.startswith("--ServerApp.root_dir")]


def wait_for_server(url: str, timeout: float, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {server.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer at {url.split('?')[0]} within {timeout:.0f} s")


def main() -> int:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        print("browser check: no `chromium` on PATH. Install it: sudo apt-get install chromium")
        return 1
    from playwright.sync_api import sync_playwright

    port, token = free_port(), secrets.token_hex(16)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "notebooks"
        cleared_copy(ROOT / "notebooks", work)
        env = {**os.environ, "SERIES_MODE": "smoke", "JUPYTER_CONFIG_DIR": str(work / "cfg")}
        cmd = [
            str(BIN / "jupyter"), "lab", "--no-browser",
            f"--ServerApp.port={port}", f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={work}", *lab_args(),
        ]  # fmt: skip
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")  # CI containers run as root; Jupyter refuses otherwise
        log = (work / "lab.log").open("w")
        server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_server(f"http://127.0.0.1:{port}/api/status?token={token}", 90, server)
            with sync_playwright() as pw:
                browser = pw.chromium.launch(
                    executable_path=chromium,
                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                          "--disable-component-update", "--disable-sync", "--no-first-run"],
                )  # fmt: skip
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/lab?token={token}")
                page.wait_for_selector(".jp-DirListing-item", timeout=90_000)
                names = page.locator(".jp-DirListing-item .jp-DirListing-itemText").all_inner_texts()
                lessons = [n for n in names if n[:2].isdigit()]
                stems = [n.rsplit(".", 1)[0] for n in lessons]
                if len(stems) != len(set(stems)):
                    raise AssertionError(f"the file browser lists lessons twice: {lessons}")
                page.wait_for_timeout(3000)  # the news question, if any, comes shortly after start
                news = page.locator(".Toastify__toast", has_text="news")
                if news.count():
                    raise AssertionError("JupyterLab asks about Jupyter news: " + news.first.inner_text())
                page.goto(f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK}?token={token}")
                page.wait_for_selector(".jp-Notebook .jp-CodeCell", timeout=90_000)
                # Wait for the kernel, then run the first code cell.
                page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=90_000)
                first = page.locator(".jp-Notebook .jp-CodeCell").first
                output = first.locator(".jp-OutputArea-output", has_text=EXPECTED)
                shot = ROOT / "runs" / "browser-check.png"
                shot.parent.mkdir(exist_ok=True)
                try:
                    # A key press that lands before the kernel is connected is lost:
                    # try up to three times, a minute each.
                    for attempt in range(3):
                        dialog = page.locator(".jp-Dialog .jp-mod-accept")
                        if dialog.count():  # "Select Kernel" for notebooks without kernelspec
                            dialog.first.click()
                        first.locator(".jp-InputArea-editor").click()
                        page.keyboard.press("Shift+Enter")
                        try:
                            output.first.wait_for(timeout=60_000)
                            break
                        except Exception:
                            if attempt == 2:
                                raise
                finally:
                    page.screenshot(path=str(shot))
                text = first.locator(".jp-OutputArea").inner_text()
                stderr = first.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
                if stderr.count():
                    raise AssertionError("the first cell shows a standard-error block: " + stderr.first.inner_text()[:300])
                browser.close()
            print(f"browser check passed: {len(lessons)} lessons listed once each, no news pop-up; "
                  f"the first cell of {NOTEBOOK} printed {EXPECTED!r} with no log block, in Chromium")
            print("cell output (first lines):", " | ".join(text.splitlines()[:3]))
            return 0
        except Exception as err:  # report, with the server log, and fail
            log.flush()
            print(f"browser check FAILED: {type(err).__name__}: {err}")
            print("JupyterLab log (last lines):\n" + "".join((work / "lab.log").read_text().splitlines(True)[-20:]))
            return 1
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
            log.close()


if __name__ == "__main__":
    raise SystemExit(main())
