"""Project wiring: pins agree, JupyterLab stays on loopback, CI runs the README's command."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pins(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#")[0].strip().lstrip("- ").strip()
        m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==([\w.]+)", line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def test_requirements_and_environment_yml_agree():
    req = pins((ROOT / "requirements.txt").read_text().splitlines())
    env_text = (ROOT / "environment.yml").read_text()
    env = pins(env_text.splitlines())
    assert req and req == env
    assert req["tensorflow"] == "2.21.0"
    assert "python=3.11" in env_text
    assert "-e ." in env_text and "-e ." in (ROOT / "requirements.txt").read_text()


def test_every_requirement_is_pinned_exactly():
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-e"):
            assert "==" in line, f"unpinned requirement: {line}"


def make_dry_run(target: str) -> str:
    # --always-make is not used: only print the commands of the target itself.
    return subprocess.run(
        ["make", "-n", "-o", ".venv/.installed-stamp", target],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout


def test_jupyterlab_listens_on_loopback_with_token():
    cmd = make_dry_run("lab")
    assert "jupyter lab" in cmd
    assert "--ServerApp.ip=127.0.0.1" in cmd
    assert "token=''" not in cmd and 'token=""' not in cmd and "--ServerApp.token" not in cmd
    assert "--ServerApp.root_dir=notebooks" in cmd


def test_test_target_runs_unit_tests_and_nbval_in_smoke_mode():
    cmd = make_dry_run("test")
    assert "SERIES_MODE=smoke" in cmd and "--nbval-lax" in cmd and "notebooks" in cmd


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make lab" in readme
    assert re.search(r"^make test$", ci, re.M)
