"""The experiment notebooks end to end: `mri-protodiff reproduce --profile smoke` through the command line (a subprocess, as a
user runs it), every notebook executed into run/notebooks/, the tables and figures they promise, the site, the time it takes,
a rerun that skips everything, and determinism: a second run with the same seed gives byte-identical tables.

Two full smoke runs make this the slowest test file (a few minutes on 2 CPU cores).  The runs use one torch thread
(OMP_NUM_THREADS=1): the smoke models are tiny, and on a shared 2-core machine two OpenMP threads per process were measured
10-40x slower than one."""
import json, os, re, resource, shutil, subprocess, sys, time
from pathlib import Path

import nbformat
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT/"nbs"/"experiments"
TABLES = ("image_quality.csv", "faithfulness.csv", "paper_comparison.csv")
FIGURES = ("data_density", "data_examples", "diffusion_training_curve", "real_vs_synthetic", "quality_psnr", "quality_ssim",
           "trajectory_0", "trajectory_convergence", "explainer_accuracy", "prototypes_ppnet", "prototypes_eppnet",
           "prototypes_protopool", "nis_histogram", "nis_histogram_paper", "faithfulness_ablation", "faithfulness_paper_definition",
           "faithfulness_timesteps", "nis_over_trajectory", "paper_comparison", "groundtruth", "groundtruth_copy_ratio")
PARAMETERS = ("profile", "run_dir", "data", "diffusion", "overrides", "force")
# tables/*.csv files known to hold wall-clock timings (so they cannot be byte-identical between runs), and who writes them
TIMING_COLUMN = re.compile(r"(^|_)(seconds|secs|time|timestamp|date|started|ended|elapsed)($|_)", re.I)


from conftest import cli_command as _cli, cli_env as _env


def reproduce(out:Path, *extra, env:dict|None=None) -> dict:
    "Run `mri-protodiff reproduce --profile smoke --out OUT` (`env`: variables to add); returns returncode, output, wall and CPU seconds (children)."
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    r = subprocess.run(_cli() + ["reproduce", "--profile", "smoke", "--out", str(out), *extra], capture_output=True, text=True,
                       env={**_env(), **(env or {})}, timeout=1800)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return dict(rc=r.returncode, stdout=r.stdout, stderr=r.stderr, wall=time.time() - t0, cpu=cpu)


def _fail_msg(res:dict) -> str:
    return f"exit {res['rc']}\n--- stdout (tail)\n{res['stdout'][-3000:]}\n--- stderr (tail)\n{res['stderr'][-3000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    "Two smoke runs with the same seed: `a` (with the site) and `b` (without); the second only for the determinism test."
    base = tmp_path_factory.mktemp("experiments")
    return dict(base=base, a=base/"a", b=base/"b", results={})


def _code_hash() -> str:
    from mri_protodiff.reproduce import _code_hash as h
    return h()


@pytest.fixture(scope="module")
def run_a(runs):
    runs["code"] = _code_hash()
    res = reproduce(runs["a"], "--groundtruth")
    runs["results"]["a"] = res
    print(f"\nsmoke reproduce: wall {res['wall']:.1f} s, CPU {res['cpu']:.1f} s (user + system of the CLI and its kernels)")
    assert res["rc"] == 0, _fail_msg(res)
    return runs["a"]


