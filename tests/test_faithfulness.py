"Faithfulness metrics: known answers on hand-made models, zero perturbation, sanity checks, statistics, Quantus, the `explanations`, `image-quality` and `faithfulness` stages."
import importlib.util, math
from typing import NamedTuple

import numpy as np, pandas as pd, pytest, torch
import torch.nn as nn, torch.nn.functional as F
from scipy import stats

from conftest import tiny_unet
import mri_protodiff.faithfulness as fa
from mri_protodiff.faithfulness import (
    prototype_regions, baseline_images, perturbed_outputs, rowwise_correlation, top_prototypes, prototype_ablation,
    explanation_saliency, deletion_insertion, renoise_in_regions, generative_perturbation, output_change, prototype_parts,
    randomize_explainer, shuffle_rows, records_frame, summarize_records, compare_methods, holm, faithfulness_correlation,
    quantus_subsets, nis_shares, TRAINED, RANDOMISED)

torch.set_num_threads(1)


# --- hand-made models -------------------------------------------------------------------------------

class _Out(NamedTuple):
    logits: torch.Tensor; similarity: torch.Tensor; distances: torch.Tensor

class ToyExplainer(nn.Module):
    "Latent = 8x8 average pool; prototypes are grey values; ProtoPNet similarity and last layer."
    def __init__(self, values=(1.0, 0.0, -0.5, 0.5), classes=(0, 0, 1, 1), n_classes=2):
        super().__init__()
        self.prototypes = nn.Parameter(torch.tensor(values).view(-1, 1))
        ident = F.one_hot(torch.tensor(classes), n_classes).float()
        self.register_buffer("prototype_class", ident)
        self.last_layer = nn.Linear(len(values), n_classes, bias=False)
        with torch.no_grad(): self.last_layer.weight.copy_(ident.t() - 0.5 * (1 - ident.t()))
    def forward(self, x):
        d = (F.avg_pool2d(x, 8) - self.prototypes.view(1, -1, 1, 1)) ** 2
        sim = torch.log((d.amin((2, 3)) + 1) / (d.amin((2, 3)) + 1e-4))
        return _Out(self.last_layer(sim), sim, d)

class BlockModel(nn.Module):
    "logit_0 = sum of weight * mean of an 8x8 block, logit_1 = 0: what a region does to the logit is known."
    def __init__(self, blocks={(0, 0): 1.0}):
        super().__init__(); self.blocks = blocks; self.scale = nn.Parameter(torch.ones(1))
    def forward(self, x):
        z = sum(w * x[..., 8*i:8*i+8, 8*j:8*j+8].mean((1, 2, 3)) for (i, j), w in self.blocks.items())
        return torch.stack([z * self.scale, torch.zeros(len(x))], 1)

def block_image(blocks, size=32):
    "Background -1 with 8x8 blocks {(cell_i, cell_j): value}."
    x = -torch.ones(1, 1, size, size)
    for (i, j), v in blocks.items(): x[..., 8*i:8*i+8, 8*j:8*j+8] = v
    return x

# --- regions, baselines, ablation --------------------------------------------------------------------

def test_regions_have_equal_area_and_point_at_the_match():
    toy = ToyExplainer()
    x = torch.cat([block_image({(0, 0): 1.0, (3, 3): 0.0}), block_image({(1, 2): 1.0, (2, 0): 0.0})])
    reg = prototype_regions(toy(x).distances, 32, q=0.1)
    assert reg.dtype == torch.bool and reg.shape == (2, 4, 32, 32)
    assert (reg.sum((2, 3)) == math.ceil(0.1 * 32 * 32)).all()                 # same area for every prototype
    assert reg[0, 0, :8, :8].all() and reg[0, 1, 24:, 24:].all()             # on the block each prototype matches
    assert reg[1, 0, 8:16, 16:24].all() and reg[1, 1, 16:24, :8].all()
    with pytest.raises(ValueError, match="q must be"): prototype_regions(toy(x).distances, 32, q=1.5)

def test_baselines():
    x = torch.randn(3, 1, 16, 16)
    assert torch.allclose(baseline_images(x, "mean")[:, :, 0, 0], x.mean((2, 3)))
    assert torch.equal(baseline_images(x, "noise", seed=1), baseline_images(x, "noise", seed=1))
    assert not torch.equal(baseline_images(x, "noise", seed=1), baseline_images(x, "noise", seed=2))
    assert baseline_images(x, "blur").std() < x.std()
    with pytest.raises(ValueError, match="unknown baseline"): baseline_images(x, "zeros")

