"Tests of mri_protodiff.quality: oracles are scikit-image, lpips and torchmetrics called directly."
import os
from urllib.error import URLError
import numpy as np
import pandas as pd
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from mri_protodiff import quality as Q
from mri_protodiff import stats as S

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    real = np.tanh(rng.normal(size=(6, 1, 32, 32))).astype(np.float32)
    gen = np.clip(real + rng.normal(0, 0.2, real.shape), -1, 1).astype(np.float32)
    return gen, real


@pytest.fixture
def downloads(monkeypatch):
    "No network: torch.hub's downloader (used by torchvision and torch-fidelity alike) fails; the URLs it was asked for."
    urls = []
    def offline(url, *a, **k):
        urls.append(url); raise URLError("no network (simulated)")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.delenv(Q.OFFLINE_ENV, raising=False)       # the suite runs offline (conftest); here the download is attempted
    return urls


@pytest.fixture
def no_weights(tmp_path, monkeypatch, downloads):
    "No network, an empty torch cache and no env override: pretrained weights are absent and cannot be fetched."
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("MRI_PROTODIFF_ALEXNET_WEIGHTS", raising=False)
    monkeypatch.delenv("MRI_PROTODIFF_INCEPTION_WEIGHTS", raising=False)
    return tmp_path


def _in_hub_cache(state_dict, file):
    "Save a state dict where torch.hub keeps downloaded checkpoints, under the name the library looks for."
    path = Q.hub_checkpoint(file)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, path)
    return path


def _random_inception_state_dict(monkeypatch):
    "torch-fidelity's InceptionV3 feature extractor with random weights (built without loading any), as a state dict."
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    torch.manual_seed(0)
    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    return net.state_dict()


def test_offline_env_never_downloads(no_weights, downloads, monkeypatch, pair):
    monkeypatch.setenv(Q.OFFLINE_ENV, "1")
    r = Q.inception_fid(pair[1], pair[0])
    assert r.startswith(Q.LPIPS_UNAVAILABLE) and f"{Q.OFFLINE_ENV} is set" in r and downloads == []


# ---------------------------------------------------------------- statistics
def test_summarize_and_ci():
    x = np.random.default_rng(1).normal(3.0, 1.0, 50)
    s = S.summarize(x, n_resamples=500, seed=0)
    assert s["n"] == 50 and s["mean"] == pytest.approx(x.mean()) and s["sd"] == pytest.approx(x.std(ddof=1))
    assert s["ci95_low"] < s["mean"] < s["ci95_high"]
    assert S.bootstrap_ci(x, n_resamples=500, seed=3) == S.bootstrap_ci(x, n_resamples=500, seed=3)
    assert S.summarize([np.nan, 1.0, np.inf, 3.0])["n"] == 2
    assert all(np.isnan(v) for v in S.bootstrap_ci([1.0]))
    assert S.format_mean_sd(19.3712, 1.6654) == "19.37 ± 1.67"
    assert S.format_mean_sd(0.28934, 0.10501) == "0.2893 ± 0.1050"


def test_markdown_table():
    md = S.markdown_table(pd.DataFrame({"a": ["x", "y"], "b": [1.23456, np.nan]}))
    lines = md.strip().splitlines()
    assert lines[0] == "| a | b |" and lines[2] == "| x | 1.235 |" and lines[3] == "| y |  |"


# ---------------------------------------------------------------- PSNR / SSIM
@pytest.mark.parametrize("scaling", ["paper", "fixed"])
def test_psnr_ssim_equal_skimage(pair, scaling):
    gen, real = pair
    p, s = Q.psnr_ssim(gen, real, scaling)
    for i in range(len(gen)):
        g, r = gen[i, 0].astype(np.float64), real[i, 0].astype(np.float64)
        if scaling == "paper":
            g, r = (g - g.min()) / (g.max() - g.min()), (r - r.min()) / (r.max() - r.min())
        else:
            g, r = (g + 1) / 2, (r + 1) / 2
        assert p[i] == pytest.approx(peak_signal_noise_ratio(r, g, data_range=1.0), rel=1e-10)
        assert s[i] == pytest.approx(structural_similarity(r, g, data_range=1.0), rel=1e-10)


