"""The generated modules under utils/lessons/ equal the notebooks' `#@save` cells."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
spec = importlib.util.spec_from_file_location("export_lessons", ROOT / "scripts" / "export_lessons.py")
export_lessons = importlib.util.module_from_spec(spec)
spec.loader.exec_module(export_lessons)


def test_generated_modules_match_the_notebooks():
    want = export_lessons.expected()
    for path, text in want.items():
        assert path.exists(), f"{path.name} missing: run `make export`"
        assert path.read_text() == text, f"{path.name} differs from its notebook: run `make export`"
    extra = [p.name for p in export_lessons.generated_now() if p not in want]
    assert not extra, f"generated modules without a notebook: {extra}"


def test_export_detects_an_edited_notebook(tmp_path, monkeypatch):
    nb = {"cells": [{"cell_type": "code", "source": ["#@save\n", "def f():\n", "    return 1\n"],
                     "metadata": {}, "outputs": [], "execution_count": None}],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "nb").mkdir()
    (tmp_path / "nb" / "07_demo.ipynb").write_text(json.dumps(nb))
    monkeypatch.setattr(export_lessons, "NOTEBOOKS", tmp_path / "nb")
    monkeypatch.setattr(export_lessons, "LESSONS", tmp_path / "lessons")
    assert export_lessons.main([]) == 0
    module = tmp_path / "lessons" / "demo.py"
    assert "notebooks/07_demo.ipynb" in module.read_text() and "def f():" in module.read_text()
    assert export_lessons.main(["--check"]) == 0
    nb["cells"][0]["source"][2] = "    return 2\n"
    (tmp_path / "nb" / "07_demo.ipynb").write_text(json.dumps(nb))
    assert export_lessons.main(["--check"]) == 1
