"""Real-browser check: JupyterLab from the project's venv, opened in headless Chromium.

1. Copy the notebooks to a temporary folder with their outputs cleared (so nothing
   committed is touched, and a fresh output can only come from this run).
2. Start JupyterLab on a free loopback port with a random token.
3. Open 00_setup.ipynb in Debian's Chromium, driven by Playwright; run the first code
   cell (Shift+Enter); wait until its output shows the mode line.
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
    nb = json.loads(src.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    dst.write_text(json.dumps(nb))


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
        work = Path(tmp)
        cleared_copy(ROOT / "notebooks" / NOTEBOOK, work / NOTEBOOK)
        env = {**os.environ, "SERIES_MODE": "smoke", "JUPYTER_CONFIG_DIR": str(work / "cfg")}
        cmd = [
            str(BIN / "jupyter"), "lab", "--no-browser",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={work}",
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
                browser.close()
            print(f"browser check passed: the first cell of {NOTEBOOK} printed {EXPECTED!r} in Chromium")
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