def test_paper_scaling_ignores_affine_offset(pair):
    gen, real = pair
    p1, s1 = Q.psnr_ssim(gen, real, "paper")
    p2, s2 = Q.psnr_ssim(gen * 0.5 - 0.3, real, "paper")        # globally darker, lower contrast
    np.testing.assert_allclose(p1, p2, rtol=1e-6); np.testing.assert_allclose(s1, s2, rtol=1e-6)
    pf1, _ = Q.psnr_ssim(gen, real, "fixed"); pf2, _ = Q.psnr_ssim(gen * 0.5 - 0.3, real, "fixed")
    assert (pf2 < pf1).all()                                      # the fixed range sees the offset


def test_bad_input(pair):
    gen, real = pair
    with pytest.raises(ValueError, match="same shape"): Q.psnr_ssim(gen, real[:3])
    with pytest.raises(ValueError, match="scaling"): Q.to_unit_range(gen, "zscore")


# ---------------------------------------------------------------- LPIPS
def test_weight_file_names_are_the_libraries():
    "The file names in the how-to are those torchvision and torch-fidelity download to and look for in the cache."
    from torchvision.models import AlexNet_Weights
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    assert AlexNet_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1] == Q.ALEXNET_FILE
    assert URL_INCEPTION_V3.rsplit("/", 1)[1] == Q.INCEPTION_FILE


def test_lpips_unavailable_gives_message(no_weights, downloads, pair):
    with pytest.warns(UserWarning, match="torchvision could not download") as ws:
        m = Q.load_lpips()
    assert len(ws) == 1
    from torchvision.models import AlexNet_Weights
    assert downloads == [AlexNet_Weights.IMAGENET1K_V1.url]          # torchvision's own call tried to fetch them
    assert m.model is None and not m.available
    assert m.message.startswith("unavailable: pretrained weights not found") and Q.ALEXNET_FILE in m.message
    assert str(Q.hub_checkpoint(Q.ALEXNET_FILE)) in m.message and "no network (simulated)" in m.message
    assert "MRI_PROTODIFF_ALEXNET_WEIGHTS" in m.message and "Traceback" not in m.message
    assert not Q.hub_checkpoint(Q.ALEXNET_FILE).exists()             # no partial file left in the cache
    gen, real = pair
    df = Q.image_quality_frame(gen, real, np.arange(6), lpips_metric=m, n_bootstrap=50)
    rows = df[df.metric == "LPIPS (AlexNet)"]
    assert len(rows) == 6 and (rows.value == "unavailable: pretrained weights not found").all()
    assert rows["mean"].isna().all() and (rows.n == 0).all()
    assert rows.note.str.contains("MRI_PROTODIFF_ALEXNET_WEIGHTS").all()
    assert Q.quality_markdown(df).count("torchvision could not download") == 1     # the how-to said once


def test_lpips_explicit_missing_path_is_an_error(no_weights):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        Q.load_lpips(alexnet_weights=no_weights / "missing.pth")


def test_lpips_random_trunk_code_path_equals_lpips(pair):
    gen, real = pair
    m = Q.load_lpips(pnet_rand=True)
    assert m.random_trunk and not m.available and "NOT LPIPS" in m.name
    d = Q.lpips_distances(m, gen, real, "fixed")
    ref = m.model(torch.from_numpy(gen).expand(-1, 3, -1, -1), torch.from_numpy(real).expand(-1, 3, -1, -1)).flatten()
    np.testing.assert_allclose(d, ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert np.allclose(Q.lpips_distances(m, real, real), 0, atol=1e-6)


def test_lpips_loads_trunk_from_file(no_weights):
    import torchvision
    alex = torchvision.models.alexnet(weights=None)
    path = no_weights / Q.ALEXNET_FILE
    torch.save(alex.state_dict(), path)
    m = Q.load_lpips(alexnet_weights=path)
    assert m.available and m.message == ""
    assert torch.equal(getattr(m.model.net.slice1, "0").weight, alex.features[0].weight)
    # and from the ordinary torch cache
    hub = torch.hub.get_dir(); os.makedirs(os.path.join(hub, "checkpoints"), exist_ok=True)
    torch.save(alex.state_dict(), os.path.join(hub, "checkpoints", Q.ALEXNET_FILE))
    assert Q.load_lpips().available
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="has shape"): Q.load_lpips(alexnet_weights=path)