def test_perturbed_outputs_equal_one_copy_at_a_time():
    toy = ToyExplainer(); x = torch.rand(3, 1, 32, 32) * 2 - 1
    masks = torch.rand(3, 2, 32, 32) > 0.7; b = baseline_images(x, "mean")
    po = perturbed_outputs(toy, x, masks, b, batch_size=4)
    for n in range(3):
        for j in range(2):
            m = masks[n, j].float()
            ref = toy(((1 - m) * x[n] + m * b[n])[None])
            assert torch.allclose(po["logits"][n, j], ref.logits[0], atol=1e-6)

def test_ablating_the_only_region_that_matters_gives_the_largest_drop():
    toy = ToyExplainer()
    x = block_image({(0, 0): 1.0, (3, 3): 0.0, (1, 2): 0.5})
    share = np.array([[0.6, 0.1, 0.0, 0.3]])                                 # prototypes 0 / 3 / 1 point at blocks 1 / .5 / 0
    ab = prototype_ablation(toy, x, share, k=3, baseline="mean", model=BlockModel({(0, 0): 1.0}))
    assert ab.prototypes[0].tolist() == [0, 3, 1]
    assert ab.logit_drop[0, 0] > 1.0 and np.allclose(ab.logit_drop[0, 1:], 0.0)

def test_spearman_one_for_the_right_order_minus_one_reversed():
    toy = ToyExplainer()
    x = block_image({(0, 0): 1.0, (3, 3): 0.0, (1, 2): 0.5})
    share = np.array([[0.6, 0.1, 0.0, 0.3]])
    ab = prototype_ablation(toy, x, share, k=3, baseline="mean", model=BlockModel({(0, 0): 1.0, (1, 2): 0.5, (3, 3): 0.25}))
    assert np.all(np.diff(ab.logit_drop[0]) < 0)                             # drops follow the block weights
    assert ab.correlation()[0] == pytest.approx(1.0)
    from dataclasses import replace
    assert replace(ab, nis=ab.nis[:, ::-1].copy()).correlation()[0] == pytest.approx(-1.0)

def test_rowwise_correlation_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 4, (20, 7)).astype(float), rng.normal(size=(20, 7))
    r = rowwise_correlation(a, b)
    for i in range(20):
        if np.ptp(a[i]) > 0: assert r[i] == pytest.approx(stats.spearmanr(a[i], b[i]).statistic)
    assert np.isnan(rowwise_correlation(np.ones((1, 7)), b[:1])[0])
    assert rowwise_correlation(a, b, "pearson")[3] == pytest.approx(stats.pearsonr(a[3], b[3]).statistic)

def test_deletion_auc_smaller_and_insertion_larger_for_the_right_saliency():
    x = block_image({(0, 0): 1.0, (3, 3): 0.0, (1, 2): 0.5}).repeat(4, 1, 1, 1)
    right = np.zeros((4, 32, 32)); right[:, :8, :8] = 1
    rand = np.random.default_rng(0).random((4, 32, 32))
    for base in ("mean", "blur"):
        cr = deletion_insertion(BlockModel(), x, right, baseline=base)
        cz = deletion_insertion(BlockModel(), x, rand, baseline=base)
        assert (cr.deletion_auc < cz.deletion_auc).all() and (cr.insertion_auc > cz.insertion_auc).all()
        assert np.allclose(cr.deletion[:, 0], cr.insertion[:, -1])           # nothing deleted = everything inserted

def test_saliency_weights_maps_by_share():
    toy = ToyExplainer()
    x = block_image({(0, 0): 1.0, (3, 3): 0.0})
    d = toy(x).distances.detach()
    s = explanation_saliency(np.array([[1.0, 0.0, 0.0, 0.0]]), d, 32)
    assert s[0, :4, :4].min() > 0.9 and s[0, 28:, 28:].max() < 0.1


# --- the generative metric ---------------------------------------------------------------------------

