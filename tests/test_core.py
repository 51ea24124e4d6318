"Core: seeding, profiles, the run directory's manifest under failure and kill."
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import numpy as np, pytest, torch
from mri_protodiff.core import (seed_everything, get_profile, Profile, RunDir, write_json, read_json,
                                hash_inputs, open_run, CorruptFile, RunNote)

def test_same_seed_same_draws():
    seed_everything(123); a = np.random.rand(10), torch.randn(10)
    seed_everything(123); b = np.random.rand(10), torch.randn(10)
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1])
    seed_everything(124); assert not torch.equal(torch.randn(10), a[1])

def test_profiles_are_sectioned_and_roundtrip():
    for name in ("smoke", "quick", "paper"):
        p = get_profile(name)
        d = json.loads(json.dumps(p.to_dict()))
        assert set(d) == {"name", "seed", "n_bootstrap", "data", "diffusion", "explainers", "faithfulness", "groundtruth"}
        assert Profile.from_dict(d) == p and Profile.from_dict(p.flat()) == p
    assert get_profile("paper").data.image_size == 256 and get_profile("paper").diffusion.sample_steps == 200

def test_a_setting_is_named_alone_or_with_its_section():
    p = get_profile("smoke", train_steps="3")
    assert p == get_profile("smoke", **{"diffusion.train_steps": 3}) and p.get("train_steps") == p.diffusion.train_steps == 3
    assert Profile.from_dict({"name": "smoke", "train_steps": 3}).diffusion.train_steps == 3     # a flat (older) manifest still reads
    assert p.updated(region_fraction=0.2).faithfulness.region_fraction == 0.2
    with pytest.raises(ValueError, match="data.train_steps"): get_profile("smoke", **{"data.train_steps": 3})
    with pytest.raises(ValueError, match="trian_steps"): get_profile("smoke", trian_steps=3)
    with pytest.raises(ValueError, match="gt_minimal"): get_profile("smoke", gt_minimal="[1, 2]")

def test_manifest_records_versions_and_commit(tmp_run):
    rd = RunDir(tmp_run, get_profile("smoke"))
    m = rd.manifest
    assert m["environment"]["packages"]["torch"] == torch.__version__.split("+")[0] or m["environment"]["packages"]["torch"]
    assert m["environment"]["python"].count(".") == 2
    assert set(m["git"]) == {"commit", "dirty"}
    # inside this repository checkout the commit is a 40-hex sha
    if (Path(__file__).parent.parent/".git").exists():
        assert m["git"]["commit"] and len(m["git"]["commit"]) == 40
    assert m["profile"]["name"] == "smoke"

def test_stage_skip_redo_force(tmp_run):
    rd = RunDir(tmp_run, get_profile("smoke")); n = []
    def f(): n.append(1); (rd/"o.txt").write_text("x")
    assert rd.run_stage("s", f, {"a": 1}, ["o.txt"]) == "done"
    assert rd.run_stage("s", f, {"a": 1}, ["o.txt"]) == "skipped"
    assert rd.run_stage("s", f, {"a": 2}, ["o.txt"]) == "done"
    assert rd.run_stage("s", f, {"a": 2}, ["o.txt"], force=True) == "done"
    (rd/"o.txt").unlink()  # an output that disappeared makes the stage not done
    with pytest.warns(RunNote, match="stage 's' is redone: o.txt is missing"): assert rd.run_stage("s", f, {"a": 2}, ["o.txt"]) == "done"
    assert len(n) == 4

def test_exception_leaves_stage_not_done_and_rerun_completes(tmp_run):
    rd = RunDir(tmp_run, get_profile("smoke"))
    def bad(): (rd/"half.txt").write_text("half"); raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt): rd.run_stage("s", bad, {}, ["half.txt", "full.txt"])
    assert rd.stage("s")["status"] == "failed" and not rd.is_done("s")
    def good(): (rd/"half.txt").write_text("ok"); (rd/"full.txt").write_text("ok")
    assert rd.run_stage("s", good, {}, ["half.txt", "full.txt"]) == "done" and rd.is_done("s")

def _spawn(code, *args):
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def test_kill_during_stage_leaves_it_not_done(tmp_run):
    p = _spawn("""
        import sys, time
        from mri_protodiff.core import RunDir, get_profile
        rd = RunDir(sys.argv[1], get_profile('smoke'))
        def slow():
            print('started', flush=True); time.sleep(60); (rd/'out.txt').write_text('x')
        rd.run_stage('slow', slow, {'k': 1}, ['out.txt'])
    """, tmp_run)
    assert p.stdout.readline().strip() == "started"
    p.send_signal(signal.SIGKILL); p.wait()
    rd = RunDir(tmp_run)
    assert rd.stage("slow")["status"] == "running" and not rd.is_done("slow", {"k": 1})
    assert rd.run_stage("slow", lambda: (rd/"out.txt").write_text("x"), {"k": 1}, ["out.txt"]) == "done"