def test_lpips_weights_in_torch_cache_without_network(no_weights, downloads, pair):
    "AlexNet weights placed in $TORCH_HOME/hub/checkpoints under torchvision's file name: LPIPS runs offline."
    import torchvision
    torch.manual_seed(0)
    alex = torchvision.models.alexnet(weights=None)
    cached = _in_hub_cache(alex.state_dict(), Q.ALEXNET_FILE)
    assert cached == no_weights / "torch_home" / "hub" / "checkpoints" / Q.ALEXNET_FILE
    sd = Q.fetch_alexnet_weights()                                    # torchvision's own call reads the cache
    assert torch.equal(sd["features.3.weight"], alex.features[3].weight)
    m = Q.load_lpips()
    assert m.available and m.message == "" and m.name == "LPIPS (AlexNet)"
    assert torch.equal(getattr(m.model.net.slice2, "3").weight, alex.features[3].weight)
    gen, real = pair
    d = Q.lpips_distances(m, gen, real)
    assert d.shape == (len(gen),) and np.isfinite(d).all() and (d > 0).all()
    assert np.allclose(Q.lpips_distances(m, real, real), 0, atol=1e-6)
    assert downloads == []                                            # nothing was fetched
    df = Q.image_quality_frame(gen, real, np.arange(6), lpips_metric=m, n_bootstrap=50)
    row = df.set_index(["metric", "variant", "scaling"]).loc[("LPIPS (AlexNet)", "paired", "paper")]
    assert np.isfinite(row["mean"]) and row.n == 6 and row.paper_reference == "0.2893 ± 0.1050 (paper)"


def test_lpips_broken_cache_file_is_an_error_naming_it(no_weights):
    cached = _in_hub_cache({"features.0.weight": torch.zeros(1)}, Q.ALEXNET_FILE)
    with pytest.raises(ValueError, match=f"{cached}: does not load as torchvision's weights"):
        Q.load_lpips()


# ---------------------------------------------------------------- Frechet distances
def test_frechet_distance():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(300, 6))
    assert Q.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert Q.frechet_distance(a, a + 2.0) == pytest.approx(6 * 4.0, rel=1e-6)
    same = Q.frechet_distance(a, rng.normal(size=(300, 6)))
    shifted = Q.frechet_distance(a, rng.normal(size=(300, 6)) + 0.5)
    assert same < shifted
    with pytest.raises(ValueError, match="at least 2"): Q.frechet_distance(a[:1], a)


def test_inception_fid_unavailable(no_weights, downloads, pair):
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    gen, real = pair
    with pytest.warns(UserWarning, match="torch-fidelity could not download"):
        r = Q.inception_fid(real, gen)
    assert downloads == [URL_INCEPTION_V3]                            # torch-fidelity's own call tried to fetch them
    assert isinstance(r, str) and r.startswith("unavailable: pretrained weights not found; torch-fidelity could not download")
    assert str(Q.hub_checkpoint(Q.INCEPTION_FILE)) in r and "MRI_PROTODIFF_INCEPTION_WEIGHTS" in r
    df = Q.image_quality_frame(gen, real, np.arange(6), lpips_metric=Q.load_lpips(pnet_rand=True), n_bootstrap=50)
    fid = df[df.metric == "FID (InceptionV3)"]
    assert len(fid) == 1 and fid.value.item() == "unavailable: pretrained weights not found" and fid.n.item() == 0
    assert "torch-fidelity could not download" in fid.note.item() and Q.INCEPTION_FILE in fid.note.item()
    with pytest.raises(FileNotFoundError, match="inception_weights='"):
        Q.inception_fid(real, gen, no_weights / "missing.pth")


def test_inception_fid_weights_in_torch_cache_without_network(no_weights, downloads, pair, monkeypatch):
    "InceptionV3 weights (random, torch-fidelity's layout) in $TORCH_HOME/hub/checkpoints: FID runs offline."
    gen, real = pair[0][:3], pair[1][:3]                              # 3 + 3 images through InceptionV3 on the CPU
    sd = _random_inception_state_dict(monkeypatch)
    cached = _in_hub_cache(sd, Q.INCEPTION_FILE)
    fid = Q.load_fid()                                                # torch-fidelity's own call reads the cache
    assert not isinstance(fid, str), fid
    assert torch.equal(fid.inception.Conv2d_1a_3x3.conv.weight, sd["Conv2d_1a_3x3.conv.weight"])
    r = Q.inception_fid(real, gen)
    assert isinstance(r, float) and np.isfinite(r) and r > 0
    explicit = Q.load_fid(weights=cached)                             # an explicit file: the same network
    assert torch.equal(explicit.inception.Mixed_7c.branch_pool.conv.weight, sd["Mixed_7c.branch_pool.conv.weight"])
    assert downloads == []