def test_renoise_leaves_everything_outside_the_region_alone():
    xt, x0 = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16)
    m = torch.zeros(2, 3, 16, 16); m[:, 1, :4, :4] = 1; m[:, 2] = 1
    p = renoise_in_regions(xt, x0, m, alpha_bar=0.5, seed=0)
    assert torch.equal(p[:, 0], xt) and torch.equal(p[:, 1, :, 4:], xt[:, :, 4:])
    assert not torch.allclose(p[:, 1, :, :4, :4], xt[:, :, :4, :4])
    with pytest.raises(ValueError, match="alpha_bar"): renoise_in_regions(xt, x0, m, alpha_bar=0.0)

def test_generative_zero_perturbation_gives_zero_change():
    from diffusers import DDPMScheduler
    from mri_protodiff.trajectory import record_trajectory, denoise_from
    unet, sched = tiny_unet(in_channels=1, seed=0).eval(), DDPMScheduler(num_train_timesteps=1000)
    trs = record_trajectory(unet, sched, None, [0, 1], steps=10, timesteps=(500,))
    xt = torch.tensor(np.stack([t.x_t[0] for t in trs])); x0 = torch.tensor(np.stack([t.x0_hat[0] for t in trs]))
    fin = lambda x, t, c: denoise_from(unet, sched, x, t, c, steps=10)
    masks = torch.zeros(2, 2, 32, 32, dtype=torch.bool); masks[:, 0, :10, :10] = True; masks[:, 1, 20:, 12:22] = True
    nis = np.array([[0.7, 0.3], [0.2, 0.8]])
    g0 = generative_perturbation(fin, xt, x0, 500, float(sched.alphas_cumprod[500]), torch.zeros_like(masks), nis)
    for k, v in g0.change.items(): assert np.abs(v).max() == 0, k
    assert np.allclose(g0.reference, np.stack([t.final for t in trs]), atol=1e-5)   # the continuation reproduces the image
    g1 = generative_perturbation(fin, xt, x0, 500, float(sched.alphas_cumprod[500]), masks, nis, batch_size=3)
    assert all((v > 0).all() for v in g1.change.values())
    assert (g1.change["L2 (region)"] > g1.change["L2 (image)"]).all()

def test_output_change_on_known_images():
    ref = torch.zeros(1, 1, 16, 16); out = ref[:, None].repeat(1, 2, 1, 1, 1)
    out[0, 1, 0, :4, :4] = 1.0
    m = torch.zeros(1, 2, 16, 16); m[0, :, :4, :4] = 1
    ch = output_change(out, ref, m)
    assert ch["L2 (region)"][0].tolist() == [0.0, 1.0]
    assert ch["L2 (image)"][0, 1] == pytest.approx(math.sqrt(16 / 256))
    assert ch["1-SSIM (region)"][0, 0] == pytest.approx(0.0, abs=1e-6) and ch["1-SSIM (region)"][0, 1] > 0.1


# --- consistency and stability -----------------------------------------------------------------------

def test_consistency_and_stability_on_known_parts():
    toy = ToyExplainer()
    cells = [(0, 0), (1, 2), (2, 1), (0, 3)]
    xs = torch.cat([block_image({(i, j): 1.0, (3 - i, 3 - j): 0.0}) for i, j in cells])
    mk = np.zeros((4, 32, 32), np.int64)
    for n, (i, j) in enumerate(cells):
        mk[n, 8*i:8*i+8, 8*j:8*j+8] = 1; mk[n, 8*(3-i):8*(3-i)+8, 8*(3-j):8*(3-j)+8] = 2
    pr = prototype_parts(toy, xs, mk, np.zeros(4, np.int64), [1, 2], ("bright", "grey"))
    assert pr.consistent.tolist() == [True, True, False, False] and pr.consistency_score == 100.0
    assert np.allclose(pr.coverage[:2], np.eye(2)) and pr.stability[:2].tolist() == [1.0, 1.0]
    assert pr.covers_any[:2].tolist() == [1.0, 1.0] and np.isnan(pr.covers_any[2:]).all()
    swapped = mk.copy(); swapped[1][mk[1] == 1], swapped[1][mk[1] == 2] = 2, 1      # one image's parts relabelled
    pr2 = prototype_parts(toy, xs, swapped, np.zeros(4, np.int64), [1, 2], ("bright", "grey"))
    assert pr2.coverage[0, 0] == pytest.approx(0.75) and not pr2.consistent[0]     # 3 of 4 < 0.8


