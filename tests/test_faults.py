"""Faults a user can cause in a run directory (issue 18), through the command line as a user runs it: outputs changed after
their stage wrote them are named and redone; a damaged manifest, a bad `--out` and a run held by another command are one line
naming the file and what to do, never a traceback (unless --debug); a lock left by a killed command is taken over."""
import contextlib, io, json, os, shutil, signal, socket, subprocess, sys, textwrap, zipfile
from pathlib import Path

import numpy as np
import pytest

from mri_protodiff import cli
from mri_protodiff.core import (CorruptFile, LOCK_ENV, LOCK_FILE, RunLocked, check_lock, lock_owner, open_run, read_json,
                                reading, run_lock)

EXE = str(Path(sys.executable).parent/"mri-protodiff")
ENV = {k: v for k, v in os.environ.items() if k not in ("MRI_PROTODIFF_DEBUG", LOCK_ENV, "MRI_PROTODIFF_STAGE")}
ENV.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def mp(*args, env=None, timeout=300):
    "Run `mri-protodiff ARGS` as a user does; (exit code, stdout, stderr)."
    r = subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, timeout=timeout, env={**ENV, **(env or {})})
    return r.returncode, r.stdout, r.stderr


def one_line_error(rc, err, cmd="data"):
    "A nonzero exit and one line on stderr, `mri-protodiff CMD: error: ...`, no traceback; returns the line."
    lines = err.strip().splitlines()
    assert rc != 0 and "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"mri-protodiff {cmd}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    "A smoke run with its `data` stage done, made by `mri-protodiff data`."
    run = tmp_path_factory.mktemp("faults")/"base"
    rc, out, err = mp("data", "--profile", "smoke", "--out", run)
    assert rc == 0 and "data: done" in out, err
    return run


@pytest.fixture
def run(base_run, tmp_path):
    "A copy of the base run to damage."
    return Path(shutil.copytree(base_run, tmp_path/"run"))


def files(run): return read_json(run/"manifest.json")["stages"]["data"]["files"]


def test_an_output_overwritten_at_the_same_size_is_named_and_redone(run):
    before = files(run)["data/images.npy"]
    with open(run/"data"/"images.npy", "r+b") as f:          # 4 KiB of valid float32 values in the middle, same size
        f.seek(before[0] // 2); f.write(np.full(1024, 0.5, np.float32).tobytes())
    assert (run/"data"/"images.npy").stat().st_size == before[0]
    rc, out, err = mp("data", "--out", run)
    assert rc == 0 and "Traceback" not in err, err
    assert "stage 'data' is redone: data/images.npy changed (same size, other bytes)" in out and "data: done" in out, out
    assert files(run)["data/images.npy"] == before            # rebuilt: the same bytes as before the damage
    rc, out, _ = mp("data", "--out", run)
    assert rc == 0 and "data: skipped" in out and "redone" not in out


def test_a_truncated_or_deleted_output_is_named_and_redone(run):
    size = (run/"data"/"masks.npy").stat().st_size
    with open(run/"data"/"masks.npy", "r+b") as f: f.truncate(size - 100)
    rc, out, err = mp("data", "--out", run)
    assert rc == 0 and f"stage 'data' is redone: data/masks.npy changed ({size} -> {size - 100} bytes)" in out, (out, err)
    (run/"data"/"split.json").unlink()
    rc, out, err = mp("data", "--out", run)
    assert rc == 0 and "stage 'data' is redone: data/split.json is missing" in out and "data: done" in out, (out, err)
    assert (run/"data"/"split.json").exists()


@pytest.mark.parametrize("text,what", [
    ("[1, 2, 3]", "not a run manifest (a JSON array, where a run manifest is an object)"),
    ('{"stages": []}', "not a run manifest (its 'stages' is a JSON array, not an object)"),
    ('{"profile": {"name": "smoke"}, "stages": {"da', "cannot be read (JSONDecodeError: "),
])
def test_a_damaged_manifest_is_one_line_naming_it(run, text, what):
    (run/"manifest.json").write_text(text)
    line = one_line_error(*mp("data", "--out", run)[::2])
    assert f"{run/'manifest.json'}: {what}" in line and "delete it to start this run afresh" in line, line
    assert (run/"manifest.json").read_text() == text          # left as it was


def test_an_out_that_is_a_file_or_cannot_be_created_is_one_line(tmp_path):
    (tmp_path/"file").write_text("x")
    line = one_line_error(*mp("data", "--out", tmp_path/"file", "--profile", "smoke")[::2])
    assert f"{tmp_path/'file'}: is a file, not a run directory" in line
    line = one_line_error(*mp("reproduce", "--out", tmp_path/"file")[::2], cmd="reproduce")
    assert "is a file, not a run directory" in line
    line = one_line_error(*mp("data", "--out", "/dev/null/run")[::2])
    assert line == "mri-protodiff data: error: /dev/null/run: cannot create this folder (/dev/null is not a folder); choose another --out"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any folder")
def test_a_read_only_out_is_one_line(run):
    os.chmod(run, 0o555)
    try: line = one_line_error(*mp("data", "--out", run)[::2])
    finally: os.chmod(run, 0o755)
    assert f"{run}: cannot write in this folder (permission denied)" in line


def test_an_out_that_cannot_be_written_is_one_line_also_for_root(run, monkeypatch):
    "As root every folder is writable: the check itself, with `os.access` saying no."
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == run else real(p, mode, **kw))
    rc, _, err = run_main("data", "--out", run)
    line = one_line_error(rc, err)
    assert line == f"mri-protodiff data: error: {run}: cannot write in this folder (permission denied); choose another --out or make it writable"


