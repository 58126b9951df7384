"""Write measured tables into the docs (between <!-- NAME:start --> and <!-- NAME:end -->).

- every notebook: the run-time table under its "Run time" heading (utils.series.runtime_block),
  in the .ipynb and its jupytext pair (markdown only: outputs are left as they are);
- docs/instructor-guide.md and README.md: the run-time table (utils.series.runtime_table()).
- README.md: the benchmark table from bench-results/bench.md, if present and full-size, under a
  heading that names the kind of machine (CPU, SIMD width, bfloat16 support, GPU); the tables of
  other kinds of machine stay, so the README keeps one table per kind it was run on.
Usage: make docs-tables
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from utils.series import RUNTIME_END, RUNTIME_START, notebook_paths, runtime_block, runtime_table  # noqa: E402


def replace_block(path: Path, name: str, body: str) -> None:
    text = path.read_text()
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: markers <!-- {name}:start/end --> not found")
    path.write_text(pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text))


def machine_kind(machine: dict) -> str:
    """The heading of a benchmark table: what makes one machine's ratios differ from another's."""
    bf16 = machine.get("bfloat16", "unknown").split(" (")[0]
    kind = f"{machine['cpu']}, {machine['cores']} cores, {machine['SIMD']} SIMD, bfloat16 {bf16}"
    return kind + ("" if machine.get("gpu", "none") == "none" else f", GPU {machine['gpu']}")


def merge_machine_table(block: str, kind: str, table: str) -> str:
    """The README's benchmark block with ``table`` under ``#### kind``, replacing that kind's old
    table or added after the others; tables of other kinds stay as they are."""
    sections = [s for s in re.split(r"(?m)^(?=#### )", block.strip()) if s.strip()]
    new = f"#### {kind}\n\n{table.strip()}\n"
    heads = [s.splitlines()[0][5:].strip() for s in sections]
    if kind in heads:
        sections[heads.index(kind)] = new
    else:
        sections.append(new)
    return "\n".join(s.rstrip() + "\n" for s in sections)


def markdown_table(df) -> str:
    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "\n".join("| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False))


def update_notebook(path: Path) -> bool:
    """Write the generated run-time block into the notebook's markdown; True if it changed."""
    import subprocess

    import nbformat

    nb = nbformat.read(path, as_version=4)
    block = runtime_block(path)
    pattern = re.compile(re.escape(RUNTIME_START) + ".*?" + re.escape(RUNTIME_END), re.S)
    changed = False
    for cell in nb.cells:
        if cell.cell_type == "markdown" and RUNTIME_START in cell.source:
            new = pattern.sub(lambda _: block, cell.source)
            changed |= new != cell.source
            cell.source = new
    if changed:
        nbformat.write(nb, path)
        subprocess.run([sys.executable, "-m", "jupytext", "--quiet", "--sync", str(path)], check=True)
    return changed


def main() -> int:
    for path in notebook_paths():
        if update_notebook(path):
            print(f"run-time block updated: {path.name}")
    table = markdown_table(runtime_table())
    replace_block(ROOT / "docs" / "instructor-guide.md", "runtime-table", table)
    replace_block(ROOT / "README.md", "runtime-table", table)
    bench = ROOT / "bench-results" / "bench.md"
    if bench.exists() and "mode: full" in bench.read_text().splitlines()[0]:  # a smoke run is only a check
        machine = json.loads((ROOT / "bench-results" / "machine.json").read_text())
        block = re.search(r"<!-- bench-table:start -->\n(.*?)<!-- bench-table:end -->", (ROOT / "README.md").read_text(), re.S)
        replace_block(ROOT / "README.md", "bench-table", merge_machine_table(block[1], machine_kind(machine), bench.read_text()))
    print("docs tables updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
