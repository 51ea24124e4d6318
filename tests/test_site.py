"""The site: the nbconvert fallback built for a tiny run and opened page by page in headless Chromium
(through the DevTools protocol: pages load, plotly figures render, the console stays clean), the Quarto
builder driven through a stand-in `quarto`, and the repository's _quarto.yml."""
import json, os, shutil, stat, subprocess, sys, tempfile, time, urllib.parse, urllib.request
from pathlib import Path

import nbformat
import pytest
import yaml

from mri_protodiff import cli, reproduce as R
from mri_protodiff.core import RunDir

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PARAMS = 'profile = "quick"\nrun_dir = "runs/default"\ndata = "phantom"\ndiffusion = ""\noverrides = "{}"\nforce = False'


def make_nb(path, *cells, markdown=None):
    "A notebook with kernelspec metadata, a `parameters` cell and code cells (an optional markdown title first)."
    nb = nbformat.v4.new_notebook(metadata=dict(kernelspec=dict(name="python3", display_name="Python 3", language="python")))
    nb.cells = ([nbformat.v4.new_markdown_cell(markdown)] if markdown else []) + \
        [nbformat.v4.new_code_cell(cells[0], metadata=dict(tags=["parameters"]))] + [nbformat.v4.new_code_cell(c) for c in cells[1:]]
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    "A run made by `reproduce` from two throwaway experiment notebooks, and a one-chapter library."
    tmp = tmp_path_factory.mktemp("site")
    exp = tmp/"experiments"; exp.mkdir()
    make_nb(exp/"01_figures.ipynb", PARAMS,
            "import plotly.graph_objects as go\nfrom mri_protodiff import viz\nfrom mri_protodiff.pipeline import open_experiment\n"
            "run = open_experiment(run_dir, profile, overrides)\n"
            "fig = viz.bar_with_ci(__import__('pandas').DataFrame(dict(method=['ppnet','eppnet'], faithfulness=[.1,.2], ci_low=[0,.1], ci_high=[.2,.3])))\n"
            "viz.save_figure(fig, run, 'faithfulness_bar')\nviz.show(fig)",
            "viz.show(go.Figure(go.Scatter(y=[3, 1, 2]), layout_title_text='second figure'))",
            markdown="# Figures\n> two plotly figures shown with viz.show")
    make_nb(exp/"02_tables.ipynb", PARAMS,
            "import plotly.graph_objects as go\nfrom pathlib import Path\n"
            "(Path(run_dir)/'tables').mkdir(exist_ok=True)\n"
            "(Path(run_dir)/'tables'/'faithfulness.md').write_text('| method | faithfulness |\\n|---|---|\\n| PPNet | 0.1 |\\n')\n"
            "go.Figure(go.Bar(y=[1, 2])).show()  # plain fig.show(): only the plotly mime type",
            markdown="# Tables\n> a table and a figure shown with plain fig.show()")
    lib = tmp/"lib"; lib.mkdir()
    chap = nbformat.v4.new_notebook()
    chap.cells = [nbformat.v4.new_code_cell("#| default_exp demo"), nbformat.v4.new_markdown_cell("# Demo chapter\n> as-is, no outputs"),
                  nbformat.v4.new_code_cell("#| export\ndef f(x): return x + 1"), nbformat.v4.new_code_cell("#| hide\nimport json as secret_thing"),
                  nbformat.v4.new_code_cell("f(41)")]
    nbformat.write(chap, lib/"00_demo.ipynb")
    out = tmp/"run"
    R.reproduce(out, "smoke", notebooks=exp, site=False, file=open(os.devnull, "w"))
    return RunDir(out), lib


