"""Count lines of code in utils/ and in the notebooks (issue: utils/ is a small library).

A line of code is any line that is not blank, not a comment-only line and not part of a
docstring. Run `python scripts/code_stats.py` for the table; tests/test_structure.py keeps
the limits.
"""

from __future__ import annotations

import ast
import io
import json
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def docstring_lines(source: str) -> set[int]:
    """Line numbers (1-based) covered by module, class and function docstrings."""
    lines: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def code_lines(source: str) -> int:
    """Lines that carry code: not blank, not only a comment, not in a docstring."""
    skip = docstring_lines(source)
    has_code: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                        tokenize.DEDENT, tokenize.ENDMARKER):
            continue
        has_code.update(range(tok.start[0], tok.end[0] + 1))
    return len(has_code - skip)


def notebook_code(path: Path) -> str:
    """The code of a notebook's code cells (a `%%writefile` cell's file included), IPython
    magics and shell lines left out."""
    cells = json.loads(path.read_text())["cells"]
    out = []
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        if src.lstrip().startswith("%%"):
            if not src.lstrip().startswith("%%writefile"):
                continue  # another cell magic (bash, html...): not Python
            src = src.lstrip().split("\n", 1)[1] if "\n" in src.lstrip() else ""
        out.append("\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!"))))
    return "\n\n".join(out)


def utils_table() -> dict[str, int]:
    return {str(p.relative_to(ROOT)): code_lines(p.read_text())
            for p in sorted((ROOT / "utils").rglob("*.py"))}


def notebook_table() -> dict[str, int]:
    return {p.name: code_lines(notebook_code(p))
            for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))}


def main() -> int:
    u, n = utils_table(), notebook_table()
    for name, count in sorted(u.items(), key=lambda kv: -kv[1]):
        print(f"{count:6d}  {name}")
    print(f"{sum(u.values()):6d}  utils/ in all")
    for name, count in n.items():
        print(f"{count:6d}  {name}")
    print(f"{sum(n.values()):6d}  notebooks in all")
    print(f"utils : notebooks = {sum(u.values()) / sum(n.values()):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
