"""Write measured tables into the docs (between <!-- NAME:start --> and <!-- NAME:end -->).

- docs/instructor-guide.md: the run-time table (utils.series.runtime_table()).
- README.md: the benchmark table from bench-results/bench.md, if present.
Usage: make docs-tables
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from utils.series import runtime_table  # noqa: E402


def replace_block(path: Path, name: str, body: str) -> None:
    text = path.read_text()
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: markers <!-- {name}:start/end --> not found")
    path.write_text(pattern.sub(lambda m: m.group(1) + body.rstrip() + "\n" + m.group(2), text))


def markdown_table(df) -> str:
    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "\n".join("| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False))


def main() -> int:
    replace_block(ROOT / "docs" / "instructor-guide.md", "runtime-table", markdown_table(runtime_table()))
    bench = ROOT / "bench-results" / "bench.md"
    if bench.exists():
        replace_block(ROOT / "README.md", "bench-table", bench.read_text())
    print("docs tables updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