class Browser:
    "Headless Chromium driven through the DevTools protocol (websocket-client)."
    def __init__(self):
        import websocket
        self.profile = tempfile.mkdtemp(prefix="chromium-profile-")
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}", "--remote-debugging-port=0",
                                      "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, t0 = Path(self.profile)/"DevToolsActivePort", time.time()
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.time() - t0 > 30 or self.proc.poll() is not None: self.close(); raise RuntimeError("chromium did not start")
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        for _ in range(50):
            pages = [t for t in json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10)) if t["type"] == "page"]
            if pages: break
            time.sleep(0.1)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], suppress_origin=True, timeout=30)
        self.n, self.events = 0, []
        for m in ("Page.enable", "Runtime.enable", "Log.enable"): self.call(m)

    def call(self, method, **params):
        self.n += 1; self.ws.send(json.dumps(dict(id=self.n, method=method, params=params)))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg: raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, name, timeout=30):
        t0 = time.time()
        while time.time() - t0 < timeout:
            for e in self.events:
                if e.get("method") == name: return e
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(name)

    def open(self, path:Path, settle:float=0.5) -> dict:
        "Load a file, wait for the load event and a short settle, and report the DOM counts and console errors."
        self.events.clear()
        self.call("Page.navigate", url=path.resolve().as_uri())
        self.wait_event("Page.loadEventFired")
        time.sleep(settle)
        dom = self.call("Runtime.evaluate", returnByValue=True, expression="""JSON.stringify({
            title: document.title, plotly: typeof window.Plotly,
            divs: document.querySelectorAll('.plotly-graph-div').length,
            drawn: document.querySelectorAll('.plotly-graph-div .plot-container').length,
            svgs: document.querySelectorAll('.plotly-graph-div svg.main-svg').length,
            sidebar: document.querySelectorAll('nav.mp-sidebar a').length,
            links: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')),
            text: document.body.innerText})""")["result"]["value"]
        self.ws.settimeout(0.2)  # collect any events still in flight
        try:
            while True: self.events.append(json.loads(self.ws.recv()))
        except Exception: pass
        self.ws.settimeout(30)
        errors = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown": errors.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error": errors.append("log: " + p["entry"].get("text", ""))
        return dict(json.loads(dom), errors=errors)

    def close(self):
        try: self.ws.close()
        except Exception: pass
        self.proc.terminate()
        try: self.proc.wait(10)
        except subprocess.TimeoutExpired: self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="/usr/bin/chromium is absent (apt-get install -y chromium)")
def test_fallback_site_opens_in_chromium(tiny_run, capsys):
    run, lib = tiny_run
    assert cli.main(["site", "--out", str(run.root), "--library", str(lib), "--builder", "nbconvert"]) == 0
    printed = capsys.readouterr().out
    assert "built with nbconvert HTML fallback" in printed and str(run/"site"/"index.html") in printed
    site = run/"site"
    pages = sorted(site.rglob("*.html"))
    rel = sorted(str(p.relative_to(site)) for p in pages)
    assert rel == ["experiments/01_figures.html", "experiments/02_tables.html", "figures/faithfulness_bar.html",
                   "index.html", "library/00_demo.html"]
    # the figures the notebooks drew: viz.show x2, plain fig.show() x1 (converted), the saved figure file x1
    expect_figs = {"experiments/01_figures.html": 2, "experiments/02_tables.html": 1, "figures/faithfulness_bar.html": 1,
                   "index.html": 0, "library/00_demo.html": 0}
    b = Browser()
    try:
        for p in pages:
            r = b.open(p)
            name = str(p.relative_to(site))
            assert r["errors"] == [], f"{name}: console errors {r['errors']}"
            assert r["divs"] == expect_figs[name] == r["drawn"], f"{name}: {r['divs']} figure divs, {r['drawn']} drawn"
            assert r["svgs"] >= r["divs"]
            if r["divs"]: assert r["plotly"] == "object"
            if name != "figures/faithfulness_bar.html":   # every site page has the sidebar with all 4 site pages
                assert r["sidebar"] == 4, name
            for href in r["links"]:                        # every relative link resolves to a file of the site
                if href.startswith(("http", "#", "mailto:")): continue
                target = (p.parent/urllib.parse.unquote(href.split("#")[0])).resolve()
                assert target.exists(), f"{name}: broken link {href}"
            if name == "index.html":
                assert "built with nbconvert HTML fallback" in r["text"] and "PPNet" in r["text"]
                assert "faithfulness_bar" in r["text"] and "Demo chapter" in r["text"]
            if name == "library/00_demo.html":
                assert "def f(x)" in r["text"] and "#| export" not in r["text"] and "secret_thing" not in r["text"]
    finally:
        b.close()


