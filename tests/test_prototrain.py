"Training the explainers: push, the stage plan, ProtoPool's hard assignment, save/reload, the stage and its CLI."
import csv, json, subprocess, sys
from pathlib import Path
import numpy as np, pytest, torch
from mri_protodiff.core import get_profile, RunDir, open_run, read_json
from mri_protodiff.protonets import ExplainerConfig, build_explainer, l2_distances, ProtoPool, METHODS
from mri_protodiff.prototrain import (push_prototypes, plan_from_profile, fit_explainer, predict, accuracy_report,
                                      duplicate_check, save_explainer, load_explainer,
                                      explainer_labels, push_benchmark, gumbel_scale, TrainPlan, augment_batch)
from mri_protodiff.pipeline import run_train_explainers

from conftest import tiny_unet

torch.set_num_threads(1)

def blobs(n, size=32, n_classes=4, seed=0):
    "An easy synthetic task, unchanged by left-right flips: class c = a bright disc, top or bottom half (c // 2), small or large (c % 2)."
    g = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    yy, xx = np.mgrid[:size, :size]
    x = np.full((n, 1, size, size), -1.0, np.float32)
    for k in range(n):
        half, large = divmod(int(y[k]), 2)
        cy, cx = (half + 0.5) * size / 2 + g.uniform(-2, 2), g.uniform(0.3, 0.7) * size
        x[k, 0][(yy - cy) ** 2 + (xx - cx) ** 2 < (size / (5 if large else 12)) ** 2] = 0.8
    x += g.normal(0, 0.1, x.shape).astype(np.float32)
    return np.clip(x, -1, 1), y.astype(np.int64)

def small_plan(method, **kw):
    prof = get_profile("smoke", warm_epochs=1, joint_epochs=6, push_every=3, last_epochs=1, proto_batch=16, **kw)
    return prof, plan_from_profile(prof, method)

def cfg_for(prof, method, n_classes=4, size=32):
    return ExplainerConfig(method=method, n_classes=n_classes, image_size=size, protos_per_class=prof.explainers.protos_per_class,
                           proto_dim=prof.explainers.proto_dim, pool_size=prof.explainers.pool_size, pool_slots=prof.explainers.pool_slots)

@pytest.fixture(scope="module")
def trained():
    "All three explainers fitted on the blob task (shared by several tests)."
    xtr, ytr = blobs(64, seed=0); xte, yte = blobs(48, seed=1)
    out = {}
    for m in METHODS:
        prof, plan = small_plan(m)
        out[m] = (fit_explainer(cfg_for(prof, m), plan, xtr, ytr, seed=0, device="cpu"), cfg_for(prof, m), plan)
    return out, (xtr, ytr, xte, yte)

# ---------------------------------------------------------------- push
def test_push_finds_a_planted_patch_and_respects_classes():
    torch.manual_seed(0)
    m = build_explainer(ExplainerConfig(method="ppnet", n_classes=2, image_size=32, protos_per_class=3, proto_dim=8)).eval()
    x, y = torch.randn(20, 1, 32, 32), np.array([0, 1] * 10)
    with torch.no_grad(): z = m.features(x)
    m.prototypes.data[4] = z[7, :, 1, 2] + 1e-3                             # prototype 4 is class 1; image 7 is class 1
    r = push_prototypes(m, x, y, batch_size=6)
    assert (int(r.index[4]), r.cell[4].tolist()) == (7, [1, 2])
    assert r.label.tolist() == [0, 0, 0, 1, 1, 1] and (y[r.index] == r.label).all()
    assert r.distance[4] < 1e-4 and (r.distance >= 0).all()

