"Tests of mri_protodiff.influence: the paper's formulas against a direct transcription, NIS/cNIS properties."
from typing import NamedTuple
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from mri_protodiff import influence as I

from conftest import tiny_unet

torch.set_num_threads(1)


# ---------------------------------------------------------------- the paper's definitions
def _direct_paper_nis(g, refs):
    "The formula written out: exp(-||phi(g) - phi(r_j)||) / sum_k exp(-||phi(g) - phi(r_k)||)."
    out = np.zeros((len(g), len(refs)))
    for i in range(len(g)):
        e = np.array([np.exp(-np.sqrt(np.sum((g[i] - r) ** 2))) for r in refs])
        out[i] = e / e.sum()
    return out


def test_paper_nis_equals_direct_transcription():
    rng = np.random.default_rng(0)
    ftr, fg = rng.normal(size=(40, 8)) * 0.5, rng.normal(size=(6, 8)) * 0.5
    nis = I.paper_nis(fg, ftr)
    np.testing.assert_allclose(nis, _direct_paper_nis(fg, ftr), rtol=1e-12, atol=1e-15)
    assert I.paper_faithfulness(nis) == pytest.approx(np.mean(_direct_paper_nis(fg, ftr).max(1)), rel=1e-12)
    assert 1 / 40 <= I.paper_faithfulness(nis) <= 1


def test_paper_nis_stable_for_large_distances():
    rng = np.random.default_rng(1)
    nis = I.paper_nis(rng.normal(size=(3, 4)) * 1e3, rng.normal(size=(10, 4)) * 1e3)
    assert np.isfinite(nis).all() and np.allclose(nis.sum(1), 1)


def test_paper_references_kmeans_matches_sklearn():
    from sklearn.cluster import KMeans
    f = np.random.default_rng(2).normal(size=(50, 5))
    c = I.paper_references(f, "eppnet", k=6)
    np.testing.assert_array_equal(c, KMeans(n_clusters=6, random_state=42).fit(f).cluster_centers_)
    np.testing.assert_array_equal(c, I.paper_references(f, "protopool", k=6))
    np.testing.assert_array_equal(I.paper_references(f, "ppnet"), f)
    with pytest.raises(ValueError, match="k="): I.paper_references(f, "kmeans", k=51)
    with pytest.raises(ValueError, match="rule"): I.paper_references(f, "gradcam")


def test_paper_faithfulness_table():
    rng = np.random.default_rng(3)
    tab, arrays = I.paper_faithfulness_table(rng.normal(size=(30, 4)), rng.normal(size=(5, 4)), k=5, n_bootstrap=50)
    assert list(tab.method) == ["ppnet", "eppnet", "protopool"]
    assert list(tab.n_references) == [30, 5, 5]
    assert tab.faithfulness[1] == tab.faithfulness[2]                # one computation for both
    assert list(tab.paper_reference) == [0.0965, 0.1534, 0.1420]
    assert tab.faithfulness[0] == pytest.approx(arrays["ppnet"].max(1).mean())