def test_a_skipped_stage_leaves_the_manifest_untouched(run):
    st = (run/"manifest.json").stat()
    rc, out, err = mp("data", "--out", run)
    assert rc == 0 and "data: skipped" in out, err
    st2 = (run/"manifest.json").stat()
    assert (st2.st_ino, st2.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)


HOLD = """
    import sys, time
    from mri_protodiff.core import run_lock
    with run_lock(sys.argv[1], "mri-protodiff reproduce --out run"):
        print("held", flush=True); time.sleep(120)
"""


@contextlib.contextmanager
def holder(run):
    "Another command holding the run's lock (a process that holds it until killed)."
    p = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD), str(run)], stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p
    finally:
        if p.poll() is None: p.kill()
        p.wait(); p.stdout.close()


def test_a_run_held_by_another_command_is_refused_naming_it(run):
    with holder(run) as p:
        line = one_line_error(*mp("data", "--out", run)[::2])
        assert f"another command is writing into this run (pid {p.pid} on {socket.gethostname()}, started " in line, line
        assert "mri-protodiff reproduce --out run" in line and "wait for it to end, or use another --out" in line
        # the library refuses too: a notebook or script opening the run meanwhile
        with pytest.raises(RunLocked, match=f"pid {p.pid}"): open_run(run)
        # ... unless the holder started it (a notebook kernel under `reproduce` inherits the holder's name)
        code = "import sys; from mri_protodiff.core import open_run; print(open_run(sys.argv[1]).profile.name)"
        r = subprocess.run([sys.executable, "-c", code, str(run)], capture_output=True, text=True,
                           env={**ENV, LOCK_ENV: f"{p.pid}@{socket.gethostname()}"})
        assert r.returncode == 0 and r.stdout.strip() == "smoke", r.stderr


def test_a_lock_left_by_a_killed_command_is_taken_over(run):
    with holder(run) as p:
        p.send_signal(signal.SIGKILL)
    assert json.loads((run/LOCK_FILE).read_text())["pid"] == p.pid and lock_owner(run) is None
    rc, out, err = mp("data", "--out", run)
    assert rc == 0 and "data: skipped" in out and "Traceback" not in err, err
    assert f"mri-protodiff data: note: {run/LOCK_FILE}: took over the lock left by pid {p.pid} on " in err, err
    assert (run/LOCK_FILE).read_text() == ""                 # released cleanly at the end
    check_lock(run)


def test_a_failed_command_on_a_new_folder_leaves_no_folder(tmp_path):
    line = one_line_error(*mp("data", "--out", tmp_path/"new", "--set", "trian_steps=3")[::2])
    assert "trian_steps" in line and not (tmp_path/"new").exists()