def test_push_equals_brute_force_over_all_images():
    torch.manual_seed(1)
    m = build_explainer(ExplainerConfig(method="ppnet", n_classes=3, image_size=32, protos_per_class=2, proto_dim=8)).eval()
    x, y = torch.randn(25, 1, 32, 32), np.arange(25) % 3
    r = push_prototypes(m, x, y, batch_size=7, update=False)
    with torch.no_grad(): d = l2_distances(m.features(x), m.prototypes)   # (N, P, h, w)
    for p in range(6):
        c = p // 2
        dd = d[torch.as_tensor(y == c), p]
        rows = np.flatnonzero(y == c)
        k = int(dd.flatten().argmin()); b, rem = divmod(k, dd.shape[1] * dd.shape[2])
        assert (int(r.index[p]), r.cell[p].tolist()) == (int(rows[b]), list(divmod(rem, dd.shape[2])))
        assert abs(float(r.distance[p]) - float(dd.min())) < 1e-5

def test_unique_push_gives_distinct_patches():
    torch.manual_seed(0)
    m = build_explainer(ExplainerConfig(method="ppnet", n_classes=1, image_size=32, protos_per_class=5, proto_dim=8)).eval()
    m.prototypes.data[:] = m.prototypes.data[0]                              # five identical prototypes
    x, y = torch.randn(6, 1, 32, 32), np.zeros(6, np.int64)
    plain = push_prototypes(m, x, y, update=False)
    assert len({(int(n), *c.tolist()) for n, c in zip(plain.index, plain.cell)}) == 1
    uniq = push_prototypes(m, x, y, unique=True, update=False)
    assert len({(int(n), *c.tolist()) for n, c in zip(uniq.index, uniq.cell)}) == 5
    with torch.no_grad(): d = l2_distances(m.features(x), m.prototypes[:1])[:, 0].flatten()
    assert np.allclose(np.sort(uniq.distance), np.sort(d.numpy())[:5], atol=1e-5)   # the five nearest patches

def test_push_errors_name_the_problem():
    m = build_explainer(ExplainerConfig(method="ppnet", n_classes=2, image_size=32, protos_per_class=1, proto_dim=4))
    with pytest.raises(ValueError, match="no image of an allowed class"): push_prototypes(m, torch.randn(4, 1, 32, 32), np.zeros(4))
    with pytest.raises(ValueError, match="labels"): push_prototypes(m, torch.randn(4, 1, 32, 32), np.zeros(3))

def test_after_push_every_prototype_is_the_feature_of_its_recorded_patch(trained):
    fits, (xtr, ytr, _, _) = trained
    for m, (fit, _, _) in fits.items():
        model = fit.model
        with torch.no_grad(): z = model.features(torch.from_numpy(xtr[fit.push.index]))
        for p in range(model.n_prototypes):
            i, j = fit.push.cell[p]
            assert (model.prototypes[p] - z[p, :, i, j]).abs().max() <= 1e-5, (m, p)
        assert (ytr[fit.push.index] == fit.push.label).all()
        allowed = model.push_classes().numpy()
        assert all(allowed[p, fit.push.label[p]] for p in range(model.n_prototypes))

# ---------------------------------------------------------------- training
def test_training_beats_chance_clearly(trained):
    fits, (_, _, xte, yte) = trained
    for m, (fit, _, _) in fits.items():
        acc = accuracy_report(predict(fit.model, xte)["logits"], yte, 4)["accuracy"]
        assert acc >= 0.6, (m, acc)                                          # chance is 0.25

def test_protopool_assignment_is_one_hot_at_the_end(trained):
    fits, _ = trained
    fit = fits["protopool"][0]
    pool = fit.model
    assert isinstance(pool, ProtoPool) and pool.hardened
    A = pool.assignment()
    assert set(A.unique().tolist()) == {0.0, 1.0} and torch.equal(A.sum(1), torch.ones_like(A.sum(1)))
    assert fit.assignment_sharpness > 0.98                                 # the annealed Gumbel scale had already made it (nearly) hard
    scales = [h["gumbel_scale"] for h in fit.history if "gumbel_scale" in h]
    assert scales == sorted(scales) and scales[-1] > 500 and float(pool.gumbel_scale) == 1000.0   # annealed up to the final scale

