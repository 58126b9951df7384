"""Give every notebook the same metadata: the project's Python 3 kernel and jupytext pairing.

Only notebook-level metadata changes; cells and outputs are left exactly as they are.
Usage: python scripts/normalize_notebooks.py   (run by `make notebooks` / `make notebook`)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
# Paired with notebooks/py/NAME.py (jupytext.toml says the same for new notebooks).
JUPYTEXT = {
    "cell_metadata_filter": "tags,jupyter,-all",
    "formats": "ipynb,py//py:percent",
    "notebook_metadata_filter": "kernelspec,jupytext,-jupytext.text_representation.jupytext_version",
}


def normalize(path: Path) -> bool:
    nb = json.loads(path.read_text())
    before = json.dumps(nb["metadata"], sort_keys=True)
    nb["metadata"]["kernelspec"] = KERNELSPEC
    nb["metadata"]["jupytext"] = JUPYTEXT
    nb["metadata"].get("language_info", {}).pop("version", None)  # the author's patch version
    if json.dumps(nb["metadata"], sort_keys=True) == before:
        return False
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    return True


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    changed = [p.name for p in paths if normalize(p)]
    print(f"normalized metadata of {len(changed)} notebook(s)" + (f": {', '.join(changed)}" if changed else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
