"""The site of a smoke run, built with Sphinx and opened page by page in headless Chromium (through the DevTools
protocol): every page loads without a console error and draws its figures, every internal link resolves, nothing is
fetched from the network, search finds a chapter by a word of its text, the landing page fits 1280 px and shows the
image-quality table and the trajectory figure above the fold (its screenshot is written to site/landing.png); the
chapters' outputs as a reader sees them (progress bars as text, warnings as notes, long tables folded); the Quarto
builder driven through a stand-in `quarto`; the repository's _quarto.yml.

The smoke run is made once for the module (`mri-protodiff reproduce --profile smoke --no-site`, about 2-3 minutes on
2 CPU cores); the library is one small chapter, executed into a cache of the test's own."""
import base64, json, os, re, shutil, stat, subprocess, sys, tempfile, time, urllib.parse, urllib.request
from pathlib import Path

import nbformat
import pytest
import yaml

from mri_protodiff import cli, reproduce as R
from mri_protodiff.core import RunDir
from conftest import cli_command, cli_env

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="/usr/bin/chromium is absent (apt-get install -y chromium)")
WORD = "kestrel"   # only the demo chapter has it: the search test looks for it


def demo_chapter(path:Path) -> None:
    "A library chapter with what the site must show well: a directive, a hidden cell, a tqdm bar, a warning, a long table, a figure."
    nb = nbformat.v4.new_notebook(metadata=dict(kernelspec=dict(name="python3", display_name="Python 3", language="python")))
    code = nbformat.v4.new_code_cell
    nb.cells = [code("#| default_exp demo"),
                nbformat.v4.new_markdown_cell(f"# Demo chapter\n> the {WORD} chapter, executed for the site"),
                nbformat.v4.new_markdown_cell("Inline $s_j = \\frac{a_j}{\\sum_k a_k}$ and displayed\n\n$$\\mathrm{NIS}_j = \\frac{s_j - \\min s}{\\max s - \\min s}$$"),
                code("#| export\ndef f(x): return x + 1"),
                code("#| hide\nimport json as secret_thing, warnings\ndef noisy(): warnings.warn('a demo warning for the page')"),
                code("f(41)"),
                code("from tqdm.auto import tqdm\nfor _ in tqdm(range(5), desc='counting'): pass"),
                code("noisy()"),
                code("import pandas as pd\npd.DataFrame({'i': range(40), 'square': [i * i for i in range(40)]})"),
                code("import plotly.graph_objects as go\nfrom mri_protodiff import viz\nviz.show(go.Figure(go.Bar(y=[1, 3, 2])))")]
    nbformat.write(nb, path)