def test_stage_plan_is_data():
    prof = get_profile("quick")
    plan = plan_from_profile(prof, "ppnet")
    assert [s.kind for s in plan.stages] == ["pretrain", "init", "warm", "joint", "push", "last", "joint", "push", "last"]
    assert "backbone" not in plan.stages[2].lr and plan.stages[3].lr["backbone"] < plan.stages[0].lr["backbone"]
    assert [s.kind for s in plan_from_profile(prof, "eppnet").stages] == [s.kind for s in plan.stages]   # EPPNet starts as PPNet does (k-means)
    assert TrainPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    pp = plan_from_profile(prof, "protopool")
    assert [s.kind for s in pp.stages] == ["pretrain", "init", "warm", "joint", "harden", "push", "last"] and pp.coefs["orthogonality"] == prof.explainers.orth_coef
    assert [s.kind for s in plan_from_profile(prof, "protopool", backbone="unet").stages][:2] == ["init", "warm"]   # a frozen UNet is not pre-trained; ProtoPool's prototypes start on k-means centroids
    ep = plan_from_profile(get_profile("quick", mean_clst_coef=0.3), "eppnet")
    assert ep.coefs["mean_cluster"] == 0.3 and ep.coefs["separation"] == -prof.explainers.sep_coef
    assert all("backbone" not in s.lr for s in plan_from_profile(prof, "ppnet", backbone="unet").stages)
    assert gumbel_scale(0, 1000, 10, "sqrt") == 0 and gumbel_scale(0, 1000, 10, "geometric", 1.3) == 1.3 and gumbel_scale(2.5, 1000, 10) == 500 and gumbel_scale(20, 1000, 10) == 1000
    with pytest.raises(ValueError, match="unknown explainer method"): plan_from_profile(prof, "protonet")

def test_ppnet_and_eppnet_start_the_same_way():
    "The comparison of PPNet and EPPNet is their loss, not their start: same stages, and the same prototypes after `init`."
    prof = get_profile("quick")
    assert {"ppnet", "eppnet", "protopool"} <= set(prof.explainers.proto_init_kmeans)
    pp, ep = plan_from_profile(prof, "ppnet"), plan_from_profile(prof, "eppnet")
    assert [(s.kind, s.epochs, s.lr) for s in pp.stages] == [(s.kind, s.epochs, s.lr) for s in ep.stages]
    rest = lambda plan: {k: v for k, v in plan.to_dict().items() if k not in ("method", "coefs")}
    assert rest(pp) == rest(ep)                                   # batch size, weight decay, augmentation, push ...
    assert pp.coefs != ep.coefs                                   # ... and they do differ in the loss
    for name in ("smoke", "paper"):                               # no profile starts them differently
        p = get_profile(name)
        assert ("ppnet" in p.explainers.proto_init_kmeans) == ("eppnet" in p.explainers.proto_init_kmeans)
    # up to and including the init stage, on a tiny data set with the same seed: identical tensors
    x, y = blobs(24, seed=3)
    small = get_profile("smoke", cnn_pretrain_epochs=1)
    protos, states = {}, {}
    for m in ("ppnet", "eppnet"):
        plan = plan_from_profile(small, m)
        kinds = [s.kind for s in plan.stages]
        assert kinds[:2] == ["pretrain", "init"]
        plan.stages = plan.stages[:kinds.index("init") + 1]
        fit = fit_explainer(cfg_for(small, m), plan, x, y, seed=5, device="cpu")
        assert [h["stage"] for h in fit.history][-1] == "init" and fit.history[-1]["classes"] == [0, 1, 2, 3]
        protos[m], states[m] = fit.model.prototypes.detach().clone(), fit.model.state_dict()
    assert torch.equal(protos["ppnet"], protos["eppnet"])
    assert states["ppnet"].keys() == states["eppnet"].keys() and all(torch.equal(states["ppnet"][k], states["eppnet"][k]) for k in states["ppnet"])
    torch.manual_seed(5); fresh = build_explainer(cfg_for(small, "ppnet"))
    assert not torch.equal(fresh.prototypes, protos["ppnet"])     # the init stage did move them off the random draw

