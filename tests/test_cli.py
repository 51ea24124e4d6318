"""The command line: subcommand discovery, `reproduce` (papermill over throwaway experiment notebooks: parameters,
stages, skipping, resume after a failure, the error message) and `site` argument handling."""
import contextlib, io, json, os, subprocess, sys
from pathlib import Path

import nbformat
import pytest

from mri_protodiff import cli, reproduce as R
from mri_protodiff.core import RunDir, get_profile

PARAMS = 'profile = "quick"\nrun_dir = "runs/default"\ndata = "phantom"\ndiffusion = ""\noverrides = "{}"\nforce = False'
# each notebook appends its name and parameters to run/log.jsonl, so the test sees what ran with what
LOG = ("import json, pathlib\nwith open(pathlib.Path(run_dir)/'log.jsonl', 'a') as f:\n"
       "    f.write(json.dumps(dict(nb={name!r}, cwd=str(pathlib.Path.cwd()), profile=profile, run_dir=run_dir, data=data,"
       " diffusion=diffusion, overrides=json.loads(overrides), force=force)) + '\\n')")


def make_nb(path, *cells):
    nb = nbformat.v4.new_notebook(metadata=dict(kernelspec=dict(name="python3", display_name="Python 3", language="python")))
    nb.cells = [nbformat.v4.new_code_cell(cells[0], metadata=dict(tags=["parameters"]))] + [nbformat.v4.new_code_cell(c) for c in cells[1:]]
    nbformat.write(nb, path)