@pytest.fixture(autouse=True, scope="module")
def _sites_execute_their_chapters():
    "This file tests the executed chapters (conftest turns execution off for the other test files): its library is one small chapter."
    old = os.environ.get("MRI_PROTODIFF_SITE_EXECUTE"); os.environ["MRI_PROTODIFF_SITE_EXECUTE"] = "1"
    yield
    if old is None: os.environ.pop("MRI_PROTODIFF_SITE_EXECUTE", None)
    else: os.environ["MRI_PROTODIFF_SITE_EXECUTE"] = old


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    "A smoke run made as a user makes it, and its site built by `mri-protodiff site` with a one-chapter library."
    tmp = tmp_path_factory.mktemp("site")
    run = tmp/"run"
    r = subprocess.run(cli_command() + ["reproduce", "--profile", "smoke", "--out", str(run), "--no-site"],
                       capture_output=True, text=True, env=cli_env(), timeout=1800)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    lib = tmp/"lib"; lib.mkdir()
    demo_chapter(lib/"00_demo.ipynb")
    cache = tmp/"cache"
    r = subprocess.run(cli_command() + ["site", "--out", str(run), "--library", str(lib), "--builder", "sphinx",
                                        "--cache", str(cache)], capture_output=True, text=True, env=cli_env(), timeout=900)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return dict(run=run, site=run/"site", lib=lib, cache=cache, out=r.stdout, err=r.stderr)


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
        for m in ("Page.enable", "Runtime.enable", "Log.enable", "Network.enable"): self.call(m)
        self.call("Emulation.setDeviceMetricsOverride", width=1280, height=800, deviceScaleFactor=1, mobile=False)

    def call(self, method, **params):
        self.n += 1; self.ws.send(json.dumps(dict(id=self.n, method=method, params=params)))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.n:
                if "error" in msg: raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def eval(self, expression:str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)["result"].get("value")

    def wait_event(self, name, timeout=30):
        t0 = time.time()
        while time.time() - t0 < timeout:
            for e in self.events:
                if e.get("method") == name: return e
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(name)

    def open(self, url:str|Path, settle:float=0.3) -> dict:
        "Load a file (or file URL), wait for the load event and a short settle; report what the page shows and its errors."
        self.events.clear()
        self.call("Page.navigate", url=url.resolve().as_uri() if isinstance(url, Path) else url)
        self.wait_event("Page.loadEventFired")
        time.sleep(settle)
        dom = json.loads(self.eval("""JSON.stringify({
            title: document.title, plotly: typeof window.Plotly,
            divs: document.querySelectorAll('.plotly-graph-div').length,
            drawn: document.querySelectorAll('.plotly-graph-div .plot-container').length,
            links: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')),
            text: document.body.innerText})"""))
        self.ws.settimeout(0.2)  # collect any events still in flight
        try:
            while True: self.events.append(json.loads(self.ws.recv()))
        except Exception: pass
        self.ws.settimeout(30)
        errors, fetched = [], []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                errors.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
            elif m == "Runtime.exceptionThrown": errors.append("exception: " + json.dumps(p.get("exceptionDetails", {}))[:500])
            elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error": errors.append("log: " + p["entry"].get("text", ""))
            elif m == "Network.requestWillBeSent": fetched.append(p.get("request", {}).get("url", ""))
        return dict(dom, errors=errors, fetched=fetched)

    def close(self):
        try: self.ws.close()
        except Exception: pass
        self.proc.terminate()
        try: self.proc.wait(10)
        except subprocess.TimeoutExpired: self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


def site_pages(site:Path) -> list[Path]:
    "Every HTML page of the site: Sphinx's pages and the figure pages (not the theme's own HTML fragments in _static)."
    return sorted(p for p in site.rglob("*.html") if "_static" not in p.relative_to(site).parts)


def test_the_command_says_what_it_built(smoke):
    assert "built with Sphinx" in smoke["out"] and "MyST-NB" in smoke["out"] and str(smoke["site"]/"index.html") in smoke["out"]
    assert "executing 1 library chapter(s) not in the cache" in smoke["out"]
    assert "Kernel is running over TCP" not in smoke["err"]
    names = {str(p.relative_to(smoke["site"])) for p in site_pages(smoke["site"])}
    for nb in sorted((smoke["run"]/"notebooks").glob("*.ipynb")):
        assert f"experiments/{nb.stem}.html" in names
    assert {"index.html", "search.html", "library/00_demo.html", "api/reproduce.html", "api/viz.html", "figures/trajectory_0.html"} <= names


@needs_chromium
def test_every_page_loads_offline_without_console_errors_and_every_link_resolves(smoke, browser):
    site = smoke["site"]
    pages = site_pages(site)
    assert len(pages) > 30
    for p in pages:
        name = str(p.relative_to(site))
        r = browser.open(p)
        assert r["errors"] == [], f"{name}: console errors {r['errors']}"
        outside = [u for u in r["fetched"] if not u.startswith(("file:", "data:", "blob:", "about:"))]
        assert outside == [], f"{name} fetched from the network: {outside}"
        assert r["drawn"] == r["divs"], f"{name}: {r['divs']} figures, {r['drawn']} drawn"
        if r["divs"]: assert r["plotly"] == "object"
        for href in r["links"]:
            if href.startswith(("http:", "https:", "mailto:")) or href.startswith("#"): continue
            target = (p.parent/urllib.parse.unquote(href.split("#")[0].split("?")[0])).resolve()
            assert target.exists(), f"{name}: broken link {href}"


