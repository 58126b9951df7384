"""Print a notebook's code cells and their text outputs (a reviewing aid)."""

import json
import sys

nb = json.load(open(sys.argv[1]))
for c in nb["cells"]:
    if c["cell_type"] != "code":
        continue
    src = "".join(c["source"])
    print(f"---- [{c.get('execution_count')}]", src[:70].replace("\n", " | "))
    for o in c["outputs"]:
        if o["output_type"] == "stream":
            print(f"  {o['name']}: " + "".join(o["text"])[:1500])
        elif "data" in o:
            print("  ", o["output_type"], list(o["data"]), "".join(o["data"].get("text/plain", ""))[:1500])
        elif o["output_type"] == "error":
            print("  ERROR", o["ename"], o["evalue"][:500])
