"Tests of mri_protodiff.groundtruth: memorisation probe, counterfactual determinism, LDS, the experiment (`run_experiment`), the stage and the CLI (smoke-sized)."
import contextlib, io, json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mri_protodiff import groundtruth as G
from mri_protodiff.core import RunDir, get_profile, read_json
from mri_protodiff.data import phantom_sliceset
from mri_protodiff import pipeline as P
from mri_protodiff.pipeline import run_data

torch.set_num_threads(1)

# the smallest settings that still exercise every code path (16x16 slices, a 2-level UNet, a few steps)
TINY = dict(image_size=16, unet_channels=(8, 16), train_steps=3, batch_size=4, n_generated=6, n_counterfactual=1,
            sample_steps=3, output_draws=2, trak_draws=1, proj_dim=8, max_unique=24)


def _splits(n_subjects=12, size=32):
    ss = phantom_sliceset(n_subjects=n_subjects, slices_per_subject=4, size=size, seed=0)
    n = len(ss); a, b = n // 2, 3 * n // 4                       # subject-level: 4 slices per subject
    return ss.subset(np.arange(0, a)), ss.subset(np.arange(a, b)), ss.subset(np.arange(b, n))


# ---------------------------------------------------------------- test 1: the memorisation probe
def test_memorisation_probe_recovers_planted_with_pixel_nn_and_fails_with_random():
    tr, va, te = _splits(16)
    cfg = G.gt_config(get_profile("smoke"), image_size=32, max_unique=32, planted=3, copies=5)
    d = G.plant_training_set(tr, va, te, cfg)
    uniq = d.train.images[:d.n_unique]
    rng = np.random.default_rng(0)
    # "generated" images: 4 noisy copies of each planted image (memorised), and the unseen test slices (novel)
    copies = np.repeat(uniq[d.planted], 4, 0) + 0.05 * rng.normal(size=(4 * len(d.planted), *uniq.shape[1:]))
    gen = np.concatenate([copies, d.test.images]).astype(np.float32)
    cp = G.detect_copies(gen, uniq, d.val.images, d.planted, fpr=0.05)
    n_copy = 4 * len(d.planted)
    assert cp.is_copy[:n_copy].all() and (cp.source[:n_copy] == np.repeat(d.planted, 4)).all()
    assert (cp.source[n_copy:] == -1).all()                     # unseen subjects are never a planted source
    assert cp.threshold <= G.COPY_MAX_RATIO
    tb = rng.random((len(gen), d.n_unique))
    scores = {"pixel_nn": -G.pixel_distances(gen, uniq), "random": rng.random((len(gen), d.n_unique)),
              "anti": G.pixel_distances(gen, uniq)}           # the worst possible ranking: farthest first
    mem, per = G.memorisation_recovery(scores, cp.source, tb)
    mem = mem.set_index("method")
    assert mem.loc["pixel_nn", "top1_recovery"] == 1.0 and mem.loc["pixel_nn", "top5_recovery"] == 1.0
    assert mem.loc["pixel_nn", "n_copies"] == n_copy and mem.loc["pixel_nn", "n_sources"] == 3
    assert mem.top1_ci_low.isna().all()                         # 3 planted sources: too few clusters for an interval
    assert mem.loc["random", "top1_recovery"] <= 0.25
    assert mem.loc["anti", "top1_recovery"] == 0.0 and mem.loc["anti", "top5_recovery"] == 0.0
    assert (per[per.method == "anti"]["rank"] == d.n_unique).all()