def run_main(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


def log(run): return [json.loads(l) for l in (Path(run)/"log.jsonl").read_text().splitlines()]


@pytest.fixture
def experiments(tmp_path):
    exp = tmp_path/"experiments"; exp.mkdir()
    make_nb(exp/"01_data.ipynb", PARAMS, LOG.format(name="01_data"),
            "from mri_protodiff.pipeline import open_experiment\nrun = open_experiment(run_dir, profile, overrides)\n"
            "(run/'tables').mkdir(exist_ok=True)\n"
            "(run/'tables'/'image_quality.md').write_text('| metric | value |\\n|---|---|\\n| PSNR (dB) | %d |' % run.profile.diffusion.train_steps)")
    make_nb(exp/"02_paper.ipynb", PARAMS, LOG.format(name="02_paper"),
            "from pathlib import Path\n(Path(run_dir)/'tables'/'faithfulness.md').write_text('| method | r |\\n|---|---|\\n| EPPNet | 0.15 |')\n"
            "(Path(run_dir)/'figures').mkdir(exist_ok=True); (Path(run_dir)/'figures'/'demo_figure.html').write_text('<html></html>')")
    (exp/"_scratch.ipynb").write_text("not a notebook")   # ignored: leading underscore
    return exp


def test_help_lists_subcommands_and_options():
    rc, out, _ = run_main()
    assert rc == 0 and "reproduce" in out and "site" in out
    p = cli.build_parser()
    sub = next(a for a in p._actions if a.dest == "command").choices
    rep = sub["reproduce"].format_help()
    for opt in ("--profile", "--data", "--checkpoint", "--out", "--set", "--force", "--notebooks", "--no-site", "--kernel",
                "--papermill-progress"):
        assert opt in rep, opt
    assert all(a.help for a in sub["reproduce"]._actions), "every option has help text"
    assert all(a.help for a in sub["site"]._actions)
    assert "--builder" in sub["site"].format_help()


def test_console_script():
    exe = Path(sys.executable).parent/"mri-protodiff"
    r = subprocess.run([str(exe), "reproduce", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--notebooks" in r.stdout


@pytest.fixture
def fixed_code(monkeypatch):
    "Pin the library-code hash (other work on the package must not rerun the notebooks mid-test)."
    monkeypatch.setattr(R, "_code_hash", lambda: "code-v1")


def test_reproduce_runs_notebooks_in_order_with_parameters(experiments, tmp_path, fixed_code, monkeypatch):
    run, data = tmp_path/"runs"/"r", tmp_path/"mydata"; data.mkdir()
    rc, out, err = run_main("reproduce", "--profile", "smoke", "--out", run, "--notebooks", experiments, "--data", data,
                            "--checkpoint", "ckpt/not-here", "--set", "train_steps=7", "--no-site")
    assert rc == 0, err
    entries = log(run)
    assert [e["nb"] for e in entries] == ["01_data", "02_paper"]
    e = entries[0]
    assert e["profile"] == "smoke" and e["overrides"] == {"diffusion.train_steps": 7} and e["force"] is False
    assert e["run_dir"] == str(run.resolve()) and e["cwd"] == str(run.resolve())      # absolute; run dir is the cwd
    assert e["data"] == str(data.resolve()) and e["diffusion"] == "ckpt/not-here"      # existing paths made absolute
    executed = nbformat.read(run/"notebooks"/"01_data.ipynb", as_version=4)
    assert executed.cells[1].metadata.tags == ["injected-parameters"] and 'profile = "smoke"' in executed.cells[1].source
    assert sorted(p.name for p in (run/"notebooks").iterdir()) == ["01_data.ipynb", "02_paper.ipynb"]
    r = RunDir(run)
    assert r.profile == get_profile("smoke", train_steps=7)
    assert [r.stage(f"notebook:{n}")["status"] for n in ("01_data", "02_paper")] == ["done", "done"]
    # the two tables are printed at the end, and where the site would be
    assert "| PSNR (dB) | 7 |" in out and "| EPPNet | 0.15 |" in out and "mri-protodiff site --out" in out
    assert "01_data.ipynb: done" in out
    # a figure without its PNG (no browser for kaleido) is said in the terminal, not only inside the notebook
    assert "1 written as HTML only, without PNG (demo_figure)" in out and "Chromium" in out

    # same inputs (profile, --data, --checkpoint are remembered by the run): nothing runs
    rc, out, _ = run_main("reproduce", "--out", run, "--notebooks", experiments, "--no-site")
    assert rc == 0 and len(log(run)) == 2 and out.count("skipped (done with the same inputs)") == 2
    # the library code changes: every notebook reruns (its stages decide for themselves what to redo)
    monkeypatch.setattr(R, "_code_hash", lambda: "code-v2")
    rc, out, _ = run_main("reproduce", "--out", run, "--notebooks", experiments, "--no-site")
    assert rc == 0 and [e["nb"] for e in log(run)[2:]] == ["01_data", "02_paper"]
    # an upstream notebook changes: it and everything after it rerun
    make_nb(experiments/"01_data.ipynb", PARAMS, LOG.format(name="01_data"), "print('edited')")
    rc, out, _ = run_main("reproduce", "--out", run, "--notebooks", experiments, "--no-site")
    assert rc == 0 and [e["nb"] for e in log(run)[4:]] == ["01_data", "02_paper"]
    assert log(run)[4]["data"] == str(data.resolve())        # the run remembers --data (and --checkpoint)
    # --force reruns everything and tells the notebooks to redo their stages
    rc, _, _ = run_main("reproduce", "--out", run, "--notebooks", experiments, "--no-site", "--force")
    assert rc == 0 and [(e["nb"], e["force"]) for e in log(run)[6:]] == [("01_data", True), ("02_paper", True)]


def test_reproduce_failure_names_cell_and_resumes(experiments, tmp_path, fixed_code, monkeypatch):
    make_nb(experiments/"02_paper.ipynb", PARAMS, LOG.format(name="02_paper"), "x = 41", "assert x == 42, 'x is not 42'")
    make_nb(experiments/"03_after.ipynb", PARAMS, LOG.format(name="03_after"))
    run = tmp_path/"r"
    rc, out, err = run_main("reproduce", "--profile", "smoke", "--out", run, "--notebooks", experiments, "--no-site")
    assert rc == 1
    assert "notebook 02_paper.ipynb failed in cell 4" in err and "AssertionError: x is not 42" in err
    assert "| assert x == 42" in err and str(run/"notebooks"/"02_paper.ipynb") in err
    assert [e["nb"] for e in log(run)] == ["01_data", "02_paper"]                    # 03 never started
    r = RunDir(run)
    assert r.stage("notebook:01_data")["status"] == "done" and r.stage("notebook:02_paper")["status"] == "failed"
    failed = nbformat.read(run/"notebooks"/"02_paper.ipynb", as_version=4)           # kept, with the error in it
    assert any(o.output_type == "error" for c in failed.cells if c.cell_type == "code" for o in c.outputs)
    # fixed: the next run resumes at the failed notebook, and ends by building the site (Sphinx: no quarto here)
    make_nb(experiments/"02_paper.ipynb", PARAMS, LOG.format(name="02_paper"))
    monkeypatch.setattr(R, "library_notebooks", lambda library=None: [])       # the repository's chapters are not needed here
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p)/"quarto").exists()))
    rc, out, err = run_main("reproduce", "--out", run, "--notebooks", experiments)
    assert rc == 0, err
    assert [e["nb"] for e in log(run)[2:]] == ["02_paper", "03_after"]
    assert "01_data.ipynb: skipped" in out
    assert f"site: {run/'site'/'index.html'} (built with Sphinx" in out
    index = (run/"site"/"index.html").read_text()
    assert "PSNR (dB)" in index and "experiments/03_after.html" in index


