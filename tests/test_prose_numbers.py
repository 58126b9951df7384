"""Every result-like number in a notebook's prose appears in one of that notebook's outputs.

A learner who finds one sentence that its own outputs contradict stops trusting the printed
`True`s, so the prose may only state numbers that the same notebook prints. "Result-like"
means a decimal (0.733, 1.5), a percentage (73.3 %) or a ratio written with x or × (1.96x).
Left out: the generated run-time block (<!-- runtime:start/end -->, written by
`make docs-tables` from the recorded run), inline code and LaTeX (formulas, constants), links,
version numbers (2.21.0, TensorFlow 2.21), DOIs and the short allow-list below (citations and constants).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))

# Constants and citations that no output needs to print.
ALLOWED = {
    "127.0.0.1",  # the loopback address JupyterLab and the clusters bind to
    "255", "255.0",  # pixel scale
    "0.5",  # "half" in formulas written in words
}
NUMBER = re.compile(
    r"(?<![\w.])(\d+(?:,\d{3})*\.\d+|\d+(?:,\d{3})*)(?:\s?(%|×|x\b))?(?![\w.]*\d)"
)
SKIP = [
    re.compile(r"<!-- runtime:start -->.*?<!-- runtime:end -->", re.S),
    re.compile(r"```.*?```", re.S),  # code blocks
    re.compile(r"`[^`]*`"),  # inline code
    re.compile(r"\$\$.*?\$\$", re.S),
    re.compile(r"\$[^$]*\$"),  # LaTeX
    re.compile(r"\]\([^)]*\)"),  # link targets
    re.compile(r"https?://\S+"),
    re.compile(r"\b\d+\.\d+\.\d+\b"),  # versions
    re.compile(r"\b(?:TensorFlow|Keras|Python|TF|JupyterLab|CUDA|NumPy)\s+\d+(?:\.\d+)+"),
    re.compile(r"\b10\.\d{4,}/\S+"),  # DOIs
    re.compile(r"\b(?:arXiv:?\s?)?\d{4}\.\d{4,5}\b"),  # arXiv ids
]


def prose(nb: dict) -> str:
    text = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    for pattern in SKIP:
        text = pattern.sub(" ", text)
    return text


def outputs(nb: dict) -> str:
    parts = []
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", "")))
            for kind in ("text/plain", "text/html", "text/markdown"):
                parts.append("".join(out.get("data", {}).get(kind, "")))
    return "\n".join(parts).replace(",", "")


def result_numbers(text: str) -> list[str]:
    """Decimals, percentages and ratios in ``text`` (plain integers are counts, not results)."""
    found = []
    for m in NUMBER.finditer(text):
        number, unit = m.group(1), m.group(2)
        if "." in number or unit:
            found.append(number.replace(",", ""))
    return found


def unbacked_numbers(nb: dict) -> list[str]:
    printed = outputs(nb)
    return sorted({n for n in result_numbers(prose(nb))
                   if n not in ALLOWED and not re.search(rf"(?<![\d.]){re.escape(n)}(?!\d)", printed)})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_prose_numbers_appear_in_outputs(path):
    missing = unbacked_numbers(json.loads(path.read_text()))
    assert not missing, f"{path.name}: numbers in the prose that no output prints: {missing}"


def notebook(markdown: str, printed: str) -> dict:
    return {"cells": [
        {"cell_type": "markdown", "source": [markdown], "metadata": {}},
        {"cell_type": "code", "source": ["print(...)"], "metadata": {}, "execution_count": 1,
         "outputs": [{"output_type": "stream", "name": "stdout", "text": [printed]}]},
    ]}


def test_a_number_changed_by_hand_is_caught():
    printed = "test accuracy: 0.7330 (73.3%), 1.96x faster, 2,396 images/s\n"
    honest = "The model reaches 73.3% (0.7330), 1.96× the speed; see `lr=0.001` and $p-1$."
    assert unbacked_numbers(notebook(honest, printed)) == []
    edited = honest.replace("73.3%", "75.3%")
    assert unbacked_numbers(notebook(edited, printed)) == ["75.3"]
    assert unbacked_numbers(notebook("It ran 2.5x faster.", printed)) == ["2.5"]
    # run times live in the generated block, which the check leaves to `make docs-tables`
    assert unbacked_numbers(notebook("<!-- runtime:start -->\n| full | 3.5 min |\n<!-- runtime:end -->", printed)) == []