def test_recovery_ci_is_clustered_by_planted_image():
    "12 planted images x 10 copies: hits shared within a planted image give the width of 12 draws, not of 120."
    from mri_protodiff.stats import bootstrap_ci
    src = np.repeat(np.arange(12), 10)
    found = np.isin(src, np.arange(6))                          # a method that finds the source of 6 planted images, every copy
    scores = np.zeros((120, 12)); scores[np.arange(120), np.where(found, src, (src + 1) % 12)] = 1
    mem, _ = G.memorisation_recovery({"m": scores}, src, np.zeros((120, 12)), n_bootstrap=2000)
    r = mem.iloc[0]
    assert r.top1_recovery == 0.5 and r.n_sources == 12
    naive = bootstrap_ci(found.astype(float))                    # copies treated as independent
    assert (r.top1_ci_high - r.top1_ci_low) > 2.5 * (naive[1] - naive[0])


def test_copy_criterion_uses_no_scored_method(monkeypatch):
    "The copy criterion decides the known sources: it must run, and decide the same, with every scoring function disabled."
    tr, va, te = _splits(16)
    d = G.plant_training_set(tr, va, te, G.gt_config(get_profile("smoke"), image_size=32, max_unique=32, planted=3, copies=5))
    uniq = d.train.images[:d.n_unique]
    gen = np.concatenate([uniq[d.planted] + 0.03 * np.random.default_rng(1).normal(size=uniq[d.planted].shape), d.test.images[:4]]).astype(np.float32)
    before = G.detect_copies(gen, uniq, d.val.images, d.planted)
    def banned(*a, **k): raise AssertionError("the copy criterion called a scored method")
    for name in ("pixel_distances", "unet_block_features", "trak_scores", "explainer_nis", "explainer_full_nis", "paper_nis", "gather_rows"):
        monkeypatch.setattr(G, name, banned)
    after = G.detect_copies(gen, uniq, d.val.images, d.planted)
    np.testing.assert_array_equal(before.source, after.source)
    assert (after.source[:3] == d.planted).all() and (after.source[3:] == -1).all()
    # only a planted image is a known source: an exact copy of an unplanted training image is a copy without one
    other = np.setdiff1d(np.arange(d.n_unique), d.planted)[:2]
    assert (G.detect_copies(uniq[other], uniq, d.val.images, d.planted).source == -1).all()


def test_copy_criterion_needs_held_out_and_rejects_blur():
    tr, va, te = _splits()
    d = G.plant_training_set(tr, va, te, G.gt_config(get_profile("smoke"), max_unique=20))
    uniq = d.train.images[:d.n_unique]
    with pytest.raises(ValueError, match="held-out"): G.detect_copies(uniq[:2], uniq, uniq[:0], d.planted)
    mean_img = np.repeat(uniq.mean(0, keepdims=True), 3, 0)     # a blurry average is near everything, a copy of nothing
    assert not G.detect_copies(mean_img, uniq, d.val.images, d.planted).is_copy.any()


# ---------------------------------------------------------------- test 3: LDS
def test_lds_of_random_attribution_is_near_zero_and_matches_scipy():
    from scipy.stats import spearmanr
    rng = np.random.default_rng(0)
    U, N, M = 30, 400, 12
    true = rng.normal(size=(N, U)); subsets = G.lds_subsets(U, M, seed=1)
    outputs = np.stack([true[:, s].sum(1) for s in subsets]) + 0.5 * rng.normal(size=(M, N))
    rand = G.lds_per_image(rng.normal(size=(N, U)), outputs, subsets)
    assert abs(np.nanmean(rand)) < 0.05
    good = G.lds_per_image(true, outputs, subsets)
    assert np.nanmean(good) > 0.8
    # oracle: Spearman of summed scores against outputs, written out
    direct = [spearmanr([true[i, s].sum() for s in subsets], outputs[:, i]).correlation for i in range(5)]
    np.testing.assert_allclose(good[:5], direct, rtol=1e-10)
    with pytest.raises(ValueError, match="subsets, images"): G.lds_per_image(true, outputs[:, :5], subsets)