def test_reproduce_bad_input(tmp_path, experiments):
    rc, _, err = run_main("reproduce", "--out", tmp_path/"r", "--notebooks", tmp_path/"missing")
    assert rc == 2 and "missing does not exist" in err
    (tmp_path/"empty").mkdir()
    rc, _, err = run_main("reproduce", "--out", tmp_path/"r", "--notebooks", tmp_path/"empty")
    assert rc == 2 and "no experiment notebooks" in err
    rc, _, err = run_main("reproduce", "--out", tmp_path/"r", "--notebooks", experiments, "--set", "train_steps")
    assert rc == 2 and "FIELD=VALUE" in err
    rc, _, err = run_main("reproduce", "--out", tmp_path/"r", "--notebooks", experiments, "--set", "trian_steps=3")
    assert rc == 2 and "trian_steps" in err
    RunDir(tmp_path/"q", get_profile("quick"))
    rc, _, err = run_main("reproduce", "--out", tmp_path/"q", "--profile", "smoke", "--notebooks", experiments)
    assert rc == 2 and "another profile" in err
    assert not (tmp_path/"q"/"notebooks").exists()


def test_empty_lists_and_zero_counts_are_one_line_errors(tmp_path):
    "`--n 0` and `--seeds ,` are refused by the parser, naming the option, before any work."
    for args, what in ((("sample", "--n", "0"), "argument --n: '0' is not >= 1"), (("trajectory", "--n", "-2"), "argument --n: '-2' is not >= 1"),
                       (("train-explainers", "--seeds", ","), "argument --seeds: ',' is an empty list"),
                       (("train-explainers", "--methods", " , "), "is an empty list")):
        with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()) as buf:
            cli.main([*args, "--out", str(tmp_path/"r")])
        assert e.value.code == 2 and what in buf.getvalue() and "Traceback" not in buf.getvalue(), buf.getvalue()
    assert not (tmp_path/"r").exists()


def test_site_command_errors(tmp_path):
    rc, _, err = run_main("site", "--out", tmp_path/"none")
    assert rc == 2 and "not a run directory" in err
    RunDir(tmp_path/"r", get_profile("smoke"))
    rc, _, err = run_main("site", "--out", tmp_path/"r", "--library", tmp_path/"nolib")
    assert rc == 2 and "nolib does not exist" in err
    rc, out, _ = run_main("site", "--out", tmp_path/"r", "--library", tmp_path, "--builder", "sphinx")
    assert rc == 0 and "pages, built with Sphinx" in out


def test_experiments_dir_is_the_repository_one():
    root = R.repo_dir()
    assert root is not None and (root/"settings.ini").exists()
    assert R.experiments_dir() == root/"nbs"/"experiments"


def test_every_stage_has_a_subcommand_with_its_inputs_and_outputs_documented(tmp_path, monkeypatch):
    "Each entry of `stages.STAGES`: a subcommand whose --help names what it needs and writes, and a pipeline function taking its options."
    import inspect
    import torch
    from mri_protodiff import core, pipeline, stages
    p = cli.build_parser()
    sub = next(a for a in p._actions if a.dest == "command").choices
    for st in stages.STAGES:
        assert st.name in sub, f"no subcommand for stage {st.name!r}"
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e: cli.main([st.name, "--help"])
        assert e.value.code == 0, st.name
        text = out.getvalue()
        for need in st.needs: assert need in text, (st.name, need)
        for w in st.writes: assert w in text, (st.name, w)
        fn = getattr(pipeline, st.func, None)
        assert callable(fn), f"stage {st.name!r}: no function pipeline.{st.func}"
        params = inspect.signature(fn).parameters
        any_kw = any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values())
        for o in st.options:
            d = cli.option_dest(o)
            if d == "threads": continue   # not a stage parameter: `run_stage_command` takes it (checked below)
            assert any_kw or d in params, f"stage {st.name!r}: option {o.flags[0]} (dest {d!r}) is no parameter of pipeline.{st.func}"
    assert set(stages.PROFILE_NAMES) == set(core._PROFILES) and len(stages.PROFILE_NAMES) == len(set(stages.PROFILE_NAMES))
    # --workers (train-explainers) reaches the stage function
    seen = {}
    monkeypatch.setattr(pipeline, "run_train_explainers", lambda run, **kw: seen.update(kw) or {})
    rc, out, err = run_main("train-explainers", "--out", tmp_path/"r", "--profile", "smoke", "--workers", 2, "--methods", "ppnet")
    assert rc == 0, err
    assert seen["workers"] == 2 and seen["methods"] == ("ppnet",)


def test_building_the_parser_does_not_import_torch():
    r = subprocess.run([sys.executable, "-c", "import mri_protodiff.cli as c; c.build_parser(); import sys; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