@needs_chromium
def test_search_finds_a_chapter_by_a_word_of_its_text(smoke, browser):
    browser.open(smoke["site"].resolve().as_uri() + f"/search.html?q={WORD}")
    t0, hits = time.time(), []
    while time.time() - t0 < 20 and not hits:
        hits = browser.eval("[...document.querySelectorAll('#search-results li a')].map(a => a.getAttribute('href'))") or []
        time.sleep(0.2)
    assert any("library/00_demo.html" in h for h in hits), hits


@needs_chromium
def test_landing_page_fits_1280_and_shows_quality_and_trajectory_above_the_fold(smoke, browser):
    site = smoke["site"]
    r = browser.open(site/"index.html", settle=1.0)
    assert r["errors"] == []
    geo = browser.eval("""JSON.stringify({
        overflow: document.documentElement.scrollWidth - document.documentElement.clientWidth,
        headings: [...document.querySelectorAll('article h2')].map(h => h.textContent.replace('#', '').trim()),
        table: document.querySelector('#image-quality table').getBoundingClientRect().bottom,
        figure: document.querySelector('#the-denoising-trajectory .plotly-graph-div').getBoundingClientRect().top})""")
    geo = json.loads(geo)
    assert geo["overflow"] <= 0, f"the landing page is {geo['overflow']} px wider than the 1280 px window"
    assert geo["headings"][:5] == ["Image quality", "The denoising trajectory", "NIS distributions", "Faithfulness",
                                   "Paper comparison"], geo["headings"]
    assert geo["table"] < 800 and geo["figure"] < 800 - 150, geo      # the table, and the figure's top rows, above the fold
    assert "profile smoke" in r["text"] and "data phantom" in r["text"] and "site built with Sphinx" in r["text"]
    shot = browser.call("Page.captureScreenshot", format="png")["data"]
    (site/"landing.png").write_bytes(base64.b64decode(shot))
    assert (site/"landing.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_chapter_outputs_as_a_reader_sees_them(smoke):
    page = (smoke["site"]/"library"/"00_demo.html").read_text(encoding="utf-8")
    text = re.sub(r"<[^>]+>", "", page)
    assert "42" in text and "#| export" not in page and "secret_thing" not in page
    assert re.search(r"counting: 100%\|█{10}\| 5/5", text), "the tqdm bar is not shown as its text"
    assert 'class="mp-warning"' in page and "a demo warning for the page" in text and "warnings.warn(" not in text
    assert "stderr" not in re.findall(r'class="output ([^"]*)"', page)
    assert '<details class="mp-long-table"><summary>A table of 40 rows' in page
    assert page.count('<script src="../_static/plotly.min.js"') == 1 and R._PLOTLYJS_MARK not in page
    api = (smoke["site"]/"api"/"reproduce.html").read_text(encoding="utf-8")
    assert "build_site" in api and "folder of executed chapters" in api   # a docment, as the parameter's description


@needs_chromium
def test_formulas_are_drawn_offline(smoke, browser):
    "The chapters' $...$ and $$...$$ are typeset by the site's own MathJax (SVG), not left as TeX."
    r = browser.open(smoke["site"]/"library"/"00_demo.html", settle=0.5)
    assert r["errors"] == []
    t0, n = time.time(), 0
    while time.time() - t0 < 20 and n < 2:
        n = browser.eval("document.querySelectorAll('mjx-container svg').length") or 0
        time.sleep(0.2)
    assert n == 2, f"{n} formulas drawn, 2 expected"
    assert browser.eval("document.querySelectorAll('mjx-container[display=\"true\"]').length") == 1
    assert any("_static/mathjax/tex-svg.js" in u for u in r["fetched"]), r["fetched"]


def test_experiment_pages_load_plotlyjs_from_the_site(smoke):
    "viz.show inlines plotly.js in a notebook's first figure; on the site each page loads the site's copy once instead."
    nb = nbformat.read(smoke["run"]/"notebooks"/"01_data.ipynb", as_version=4)
    htmls = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "Plotly.newPlot" in o.get("data", {}).get("text/html", "")]
    assert len(htmls) >= 2 and R._PLOTLYJS_MARK in htmls[0] and all(R._PLOTLYJS_MARK not in h for h in htmls[1:])
    page = (smoke["site"]/"experiments"/"01_data.html").read_text(encoding="utf-8")
    assert R._PLOTLYJS_MARK not in page and page.count('<script src="../_static/plotly.min.js"') == 1
    assert "widget: open this notebook" not in page   # its progress bar is text