def test_lds_permutation_null_is_wide_when_images_move_together():
    "The subset-shuffle test: its mean is the mean LDS; independent images give a narrow null, images sharing a subset factor a wide one."
    import math
    rng = np.random.default_rng(3)
    U, N, M = 30, 300, 6                                   # 6! = 720 shuffles: all of them
    subsets = G.lds_subsets(U, M, seed=2)
    true = rng.normal(size=(N, U))
    outputs = np.stack([true[:, s].sum(1) for s in subsets]) + 0.5 * rng.normal(size=(M, N))
    pt = G.lds_permutation_test(true, outputs, subsets)
    assert pt["n_perm"] == math.factorial(M) and pt["n_images"] == N
    np.testing.assert_allclose(pt["mean"], np.nanmean(G.lds_per_image(true, outputs, subsets)), rtol=1e-10)
    assert pt["p"] <= 2 / math.factorial(M)                # only the identity (and at most a tie) reaches it
    indep = G.lds_permutation_test(rng.normal(size=(N, U)), rng.normal(size=(M, N)), subsets)
    row = rng.normal(size=U)
    common = G.lds_permutation_test(np.tile(row, (N, 1)) + 1e-6 * rng.normal(size=(N, U)),
                                    rng.normal(size=(M, 1)) + 0.1 * rng.normal(size=(M, N)), subsets)
    assert indep["null_sd"] < 0.05 < 0.3 < common["null_sd"]
    assert np.isnan(G.lds_permutation_test(np.zeros((N, U)), outputs, subsets)["mean"])   # constant scores: undefined


def test_centred_lds_removes_the_factor_all_images_share():
    "Scores that only know which training rows are 'good in general' score a high plain LDS when the outputs share that factor; centred, ~0."
    rng = np.random.default_rng(4)
    U, N, M = 40, 150, 64
    subsets = G.lds_subsets(U, M, seed=5)
    specific = rng.normal(size=(N, U)); shared = rng.normal(size=U)
    q = np.array([shared[s].sum() for s in subsets])
    outputs = np.stack([specific[:, s].sum(1) for s in subsets]) + 4 * q[:, None] + 0.5 * rng.normal(size=(M, N))
    blind = np.tile(shared, (N, 1)) + 0.01 * rng.normal(size=(N, U))
    plain = G.lds_permutation_test(blind, outputs, subsets, n_perm=2000)
    centred = G.lds_permutation_test(blind, outputs, subsets, n_perm=2000, centred=True)
    assert plain["mean"] > 0.7 and abs(centred["mean"]) < 0.1 and centred["p"] > 0.01
    good = G.lds_permutation_test(specific, outputs, subsets, n_perm=2000, centred=True)
    assert good["mean"] > 0.5 and good["p"] < 0.01
    lo, hi = G.lds_bootstrap_ci(specific, outputs, subsets, centred=True, n_resamples=300)
    assert lo <= good["mean"] <= hi and hi - lo < 0.3
    assert G.lds_mde(centred["null_sd"]) > 3 * centred["null_sd"]


# ---------------------------------------------------------------- the stage: determinism, resume, outputs
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    "A smoke run with the ground truth done at TINY sizes for every method."
    root = tmp_path_factory.mktemp("gt")/"run"
    run = RunDir(root, get_profile("smoke", gt_topk=3, gt_subsets=3))
    run_data(run)
    st = G.run_experiment(run, "minimal", device="cpu", progress=False, **TINY)
    return run, st