def test_notebook_outputs_carry_plotlyjs_once(tiny_run):
    "viz.show embeds plotly.js in the first figure of a kernel only; plain fig.show() leaves only the plotly mime type."
    run, _ = tiny_run
    nb = nbformat.read(run/"notebooks"/"01_figures.ipynb", as_version=4)
    htmls = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "text/html" in o.get("data", {})]
    assert len(htmls) == 2 and R._PLOTLYJS_MARK in htmls[0] and R._PLOTLYJS_MARK not in htmls[1]
    nb2 = nbformat.read(run/"notebooks"/"02_tables.ipynb", as_version=4)
    datas = [o["data"] for c in nb2.cells for o in c.get("outputs", []) if "data" in o]
    assert any(R._PLOTLY_MIME in d and "text/html" not in d for d in datas)
    page = (run/"site"/"experiments"/"02_tables.html")
    if page.exists(): assert page.read_text().count(R._PLOTLYJS_MARK) == 1


def test_quarto_builder_with_stand_in(tiny_run, tmp_path, monkeypatch):
    "With `quarto` on the PATH the site is staged (cleaned notebooks, index.qmd, _quarto.yml) and `quarto render` is run."
    run, lib = tiny_run
    log = tmp_path/"quarto_calls.txt"
    fake = tmp_path/"bin"/"quarto"; fake.parent.mkdir()
    fake.write_text(f"""#!{sys.executable}
import sys, pathlib, yaml
open({str(log)!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1] == "--version": print("1.7.0"); sys.exit(0)
src = pathlib.Path(sys.argv[2]); cfg = yaml.safe_load((src/"_quarto.yml").read_text())
out = (src/cfg["project"]["output-dir"]).resolve(); out.mkdir(parents=True, exist_ok=True)
for f in cfg["project"]["render"]:
    assert (src/f).exists(), f
    (out/f).with_suffix(".html").parent.mkdir(parents=True, exist_ok=True); (out/f).with_suffix(".html").write_text("ok")
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    res = R.build_site(run, library=lib)
    assert res.builder == "quarto 1.7.0" and res.index == run/"site"/"index.html" and res.index.exists()
    assert log.read_text().splitlines() == ["--version", f"render {run/'site_src'}"]
    cfg = yaml.safe_load((run/"site_src"/"_quarto.yml").read_text())
    assert cfg["project"]["render"] == ["index.qmd", "library/00_demo.ipynb", "experiments/01_figures.ipynb", "experiments/02_tables.ipynb"]
    assert cfg["project"]["output-dir"] == "../site" and cfg["project"]["type"] == "website"
    side = cfg["website"]["sidebar"]["contents"]
    assert side[1] == {"section": "Library chapters", "contents": ["library/00_demo.ipynb"]}
    assert cfg["format"]["html"]["theme"] == "cosmo"                  # taken from the repository's _quarto.yml
    index = (run/"site_src"/"index.qmd").read_text()
    assert "built with **quarto 1.7.0**" in index.replace("Site built", "built") and "(library/00_demo.ipynb)" in index
    staged = nbformat.read(run/"site_src"/"library"/"00_demo.ipynb", as_version=4)
    assert not any("#| export" in c.source or "#| default_exp" in c.source or "secret_thing" in c.source for c in staged.cells)
    assert (run/"site"/"figures"/"faithfulness_bar.html").exists()
    with pytest.raises(RuntimeError, match="not on the PATH"):
        monkeypatch.setenv("PATH", "/nonexistent"); R.build_site(run, library=lib, builder="quarto")


def test_library_executed_or_as_is(tiny_run):
    "Chapters are shown as they are (no outputs) by default, or executed first with --execute-library."
    run, lib = tiny_run
    R.build_site(run, library=lib, builder="nbconvert")
    assert "<pre>42</pre>" not in (run/"site"/"library"/"00_demo.html").read_text()
    rc = cli.main(["site", "--out", str(run.root), "--library", str(lib), "--builder", "nbconvert", "--execute-library"])
    page = (run/"site"/"library"/"00_demo.html").read_text()
    assert rc == 0 and "<pre>42</pre>" in page and "secret_thing" not in page


def test_repo_quarto_yml_is_current():
    "The repository's _quarto.yml is valid YAML and equals reproduce.quarto_config() (regenerate with reproduce.write_quarto_yml)."
    root = R.repo_dir()
    assert root is not None, "not an editable install"
    text = (root/"_quarto.yml").read_text()
    assert yaml.safe_load(text) == R.quarto_config()
    assert text.startswith(R.QUARTO_HEADER)
