"""Write measured tables into the docs (between <!-- NAME:start --> and <!-- NAME:end -->).

- every notebook: the run-time table under its "Run time" heading (utils.series.runtime_block),
  in the .ipynb and its jupytext pair (markdown only: outputs are left as they are);
- docs/instructor-guide.md and README.md: the run-time table (utils.series.runtime_table()).
- README.md: the benchmark table from bench-results/bench.md, if present.
Usage: make docs-tables
"""

from __future__ import annotations

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
        replace_block(ROOT / "README.md", "bench-table", bench.read_text())
    print("docs tables updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