def test_run_groundtruth_writes_tables_and_figure(tiny_run):
    run, st = tiny_run
    assert all(v == "done" for v in st.values()), st
    tab = pd.read_csv(run/"tables"/"groundtruth.csv")
    assert list(tab.method) == list(G.GT_METHODS)
    assert set(tab.version) == {"minimal"} and tab.setup.str.startswith("minimal: 16x16").all()
    for col in ("top1_recovery", "top1_ci_low", "n_sources", "cf_effect_vs_random", "cf_mean_k", "lds", "lds_ci_low", "lds_perm_p", "lds_null_sd",
                "lds_mde", "lds_c", "lds_c_ci_low", "lds_c_perm_p", "lds_c_mde", "n_copies"):
        assert col in tab.columns, col
    r = tab.set_index("method")
    assert np.isnan(r.loc["random", "cf_effect_vs_random"])       # random scores have no counterfactual of their own
    assert np.isfinite(r.loc["pixel_nn", "cf_change_topk"]) and r.loc["pixel_nn", "cf_n_images"] == 1
    assert r.loc["pixel_nn", "lds_subsets"] == 3
    md = (run/"tables"/"groundtruth.md").read_text()
    assert "MINIMAL version" in md and "not properties of the methods at scale" in md and "centred LDS" in md and "**Finding (minimal version).**" in md
    assert ((tab.lds_perm_p.dropna() >= 0) & (tab.lds_perm_p.dropna() <= 1)).all() and tab.lds_perm_p.notna().any()
    assert (run/"figures"/"groundtruth.html").exists()
    ch = pd.read_csv(run/"tables"/"groundtruth_changes.csv")
    assert set(ch.kind) == {"top", "random"} and (ch[["one_minus_ssim", "l2", "feature"]] >= 0).all().all()
    # every top-k removal is compared with a random removal of the same size, for the same image
    for _, r in ch[ch.kind == "top"].iterrows():
        assert ((ch.kind == "random") & (ch.image == r.image) & (ch.k == r.k)).any()
    # push NIS removes at most its support; the full-support variants the whole top-k
    sc, _, _ = G.load_scores(run/"groundtruth"/"minimal")
    for m in ("ppnet", "protopool"):
        for _, r in ch[(ch.method == m) & (ch.kind == "top")].iterrows():
            assert r.k == min(run.profile.groundtruth.gt_topk, int((sc[m][int(r.image)] > 0).sum()))
    assert (ch[(ch.method == "ppnet_full") & (ch.kind == "top")].k == run.profile.groundtruth.gt_topk).all()
    # removing nothing changes nothing: the reference model regenerates its own images (up to the float
    # summation order of a different batch size: the counterfactual images are regenerated as one batch)
    smp = np.load(run/"groundtruth"/"minimal"/"samples.npz")
    ref = np.load(run/"groundtruth"/"minimal"/"models"/"full"/"result.npz")
    np.testing.assert_allclose(ref["regen"], smp["images"][smp["cf_index"]], atol=1e-4)


def test_models_are_deduplicated_and_everything_resumes(tiny_run):
    run, st = tiny_run
    plan_models = pd.read_csv(run/"tables"/"groundtruth_changes.csv").model.nunique()
    model_stages = [k for k in st if k.startswith("model/")]
    assert len(model_stages) == len(set(model_stages)) and plan_models <= len(model_stages)
    st2 = G.run_experiment(run, "minimal", device="cpu", progress=False, **TINY)
    assert set(st2.values()) == {"skipped"}