def test_protopool_orthogonality_weight_is_the_reference():
    "gmum/ProtoPool main.py adds its orthogonality loss unweighted; ours is normalised the same way, so the weight is 1.0."
    for name in ("smoke", "quick", "paper"):
        assert get_profile(name).explainers.orth_coef == 1.0
        assert plan_from_profile(get_profile(name), "protopool").coefs["orthogonality"] == 1.0
    from mri_protodiff.protonets import orthogonality_loss
    q = torch.randn(4, 12, 3, generator=torch.Generator().manual_seed(0))   # (C, M, K) like the reference's proto_presence [c, p, n]
    C, _, K = q.shape
    reference = torch.nn.functional.cosine_similarity(q.unsqueeze(2), q.unsqueeze(-1), dim=1).sum() / (K * C) - 1
    assert torch.allclose(orthogonality_loss(q), reference, atol=1e-6)

def test_same_seed_same_model_on_cpu():
    x, y = blobs(32, seed=2)
    prof = get_profile("smoke", warm_epochs=1, joint_epochs=1, last_epochs=1)
    a = fit_explainer(cfg_for(prof, "protopool"), plan_from_profile(prof, "protopool"), x, y, seed=4, device="cpu").model
    b = fit_explainer(cfg_for(prof, "protopool"), plan_from_profile(prof, "protopool"), x, y, seed=4, device="cpu").model
    assert all(torch.equal(u, v) for u, v in zip(a.state_dict().values(), b.state_dict().values()))

def test_saved_model_reloads_to_identical_outputs(trained, tmp_path):
    fits, (_, _, xte, _) = trained
    x = torch.from_numpy(xte[:8])
    for m, (fit, cfg, plan) in fits.items():
        save_explainer(tmp_path/m, fit.model, cfg, [dict(prototype=0)], dict(plan=plan.to_dict()))
        model, conf, recs = load_explainer(tmp_path/m)
        with torch.no_grad(): a, b = fit.model(x), model(x)
        for k in ("logits", "similarity", "distances"):
            assert torch.equal(getattr(a, k), getattr(b, k)), (m, k)
        assert torch.equal(fit.model.last_layer.weight, model.last_layer.weight)
        assert conf["method"] == m and recs == [dict(prototype=0)]
    assert (tmp_path/"ppnet"/"model.safetensors").read_bytes()[:8] != b"PK\x03\x04"   # not a pickle/zip checkpoint

def test_duplicate_check_on_the_trained_models(trained):
    fits, (_, _, xte, _) = trained
    for m, (fit, _, _) in fits.items():
        dc = duplicate_check(fit.model, fit.push, predict(fit.model, xte)["similarity"])
        assert dc["shared_patch_pairs"] == []                                  # unique push
        assert set(dc) >= {"near_identical_pairs", "dead", "collapsed_slot_classes", "unused", "ok"}

def test_augmentation_is_seeded_and_bounded():
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    a = augment_batch(x, torch.Generator().manual_seed(1), shift=3, gain=0.2, noise=0.05)
    b = augment_batch(x, torch.Generator().manual_seed(1), shift=3, gain=0.2, noise=0.05)
    assert torch.equal(a, b) and a.min() >= -1 and a.max() <= 1 and not torch.equal(a, x)

def test_labels_sources_and_errors():
    from mri_protodiff.data import phantom_sliceset
    ss = phantom_sliceset(n_subjects=8, slices_per_subject=3, size=32, seed=0)
    tr, va, te = ss.subset(np.arange(12)), ss.subset(np.arange(12, 18)), ss.subset(np.arange(18, 24))
    lab = explainer_labels(tr, va, te, "density")
    assert lab.n_classes == 4 and np.array_equal(lab.test, np.asarray(te.density))
    k1 = explainer_labels(tr, va, te, "kmeans", n_classes=3, seed=0); k2 = explainer_labels(tr, va, te, "kmeans", n_classes=3, seed=0)
    assert np.array_equal(k1.train, k2.train) and set(k1.train.tolist()) == {0, 1, 2} and k1.info["features"] == "pixels"
    with pytest.raises(ValueError, match="label_source"): explainer_labels(tr, va, te, "birads")
    with pytest.raises(ValueError, match="no training slice.*--set label_source=kmeans"): explainer_labels(ss.subset(np.arange(3)), va, te, "density")