def test_every_notebook_executed(run_a):
    srcs = sorted(p for p in EXPERIMENTS.glob("*.ipynb") if not p.name.startswith(("_", ".")))
    assert len(srcs) >= 6, f"expected the experiment notebooks in {EXPERIMENTS}, found {[p.name for p in srcs]}"
    assert (EXPERIMENTS/".notest").exists(), "nbs/experiments/.notest keeps nbdev_test from running the experiment notebooks"
    stages = json.loads((run_a/"manifest.json").read_text())["stages"]
    for src in srcs:
        out = run_a/"notebooks"/src.name
        assert out.exists(), f"{src.name} was not executed into {run_a/'notebooks'}"
        assert stages.get(f"notebook:{src.stem}", {}).get("status") == "done", f"stage notebook:{src.stem} is not done"
        nb = nbformat.read(out, as_version=4)
        tags = [c.metadata.get("tags", []) for c in nb.cells]
        assert ["parameters"] in tags and ["injected-parameters"] in tags, f"{src.name}: no parameters / injected-parameters cell"
        injected = nb.cells[tags.index(["injected-parameters"])].source
        assert 'profile = "smoke"' in injected and str(run_a.resolve()) in injected, f"{src.name}: wrong parameters injected:\n{injected}"
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert all(c.execution_count is not None for c in code), f"{src.name}: a code cell did not run"
        errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
        assert not errors, f"{src.name}: error output {errors[0].get('ename')}: {errors[0].get('evalue')}"
        # the source notebook follows the contract: the parameter defaults, then open_experiment, and a kernelspec
        snb = nbformat.read(src, as_version=4)
        assert snb.metadata.get("kernelspec", {}).get("name") == "python3", f"{src.name}: no python3 kernelspec"
        pcell = next(c for c in snb.cells if "parameters" in c.metadata.get("tags", []))
        assert all(re.search(rf"^{k}\s*(:\s*\w+\s*)?=.*#\s*\S", pcell.source, re.M) for k in PARAMETERS), \
            f"{src.name}: parameters cell lacks {PARAMETERS}, each with a type and a comment (papermill --help-notebook shows both)"
        assert "pipeline.open_experiment(run_dir, profile, overrides, force)" in "".join(c.source for c in snb.cells), src.name
        assert not any("fig.show()" in c.source for c in snb.cells if c.cell_type == "code"), f"{src.name}: use viz.show(fig)"


def test_tables(run_a):
    for name in TABLES:
        p = run_a/"tables"/name
        assert p.exists(), f"missing table {p}"
        assert p.with_suffix(".md").exists(), f"missing markdown rendering {p.with_suffix('.md')}"
        assert len(pd.read_csv(p)) > 0, f"{p} is empty"
    iq = pd.read_csv(run_a/"tables"/"image_quality.csv")
    assert {"PSNR (dB)", "SSIM", "LPIPS (AlexNet)"} <= set(iq.metric)
    paired = iq[(iq.metric == "PSNR (dB)") & (iq.variant == "paired") & (iq.scaling == "paper")]
    assert len(paired) == 1 and paired.n.iloc[0] > 0 and "19.37" in str(paired.paper_reference.iloc[0])
    ft = pd.read_csv(run_a/"tables"/"faithfulness.csv")
    assert {"ours", "paper definition"} <= set(ft.definition), "the faithfulness table must hold both definitions"
    assert {"trained", "randomised explainer"} <= set(ft.variant), "the faithfulness table must hold sanity rows"
    assert ft[ft.definition == "ours"].n.max() > 0
    gt = pd.read_csv(run_a/"tables"/"groundtruth.csv")
    assert {"ppnet", "eppnet", "protopool", "paper", "random"} <= set(gt.method) and set(gt.version) == {"minimal"}
    pc = pd.read_csv(run_a/"tables"/"paper_comparison.csv")
    for col in ("paper_reported", "ours_paper_definition", "ours_package_definition"):
        assert col in pc.columns, f"paper_comparison.csv lacks the column {col}"
    ref = " ".join(pc.paper_reported.astype(str))
    for v in ("19.37", "0.6530", "0.2893", "0.0965", "0.1420", "0.1534"):
        assert v in ref, f"the paper's number {v} is missing from paper_comparison.csv"
    f = pc[pc.quantity == "faithfulness"].set_index("explainer")
    assert set(f.index) == {"ppnet", "eppnet", "protopool"}
    # ours are ours: computed on this run, never the paper's numbers copied over
    assert f.ours_paper_definition_mean.notna().all() and not (f.ours_paper_definition_mean == f.paper_value).any()
    # the scripts' "EPPNet" and "ProtoPool" rules are one computation: equal on the same images
    assert f.ours_paper_definition_mean["eppnet"] == pytest.approx(f.ours_paper_definition_mean["protopool"])


def test_figures(run_a):
    from mri_protodiff.viz import find_browser
    figs = run_a/"figures"
    for name in FIGURES:
        html = figs/f"{name}.html"
        assert html.exists(), f"missing figure {html}"
        assert "Plotly.newPlot" in html.read_text(encoding="utf-8"), f"{html} does not draw a plotly figure"
    if find_browser() is None: pytest.skip("no Chromium-family browser: save_figure writes no PNG (apt-get install -y chromium)")
    for name in FIGURES:
        png = figs/f"{name}.png"
        assert png.exists(), f"missing {png}"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, f"{png} is not a real PNG image"


