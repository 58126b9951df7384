"""Static checks of every committed notebook: skeleton, metadata, outputs, pairing.

These read the .ipynb files only (nbval executes them separately).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SECTIONS = ["What you will learn", "Run time", "## Setup", "## Summary", "## Exercises", "## Further reading"]
# Absolute paths of a development machine must never appear in committed outputs.
MACHINE_PATHS = re.compile(r"(/work/|/root/|/home/\w+|/Users/\w+|/tmp/tmp|C:\\\\Users)")


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def markdown(nb: dict) -> str:
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")


def code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]


def test_the_series_is_numbered_without_gaps():
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers and numbers == list(range(numbers[0], numbers[0] + len(numbers)))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_valid_nbformat_and_kernel(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_skeleton(path):
    nb = load(path)
    text = markdown(nb)
    h1 = [line for line in text.splitlines() if re.match(r"^# \S", line)]
    assert len(h1) == 1, f"{path.name}: expected one H1, found {h1}"
    for section in SECTIONS:
        assert section in text, f"{path.name}: missing section {section!r}"
    exercises = text.split("## Exercises", 1)[1]
    solutions = [c for c in code_cells(nb) if "".join(c["source"]).lstrip().startswith("# Solution")]
    assert solutions, f"{path.name}: exercises need executed solution cells ('# Solution ...')"
    assert "## Further reading" in exercises
    assert all(c["metadata"].get("jupyter", {}).get("source_hidden") for c in solutions), (
        f"{path.name}: solution cells should be collapsed (jupyter.source_hidden)"
    )
    assert "<!-- runtime:start -->" in text, f"{path.name}: the Run time table must be the generated block"


def first_line(cell: dict) -> str:
    return "".join(cell["source"]).lstrip().split("\n", 1)[0]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_solution_follows_a_cell_to_try(path):
    """Each exercise: a prompt, a cell to try (`# Try it`), then the collapsed solution."""
    cells = [c for c in load(path)["cells"] if "".join(c["source"]).strip()]
    for i, cell in enumerate(cells):
        if cell["cell_type"] == "code" and first_line(cell).startswith("# Solution"):
            before = cells[i - 1]
            assert before["cell_type"] == "code" and first_line(before).startswith("# Try it"), (
                f"{path.name}: '{first_line(cell)}' must follow a '# Try it' cell, not "
                f"{before['cell_type']} '{first_line(before)[:40]}'"
            )
            assert not before["metadata"].get("jupyter", {}).get("source_hidden")


# TensorFlow's start-up log must never reach a committed output (utils silences it).
LOG_NOISE = ("absl::InitializeLog", "cuInit", "oneDNN custom operations", "cudart_stub")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_tensorflow_log_noise_in_outputs(path):
    for cell in code_cells(load(path)):
        for out in cell["outputs"]:
            text = json.dumps(out)
            found = [n for n in LOG_NOISE if n in text]
            assert not found, f"{path.name}: TensorFlow log noise {found} in an output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_outputs_come_from_one_clean_full_run(path):
    nb = load(path)
    cells = code_cells(nb)
    counts = [c["execution_count"] for c in cells]
    assert None not in counts, f"{path.name}: unexecuted code cells"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), f"{path.name}: out-of-order run"
    outputs = [o for c in cells for o in c["outputs"]]
    assert not [o for o in outputs if o["output_type"] == "error"], f"{path.name}: error outputs"
    stdout = "".join("".join(o.get("text", "")) for o in outputs if o.get("name") == "stdout")
    assert "mode: full" in stdout or "mode = full" in stdout or "'mode': 'full'" in stdout, (
        f"{path.name}: the committed run must be a full-mode run that prints its mode"
    )
    checks = [c for c in cells if "".join(c["source"]).lstrip().startswith("# NBVAL_CHECK_OUTPUT")]
    assert len(checks) >= 2, f"{path.name}: needs at least two NBVAL_CHECK_OUTPUT cells"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_machine_paths_in_outputs(path):
    for cell in code_cells(load(path)):
        for out in cell["outputs"]:
            text = json.dumps(out.get("text", "")) + json.dumps(out.get("data", {}).get("text/plain", ""))
            found = MACHINE_PATHS.search(text)
            assert not found, f"{path.name}: machine path {found.group(0)!r} in an output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_paired_script_matches_notebook(path):
    import jupytext

    script = path.parent / "py" / path.with_suffix(".py").name
    assert script.exists(), f"py/{script.name} missing (jupytext pair, see jupytext.toml)"
    from_py = jupytext.read(script)
    from_nb = jupytext.read(path)
    src = lambda nb: [(c.cell_type, c.source.strip()) for c in nb.cells]  # noqa: E731
    assert src(from_py) == src(from_nb), f"{path.name} and {script.name} differ: run `jupytext --sync {path}`"