# --- sanity checks -----------------------------------------------------------------------------------

def test_randomize_explainer_changes_every_weight_and_keeps_the_original():
    from mri_protodiff.protonets import ExplainerConfig, build_explainer
    for method in ("ppnet", "protopool"):
        cfg = ExplainerConfig(method=method, n_classes=2, image_size=32, protos_per_class=2, proto_dim=8, pool_size=4, pool_slots=2)
        torch.manual_seed(0); m = build_explainer(cfg).eval()
        with torch.no_grad():                                                        # stand-in for training: move every weight
            for p in m.parameters(): p.add_(0.1 * torch.randn_like(p))
        if method == "protopool": m.harden()
        before = {k: v.clone() for k, v in m.state_dict().items()}
        r = randomize_explainer(m, 3, init=lambda: build_explainer(cfg))
        assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())          # original untouched
        params = dict(m.named_parameters())
        assert all(not torch.equal(params[k], p) for k, p in r.named_parameters()), method
        r2 = randomize_explainer(m, 3, init=lambda: build_explainer(cfg))
        assert all(torch.equal(a, b) for a, b in zip(r.state_dict().values(), r2.state_dict().values()))
        if method == "protopool": assert r.hardened
        out = r(torch.randn(2, 1, 32, 32)); assert out.logits.shape == (2, 2)
    toy = ToyExplainer(); rt = randomize_explainer(toy, 1)                         # generic path: reset_parameters
    assert all(not torch.equal(a, b) for a, b in zip(toy.parameters(), rt.parameters()))

def test_shuffle_rows_permutes_within_rows():
    a = np.arange(30.).reshape(5, 6)
    s = shuffle_rows(a, 0)
    assert np.array_equal(np.sort(s, 1), a) and not np.array_equal(s, a) and np.array_equal(s, shuffle_rows(a, 0))


# --- statistics --------------------------------------------------------------------------------------

def test_summaries_have_ci_n_seeds_and_paired_p():
    rng = np.random.default_rng(0); ids = np.arange(40)
    recs = pd.concat([records_frame(rng.normal(0.5, 0.2, 40), ids, metric="m", measure="x", method="a", variant=TRAINED, seed=s)
                      for s in (0, 1, 2)]
                     + [records_frame(rng.normal(0.0, 0.2, 40), ids, metric="m", measure="x", method="a", variant=RANDOMISED, seed=0),
                        records_frame(rng.normal(0.48, 0.2, 40), ids, metric="m", measure="x", method="b", variant=TRAINED, seed=0)])
    s = summarize_records(recs, n_bootstrap=300).set_index(["method", "variant"])
    r = s.loc[("a", TRAINED)]
    assert r.n == 40 and r.n_seeds == 3 and r.ci95_low < r["mean"] < r.ci95_high and np.isfinite(r.sd_seeds)
    assert s.loc[("a", RANDOMISED), "p_vs_trained"] < 1e-5
    c = compare_methods(recs)
    ab = c[c.b == f"b ({TRAINED})"].iloc[0]
    assert ab.test.startswith("Wilcoxon") and ab.n == 40 and ab.p_value > 0.01            # a vs b: no real difference
    assert (c.p_holm >= c.p_value).all()

def test_holm():
    p = holm([0.01, 0.04, np.nan, 0.03])
    assert np.allclose(p[[0, 1, 3]], [0.03, 0.06, 0.06]) and np.isnan(p[2])


# --- Quantus cross-check -----------------------------------------------------------------------------

def test_faithfulness_correlation_matches_quantus():
    quantus = pytest.importorskip("quantus")
    torch.manual_seed(0)
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, 3)).eval()
    x = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1)); y = cnn(x).argmax(1).detach().numpy()
    a = np.random.default_rng(2).random((6, 1, 16, 16)).astype(np.float32)
    np.random.seed(11)
    theirs = quantus.FaithfulnessCorrelation(nr_runs=25, subset_size=40, return_aggregate=False, disable_warnings=True)(
        model=cnn, x_batch=x.numpy(), y_batch=y, a_batch=a, device="cpu")
    ours = faithfulness_correlation(cnn, x, a, y, quantus_subsets(11, 6, 25, 256, 40))
    assert np.allclose(np.asarray(theirs), ours, atol=1e-5)


# --- the real explainers against their randomised versions, on the phantom ----------------------------