def test_kill_during_manifest_writes_never_leaves_partial_json(tmp_path):
    path = tmp_path/"m.json"
    big = {"k%d" % i: "v" * 200 for i in range(20000)}  # ~4 MB, so a kill often lands mid-write
    write_json(path, {"i": -1, **big})
    p = _spawn("""
        import sys
        from mri_protodiff.core import write_json
        big = {'k%d' % i: 'v' * 200 for i in range(20000)}
        i = 0
        print('go', flush=True)
        while True:
            write_json(sys.argv[1], {'i': i, **big}); i += 1
    """, path)
    assert p.stdout.readline().strip() == "go"
    for _ in range(5):
        time.sleep(0.15)
        d = read_json(path)            # readable at any moment
        assert len(d) == 20001
    p.send_signal(signal.SIGKILL); p.wait()
    d = read_json(path)
    assert len(d) == 20001 and d["k0"] == "v" * 200
    assert [f.name for f in tmp_path.iterdir()] == ["m.json"] or all(
        f.name == "m.json" or f.name.endswith(".tmp") for f in tmp_path.iterdir())

def test_open_run_keeps_recorded_profile(tmp_run):
    open_run(tmp_run, "smoke", {"train_steps": "9"})
    assert open_run(tmp_run).profile.diffusion.train_steps == 9
    with pytest.raises(ValueError, match="another profile"):
        open_run(tmp_run, "quick")

def test_outputs_are_recorded_and_checked(tmp_run):
    rd = RunDir(tmp_run, get_profile("smoke")); n = []
    def f(): n.append(1); (rd/"d").mkdir(exist_ok=True); (rd/"d"/"x.bin").write_bytes(bytes(range(256)) * 64); (rd/"o.txt").write_text("x")
    assert rd.run_stage("s", f, {}, ["o.txt", "d"]) == "done"
    assert sorted(rd.stage("s")["files"]) == ["d/x.bin", "o.txt"] and rd.stage("s")["files"]["d/x.bin"][0] == 16384
    with open(rd/"d"/"x.bin", "r+b") as fh: fh.seek(8000); fh.write(b"\0" * 4096)       # a file under an output folder, same size
    assert rd.why_not_done("s") == "d/x.bin changed (same size, other bytes)" and not rd.is_done("s")
    with pytest.warns(RunNote, match="stage 's' is redone: d/x.bin changed"): assert rd.run_stage("s", f, {}, ["o.txt", "d"]) == "done"
    assert rd.run_stage("s", f, {}, ["o.txt", "d"]) == "skipped" and len(n) == 2

def test_a_manifest_without_records_counts_outputs_present_and_records_them_at_the_next_skip(tmp_run):
    rd = RunDir(tmp_run, get_profile("smoke"))
    rd.run_stage("s", lambda: (rd/"o.txt").write_text("x"), {}, ["o.txt"])
    m = read_json(rd.manifest_path); del m["stages"]["s"]["files"]; write_json(rd.manifest_path, m)   # as written before records
    (rd/"o.txt").write_text("y")                               # unverifiable: present is enough
    assert rd.is_done("s") and rd.run_stage("s", lambda: 1 / 0, {}, ["o.txt"]) == "skipped"
    assert rd.stage("s")["files"] == {"o.txt": [1, __import__("hashlib").sha256(b"y").hexdigest()]}
    (rd/"o.txt").write_text("z"); assert rd.why_not_done("s") == "o.txt changed (same size, other bytes)"

def test_a_stage_run_by_a_stage_in_a_child_process_is_checked_with_it(tmp_run):
    "As `reproduce` runs a notebook whose kernel runs stages: a table the inner stage wrote and someone deleted redoes the outer one."
    rd = RunDir(tmp_run, get_profile("smoke"))
    code = textwrap.dedent("""
        import sys
        from mri_protodiff.core import RunDir
        rd = RunDir(sys.argv[1])
        rd.run_stage('faithfulness', lambda: (rd/'table.csv').write_text('a,b'), {}, ['table.csv'])
        (rd/'table.csv').write_text('a,c')     # the notebook rewrites it after its stage: what it leaves counts
    """)
    outer = lambda: subprocess.run([sys.executable, "-c", code, str(tmp_run)], check=True)
    assert rd.run_stage("notebook:05", outer, {"nb": 1}, []) == "done"
    assert rd.stage("faithfulness")["parent"] == "notebook:05" and rd.is_done("faithfulness") and rd.is_done("notebook:05", {"nb": 1})
    (rd/"table.csv").unlink()
    assert rd.why_not_done("notebook:05") == "table.csv is missing (written by stage 'faithfulness', which it ran)"
    with pytest.warns(RunNote, match="stage 'notebook:05' is redone: table.csv is missing"):
        assert rd.run_stage("notebook:05", outer, {"nb": 1}, []) == "done"
    assert rd.is_done("notebook:05") and "MRI_PROTODIFF_STAGE" not in os.environ
    rd._update_stage("faithfulness", status="failed")        # an inner stage that failed: the outer one is not done either
    assert rd.why_not_done("notebook:05") == "its stage 'faithfulness' failed"

@pytest.mark.parametrize("text", ["[1, 2, 3]", '{"stages": []}', '{"stages": {"s": "done"}}', '{"stag', '{"profile": {"bogus": 1}}'])
def test_a_damaged_manifest_is_an_error_naming_it(tmp_run, text):
    tmp_run.mkdir(); (tmp_run/"manifest.json").write_text(text)
    with pytest.raises(CorruptFile, match="manifest.json: .*delete it to start this run afresh"): open_run(tmp_run).profile
