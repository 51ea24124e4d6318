"The phantom: determinism, anatomy, density classes, resolution independence, benchmark."
import subprocess, sys
import numpy as np
import pytest
from mri_protodiff.phantom import (LABELS, DENSITY_CLASSES, LABEL_INDEX, phantom_subject, render_subject, generate_phantom,
                                   phantom_subjects, array_hash, bench_phantom)

L = LABEL_INDEX

@pytest.fixture(scope="module")
def ph():
    return generate_phantom(8, 6, 64, seed=0)

def test_interface_names():
    assert LABELS[0] == "background" and {"fgt", "vessel", "lesion"} <= set(LABELS)
    assert DENSITY_CLASSES == ("fatty", "scattered", "heterogeneous", "extremely_dense")

def test_shapes_ranges_and_labels(ph):
    assert ph["images"].shape == (48, 64, 64) and ph["images"].dtype == np.float32
    assert ph["masks"].dtype == np.uint8 and ph["masks"].max() < len(LABELS)
    assert 0 <= ph["images"].min() and ph["images"].max() <= 1
    present = set(np.unique(ph["masks"]).tolist())
    for name in ("background", "body", "fgt", "vessel", "lesion", "skin", "muscle", "lung", "heart"):
        assert L[name] in present, name
    assert sorted(set(ph["density"].tolist())) == [0, 1, 2, 3]
    # lesion label is exactly "the slice's mask contains lesion pixels"
    assert np.array_equal(ph["lesion"], (ph["masks"] == L["lesion"]).any((1, 2)).astype(np.int64))

def test_deterministic_by_hash_and_independent_of_batching(ph):
    again = generate_phantom(8, 6, 64, seed=0)
    assert array_hash(ph["images"], ph["masks"]) == array_hash(again["images"], again["masks"])
    # subject by subject, and slice by slice, give the same bytes
    parts = [next(phantom_subjects(1, 6, 64, seed=0, first=i)) for i in range(8)]
    assert array_hash(np.concatenate([p["images"] for p in parts]), np.concatenate([p["masks"] for p in parts])) == \
        array_hash(ph["images"], ph["masks"])
    s = phantom_subject(5, 0, 6)
    one = [render_subject(s, 64, [k]) for k in (4, 1)]
    assert np.array_equal(one[0][0][0], ph["images"][5 * 6 + 4]) and np.array_equal(one[1][1][0], ph["masks"][5 * 6 + 1])
    other = generate_phantom(8, 6, 64, seed=1)
    assert array_hash(other["images"]) != array_hash(ph["images"])

def breast_fgt_share(m):
    "Per slice: FGT share of the tissue in front of the chest wall (above the first muscle pixel of each column)."
    mus = m == L["muscle"]
    first = np.where(mus.any(1), mus.argmax(1), m.shape[1])
    ant = np.arange(m.shape[1])[None, :, None] < first[:, None, :]
    tissue = ant & np.isin(m, [L["fgt"], L["vessel"], L["lesion"], L["body"]])
    return (ant & (m == L["fgt"])).sum((1, 2)) / np.maximum(tissue.sum((1, 2)), 1)

def test_density_classes_ordered_and_separated():
    d = generate_phantom(24, 4, 64, seed=5)
    sh = breast_fgt_share(d["masks"])
    share = np.array([sh[d["subject"] == i].mean() for i in range(24)])
    dens = np.array([phantom_subject(i).density for i in range(24)])
    means = [share[dens == c].mean() for c in range(4)]
    assert all(1.2 * a < b for a, b in zip(means, means[1:])), means
    # subjects of class c have less FGT than every subject of class c + 1
    for c in range(3): assert share[dens == c].max() < share[dens == c + 1].min(), (c, share, dens)

def test_anatomy_layout(ph):
    m = ph["masks"]
    rows = np.arange(64)[None, :, None]
    def mean_row(label): return (rows * (m == L[label])).sum() / max((m == L[label]).sum(), 1)
    # breasts (FGT) at the top, heart in the middle, lungs below the FGT; background at the top corners
    assert mean_row("fgt") < mean_row("heart") and mean_row("fgt") < mean_row("lung")
    assert (m[:, :3, :3] == 0).mean() > 0.95
    # fat-suppressed T1 contrast: lung < fat < FGT < vessels/heart, background darkest
    im = ph["images"]
    mean = {k: im[m == L[k]].mean() for k in ("background", "lung", "body", "fgt", "heart", "vessel")}
    assert mean["background"] < mean["body"] < mean["fgt"] and mean["heart"] > 1.5 * mean["body"], mean
    assert mean["lung"] < mean["body"] and mean["vessel"] > mean["body"] + 0.1, mean

def test_adjacent_slices_similar_subjects_differ(ph):
    im = ph["images"].reshape(8, 6, -1)
    def corr(a, b): return np.corrcoef(a, b)[0, 1]
    within = np.mean([corr(im[s, k], im[s, k + 1]) for s in range(8) for k in range(5)])
    between = np.mean([corr(im[s, 2], im[(s + 1) % 8, 2]) for s in range(8)])
    assert within > 0.9 and within > between + 0.05, (within, between)
    sizes = [phantom_subject(i).breasts[0][2] for i in range(8)]
    assert np.std(sizes) > 0.01

def test_same_anatomy_at_64_and_256():
    s = phantom_subject(2, 0, 4)
    a, ma = render_subject(s, 64, [1]); b, mb = render_subject(s, 256, [1])
    down = b[0].reshape(64, 4, 64, 4).mean((1, 3))
    assert np.corrcoef(a[0].ravel(), down.ravel())[0, 1] > 0.9
    agree = (ma[0] == mb[0][2::4, 2::4]).mean()
    assert agree > 0.85, agree

def test_noise_is_rician_in_background(ph):
    bg = ph["images"][ph["masks"] == 0]
    assert bg.min() >= 0 and 0.005 < bg.mean() < 0.1     # magnitude noise: positive mean in the air

def test_bad_arguments():
    with pytest.raises(ValueError, match="size"): render_subject(phantom_subject(0), 4)
    with pytest.raises(ValueError, match="slice"): render_subject(phantom_subject(0, 0, 3), 32, [5])
    with pytest.raises(ValueError, match="n_subjects"): list(phantom_subjects(0))

def test_benchmark_runs_and_reports():
    r = bench_phantom(sizes=(32,), n_slices=8)
    assert r[32]["slices_per_s"] > 0
    out = subprocess.run([sys.executable, "-c", "from mri_protodiff.cli import main; raise SystemExit(main())",
                          "bench", "phantom", "--sizes", "32", "--slices", "8"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "slices/s" in out.stdout, out.stderr