def test_trained_ppnet_beats_its_randomised_version_on_the_phantom():
    """Sanity check (model randomisation, Adebayo et al. 2018) on the phantom, metric 1 with the blur baseline.

    PPNets are trained on 216 phantom slices (64x64, density classes, the quick profile's plan) with nine
    training seeds and explain 72 held-out slices.  Per slice and model, Spearman's rho over its top-5
    prototypes between the NIS share and (a) the drop of the prototype's own evidence when its region is
    blurred, (b) the drop of the trained PPNet's logit.  The same for the explanation of a randomised copy
    (every weight re-drawn; three seeds), measured on the same trained logit.  Per randomisation seed, the
    trained-minus-randomised difference is averaged per slice over the nine trained models, and asserted:
    mean over slices >= 0.2 for (a) and >= 0.1 for (b), each with a Wilcoxon signed-rank p < 0.01 (a) /
    < 0.05 (b) over the 72 slices.

    Why nine training seeds: the claim is about the trained method, and one trained model is a noisy draw
    of it.  One model per seed (seeds 0-8), the logit margin (b) ranged from -0.22 to +0.69 with the
    reference random start and from -0.16 to +0.61 with the k-means start; a single model passed every
    criterion for 2 of the 9 seeds (random start) and 1 of 9 (k-means start), so a one-seed check passed or
    failed by the luck of the seed (06_prototrain, "Where the prototypes start").
    (Measured when written, pooled over the nine, k-means start: (a) +0.26 / +0.41 / +0.29, p <= 1e-7;
    (b) +0.17 / +0.20 / +0.16, p <= 1e-3.  Random start: (a) +0.28 / +0.41 / +0.21, (b) +0.17 / +0.17 / +0.16.)
    """
    from mri_protodiff.data import phantom_sliceset
    from mri_protodiff.prototrain import fit_explainer, plan_from_profile
    from mri_protodiff.protonets import ExplainerConfig, build_explainer
    from mri_protodiff.core import get_profile
    prof = get_profile("quick")
    assert "ppnet" in prof.explainers.proto_init_kmeans      # the default being checked
    ss = phantom_sliceset(n_subjects=24, slices_per_subject=12, size=64, seed=0)
    tr, te = ss.subset(np.arange(216)), ss.subset(np.arange(216, 288))           # subjects 0-17 / 18-23
    assert not set(np.asarray(tr.subject)) & set(np.asarray(te.subject))
    cfg = ExplainerConfig(method="ppnet", n_classes=4, image_size=64, protos_per_class=prof.explainers.protos_per_class, proto_dim=prof.explainers.proto_dim)
    x = torch.from_numpy(np.array(te.images, np.float32))
    diffs = {}
    for seed in range(9):
        model = fit_explainer(cfg, plan_from_profile(prof, "ppnet"), np.array(tr.images), np.asarray(tr.density), seed=seed, device="cpu").model
        share, tgt = nis_shares(model, x)
        real = prototype_ablation(model, x, share, k=5, baseline="blur", model=model, target=tgt)
        for s in (100, 101, 102):
            rnd = randomize_explainer(model, s, init=lambda: build_explainer(cfg))
            fake = prototype_ablation(rnd, x, nis_shares(rnd, x, None, tgt)[0], k=5, baseline="blur", model=model, target=tgt)
            for drop in ("evidence", "logit"):
                d = real.correlation(drop) - fake.correlation(drop)
                assert np.isfinite(d).sum() >= 60, (seed, s, drop)
                diffs.setdefault((drop, s), []).append(d)
    for (drop, s), ds in diffs.items():
        d = np.nanmean(np.stack(ds), 0)
        d = d[np.isfinite(d)]
        margin, alpha = dict(evidence=(0.2, 0.01), logit=(0.1, 0.05))[drop]
        diff, p = float(d.mean()), float(stats.wilcoxon(d).pvalue)
        assert diff >= margin and p < alpha, (drop, s, diff, p)


# --- the stage and its command line ------------------------------------------------------------------

def test_explain_needs_the_earlier_stages(tmp_run):
    "The three stages that replaced `explain` each name the missing stage `sample` on an empty run."
    from mri_protodiff.core import RunDir, get_profile
    from mri_protodiff import pipeline as P
    run = RunDir(tmp_run, get_profile("smoke"))
    for name, fn in (("explanations", P.run_explanations), ("image-quality", P.run_image_quality), ("faithfulness", P.run_faithfulness)):
        with pytest.raises(FileNotFoundError, match=f"stage '{name}' needs stage 'sample', which is not done"): fn(run)

