"""The experiment notebooks as papermill users run them: `--help-notebook` describes every parameter, and
`-p run_dir RUN` alone continues any run with its recorded settings (a mismatch names the notebook parameters)."""
import json, re, shutil, subprocess, sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS = ROOT/"nbs"/"experiments"
PARAMETERS = {"profile": "str", "run_dir": "str", "data": "str", "diffusion": "str", "overrides": "str", "force": "bool"}


def _papermill(*args, timeout=600) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent/"papermill"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "papermill"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout)


def _comments(nb:Path) -> dict:
    "The comment after each `name: type = value  # comment` line of the notebook's parameters cell."
    cell = next(c for c in nbformat.read(nb, as_version=4).cells if "parameters" in c.metadata.get("tags", []))
    return {m[1]: m[2].strip() for m in re.finditer(r"^(\w+)\s*:\s*\w+\s*=.*?#(.*)$", cell.source, re.M)}


def test_help_notebook_describes_every_parameter():
    for nb in sorted(EXPERIMENTS.glob("0*.ipynb")):
        r = _papermill("--help-notebook", nb)
        assert r.returncode == 0, r.stderr
        assert "Unknown type" not in r.stdout, f"{nb.name}:\n{r.stdout}"
        for name, typ in PARAMETERS.items():
            line = next((l for l in r.stdout.splitlines() if l.strip().startswith(f"{name}:")), "")
            assert f"{name}: {typ}" in line, f"{nb.name}: {name!r} not described as {typ}:\n{r.stdout}"
        comments, shown = _comments(nb), " ".join(r.stdout.split())     # click may wrap a long description
        assert set(PARAMETERS) <= set(comments), f"{nb.name}: parameters without a comment: {set(PARAMETERS) - set(comments)}"
        for name, text in comments.items(): assert " ".join(text.split()) in shown, f"{nb.name}: {name!r} shown without {text!r}"
        assert "recorded profile" in r.stdout and "JSON object" in r.stdout, r.stdout


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    "A run made with the smoke profile (its data stage only), as `mri-protodiff data --profile smoke` leaves it."
    from mri_protodiff.core import RunDir, get_profile
    from mri_protodiff.pipeline import run_data
    run = RunDir(tmp_path_factory.mktemp("pm")/"run", get_profile("smoke"))
    run_data(run)
    return run.root


def test_run_dir_alone_continues_a_run_with_its_recorded_settings(smoke_run, tmp_path):
    out = tmp_path/"01.ipynb"
    r = _papermill(EXPERIMENTS/"01_data.ipynb", out, "-p", "run_dir", smoke_run, "--cwd", tmp_path, "-k", "python3")
    assert r.returncode == 0, r.stderr[-3000:]
    from mri_protodiff.core import read_json
    m = read_json(smoke_run/"manifest.json")
    assert m["profile"]["name"] == "smoke" and m["stages"]["data"]["status"] == "done"
    text = "".join(c.source + "".join(o.get("text", "") for o in c.get("outputs", [])) for c in nbformat.read(out, as_version=4).cells)
    assert "profile smoke" in text and "stage data: skipped" in text      # the run's own profile; its data reused, not rebuilt


def test_a_profile_mismatch_names_the_notebook_parameters(smoke_run, tmp_path):
    r = _papermill(EXPERIMENTS/"01_data.ipynb", tmp_path/"01.ipynb", "-p", "run_dir", smoke_run, "-p", "profile", "quick",
                   "--cwd", tmp_path, "-k", "python3")
    assert r.returncode != 0
    assert "this run was made with another profile" in r.stderr and "-p run_dir NEW_FOLDER" in r.stderr, r.stderr[-3000:]
    assert '-p profile ""' in r.stderr and "-p force True" in r.stderr                 # papermill's words, not the CLI's
    assert "--out" not in r.stderr and "--force" not in r.stderr
