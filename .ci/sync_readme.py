"""Write README.md from the markdown cells of nbs/index.ipynb (nbdev_readme needs Quarto, which may be absent).

`python .ci/sync_readme.py` rewrites README.md; `python .ci/sync_readme.py --check` exits 1 if it is stale.
"""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def render(nb_path=ROOT/"nbs"/"index.ipynb") -> str:
    "The README text: the index notebook's markdown cells, the title's `> subtitle` kept as a quote."
    nb = json.loads(Path(nb_path).read_text(encoding="utf-8"))
    cells = ["".join(c["source"]).strip() for c in nb["cells"] if c["cell_type"] == "markdown"]
    header = "<!-- generated from nbs/index.ipynb by .ci/sync_readme.py: edit the notebook, not this file -->\n\n"
    return header + "\n\n".join(c for c in cells if c) + "\n"

if __name__ == "__main__":
    text = render()
    readme = ROOT/"README.md"
    if "--check" in sys.argv:
        if readme.read_text(encoding="utf-8") != text:
            sys.exit("README.md is out of step with nbs/index.ipynb: run python .ci/sync_readme.py")
    else:
        readme.write_text(text, encoding="utf-8")
