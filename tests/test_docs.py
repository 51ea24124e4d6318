"The README is generated from nbs/index.ipynb, and its commands match what CI runs."
import re, subprocess, sys
from pathlib import Path
ROOT = Path(__file__).resolve().parent.parent

def test_readme_in_step_with_index():
    r = subprocess.run([sys.executable, str(ROOT/".ci"/"sync_readme.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

def test_readme_install_is_the_one_ci_runs():
    readme = (ROOT/"README.md").read_text()
    ci = (ROOT/".ci"/"run").read_text()
    install = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]"'
    assert install in ci
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    assert any(install in b for b in blocks), "README's main command must use the same install as CI"
    assert any(b.strip() == "bash .ci/run" for b in blocks)

def test_cli_help_and_version():
    for args in (["--help"], ["--version"]):
        r = subprocess.run(["mri-protodiff", *args], capture_output=True, text=True)
        assert r.returncode == 0 and "mri-protodiff" in r.stdout

def test_nbdev_clean_keeps_parameters_tag(tmp_path):
    import json, shutil, nbformat
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("profile = 'smoke'", metadata={"tags": ["parameters"], "scrolled": True}),
                nbformat.v4.new_code_cell("print(profile)", execution_count=3)]
    dest = ROOT/"nbs"/"experiments"/"_tmp_clean_check.ipynb"
    nbformat.write(nb, dest)
    try:
        r = subprocess.run(["nbdev_clean", "--fname", str(dest)], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        cells = json.loads(dest.read_text())["cells"]
        assert cells[0]["metadata"] == {"tags": ["parameters"]}   # tags kept, other cell metadata dropped
        assert cells[1]["execution_count"] is None
    finally:
        dest.unlink()