def test_cli_has_explain_and_bench_with_help(capsys):
    from mri_protodiff.cli import build_parser
    p = build_parser()
    for cmd in (["explanations"], ["image-quality"], ["faithfulness"], ["bench", "faithfulness"]):
        with pytest.raises(SystemExit) as e: p.parse_args(cmd + ["--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "explanations.csv" in out and "image_quality.csv" in out and "faithfulness.csv" in out and "--prototypes" in out

def test_explain_end_to_end_on_a_tiny_run(tmp_run, capsys):
    "data -> train-diffusion (2 steps) -> sample -> train-explainers -> explanations -> image-quality -> faithfulness, through the command line."
    from mri_protodiff.cli import main
    sets = ["train_steps=2", "n_generated=4", "sample_steps=4", "sample_batch=4", "faith_images=2", "faith_steps=4",
            "faith_timesteps=500", "n_bootstrap=50", "warm_epochs=1", "joint_epochs=1", "last_epochs=1", "push_every=1",
            "methods=ppnet", "explainer_seeds=0", "paper_kmeans_k=4", "topk_prototypes=2"]
    args = ["--out", str(tmp_run), "--profile", "smoke"] + [a for kv in sets for a in ("--set", kv)]
    for cmd in ("data", "train-diffusion", "sample", "train-explainers"): assert main([cmd] + args) == 0, cmd
    explain = ("explanations", "image-quality", "faithfulness")     # what the single `explain` stage did, in this order
    for cmd in explain: assert main([cmd, "--out", str(tmp_run)]) == 0, cmd
    out = capsys.readouterr().out
    assert all(f"{cmd}: done; in " in out for cmd in explain), out
    tables = tmp_run/"tables"
    for f in ("faithfulness.csv", "faithfulness.md", "faithfulness_comparisons.csv", "faithfulness_records.csv", "explainers.csv",
              "faithfulness_info.json", "image_quality.csv", "image_quality.md"): assert (tables/f).is_file(), f
    assert (tmp_run/"explanations"/"explanations.csv").is_file()
    t = pd.read_csv(tables/"faithfulness.csv")
    assert set(t.definition) == {"ours", "paper definition"}
    assert {"trained", "randomised explainer", "shuffled NIS", "random saliency"} <= set(t.variant)
    assert set(t[t.definition == "paper definition"].paper_reference.str.replace(" (paper)", "").astype(float)) == {0.0965, 0.1534, 0.142}
    ours = t[t.definition == "ours"]
    assert ((ours.n + ours.n_dropped) > 0).all() and {"ci95_low", "ci95_high", "n", "n_seeds", "p_vs_trained"} <= set(t.columns)
    # the metrics are named for what they perturb and measure; none claims the training data
    assert set(ours.metric) >= {"classifier faithfulness: prototype ablation", "denoiser spatial sensitivity: re-noise x_t in prototype regions"}
    assert ours[ours.metric.str.startswith("denoiser spatial sensitivity")].timestep.dropna().astype(int).tolist()[0] == 500
    # 4 generated images < stats.MIN_UNITS: every cell of ours says so instead of a number; sanity rows carry an MDE column
    assert (ours.value == "n too small").all() and {"mde", "ci_over"} <= set(t.columns)
    assert ours[ours.variant == "randomised explainer"].mde.notna().any()
    from mri_protodiff.influence import read_full_nis
    from mri_protodiff.data import load_sliceset
    _, full = read_full_nis(tmp_run)
    assert list(full) == [("ppnet", 0)] and full[("ppnet", 0)].shape == (4, len(load_sliceset(tmp_run, "train")))
    assert (full[("ppnet", 0)] > 0).all()                                   # every training image of the run is named
    for cmd in explain: assert main([cmd, "--out", str(tmp_run)]) == 0, cmd     # done with the same inputs: skipped
    out = capsys.readouterr().out
    assert all(f"{cmd}: skipped; in " in out for cmd in explain), out
    from mri_protodiff.core import RunDir
    assert all(RunDir(tmp_run).stage(cmd)["status"] == "done" for cmd in explain)