def test_domain_encoder_deterministic_and_cached(tmp_path):
    rng = np.random.default_rng(3)
    dens = rng.integers(0, 4, 64)
    img = np.clip(dens[:, None, None, None] / 3 - 0.5 + 0.1 * rng.normal(size=(64, 1, 32, 32)), -1, 1).astype(np.float32)
    masks = (img[:, 0] > 0).astype(np.uint8)
    kw = dict(n_labels=2, epochs=3, batch_size=32, min_steps=0, seed=0)
    e1, info = Q.train_domain_encoder(img, masks, dens, -np.ones(64, int), **kw)
    e2, _ = Q.train_domain_encoder(img, masks, dens, -np.ones(64, int), **kw)
    f1 = Q.domain_features(e1, img[:5])
    np.testing.assert_array_equal(f1, Q.domain_features(e2, img[:5]))
    assert f1.shape == (5, e1.num_features) and info["epochs"] == 3
    Q.save_domain_encoder(e1, tmp_path, info)
    e3, _ = Q.load_domain_encoder(tmp_path)
    np.testing.assert_array_equal(f1, Q.domain_features(e3, img[:5]))
    assert (tmp_path / "domain_encoder.safetensors").is_file()


# ---------------------------------------------------------------- the table
def test_image_quality_table_on_a_run(tmp_path, no_weights):
    from mri_protodiff.core import RunDir, get_profile
    from mri_protodiff.data import load_sliceset
    from mri_protodiff.pipeline import run_data
    run = RunDir(tmp_path / "run", get_profile("smoke", n_bootstrap=100))
    run_data(run)
    test = load_sliceset(run, "test")
    rng = np.random.default_rng(0)
    ri = rng.integers(0, len(test), 6)
    gen = np.clip(np.asarray(test.images)[ri] + rng.normal(0, 0.2, (6, 1, 32, 32)), -1, 1).astype(np.float32)
    (run / "samples").mkdir()
    np.savez(run / "samples" / "samples.npz", images=gen, masks=np.asarray(test.masks)[ri], seeds=np.arange(6), real_index=ri)
    df = Q.image_quality_table(run, encoder_steps=20)
    for c in ("metric", "variant", "mean", "sd", "n", "paper_reference"):
        assert c in df.columns
    assert (run / "tables" / "image_quality.csv").is_file() and (run / "tables" / "image_quality.md").is_file()
    back = pd.read_csv(run / "tables" / "image_quality.csv")
    assert len(back) == len(df)
    q = df.set_index(["metric", "variant", "scaling"])
    paired = q.loc[("PSNR (dB)", "paired", "paper")]
    assert paired.n == 6 and paired.paper_reference == "19.37 ± 1.67 (paper)"
    assert paired["mean"] != 19.37                                   # ours, not the paper's
    p, _ = Q.psnr_ssim(gen, np.asarray(test.images)[ri], "paper")
    assert paired["mean"] == pytest.approx(p.mean()) and paired.sd == pytest.approx(p.std(ddof=1))
    assert q.loc[("PSNR (dB)", "paired", "paper"), "mean"] > q.loc[("PSNR (dB)", "unpaired", "paper"), "mean"]
    assert q.loc[("LPIPS (AlexNet)", "paired", "paper"), "value"] == "unavailable: pretrained weights not found"
    assert q.loc[("LPIPS (AlexNet)", "paired", "paper"), "paper_reference"] == "0.2893 ± 0.1050 (paper)"
    fd = df[df.metric.str.startswith("Frechet")]
    assert set(fd.variant) == {"generated vs test", "real vs real (train vs test)"} and (fd["mean"] >= 0).all()
    assert (run / "quality" / "domain_encoder.safetensors").is_file()
    md = (run / "tables" / "image_quality.md").read_text()
    assert "19.37 ± 1.67 (paper)" in md and "unavailable: pretrained weights not found" in md
    assert md.count("torchvision could not download") == 1 and md.count("torch-fidelity could not download") == 1
    assert q.loc[("FID (InceptionV3)", "generated vs test", "fixed"), "value"] == "unavailable: pretrained weights not found"


def test_image_quality_table_needs_samples(tmp_path):
    from mri_protodiff.core import RunDir, get_profile
    run = RunDir(tmp_path / "run", get_profile("smoke"))
    with pytest.raises(FileNotFoundError, match="samples.npz"):
        Q.image_quality_table(run)