# ---------------------------------------------------------------- the stage and the CLI
def cli(*args):
    "Run `mri-protodiff ARGS` in this process; (exit code, stdout, stderr)."
    import contextlib, io
    from mri_protodiff.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: code = main(list(args))
        except SystemExit as e: code = e.code
    return code, out.getvalue(), err.getvalue()

def test_train_explainers_help():
    r = subprocess.run(["mri-protodiff", "train-explainers", "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "--methods" in r.stdout and "--backbone" in r.stdout and "--seeds" in r.stdout
    code, out, _ = cli("bench", "push", "--help")
    assert code == 0 and "--n-images" in out

def test_train_explainers_stage_end_to_end(tmp_path):
    out = tmp_path/"run"
    code, _, err = cli("data", "--out", str(out), "--profile", "smoke")
    assert code == 0, err
    code, stdout, err = cli("train-explainers", "--out", str(out), "--methods", "ppnet,eppnet,protopool", "--device", "cpu")
    assert code == 0, err
    assert stdout.count("(n=") == 3 and stdout.count("seed 0: test acc") == 3   # one summary line per model
    assert "train-explainers: 3 done, 0 skipped; in " in stdout
    from mri_protodiff.data import load_sliceset
    train = load_sliceset(out, "train")
    for m in METHODS:
        d = out/"protonets"/m/"seed0"
        for f in ("model.safetensors", "config.json", "push.json", "metrics.json", "gallery.png"): assert (d/f).exists(), (m, f)
        model, conf, recs = load_explainer(d)
        assert len(recs) == model.n_prototypes and conf["plan"]["method"] == m
        for rec in recs:                                                     # push.json points at the TRAIN split
            assert set(rec) >= {"prototype", "source_index", "subject", "slice", "box", "distance", "class", "latent"}
            assert rec["subject"] == str(train.subject[rec["source_index"]]) and rec["slice"] == int(train.slice_index[rec["source_index"]])
            y0, x0, y1, x1 = rec["box"]; assert 0 <= y0 < y1 <= 32 and 0 <= x0 < x1 <= 32
            with torch.no_grad(): z = model.features(torch.tensor(np.asarray(train.images[rec["source_index"]:rec["source_index"] + 1])))
            i, j = rec["latent"]
            assert (model.prototypes[rec["prototype"]] - z[0, :, i, j]).abs().max() <= 1e-5
        met = read_json(d/"metrics.json")
        assert 0 <= met["accuracy"]["test"] <= 1 and "ok" in met["duplicates"]
    rows = list(csv.DictReader(open(out/"protonets"/"summary.csv")))
    assert sorted(r["method"] for r in rows) == sorted(METHODS)
    # done stages are skipped; a bad method is one clear error
    run = open_run(out)
    assert set(run_train_explainers(run, ["ppnet"], progress=False).values()) == {"skipped"}
    code, _, err = cli("train-explainers", "--out", str(out), "--methods", "protonet")
    assert code == 2 and "unknown explainer method" in err

def test_parallel_workers_train_the_same_explainers_as_the_sequential_loop(tmp_path, capsys):
    "workers=2 (spawned processes, one CPU thread each) writes byte-identical weights and push records to workers=1."
    from mri_protodiff.pipeline import run_data
    prof = get_profile("smoke", explainer_seeds=(0, 1), warm_epochs=1, joint_epochs=1, last_epochs=1, push_every=1)
    runs = {w: RunDir(tmp_path/f"w{w}", prof) for w in (1, 2)}
    for w, run in runs.items():
        run_data(run)
        st = run_train_explainers(run, ["ppnet", "eppnet"], workers=w, progress=True)
        assert set(st.values()) == {"done"} and len(st) == 4
    assert "4 explainers, 2 at a time" in capsys.readouterr().out
    for m in ("ppnet", "eppnet"):
        for s in (0, 1):
            a, b = (runs[w].root/"protonets"/m/f"seed{s}" for w in (1, 2))
            for f in ("model.safetensors", "push.json"): assert (a/f).read_bytes() == (b/f).read_bytes(), (m, s, f)
    assert set(run_train_explainers(runs[2], ["ppnet", "eppnet"], workers=2, progress=False).values()) == {"skipped"}


def test_train_explainers_without_data_is_a_clear_error(tmp_path):
    run = RunDir(tmp_path/"r", get_profile("smoke"))
    with pytest.raises(FileNotFoundError, match="mri-protodiff data"): run_train_explainers(run, progress=False)

def test_push_benchmark_small():
    r = push_benchmark(n_images=64, image_size=32, protos_per_class=3, proto_dim=8, batch_size=16, device="cpu", reference_batches=(1, 16))
    assert r["identical_patches"] and set(r["reference"]) == {"batch1", "batch16"}
    assert all(v["n_different"] == 0 for v in r["reference"].values())
    assert all(v["speedup"] > 0 for v in r["reference"].values())      # measured and reported (a ratio); no timing threshold

def test_unet_backbone_and_kmeans_labels_through_the_stage(tmp_path):
    "The frozen encoder of the run's diffusion UNet as backbone, on k-means pseudo-classes of the UNet's features."
    out = tmp_path/"run"
    code, _, err = cli("data", "--out", str(out), "--profile", "smoke", "--set", "label_source=kmeans", "--set", "n_classes=3")
    assert code == 0, err
    torch.manual_seed(0)
    unet = tiny_unet(in_channels=2)
    unet.save_pretrained(out/"diffusion"/"unet", safe_serialization=True)
    run = open_run(out)
    st = run_train_explainers(run, ["ppnet"], backbone="unet", device="cpu", progress=False)
    assert set(st.values()) == {"done"}
    d = out/"protonets"/"ppnet"/"seed0"
    model, conf, recs = load_explainer(d)
    assert conf["explainer"]["backbone"] == "unet" and conf["explainer"]["unet_config"]["in_channels"] == 2
    assert conf["labels"]["source"] == "kmeans" and "unet" in conf["labels"]["features"] and conf["labels"]["n_classes"] == 3
    assert model.prototype_class.shape[1] == 3
    # the encoder inside the explainer is the run's UNet, frozen: its weights are unchanged by training
    enc = model.backbone.unet
    assert torch.equal(enc.conv_in.weight, unet.conv_in.weight) and torch.equal(enc.down_blocks[1].resnets[0].conv1.weight, unet.down_blocks[1].resnets[0].conv1.weight)
    x = torch.randn(2, 1, 32, 32)
    m2, _, _ = load_explainer(d)
    with torch.no_grad(): assert torch.equal(model(x).logits, m2(x).logits)


def test_quick_profile_explainers_are_accurate_on_the_phantom(tmp_path):
    """The issue's quality bar, as a regression test: seed 0 of each method on the quick profile's phantom data.

    One thread (set here) keeps it the same computation whatever the machine's core count.  Measured when
    written: test accuracy PPNet 0.955, EPPNet 0.946, ProtoPool 0.911 (224 test slices of 14 subjects; one subject
    moves it by up to 0.04, hence the 0.88 floor here -- 06_prototrain reports all three seeds at >= 0.906).  No
    duplicated, dead or collapsed prototype.  Re-measured with EPPNet on the k-means start too and ProtoPool's
    orth_coef = 1.0 (the reference's weight): PPNet 0.955, EPPNet 0.911, ProtoPool 0.911, no duplicates.
    """
    from mri_protodiff.pipeline import run_data
    run = RunDir(tmp_path/"q", get_profile("quick"))
    run_data(run)
    threads = torch.get_num_threads(); torch.set_num_threads(1)
    try: status = run_train_explainers(run, seeds=[0], device="cpu", progress=False)
    finally: torch.set_num_threads(threads)
    assert set(status.values()) == {"done"} and len(status) == 3
    for m in METHODS:
        met = read_json(run/"protonets"/m/"seed0"/"metrics.json")
        assert met["accuracy"]["test"] >= 0.88 and met["reports"]["test"]["n"] == 224, (m, met["accuracy"])
        assert met["duplicates"]["ok"], (m, met["duplicates"])