def test_paper_features_uses_unet_hook():
    pytest.importorskip("mri_protodiff.trajectory")
    torch.manual_seed(0)
    unet = tiny_unet(in_channels=2, size=16, channels=(8, 16)).eval()
    x = np.random.default_rng(0).uniform(-1, 1, (3, 1, 16, 16)).astype(np.float32)
    f = I.paper_features(unet, x, batch_size=3)            # the oracle's batch: the same computation, compared tightly
    assert f.shape == (3, 8)
    # oracle: a hook on up_blocks[-1] at t = 0 with the mask channel zero, averaged over space
    def oracle(inp):
        got = {}
        h = unet.up_blocks[-1].register_forward_hook(lambda m, i, o: got.__setitem__("o", o))
        with torch.no_grad():
            unet(torch.cat([torch.from_numpy(inp), torch.zeros_like(torch.from_numpy(inp))], 1), torch.zeros(3, dtype=torch.long))
        h.remove()
        return got["o"].mean((2, 3)).numpy()
    # default: the seed scripts' input range, PNG / 255 in [0, 1]
    np.testing.assert_allclose(f, oracle((x + 1) / 2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(I.paper_features(unet, x, batch_size=3, input_range="model"), oracle(x), rtol=1e-5, atol=1e-6)
    # in batches of 2: another batch size may sum in another order on some CPUs (AVX-512), so rounding's tolerance
    np.testing.assert_allclose(I.paper_features(unet, x, batch_size=2), f, atol=1e-4)
    assert not np.allclose(f, oracle(x), rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="input_range"): I.paper_features(unet, x, input_range="png")


# ---------------------------------------------------------------- NIS from explainers
class _Out(NamedTuple):
    logits: torch.Tensor
    similarity: torch.Tensor
    distances: torch.Tensor


class Toy(nn.Module):
    "A stand-in with the explainer interface."
    def __init__(self, C=3, per=2, D=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(1, D, 1); nn.init.normal_(self.conv.weight, generator=g)
        self.prototypes = nn.Parameter(torch.rand(C * per, D, generator=g))
        self.last_layer = nn.Linear(C * per, C, bias=False)
        ident = nn.functional.one_hot(torch.arange(C * per) // per, C).float()
        with torch.no_grad(): self.last_layer.weight.copy_(ident.t() - 0.5 * (1 - ident.t()))
        self.prototype_class = ident

    def forward(self, x):
        z = torch.sigmoid(self.conv(nn.functional.avg_pool2d(x, 4)))
        d = ((z[:, None] - self.prototypes[None, :, :, None, None]) ** 2).sum(2)
        md = d.amin((2, 3))
        sim = torch.log((md + 1) / (md + 1e-4))
        return _Out(self.last_layer(sim), sim, d)


@pytest.fixture(scope="module")
def toy():
    model = Toy()
    push = [dict(prototype=p, source_index=s, **{"class": p // 2}) for p, s in enumerate([3, 8, 3, 1, 0, 9])]
    imgs = torch.rand(7, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return model, push, imgs


def test_explainer_nis_properties(toy):
    model, push, imgs = toy
    inf = I.explainer_nis(model, push, imgs, n_train=12)
    assert inf.nis.shape == (7, 12) and inf.evidence.shape == (7, 6)
    assert (inf.nis >= 0).all() and np.allclose(inf.nis.sum(1), 1)
    np.testing.assert_array_equal(inf.nis[:, [2, 4, 5, 6, 7, 10, 11]], 0)     # never pushed onto
    np.testing.assert_allclose(inf.evidence.sum(1), inf.logits[np.arange(7), inf.target], rtol=1e-5)
    # direct per-image, per-prototype transcription
    W = model.last_layer.weight.detach().double().numpy()
    with torch.no_grad(): out = model(imgs)
    sim = out.similarity.double().numpy(); pred = out.logits.argmax(1).numpy()
    for n in range(7):
        e = np.clip(W[pred[n]] * sim[n], 0, None)
        ref = np.zeros(12)
        for p, r in enumerate(push): ref[r["source_index"]] += e[p] / e.sum()
        np.testing.assert_allclose(inf.nis[n], ref, rtol=1e-9, atol=1e-12)


def _copies(seed, noise, n_train=40, src=(0, 7, 7, 21, 39, 12)):
    "A toy whose influential training images are known: generated images that are noisy copies of training images `src`."
    g = torch.Generator().manual_seed(seed)
    train = torch.rand(n_train, 1, 16, 16, generator=g) * 2 - 1
    return train, train[list(src)] + noise * torch.randn(len(src), 1, 16, 16, generator=g), np.array(src)


def test_full_nis_ranks_the_copied_training_image_first(toy):
    torch.manual_seed(0); model = Toy()                               # the bias init draws from the global generator
    push = toy[1]
    train, gen, src = _copies(5, 0.001)
    full = I.explainer_full_nis(model, gen, train)
    np.testing.assert_array_equal(full.argmax(1), src)
    assert (full > 0).all() and np.allclose(full.sum(1), 1)
    # direct transcription of the formula: softmax(-D), D the RMS similarity difference (uniform) or evidence-weighted
    ev, sim, _, _ = I.prototype_evidence(model, gen)
    tsim = I.train_similarities(model, train)
    ev_full = I.explainer_full_nis(model, gen, train, weighting="evidence")
    for n in range(len(src)):
        d = np.sqrt(((sim[n] - tsim) ** 2).mean(1))
        np.testing.assert_allclose(full[n], np.exp(-d) / np.exp(-d).sum(), rtol=1e-9, atol=1e-15)
        pi = np.clip(ev[n], 0, None) / np.clip(ev[n], 0, None).sum()
        d = np.sqrt((pi * (sim[n] - tsim) ** 2).sum(1))
        np.testing.assert_allclose(ev_full[n], np.exp(-d) / np.exp(-d).sum(), rtol=1e-9, atol=1e-15)
    # push NIS on the same explainer names only the pushed-onto images: the reason full NIS exists
    assert ((I.explainer_nis(model, push, gen, n_train=40).nis > 0).sum(1) <= 4).all()


def test_full_nis_uniform_weighting_finds_copies_the_evidence_weighting_misses():
    "Why `weighting='uniform'` is the default (chapter influence): 20 toys x 6 copies, noise SD 0.01, 6 prototypes."
    torch.manual_seed(0); model = Toy()
    miss = {"uniform": 0, "evidence": 0}
    for seed in range(20):
        train, gen, src = _copies(seed, 0.01)
        for w in miss: miss[w] += int((I.explainer_full_nis(model, gen, train, weighting=w).argmax(1) != src).sum())
    assert miss["uniform"] <= 6 and miss["evidence"] >= 40, miss     # measured: 2 and 88 of 120


def test_explicit_target_and_negative_evidence(toy):
    model, push, imgs = toy
    inf = I.explainer_nis(model, push, imgs, n_train=12, target=2)
    assert (inf.target == 2).all() and np.allclose(inf.nis.sum(1), 1)
    # the prototypes of class 2 (4, 5 -> images 0, 9) carry all positive evidence for class 2
    np.testing.assert_allclose(inf.nis[:, 0] + inf.nis[:, 9], 1.0)


def test_unpushed_prototypes_left_out(toy):
    model, push, imgs = toy
    p2 = [dict(r) for r in push]; p2[0]["source_index"] = None
    inf = I.explainer_nis(model, p2, imgs, n_train=12)
    assert np.allclose(inf.nis.sum(1), 1) and (inf.share[:, 0] == 0).all()
    with pytest.raises(ValueError, match="push"):
        I.explainer_nis(model, [dict(prototype=p, source_index=None) for p in range(6)], imgs, 12)
    with pytest.raises(ValueError, match="out of range"):
        I.explainer_nis(model, push, imgs, n_train=5)


def test_class_nis_consistent_with_nis(toy):
    model, push, imgs = toy
    inf = I.explainer_nis(model, push, imgs, n_train=12)
    train_class = np.array([2, 1, 0, 0, 1, 2, 0, 1, 0, 2, 1, 1])
    cn = I.class_nis(inf.nis, train_class, 3)
    assert np.allclose(cn.sum(1), 1) and (cn >= 0).all()
    for c in range(3):
        np.testing.assert_allclose(cn[:, c], inf.nis[:, train_class == c].sum(1))
    cf = I.class_frame(inf, np.arange(7), "ppnet", 0, train_class=train_class)
    np.testing.assert_allclose(cf.cnis.values.reshape(7, 3), cn)


def test_trajectory_nis(toy):
    model, push, imgs = toy
    x0 = np.stack([imgs.numpy()[:2] * a + (1 - a) * 3 for a in np.linspace(0, 1, 5)], axis=1)   # (2, 5, 1, H, W), leaves [-1, 1] early
    tr = I.trajectory_nis(model, push, x0, n_train=12)
    assert tr.nis.shape == (2, 5, 12) and np.allclose(tr.nis.sum(-1), 1)
    final = I.explainer_nis(model, push, imgs[:2], n_train=12)
    np.testing.assert_allclose(tr.nis[:, -1], final.nis, rtol=1e-6)
    one = I.trajectory_nis(model, push, x0[1], n_train=12)
    assert one.nis.shape == (5, 12) and np.allclose(one.nis, tr.nis[1])
    fin = I.trajectory_nis(model, push, x0, n_train=12, target="final")
    assert (fin.target == final.target[:, None]).all()


def test_explanations_roundtrip(tmp_path, toy):
    model, push, imgs = toy
    inf = I.explainer_nis(model, push, imgs, n_train=12)
    ef = I.explanation_frame(inf, np.arange(7), "eppnet", 1)
    for c in ("generated_id", "method", "seed", "timestep", "prototype", "source_index", "nis", "evidence"):
        assert c in ef.columns
    assert (ef.timestep == I.FINAL_TIMESTEP).all() and len(ef) == 7 * 6
    g = ef.groupby(["generated_id", "source_index"]).agg(nis=("nis", "first"), share=("share", "sum"))
    np.testing.assert_allclose(g.nis, g.share)
    I.write_explanations(tmp_path, ef, I.class_frame(inf, np.arange(7), "eppnet", 1))
    assert (tmp_path / "explanations" / "explanations.csv").is_file()
    back = I.read_explanations(tmp_path)
    pd.testing.assert_frame_equal(back, ef, check_dtype=False)
    cl = I.read_explanations(tmp_path, "classes")
    assert np.allclose(cl.groupby("generated_id").cnis.sum(), 1)
    s = I.nis_summary(back, n_bootstrap=50)
    assert s.max_nis[0] == pytest.approx(inf.nis.max(1).mean())


# ---------------------------------------------------------------- with the real stages of a tiny run
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("mri_protodiff.prototrain"); pytest.importorskip("mri_protodiff.trajectory")
    from mri_protodiff.core import RunDir, get_profile
    from mri_protodiff.pipeline import run_data, run_train_diffusion, run_sample, run_trajectory, run_train_explainers
    run = RunDir(tmp_path_factory.mktemp("inf") / "run",
                 get_profile("smoke", train_steps=2, n_generated=4, trajectory_steps=10, trajectory_timesteps=(900, 500, 0),
                             paper_kmeans_k=8, n_bootstrap=50))
    run_data(run); run_train_diffusion(run, progress=False); run_sample(run, progress=False); run_trajectory(run)
    run_train_explainers(run, methods=("ppnet", "protopool"), progress=False)
    return run


def test_explain_samples_on_a_run(tiny_run):
    from mri_protodiff.data import load_sliceset
    run, n_train = tiny_run, len(load_sliceset(tiny_run, "train"))
    ex, cl, infl = I.explain_samples(run)
    assert set(ex.method) == {"ppnet", "protopool"} and set(ex.generated_id) == {0, 1, 2, 3}
    for (m, s), inf in infl.items():
        assert inf.nis.shape == (4, n_train) and np.allclose(inf.nis.sum(1), 1) and (inf.nis >= 0).all()
        # evidence adds up to the explained logit (ProtoPool: its folded, hardened slot layer)
        np.testing.assert_allclose(inf.evidence.sum(1), inf.logits[np.arange(4), inf.target], rtol=1e-4, atol=1e-4)
    assert np.allclose(cl.groupby(["method", "generated_id"]).cnis.sum(), 1)
    for (m, s), inf in infl.items():   # full-support NIS: every training image of the run is named, by every explainer
        assert inf.full_nis.shape == (4, n_train) and (inf.full_nis > 0).all() and np.allclose(inf.full_nis.sum(1), 1)
        assert ((inf.nis > 0).sum(1) < n_train).all()                  # push NIS: only the pushed-onto images
    paths = I.write_explanations(run, ex, cl)
    assert paths["explanations"] == run / "explanations" / "explanations.csv"
    assert len(I.read_explanations(run)) == len(ex)


def test_explain_trajectories_on_a_run(tiny_run):
    ex, cl, infl = I.explain_trajectories(tiny_run)
    assert sorted(ex.timestep.unique()) == [0, 500, 900]
    inf = infl[("ppnet", 0)]
    assert inf.nis.shape[:2] == (4, 3) and np.allclose(inf.nis.sum(-1), 1)
    assert (inf.target == inf.target[:, -1:]).all()                    # target="final": one class per trajectory
    tr = I.load_trajectory_arrays(tiny_run)
    np.testing.assert_array_equal(I.trajectory_ids(tr, I.load_samples(tiny_run)), np.arange(4))   # same seeds as the samples


def test_paper_scores_on_a_run(tiny_run):
    tab, arrays = I.paper_scores(tiny_run)
    assert list(tab.n_references) == [48, 8, 8] and (tab.n_generated == 4).all()
    assert (tab.faithfulness >= tab.floor_1_over_M - 1e-12).all() and (tab.faithfulness <= 1).all()
    assert arrays["ppnet"].shape == (4, 48)