def test_an_ensemble_model_equals_the_same_model_trained_alone_and_runs_repeat(tiny_run, tmp_path):
    run, _ = tiny_run
    folder = run/"groundtruth"/"minimal"/"models"
    key = sorted(p.name for p in folder.iterdir() if p.name != "full")[0]
    before = dict(np.load(folder/key/"result.npz"))
    assert read_json(run/"manifest.json")["stages"][f"groundtruth/minimal/model/{key}"]["summary"]["ensemble_models"] > 1
    # 1. the same model trained alone (train_diffusion) instead of in a batch of models: equal up to float rounding
    ctx = G._context(run, "minimal", "cpu", False, **TINY)
    data = G.load_gt_data(ctx.folder/"data.npz")
    assert G._stage_model(ctx, data, before["rows"], force=True) == "done"
    after = dict(np.load(folder/key/"result.npz"))
    np.testing.assert_array_equal(before["rows"], after["rows"])
    np.testing.assert_allclose(after["regen"], before["regen"], atol=1e-3)
    np.testing.assert_allclose(after["output"], before["output"], rtol=1e-3, atol=1e-5)
    assert not (folder/key/"checkpoints").exists()
    # 2. a fresh run directory with the same seed gives the same bytes (reference) and the same LDS models
    run2 = RunDir(tmp_path/"run2", run.profile); run_data(run2)
    G.run_experiment(run2, "minimal", methods=("pixel_nn",), device="cpu", progress=False, **TINY)
    f2 = tmp_path/"run2"/"groundtruth"/"minimal"/"models"
    again, ref = np.load(f2/"full"/"result.npz"), np.load(folder/"full"/"result.npz")
    np.testing.assert_array_equal(again["regen"], ref["regen"]); np.testing.assert_array_equal(again["output"], ref["output"])
    subs = [G.rows_key(r, len(data.train)) for r in G.lds_subsets(len(data.train), run.profile.groundtruth.gt_subsets, run.profile.seed)]
    sub = [k for k in subs if k != key][0]                                 # not the one retrained alone above
    np.testing.assert_allclose(np.load(f2/sub/"result.npz")["output"], np.load(folder/sub/"result.npz")["output"], rtol=1e-5, atol=1e-6)


def test_removing_the_planted_source_is_in_the_top_k_of_pixel_nn(tiny_run):
    run, _ = tiny_run
    folder = run/"groundtruth"/"minimal"
    scores, tb, idx = G.load_scores(folder)
    data = G.load_gt_data(folder/"data.npz")
    np.testing.assert_array_equal(idx, np.arange(TINY["n_generated"]))
    assert set(scores) == set(G.GT_METHODS) and all(s.shape == (TINY["n_generated"], data.n_unique) for s in scores.values())
    # the reference images themselves, scored by pixel distance to the distinct training images
    np.testing.assert_allclose(scores["pixel_nn"], -G.pixel_distances(np.load(folder/"samples.npz")["images"], data.train.images[:data.n_unique]))
    for m in ("ppnet", "eppnet", "protopool", "ppnet_full", "eppnet_full", "protopool_full", "paper"):
        np.testing.assert_allclose(scores[m].sum(1), 1.0, rtol=1e-6)    # NIS are shares: they sum to 1 over training images
    for m in ("ppnet_full", "eppnet_full", "protopool_full"):
        assert (scores[m] > 0).all()                                     # full support: every training image
    # the LDS unit is the row: per-row scores sum back to the per-image scores (shares) or repeat them (similarities)
    rows = G.load_row_scores(folder)
    assert set(rows) == set(G.GT_METHODS) and all(r.shape == (TINY["n_generated"], len(data.train)) for r in rows.values())
    np.testing.assert_allclose(G.gather_rows(rows["ppnet"], data.unique, data.n_unique), scores["ppnet"])
    np.testing.assert_array_equal(rows["pixel_nn"], scores["pixel_nn"][:, data.unique])
    # every LDS subset model trained on half of the rows
    subs = G.lds_subsets(len(data.train), TINY.get("subsets", run.profile.groundtruth.gt_subsets), run.profile.seed)
    for s in subs:
        res = np.load(folder/"models"/G.rows_key(s, len(data.train))/"result.npz")
        np.testing.assert_array_equal(res["rows"], s); assert len(s) == len(data.train) // 2


# ---------------------------------------------------------------- bad input
def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="version"): G.gt_config(get_profile("smoke"), "medium")
    with pytest.raises(ValueError, match="gt_copies"): G.gt_config(get_profile("smoke", gt_copies=1))
    with pytest.raises(ValueError, match="unknown ground-truth setting"): G.gt_config(get_profile("smoke"), n_images=3)
    run = RunDir(tmp_path/"r", get_profile("smoke"))
    with pytest.raises(FileNotFoundError, match="data"): G.run_experiment(run, progress=False)
    # the stage (chapter pipeline) builds the missing data itself, then stops at the unknown method
    with pytest.raises(ValueError, match="unknown ground-truth method"): P.run_groundtruth(run, methods=("gradcam",), progress=False)
    assert run.is_done("data")
    with pytest.raises(ValueError, match="unknown ground-truth method"): G.run_experiment(run, methods=("gradcam",), progress=False)
    with pytest.raises(ValueError, match="gt_topk"):
        G.run_experiment(RunDir(tmp_path/"r", get_profile("smoke")), progress=False, **dict(TINY, topk=24))
    with pytest.raises(ValueError, match="top-k removal"):
        G.removal_sets({"a": np.zeros((2, 5))}, np.array([0]), 5, np.zeros((2, 5)), 0)


