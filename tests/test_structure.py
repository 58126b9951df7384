"""utils/ stays a small library: its size, its import graph and no repeated code.

The limits are the project's (issue: the lesson's code is in the lesson): at most 3,500 lines
of code in utils/ in all, no file over 500, at most 1.5 lines of utils/ code per line of
notebook code, no import circle, no block of six code lines repeated inside utils/.
`python scripts/code_stats.py` prints the counts.
"""

from __future__ import annotations

import ast
import importlib.util
import io
import tokenize
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("code_stats", ROOT / "scripts" / "code_stats.py")
code_stats = importlib.util.module_from_spec(spec)
spec.loader.exec_module(code_stats)

UTILS = sorted((ROOT / "utils").rglob("*.py"))


def test_utils_is_small():
    table = code_stats.utils_table()
    big = {name: n for name, n in table.items() if n > 500}
    assert not big, f"files over 500 lines of code: {big}"
    total = sum(table.values())
    assert total <= 3500, f"utils/ holds {total} lines of code (limit 3,500)"
    ratio = total / sum(code_stats.notebook_table().values())
    assert ratio <= 1.5, f"{ratio:.2f} lines of utils/ code per line of notebook code (limit 1.5)"


def module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """The utils modules a file imports, at any depth (function-level imports included)."""
    found = set()
    package = module_of(path).rsplit(".", 1)[0] if path.name != "__init__.py" else module_of(path)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("utils"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if base.startswith("utils"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)
    return found


def test_no_import_circle():
    modules = {module_of(p): p for p in UTILS}
    graph = {m: {i for i in imports_of(p) if i in modules and i != m} for m, p in modules.items()}
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [m, n]))
            if n not in state:
                visit(n, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def shapes(path: Path) -> list[tuple[int, str]]:
    """Each code line as (line number, shape): names, strings and numbers replaced by one
    letter each, so that the same code with other names has the same shape."""
    source = path.read_text()
    skip = code_stats.docstring_lines(source)
    lines: dict[int, list[str]] = defaultdict(list)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                        tokenize.DEDENT, tokenize.ENDMARKER) or tok.start[0] in skip:
            continue
        word = {tokenize.NAME: "n", tokenize.STRING: "s", tokenize.NUMBER: "0"}.get(tok.type, tok.string)
        if tok.type == tokenize.NAME and tok.string in KEYWORDS:
            word = tok.string
        lines[tok.start[0]].append(word)
    # Import lines and dataclass fields (`name: type = default`) are declarations, not code
    # that could be shared: leave them out.
    return [(n, " ".join(w)) for n, w in sorted(lines.items())
            if w[0] not in ("import", "from") and not (len(w) >= 3 and w[:3] == ["n", ":", "n"])]


KEYWORDS = set(__import__("keyword").kwlist)
WINDOW = 6


def repeated_blocks(paths: list[Path]) -> list[str]:
    """Pairs of places that share WINDOW code lines of the same shape."""
    first: dict[str, tuple[Path, int, int]] = {}
    repeats = []
    for path in paths:
        rows = shapes(path)
        reported_until = -1
        for i in range(len(rows) - WINDOW + 1):
            block = rows[i : i + WINDOW]
            if len({s for _, s in block}) < 3:
                continue  # six lines of one trivial shape (a table of constants) are no copy
            key = "\n".join(s for _, s in block)
            start, end = block[0][0], block[-1][0]
            if key not in first:
                first[key] = (path, start, end)
                continue
            other, o_start, o_end = first[key]
            overlaps = other == path and start <= o_end
            if not overlaps and start > reported_until:
                repeats.append(f"{other.relative_to(ROOT)}:{o_start} and {path.relative_to(ROOT)}:{start}")
                reported_until = end
    return repeats


def test_no_repeated_blocks():
    repeats = repeated_blocks(UTILS)
    assert not repeats, "blocks of six lines repeated in utils/:\n" + "\n".join(repeats[:30])