def test_second_build_reads_the_cache_and_changes_nothing(smoke):
    src = smoke["run"]/"site_src"
    before = {p: p.stat().st_mtime_ns for p in src.rglob("*") if p.is_file() and "_doctrees" not in p.parts and p.name != "problems.txt"}
    res = R.build_site(smoke["run"], library=smoke["lib"], builder="sphinx", cache=smoke["cache"], file=open(os.devnull, "w"))
    assert res.executed == [] and res.index.exists()
    after = {p: p.stat().st_mtime_ns for p in before}
    assert [str(p) for p in before if after[p] != before[p]] == []      # nothing restaged: Sphinx reads no page again


def test_library_as_is(smoke, tmp_path):
    "--no-execute-library shows the chapters without outputs (and executes nothing)."
    run = tmp_path/"run"
    shutil.copytree(smoke["run"], run, ignore=shutil.ignore_patterns("site", "site_src"))
    assert cli.main(["site", "--out", str(run), "--library", str(smoke["lib"]), "--builder", "sphinx", "--no-execute-library",
                     "--cache", str(tmp_path/"empty")]) == 0
    page = (run/"site"/"library"/"00_demo.html").read_text(encoding="utf-8")
    assert "f(41)" in re.sub(r"<[^>]+>", "", page) and 'class="cell_output' not in page
    assert not (tmp_path/"empty").exists()


def test_quarto_builder_with_stand_in(smoke, tmp_path, monkeypatch):
    "With `quarto` on the PATH the site is staged (cleaned notebooks, index.qmd, _quarto.yml) and `quarto render` is run."
    run = tmp_path/"run"
    shutil.copytree(smoke["run"], run, ignore=shutil.ignore_patterns("site", "site_src"))
    lib = smoke["lib"]
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
    res = R.build_site(run, library=lib, execute_library=False)
    assert res.builder == "quarto 1.7.0" and res.index == run/"site"/"index.html" and res.index.exists()
    assert log.read_text().splitlines() == ["--version", f"render {run/'site_src'}"]
    cfg = yaml.safe_load((run/"site_src"/"_quarto.yml").read_text())
    exps = [f"experiments/{p.name}" for p in sorted((run/"notebooks").glob("*.ipynb"))]
    assert cfg["project"]["render"] == ["index.qmd", "library/00_demo.ipynb", *exps]
    assert cfg["project"]["output-dir"] == "../site" and cfg["project"]["type"] == "website"
    side = cfg["website"]["sidebar"]["contents"]
    assert side[1] == {"section": "Library chapters", "contents": ["library/00_demo.ipynb"]}
    assert cfg["format"]["html"]["theme"] == "cosmo"                  # taken from the repository's _quarto.yml
    index = (run/"site_src"/"index.qmd").read_text()
    assert "built with quarto 1.7.0" in index and "## Image quality" in index and "(experiments/03_trajectory.ipynb)" in index
    assert "```{=html}" in index and '<script src="figures/plotly.min.js"' in index
    staged = nbformat.read(run/"site_src"/"library"/"00_demo.ipynb", as_version=4)
    assert not any("#| export" in c.source or "#| default_exp" in c.source or "secret_thing" in c.source for c in staged.cells)
    assert (run/"site"/"figures"/"trajectory_0.html").exists() and (run/"site"/"figures"/"plotly.min.js").exists()
    with pytest.raises(RuntimeError, match="not on the PATH"):
        monkeypatch.setenv("PATH", "/nonexistent"); R.build_site(run, library=lib, builder="quarto")


def test_repo_quarto_yml_is_current():
    "The repository's _quarto.yml is valid YAML and equals reproduce.quarto_config() (regenerate with reproduce.write_quarto_yml)."
    root = R.repo_dir()
    assert root is not None, "not an editable install"
    text = (root/"_quarto.yml").read_text()
    assert yaml.safe_load(text) == R.quarto_config()
    assert text.startswith(R.QUARTO_HEADER)