# ---------------------------------------------------------------- the command line
def test_cli_groundtruth(tmp_path):
    from mri_protodiff.cli import main
    out = tmp_path/"cli"
    args = ["groundtruth", "--out", str(out), "--profile", "smoke", "--methods", "pixel_nn,random", "--cf-images", "1", "--generated", "6",
            "--set", "gt_train_steps=2", "--set", "gt_subsets=2", "--no-progress"]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf): rc = main(args)
    assert rc == 0, buf.getvalue()
    assert "MINIMAL version" in buf.getvalue() and (out/"tables"/"groundtruth.csv").exists()
    assert list(pd.read_csv(out/"tables"/"groundtruth.csv").method) == ["pixel_nn", "random"]
    m = json.loads((out/"manifest.json").read_text())
    assert m["stages"]["data"]["status"] == "done" and m["stages"]["groundtruth/minimal/table"]["status"] == "done"
    buf = io.StringIO()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(buf):
        assert main(["groundtruth", "--out", str(out), "--methods", "nope"]) == 2


def test_memorisation_uses_its_own_longer_trained_probe_model(tiny_run):
    run, st = tiny_run
    folder = run/"groundtruth"/"minimal"
    assert {"probe", "probe-samples", "probe-scores"} <= set(st) and all(st[k] == "done" for k in ("probe", "probe-samples", "probe-scores"))
    ref, probe = (read_json(folder/n/"training.json") for n in ("reference", "probe"))
    assert len(probe["losses"]) == run.profile.groundtruth.gt_probe_steps and len(ref["losses"]) == TINY["train_steps"]
    pz = np.load(folder/"probe.npz")
    scores, _, idx = G.load_scores(folder, "probe")                     # only the probe's copies of planted images are scored
    np.testing.assert_array_equal(idx, np.flatnonzero(pz["source"] >= 0)); assert len(pz["images"]) == 4 * TINY["n_generated"]
    np.testing.assert_allclose(scores["pixel_nn"], -G.pixel_distances(pz["images"][idx], G.load_gt_data(folder/"data.npz").train.images[:TINY["max_unique"]]))
    per = pd.read_csv(run/"tables"/"groundtruth_probe.csv")            # the ranks of the probe's copies, one row per method and copy
    assert len(per) == len(G.GT_METHODS) * len(idx)


def test_model_output_is_the_loss_of_the_models_own_target():
    from diffusers import DDPMScheduler
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1; noise = torch.randn(3, 1, 8, 8); t = torch.tensor([10, 500, 990])
    for pt in ("epsilon", "v_prediction", "sample"):
        sch = DDPMScheduler(num_train_timesteps=1000, prediction_type=pt)
        ab = sch.alphas_cumprod[t].view(-1, 1, 1, 1)
        want = {"epsilon": noise, "v_prediction": sch.get_velocity(x0, noise, t), "sample": x0}[pt]
        torch.testing.assert_close(G.training_target(sch, x0, noise, ab), want)


def test_explainer_stage_key_follows_every_explainer_setting():
    base = G._explainer_fields(get_profile("smoke"))
    for k, v in (("proto_init_kmeans", ""), ("gumbel_schedule", "geometric"), ("protos_per_class", 3)):
        assert G._explainer_fields(get_profile("smoke", **{k: v})) != base, k