def test_site(run_a):
    site = run_a/"site"
    assert (site/"index.html").exists(), "the site was not built"
    for src in sorted(EXPERIMENTS.glob("[0-9]*.ipynb")):
        page = site/"experiments"/f"{src.stem}.html"
        assert page.exists(), f"no site page for {src.name}"
    index = (site/"index.html").read_text(encoding="utf-8")
    assert "paper comparison" in index.lower() and "built with" in index


def test_smoke_time_is_recorded(run_a, runs):
    "Speed is measured, not asserted: every notebook's time is in the manifest, and the run's CPU time is printed (pytest -s)."
    res = runs["results"]["a"]
    m = json.loads((run_a/"manifest.json").read_text())
    secs = {k: v.get("seconds") for k, v in m["stages"].items() if k.startswith("notebook:")}
    assert len(secs) == len(list(EXPERIMENTS.glob("[0-9]*.ipynb"))) and all(isinstance(v, (int, float)) and v > 0 for v in secs.values()), secs
    print(f"smoke reproduce: {res['cpu']:.0f} s CPU, {res['wall']:.0f} s wall; notebooks {secs}")


def test_rerun_skips_every_notebook(run_a, runs):
    if _code_hash() != runs["code"]:   # the notebooks' stage inputs include the library's source: a changed library reruns them
        pytest.skip("the mri_protodiff sources changed while the test ran (someone exported notebooks): a rerun must redo the notebooks")
    res = reproduce(run_a, "--no-site", "--groundtruth")
    assert res["rc"] == 0, _fail_msg(res)
    lines = [l for l in res["stdout"].splitlines() if l.strip().startswith(tuple("0123456789")) and ".ipynb:" in l]
    assert lines and all("skipped" in l for l in lines), "\n".join(lines)


@pytest.fixture(scope="module")
def run_b(runs, run_a):
    "The second run, without a browser for PNG export (BROWSER_PATH names no program): its figures are HTML only."
    res = reproduce(runs["b"], "--no-site", "--groundtruth", env=dict(BROWSER_PATH=str(runs["base"]/"no-browser")))
    runs["results"]["b"] = res
    assert res["rc"] == 0, _fail_msg(res)
    return runs["b"]


def _csvs(run:Path) -> dict:
    return {p.relative_to(run/"tables").as_posix(): p for p in sorted((run/"tables").rglob("*.csv"))}


def test_same_seed_same_tables(run_a, run_b):
    a, b = _csvs(run_a), _csvs(run_b)
    assert set(a) == set(b), f"the runs wrote different tables: {sorted(set(a) ^ set(b))}"
    assert set(TABLES) <= set(a)
    differ = []
    for name in a:
        if a[name].read_bytes() != b[name].read_bytes():
            differ.append(name)
    assert not differ, f"tables that differ between two smoke runs with the same seed: {differ}"


def test_tables_have_no_timings(run_a):
    timed = {n: [c for c in pd.read_csv(p, nrows=0).columns if TIMING_COLUMN.search(c)] for n, p in _csvs(run_a).items()}
    timed = {n: c for n, c in timed.items() if c}
    assert not timed, f"tables with timing columns (cannot be byte-identical between runs): {timed}"


def test_the_terminal_says_which_figures_have_no_png(run_b, runs):
    "Without a browser the notebooks only warn inside their outputs; the last line of `reproduce` counts the figures, says why and what to do."
    html, png = list((run_b/"figures").glob("*.html")), list((run_b/"figures").glob("*.png"))
    assert len(html) >= len(FIGURES) and not png, f"a run without a browser wrote PNGs: {png}"
    last = runs["results"]["b"]["stdout"].rstrip().splitlines()[-1]
    assert last.startswith(f"figures: {len(html)} written as HTML only, without PNG ("), last
    assert "Chromium-family browser" in last and "apt-get install -y chromium" in last and f"reproduce --out {run_b}` again" in last, last