def run_main(*argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = cli.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("exc", [AttributeError("'NoneType' object has no attribute 'shape'"), TypeError("bad operand"),
                                 zipfile.BadZipFile("File is not a zip file"), ValueError("n must be positive"), KeyError("missing")])
def test_any_exception_in_a_subcommand_is_one_line_and_the_traceback_only_with_debug(run, monkeypatch, exc):
    from mri_protodiff import pipeline
    def boom(*a, **k): raise exc
    monkeypatch.setattr(pipeline, "run_stage_command", boom)
    monkeypatch.delenv("MRI_PROTODIFF_DEBUG", raising=False)
    rc, _, err = run_main("data", "--out", run)
    line = one_line_error(rc, err)
    assert str(exc.args[0]) in line and rc == (2 if isinstance(exc, (ValueError, KeyError)) else 1)
    if rc == 1: assert line.endswith("(unexpected; rerun with --debug for the traceback)") and type(exc).__name__ in line
    for argv, env in ((("--debug", "data", "--out", run), None), (("data", "--out", run, "--debug"), None), (("data", "--out", run), "1")):
        if env: monkeypatch.setenv("MRI_PROTODIFF_DEBUG", env)
        rc2, _, err = run_main(*argv)
        assert rc2 == rc and err.startswith("Traceback (most recent call last)") and err.strip().splitlines()[-1] == line, err
    assert (run/LOCK_FILE).read_text() == ""                 # the lock is released after a failure too


def test_ctrl_c_is_exit_130_in_one_line(run, monkeypatch):
    from mri_protodiff import pipeline
    def interrupted(*a, **k): raise KeyboardInterrupt
    monkeypatch.setattr(pipeline, "run_stage_command", interrupted)
    assert run_main("data", "--out", run)[::2] == (130, "mri-protodiff data: interrupted\n")


@pytest.mark.parametrize("args,what", [(("sample", "--n", "0"), "argument --n: '0' is not >= 1"),
                                       (("train-explainers", "--seeds", ","), "argument --seeds: ',' is an empty list")])
def test_empty_lists_and_zero_counts_are_one_line(tmp_path, args, what):
    rc, _, err = mp(*args, "--out", tmp_path/"r")
    assert rc == 2 and what in err.strip().splitlines()[-1] and "Traceback" not in err, err
    assert not (tmp_path/"r").exists()


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_a_damaged_file_read_inside_reading_is_named(tmp_path, damage):
    "The helper every reader of a pipeline file uses: npz, npy, safetensors and JSON damaged in three ways."
    from safetensors.torch import save_file, load_file
    import torch
    arrays = {"a.npz": lambda p: np.savez(p, x=np.arange(1000)), "a.npy": lambda p: np.save(p, np.arange(1000)),
              "m.safetensors": lambda p: save_file({"w": torch.zeros(100)}, str(p)), "c.json": lambda p: p.write_text('{"a": [1, 2, 3]}')}
    readers = {"a.npz": lambda p: dict(np.load(p, allow_pickle=False)), "a.npy": lambda p: np.load(p, allow_pickle=False),
               "m.safetensors": lambda p: load_file(str(p)), "c.json": lambda p: json.loads(p.read_text())}
    for name, write in arrays.items():
        p = tmp_path/name; write(p); data = p.read_bytes()
        p.write_bytes({"truncate": data[:len(data) // 2], "garbage": b"\x00\xff" * 50, "empty": b""}[damage])
        with pytest.raises(CorruptFile, match="rerun the stage that wrote it with --force") as e:
            with reading(p): readers[name](p)
        assert str(e.value).startswith(f"{p}: cannot be read (") and e.value.path == p
    with pytest.raises(FileNotFoundError):                    # a missing file is not called damaged
        with reading(tmp_path/"none.npy"): np.load(tmp_path/"none.npy")


def test_reproduce_redoes_a_notebook_whose_stage_output_was_deleted(tmp_path, monkeypatch):
    "The issue's case: `reproduce` said 'skipped' six times after tables/faithfulness.csv was deleted; now the notebook that ran the stage is redone."
    import nbformat
    from mri_protodiff import reproduce as R
    monkeypatch.setattr(R, "_code_hash", lambda: "code-v1")       # other work on the package must not rerun the notebooks mid-test
    exp = tmp_path/"experiments"; exp.mkdir()
    nb = nbformat.v4.new_notebook(metadata=dict(kernelspec=dict(name="python3", display_name="Python 3", language="python")))
    nb.cells = [nbformat.v4.new_code_cell('profile = "quick"\nrun_dir = "runs/default"\ndata = "phantom"\ndiffusion = ""\n'
                                          'overrides = "{}"\nforce = False', metadata=dict(tags=["parameters"])),
                nbformat.v4.new_code_cell("from mri_protodiff.core import open_run\nrun = open_run(run_dir)\n"
                                          "def work(): (run/'tables').mkdir(exist_ok=True); (run/'tables'/'faithfulness.csv').write_text('a,b\\n1,2')\n"
                                          "run.run_stage('faithfulness', work, {'v': 1}, ['tables/faithfulness.csv'])")]
    nbformat.write(nb, exp/"05_faithfulness.ipynb")
    run = tmp_path/"r"
    rc, out, err = run_main("reproduce", "--profile", "smoke", "--out", run, "--notebooks", exp, "--no-site")
    assert rc == 0 and "05_faithfulness.ipynb: done" in out, err
    assert read_json(run/"manifest.json")["stages"]["faithfulness"]["parent"] == "notebook:05_faithfulness"
    (run/"tables"/"faithfulness.csv").unlink()
    rc, out, err = run_main("reproduce", "--out", run, "--notebooks", exp, "--no-site")
    assert rc == 0 and "05_faithfulness.ipynb: done" in out, (out, err)
    assert ("mri-protodiff reproduce: note: stage 'notebook:05_faithfulness' is redone: tables/faithfulness.csv is missing "
            "(written by stage 'faithfulness', which it ran)") in err, err
    assert (run/"tables"/"faithfulness.csv").exists()
    rc, out, err = run_main("reproduce", "--out", run, "--notebooks", exp, "--no-site")
    assert rc == 0 and "05_faithfulness.ipynb: skipped" in out and "note:" not in err, (out, err)


def test_a_failed_force_leaves_the_recorded_profile(run):
    before = read_json(run/"manifest.json")["profile"]
    rc, out, err = mp("sample", "--out", run, "--set", "n_generated=0", "--force")
    assert rc != 0 and "Traceback" not in err, err
    assert read_json(run/"manifest.json")["profile"] == before       # the settings change only when a command succeeds
    rc, out, err = mp("data", "--out", run)                           # and the run goes on as before, no --force needed
    assert rc == 0 and "data: skipped" in out, err
    rc, out, err = mp("data", "--out", run, "--set", "val_fraction=0.3", "--force")
    assert rc == 0 and read_json(run/"manifest.json")["profile"]["data"]["val_fraction"] == 0.3, err   # succeeded: recorded


def test_sigterm_ends_the_command_and_every_process_it_started(tmp_path):
    "`reproduce` killed with SIGTERM while a notebook runs: exit 130 in one line, its kernel (and anything the kernel started) gone, lock released."
    import psutil, time
    nbs = tmp_path/"nbs"; nbs.mkdir()
    import nbformat
    nb = nbformat.v4.new_notebook(metadata=dict(kernelspec=dict(name="python3", display_name="Python 3", language="python")))
    nb.cells = [nbformat.v4.new_code_cell('profile = ""\nrun_dir = ""\ndata = ""\ndiffusion = ""\noverrides = "{}"\nforce = False',
                                          metadata=dict(tags=["parameters"])),
                nbformat.v4.new_code_cell("import subprocess, time\n"           # a grandchild in a session of its own, as Chromium is
                                          "subprocess.Popen(['sleep', '300'], start_new_session=True)\ntime.sleep(300)")]
    nbformat.write(nb, nbs/"01_sleep.ipynb")
    p = subprocess.Popen([EXE, "reproduce", "--profile", "smoke", "--out", str(tmp_path/"r"), "--notebooks", str(nbs), "--no-site"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    me, seen, t0 = psutil.Process(p.pid), set(), time.time()
    while time.time() - t0 < 240:          # wait for the kernel's sleeping grandchild
        try: kids = me.children(recursive=True)
        except psutil.NoSuchProcess: break
        seen |= {k.pid for k in kids}
        if any(k.name() == "sleep" for k in kids if k.is_running()): break
        time.sleep(0.5)
    assert any(psutil.Process(k).name() == "sleep" for k in seen if psutil.pid_exists(k)), "the notebook never started"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    time.sleep(0.5)
    left = [k for k in seen if psutil.pid_exists(k) and psutil.Process(k).status() != psutil.STATUS_ZOMBIE]
    assert left == [], f"still running after the command ended: {[psutil.Process(k).cmdline() for k in left]}"
    assert not lock_owner(tmp_path/"r")
