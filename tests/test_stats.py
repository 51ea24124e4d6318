"Stats: the hierarchical (seeds x units) bootstrap covers, the minimum detectable effect has its power, small n is not shown."
import warnings
import numpy as np, pandas as pd, pytest
from scipy import stats as st
from mri_protodiff.stats import (bootstrap_ci, hierarchical_bootstrap_ci, hierarchical_summary, minimum_detectable_effect,
                                 format_estimate, format_ci, format_mean_sd, MIN_UNITS, MIN_SEEDS, TOO_SMALL)

MU = 1.0

def crossed(rng, S, U, sa, sb, se):
    "Y[s, i] = mu + a_s + b_i + e_si: a crossed seeds x units design."
    return MU + rng.normal(0, sa, (S, 1)) + rng.normal(0, sb, (1, U)) + rng.normal(0, se, (S, U))

def coverage(S, U, sa, sb, se, n_sets, n_old, seed=2024, B=400):
    "Share of simulated data sets whose 95 % interval covers mu: (hierarchical, seeds-averaged-then-units bootstrap_ci)."
    rng = np.random.default_rng(seed); hier = old = 0
    for k in range(n_sets):
        Y = crossed(rng, S, U, sa, sb, se)
        lo, hi = hierarchical_bootstrap_ci(Y, n_resamples=B, seed=k); hier += lo <= MU <= hi
        if k < n_old:
            lo, hi = bootstrap_ci(Y.mean(0), n_resamples=B, seed=k); old += lo <= MU <= hi
    return hier / n_sets, old / n_old

@pytest.mark.parametrize("S,sa", [(5, 0.22), (10, 0.5)])
def test_hierarchical_ci_covers_and_the_units_only_ci_does_not(S, sa):
    # the seed part of the variance is > half the total here: leaving it out (the old way) under-covers
    hier, old = coverage(S, 30, sa, 0.5, 0.3, n_sets=1000, n_old=400)
    print(f"S={S} sigma_a={sa}: hierarchical {hier:.3f}, units only {old:.3f}")
    assert hier >= 0.90, hier
    assert old < 0.85, old

def test_few_dominant_seeds_still_far_better_than_units_only():
    # 5 seeds whose spread dominates: the percentile bootstrap cannot make up for unrun seeds (~0.88), but it
    # is far closer to nominal than ignoring the seeds (~0.57)
    hier, old = coverage(5, 30, 0.5, 0.5, 0.3, n_sets=600, n_old=300)
    print(f"S=5 sigma_a=0.5: hierarchical {hier:.3f}, units only {old:.3f}")
    assert hier >= 0.84 and old < 0.70 and hier - old > 0.2, (hier, old)

def test_deterministic_for_a_seed():
    Y = crossed(np.random.default_rng(0), 4, 20, 0.5, 0.5, 0.3)
    assert hierarchical_bootstrap_ci(Y, seed=7) == hierarchical_bootstrap_ci(Y, seed=7)
    assert hierarchical_bootstrap_ci(Y, seed=7) != hierarchical_bootstrap_ci(Y, seed=8)

def test_one_seed_is_the_unit_bootstrap():
    x = np.random.default_rng(1).normal(3, 1, 25); B = 500
    idx = np.random.default_rng(5).integers(0, len(x), (B, len(x)))   # a plain percentile bootstrap over units
    want = tuple(np.quantile(x[idx].mean(1), [0.025, 0.975]))
    np.testing.assert_allclose(hierarchical_bootstrap_ci(x[None], n_resamples=B, seed=5), want, rtol=1e-12)
    np.testing.assert_allclose(hierarchical_bootstrap_ci(x, n_resamples=B, seed=5), want, rtol=1e-12)   # 1-D: one seed
    r = st.bootstrap((x,), np.mean, n_resamples=2000, method="percentile", rng=np.random.default_rng(0)).confidence_interval
    np.testing.assert_allclose(hierarchical_bootstrap_ci(x, n_resamples=2000), (r.low, r.high), atol=0.03)

def test_nan_cells_are_ignored():
    Y = crossed(np.random.default_rng(3), 4, 20, 0.5, 0.5, 0.3)
    padded = np.full((6, 23), np.nan); padded[1:5, 2:22] = Y       # empty seeds and units around it
    assert hierarchical_bootstrap_ci(padded, seed=2) == hierarchical_bootstrap_ci(Y, seed=2)
    Yn = Y.copy(); Yn[0, :6] = np.nan; Yn[2, 10] = np.inf           # missing cells
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lo, hi = hierarchical_bootstrap_ci(Yn)
    m = np.nanmean(np.where(np.isfinite(Yn), Yn, np.nan))
    assert np.isfinite([lo, hi]).all() and lo < m < hi
    assert np.isnan(hierarchical_bootstrap_ci(Y[:, :1])).all() and np.isnan(hierarchical_bootstrap_ci(np.full((3, 5), np.nan))).all()

def test_hierarchical_summary_from_long_records():
    rng = np.random.default_rng(4); Y = crossed(rng, 3, 12, 0.5, 0.5, 0.3)
    rec = pd.DataFrame([dict(seed=s, unit=f"img{i}", value=Y[s, i]) for s in range(3) for i in range(12)])
    dup = rec.iloc[:2].assign(value=rec.value.iloc[:2] + 1.0)   # a second row for two cells: the cell is their mean
    rec2 = pd.concat([rec, dup, rec.iloc[:2].assign(value=rec.value.iloc[:2] - 1.0)])
    for r in (rec, rec2):
        h = hierarchical_summary(r, n_resamples=300, seed=1)
        assert (h["n_seeds"], h["n_units"]) == (3, 12)
        np.testing.assert_allclose([h["mean"], h["sd_seeds"], h["sd_units"]],
                                   [Y.mean(), Y.mean(1).std(ddof=1), Y.mean(0).std(ddof=1)])
        order = sorted(range(12), key=lambda i: f"img{i}")          # the table's units are in sorted order
        assert (h["ci95_low"], h["ci95_high"]) == hierarchical_bootstrap_ci(Y[:, order], n_resamples=300, seed=1)
    one = hierarchical_summary(rec[rec.seed == 0])
    assert one["n_seeds"] == 1 and np.isnan(one["sd_seeds"]) and np.isfinite(one["sd_units"])

def test_minimum_detectable_effect_formula():
    assert minimum_detectable_effect(1.0, 16) == pytest.approx(2.8016 / 4, abs=1e-4)
    assert minimum_detectable_effect(2.0, 16) == pytest.approx(2 * 0.70040, abs=1e-4)
    assert minimum_detectable_effect(1.0, 16, test="two-sample") == pytest.approx(np.sqrt(2) * 0.70040, abs=1e-4)
    assert minimum_detectable_effect(1.0, 16, test="wilcoxon") == pytest.approx(0.70040 / np.sqrt(3 / np.pi), abs=1e-4)
    assert minimum_detectable_effect(1.0, 16, alpha=0.01, power=0.9) == pytest.approx((2.5758 + 1.2816) / 4, abs=1e-4)
    assert np.isnan(minimum_detectable_effect(1.0, 1)) and np.isnan(minimum_detectable_effect(np.nan, 20))
    with pytest.raises(ValueError): minimum_detectable_effect(1.0, 16, test="t")

def test_paired_t_test_at_the_mde_has_the_power():
    n, sd = 16, 1.0; d = minimum_detectable_effect(sd, n)
    diffs = np.random.default_rng(11).normal(d, sd, (2000, n))
    p = st.ttest_1samp(diffs, 0.0, axis=1).pvalue
    power = (p < 0.05).mean()
    print(f"simulated power at MDE {d:.4f}: {power:.3f}")
    assert 0.72 <= power <= 0.88, power
    tc, nc = st.t.ppf(0.975, n - 1), d * np.sqrt(n) / sd                  # the exact power of the t-test: 0.745
    assert abs(power - (st.nct.sf(tc, n - 1, nc) + st.nct.cdf(-tc, n - 1, nc))) < 0.03
    half = (st.ttest_1samp(np.random.default_rng(12).normal(d / 2, sd, (2000, n)), 0.0, axis=1).pvalue < 0.05).mean()
    assert half < 0.45, half    # half the effect is clearly underpowered

def test_small_n_is_not_shown():
    assert (MIN_UNITS, MIN_SEEDS, TOO_SMALL) == (10, 3, "n too small")
    assert format_estimate(0.65301, 0.10521, n=MIN_UNITS - 1) == TOO_SMALL
    assert format_estimate(0.65301, 0.10521, n=MIN_UNITS) == format_mean_sd(0.65301, 0.10521) == "0.6530 ± 0.1052"
    assert format_estimate(19.3712, 1.6654, n=2, n_min=MIN_SEEDS) == TOO_SMALL
    assert format_estimate(19.3712, 1.6654, n=3, n_min=MIN_SEEDS) == "19.37 ± 1.67"
    assert format_ci(0.61234, 0.70111, n=MIN_UNITS - 1) == TOO_SMALL
    assert format_ci(0.61234, 0.70111, n=MIN_UNITS) == "[0.612, 0.701]"
    assert format_ci(1234.5, 1299.9, n=50) == "[1230, 1300]" and format_ci(0.000123456, 0.0456, n=50) == "[0.000123, 0.0456]"
    assert format_ci(np.nan, 0.7, n=50) == ""


# ---------------------------------------------------------------- numbers for reading (issue 19)

from mri_protodiff.stats import format_number, markdown_table, write_table, ZERO_BELOW

import re
LONG_ZEROS = re.compile(r"0\.0{6,}")   # the look of -0.00000000000000001110


def test_tiny_numbers_read_as_zero_or_scientific():
    "1.1e-17 reads '1.1e-17' alone and '0' beside numbers of size 0.1; never '-0.00000000000000001110'."
    assert format_number(1.1e-17) == "1.1e-17" and format_number(-1.11e-17) == "-1.11e-17"
    assert format_number(1.1e-17, scale=0.1) == "0" and format_number(-1.11e-17, scale=0.5) == "0"
    assert format_number(2e-13, scale=0.1) == "2e-13"                       # above ZERO_BELOW x scale: kept
    assert format_number(0.123456) == "0.1235" and format_number(12345.678) == "12346" and format_number(30.0) == "30"
    assert format_number(-0.0) == "0" and format_number(np.nan) == "" and format_number(3.2e7) == "3.2e+7"
    # mean +- SD: the mean that is rounding noise reads 0 at the SD's precision (the old output was 20 decimals long)
    assert format_mean_sd(-1.11e-17, 0.3) == "0.0000 ± 0.3000"
    assert format_mean_sd(-1.11e-17, np.nan, scale=0.37) == "0.0000"
    assert format_mean_sd(-1.11e-17, np.nan) == "-1.110e-17"
    assert format_mean_sd(0.0012, 0.3) == "0.0012 ± 0.3000" and format_mean_sd(1.2e-5, 3e-6) == "(1.200 ± 0.300)e-5"
    assert format_ci(-1.11e-17, 0.31, n=50) == "[0, 0.31]" and format_ci(-2.1e-7, 3.4e-7, n=50) == "[-2.1e-7, 3.4e-7]"
    for s in (format_mean_sd(-1.11e-17, 0.3), format_mean_sd(-1.11e-17, np.nan), format_ci(-1.11e-17, 0.31, n=50),
              format_ci(-1e-17, 1e-17, n=50)):
        assert not LONG_ZEROS.search(s), s


def test_markdown_table_rounds_for_reading_and_the_csv_keeps_full_precision(tmp_path):
    "Every column through format_number with its column as the scale; p-values keep tiny values; the CSV is untouched."
    t = pd.DataFrame({"metric": ["a", "b", "c"], "measure": ["x", "y", "z"], "mean": [0.3123456, -1.11e-17, 0.25],
                      "difference": [1.1e-17, 0.2, -0.3], "p_holm": [1e-15, 0.5, 0.04], "p vs trained": [2e-20, 0.9, 0.01],
                      "n": [30.0, 30.0, np.nan]})
    md = markdown_table(t)
    rows = [r.split(" | ") for r in md.splitlines()[2:]]
    assert rows[0][2:6] == ["0.3123", "0", "1e-15", "2e-20"] and rows[1][2:4] == ["0", "0.2"]
    assert md.splitlines()[4].endswith("| 0.01 |  |")                        # NaN: an empty cell
    assert not LONG_ZEROS.search(md) and "e-17" not in md
    assert markdown_table(t, ".3g").splitlines()[2].split(" | ")[2] == "0.312"
    p = write_table(t, tmp_path/"t.csv", "T")
    back = pd.read_csv(p)
    assert back["mean"].iloc[1] == -1.11e-17 and back["mean"].iloc[0] == 0.3123456     # full precision in the CSV
    assert "| a | x | 0.3123 | 0 | 1e-15 | 2e-20 | 30 |" in (tmp_path/"t.md").read_text()
    assert ZERO_BELOW == 1e-12
