"""Figures and explorers of mri_protodiff.viz: figure contents (traces, titles, axis labels, data), the files
save_figure writes (offline HTML, PNG via kaleido + Chromium, the no-browser path), and the explorers driven
through their widgets."""
import os, time, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from PIL import Image

from mri_protodiff import viz
from mri_protodiff.core import RunDir, get_profile, write_json

rng = np.random.default_rng(0)
HAVE_BROWSER = viz.find_browser() is not None


@pytest.fixture
def no_browser(monkeypatch, tmp_path):
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path/"no-such-browser"))


def small_traj(T=5, H=12):
    ts = np.linspace(995, 0, T).astype(int)
    x_t = rng.uniform(-1, 1, (T, 1, H, H)).astype(np.float32)
    return ts, x_t, x_t*0.5, rng.uniform(0, 1, (T, H, H)).astype(np.float32)


# ---------------------------------------------------------------- figure builders

def test_image_grid_layout_and_overlay():
    imgs = rng.uniform(-1, 1, (5, 1, 10, 10)); masks = np.zeros((5, 10, 10), np.uint8); masks[:, 2:4, 2:4] = 2
    fig = viz.image_grid(imgs, masks, ncols=3, row_labels=["real", "synthetic"], col_labels=["a", "b", "c"],
                         title="grid", label_names=["background", "fgt", "vessel"])
    heat = [t for t in fig.data if t.type == "heatmap"]
    assert len(heat) == 10 and [t.name for t in fig.data if t.type == "scatter"] == ["vessel"]
    np.testing.assert_allclose(heat[4].z, imgs[4, 0], atol=1e-6)               # 5th image in row 2, col 2
    assert heat[4].xaxis == "x5" and heat[0].zmin == -1 and heat[0].zmax == 1
    mz = np.asarray(heat[5].z, float); assert np.isnan(mz[0, 0]) and mz[2, 2] == 2  # background transparent
    assert fig.layout.title.text == "grid" and [a.text for a in fig.layout.annotations] == ["a", "b", "c"]
    assert fig.layout.yaxis.title.text == "real" and fig.layout.yaxis4.title.text == "synthetic"
    assert fig.layout.yaxis2.scaleanchor == "x2"                                # square pixels per panel
    with pytest.raises(ValueError, match="images must have shape"): viz.image_grid(np.zeros((2, 3, 4, 4)))
    with pytest.raises(ValueError, match="col_labels"): viz.image_grid(imgs, ncols=3, col_labels=["a"])


def test_trajectory_figure_rows_columns_and_data():
    ts, xt, x0, nm = small_traj()
    fig = viz.trajectory_figure(ts, xt, x0, nm, title="traj")
    T = len(ts)
    assert len(fig.data) == 3*T and fig.layout.title.text == "traj"
    assert [a.text for a in fig.layout.annotations] == [f"t = {t}" for t in ts]
    # column c holds x_t, x0_hat, noise map of snapshot c (rows 1..3)
    for c in (0, T - 1):
        np.testing.assert_allclose(fig.data[3*c].z, xt[c, 0]); np.testing.assert_allclose(fig.data[3*c + 2].z, nm[c])
    assert fig.data[2].zmin == 0 and fig.data[2].zmax == 1 and fig.data[0].zmin == -1
    assert [fig.layout[f"yaxis{'' if r == 0 else r*T + 1}"].title.text for r in range(3)] == \
        ["x_t", "x̂₀", "|ε̂|"]                                        # short: they fit a row scaled down to the page
    assert fig.layout.title.subtitle.text.startswith("x_t: the noisy latent · x̂₀: the clean estimate")
    assert sum(bool(t.showscale) for t in fig.data) == 2
    class Traj:  # a trajectory.Trajectory-like object
        timesteps, x_t, x0_hat, noise_map = ts, xt, x0, nm
    assert len(viz.trajectory_figure(Traj()).data) == 3*T
    with pytest.raises(ValueError, match="noise_map has 4 snapshots"): viz.trajectory_figure(ts, xt, x0, nm[:4])


def test_nis_histogram_facet_and_overlay():
    df = pd.DataFrame({"method": ["ppnet"]*30 + ["protopool"]*20, "nis": rng.uniform(0, 1.1, 50)})
    fig = viz.nis_histogram(df, nbins=11)
    assert [t.name for t in fig.data] == ["PPNet (n=30)", "ProtoPool (n=20)"] and [len(t.x) for t in fig.data] == [30, 20]
    assert fig.layout.xaxis2.title.text == viz.NIS_LABEL and fig.layout.yaxis.title.text == "count"
    assert fig.data[0].xbins.size == fig.data[1].xbins.size and fig.data[0].xbins.start == pytest.approx(df.nis.min())
    assert fig.data[0].marker.color != fig.data[1].marker.color and fig.layout.title.text == "NIS distribution per explainer"
    over = viz.nis_histogram(df, mode="overlay")
    assert over.layout.barmode == "overlay" and over.layout.xaxis.title.text == viz.NIS_LABEL and len(over.data) == 2
    with pytest.raises(ValueError, match="mode"): viz.nis_histogram(df, mode="stacked")
    with pytest.raises(ValueError, match="no finite"): viz.nis_histogram({"ppnet": [np.nan]})


def test_bar_with_ci_error_bars_groups_reference():
    df = pd.DataFrame({"method": ["ppnet", "eppnet"], "faithfulness": [0.2, 0.5], "ci_low": [0.1, 0.45], "ci_high": [0.4, 0.6]})
    fig = viz.bar_with_ci(df, reference={"ppnet": 0.0965, "eppnet": 0.1534, "protopool": 0.142}, y_label="r (Pearson)")
    bar, ref = fig.data
    assert list(bar.x) == ["PPNet", "EPPNet"] and list(bar.y) == [0.2, 0.5]
    np.testing.assert_allclose(bar.error_y.array, [0.2, 0.1]); np.testing.assert_allclose(bar.error_y.arrayminus, [0.1, 0.05])
    assert list(ref.x) == ["PPNet", "EPPNet"] and list(ref.y) == [0.0965, 0.1534]  # only methods in the table
    assert fig.layout.yaxis.title.text == "r (Pearson)" and fig.layout.xaxis.title.text == "explainer"
    assert "CI" in fig.layout.title.text
    g = viz.bar_with_ci(pd.concat([df.assign(seed=0), df.assign(seed=1)]), by="seed", reference=None)
    bars = [t for t in g.data if t.showlegend is False]                       # + one grey legend key per seed
    assert len(bars) == 2 and len(g.data) == 4 and g.layout.barmode == "group"
    assert list(bars[0].marker.color) == [viz.METHOD_COLORS["ppnet"], viz.METHOD_COLORS["eppnet"]]
    assert viz.bar_with_ci(df, lo=None, hi=None).data[0].error_y.array is None


def test_line_with_band_and_training_curve():
    df = pd.DataFrame([dict(method=m, timestep=t, faithfulness=0.1*i, ci_low=0.1*i - 0.05, ci_high=0.1*i + 0.05)
                       for m in ("ppnet", "eppnet", "protopool") for i, t in enumerate((775, 555, 335, 115))])
    fig = viz.line_with_band(df)
    assert len(fig.data) == 6 and [t.fill for t in fig.data[::2]] == ["toself"]*3
    assert [t.name for t in fig.data[1::2]] == ["PPNet", "EPPNet", "ProtoPool"]
    assert fig.data[0].showlegend is False and fig.data[0].legendgroup == fig.data[1].legendgroup
    assert fig.layout.xaxis.autorange == "reversed" and fig.layout.yaxis.title.text == "faithfulness"
    assert len(fig.data[0].x) == 8 and fig.data[0].line.width == 0
    curve = pd.DataFrame({"step": np.arange(50), "loss": np.exp(-np.arange(50)/10)})
    c = viz.training_curve(curve, smooth=0.8, title="UNet loss")
    assert len(c.data) == 2 and c.layout.title.text == "UNet loss" and c.layout.xaxis.title.text == "training step"
    assert c.data[1].y[-1] > curve.loss.iloc[-1]    # the EMA lags a falling curve
    assert viz.training_curve(curve, log_y=False).layout.yaxis.type is None
    with pytest.raises(ValueError, match="no column"): viz.training_curve(curve, y="val_loss")


# ---------------------------------------------------------------- show / save

def test_notebook_html_embeds_plotlyjs_once(monkeypatch):
    monkeypatch.setattr(viz, "_PLOTLYJS_SHOWN", False)
    fig = go.Figure(go.Scatter(y=[1, 2]), layout_height=321)
    a, b = viz.notebook_html(fig), viz.notebook_html(fig)
    assert "* plotly.js v" in a and "* plotly.js v" not in b and "height:321px" in b and "cdn" not in b.lower()


def test_save_figure_html_and_png(tmp_path):
    run = RunDir(tmp_path/"run", get_profile("smoke"))
    fig = viz.bar_with_ci(pd.DataFrame({"method": ["ppnet"], "faithfulness": [0.3], "ci_low": [0.2], "ci_high": [0.4]}))
    if not HAVE_BROWSER: pytest.skip("no Chromium-family browser: PNG export cannot be tested (apt-get install -y chromium)")
    r = viz.save_figure(fig, run, "bar", width=400, height=300, scale=1)
    assert r["html"] == run/"figures"/"bar.html" and r["png"] == run/"figures"/"bar.png"
    html = r["html"].read_text()
    assert 'src="plotly.min.js"' in html and "Plotly.newPlot" in html and "Faithfulness per explainer" in html
    assert (run/"figures"/"plotly.min.js").stat().st_size > 1_000_000
    im = Image.open(r["png"]); assert im.size == (400, 300) and im.format == "PNG"
    assert len(set(np.asarray(im.convert("L")).ravel().tolist())) > 10     # not a blank image
    t0 = time.perf_counter()                                              # the persistent browser is warm now
    r2 = viz.save_figure(viz.training_curve(pd.DataFrame({"step": [0, 1], "loss": [1, .5]})), tmp_path, "curve")
    assert time.perf_counter() - t0 < 5 and r2["png"].exists()
    r3 = viz.save_figure(fig, tmp_path, "selfcontained", png=False, include_plotlyjs=True)
    assert r3["png"] is None and "* plotly.js v" in r3["html"].read_text()
    assert 'href="bar.png"' in html and 'href="png"' not in r3["html"].read_text()   # the page links its PNG when there is one


def test_save_figure_without_browser(no_browser, tmp_path):
    fig = go.Figure(go.Bar(y=[1]))
    with pytest.warns(viz.MissingBrowserWarning, match="apt-get install -y chromium"):
        r = viz.save_figure(fig, tmp_path, "f")
    assert r["png"] is None and r["html"].exists() and not (tmp_path/"figures"/"f.png").exists()
    with pytest.raises(RuntimeError, match="chromium"): viz.save_figure(fig, tmp_path, "f", png=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error"); viz.save_figure(fig, tmp_path, "g", png=False)   # silent
    for bad in ("", "a/b", "x.png", ".hidden"):
        with pytest.raises(ValueError, match="plain file stem"): viz.save_figure(fig, tmp_path, bad)


# ---------------------------------------------------------------- explorers

def test_trajectory_explorer_slider_updates_images():
    ts, xt, x0, nm = small_traj()
    ex = viz.trajectory_explorer(ts, xt, x0, nm)
    assert [lab for lab, _ in ex.slider.options] == [str(t) for t in ts] and ex.slider.label == str(ts[0])
    for i in (3, len(ts) - 1, 0):
        ex.slider.value = i
        np.testing.assert_allclose(ex.figure.data[0].z, xt[i, 0]); np.testing.assert_allclose(ex.figure.data[1].z, x0[i, 0])
        np.testing.assert_allclose(ex.figure.data[2].z, nm[i]); assert f"t = {ts[i]}" in ex.figure.layout.title.text
    assert isinstance(ex.figure, go.FigureWidget) and ex.children == (ex.slider, ex.figure)
    with pytest.raises(ValueError, match="x_t"): viz.trajectory_explorer(ts, xt[:, :, :5], x0, nm)


def explanations(n_gen=3, methods=("ppnet", "eppnet"), seeds=(0, 1), timesteps=(555, 0), P=4, N=10):
    return pd.DataFrame([dict(generated_id=g, method=m, seed=s, timestep=t, prototype=p, source_index=(g*7 + p*3 + s) % N,
                              nis=float(rng.uniform()), evidence=float(rng.normal()))
                         for g in range(n_gen) for m in methods for s in seeds for t in timesteps for p in range(P)])


def test_influence_explorer_dropdowns_update_view(tmp_path):
    gen = rng.uniform(-1, 1, (3, 1, 16, 16)); train = rng.uniform(-1, 1, (10, 1, 16, 16))
    tab = explanations()
    for m in ("ppnet", "eppnet"):
        for s in (0, 1):
            write_json(tmp_path/"protonets"/m/f"seed{s}"/"push.json",
                       [dict(prototype=p, source_index=p, box=[p, 2, p + 6, 10], distance=0.1, subject="s", slice=0, **{"class": 0})
                        for p in range(4)])
    push = viz.load_push_records(tmp_path)
    assert len(push) == 16 and set(push.columns) >= {"method", "seed", "prototype", "box"}
    ie = viz.influence_explorer(tab, gen, train, push, topk=3)
    assert [v for _, v in ie.method.options] == ["ppnet", "eppnet"] and ie.method.label == "PPNet"
    assert [v for _, v in ie.timestep.options] == [555, 0] and [v for _, v in ie.seed.options] == [0, 1]

    def check():
        sel = tab[(tab.generated_id == ie.image.value) & (tab.method == ie.method.value) & (tab.seed == ie.seed.value)
                  & (tab.timestep == ie.timestep.value)].nlargest(3, "nis")
        np.testing.assert_allclose(ie.figure.data[0].z, gen[ie.image.value, 0])
        for j, row in enumerate(sel.itertuples()):
            np.testing.assert_allclose(ie.figure.data[1 + 2*j].z, train[row.source_index, 0])
            p = row.prototype
            np.testing.assert_allclose(ie.figure.data[2 + 2*j].z, train[row.source_index, 0][p:p + 6, 2:10])
            assert f"<td>{row.nis:.4f}</td>" in ie.html.value
        assert list(ie.figure.data[-1].x) == pytest.approx(sel.nis.tolist())
        assert len(ie.figure.layout.shapes) == 3
        assert ie.figure.layout.shapes[0].x0 == 1.5 and ie.figure.layout.shapes[0].x1 == 9.5
    check()
    for widget, value in ((ie.image, 2), (ie.method, "eppnet"), (ie.seed, 1), (ie.timestep, 0)):
        before = (np.asarray(ie.figure.data[1].z).copy(), ie.html.value)
        widget.value = value
        check()
        assert ie.html.value != before[1]
    assert "EPPNet, seed 1, t = 0" in ie.html.value


def test_influence_explorer_minimal_inputs():
    "No seed/timestep/evidence columns, no push records, a dict of generated images, fewer rows than topk."
    tab = pd.DataFrame(dict(generated_id=["g1", "g1", "g2"], method="protopool", prototype=[0, 1, 0], source_index=[1, 2, 0],
                            nis=[0.3, 0.7, 0.5]))
    train = rng.uniform(-1, 1, (3, 1, 8, 8))
    ie = viz.influence_explorer(tab, {"g1": np.zeros((1, 8, 8)), "g2": np.ones((8, 8))}, train, topk=4)
    assert ie.seed is None and ie.timestep is None
    assert ie.selection().prototype.tolist() == [1, 0]
    np.testing.assert_allclose(ie.figure.data[2].z, train[2, 0])          # no box: the whole image is the patch
    assert ie.figure.data[5].z is None and len(ie.figure.layout.shapes) == 0
    ie.image.value = "g2"; np.testing.assert_allclose(ie.figure.data[0].z, np.ones((8, 8)))
    with pytest.raises(ValueError, match="empty"): viz.influence_explorer(tab.iloc[:0], np.zeros((1, 1, 8, 8)), train)
    with pytest.raises(ValueError, match="topk"): viz.influence_explorer(tab, np.zeros((1, 1, 8, 8)), train, topk=0)


# ---------------------------------------------------------------- tables and figures fit for a paper (issue 19)

import colorsys, itertools, re, subprocess, json


def _hsv(hex_color):
    h = hex_color.lstrip("#"); return colorsys.rgb_to_hsv(*(int(h[i:i + 2], 16)/255 for i in (0, 2, 4)))


def _hue_gap(a, b):
    "Distance of two hues on the colour circle (0..0.5)."
    d = abs(a - b) % 1; return min(d, 1 - d)


def test_one_colour_per_method_in_every_figure():
    "PPNet, EPPNet and ProtoPool have one colour each in the histogram, the bars, the lines and the faceted lines."
    methods = ("ppnet", "eppnet", "protopool")
    hist = viz.nis_histogram(pd.DataFrame({"method": np.repeat(methods, 10), "nis": rng.uniform(0, 1, 30)}))
    bars = viz.bar_with_ci(pd.DataFrame({"method": methods, "faithfulness": [.1, .2, .3], "ci_low": [0, .1, .2], "ci_high": [.2, .3, .4]}))
    long = pd.DataFrame([dict(method=m, variant=v, timestep=t, faithfulness=.1, ci_low=0., ci_high=.2)
                         for m in methods for v in ("trained", "shuffled NIS", "randomised explainer") for t in (600, 200)])
    lines = viz.line_with_band(long[long.variant == "trained"])
    facets = viz.line_with_band(long, by="variant", facet="method")
    grouped = viz.bar_with_ci(long[long.timestep == 600].rename(columns={"faithfulness": "f"}), y="f", by="variant")
    seen = {m: set() for m in methods}
    for i, m in enumerate(methods):
        seen[m].add(hist.data[i].marker.color)
        seen[m].add(bars.data[0].marker.color[i])
        seen[m].add(next(t.line.color for t in lines.data if t.name == viz.method_label(m)))
        seen[m].add(next(t.line.color for t in facets.data if t.xaxis == ("x" if i == 0 else f"x{i + 1}") and t.name == "trained"
                         and t.x[0] is not None))
        seen[m].add(next(t for t in grouped.data if t.showlegend is False and t.legendgroup == "trained").marker.color[i])
    for m in methods: assert seen[m] == {viz.METHOD_COLORS[m]}, (m, seen[m])
    assert len({viz.METHOD_COLORS[m] for m in methods}) == 3
    # the ground-truth figure's methods: a full-support NIS is a darker PPNet, the baselines have colours of their own
    assert _hue_gap(_hsv(viz.method_color("ppnet_full"))[0], _hsv(viz.METHOD_COLORS["ppnet"])[0]) < 0.01
    assert len({viz.method_color(m) for m in ("trak", "pixel_nn", "feature_nn", "random", "paper", *methods)}) == 8


def test_controls_are_in_their_methods_colour_family():
    "A sanity control is the method's hue, lighter, and dashed (hatched as a bar); never an unrelated colour."
    for m in ("ppnet", "eppnet", "protopool"):
        base = _hsv(viz.METHOD_COLORS[m])
        for v, dash, pattern in (("shuffled NIS", "dash", "/"), ("randomised explainer", "dot", "x"), ("random saliency", "dashdot", ".")):
            st = viz.series_style(m, variant=v)
            h, sat, val = _hsv(st["color"])
            assert _hue_gap(h, base[0]) < 0.01 and sat < base[1] and val >= base[2] - 1e-9, (m, v)
            assert (st["dash"], st["pattern"]) == (dash, pattern)
            assert viz.series_style(f"{viz.method_label(m)}: {v}")["color"] == st["color"]   # the same from a series name
    assert viz.method_color("not a method", 0) in viz.OTHER_COLORS and not set(viz.OTHER_COLORS) & set(viz.METHOD_COLORS.values())


def test_faithfulness_timesteps_is_small_multiples():
    "Nine series (3 explainers x trained + 2 controls): one panel per explainer, a three-entry legend, bands on the trained lines only."
    long = pd.DataFrame([dict(method=m, variant=v, timestep=t, mean=rng.normal(), ci95_low=-1., ci95_high=1.)
                         for m in ("ppnet", "eppnet", "protopool") for v in ("trained", "shuffled NIS", "randomised explainer")
                         for t in (775, 555, 115)])
    fig = viz.line_with_band(long, y="mean", lo="ci95_low", hi="ci95_high", by="variant", facet="method")
    lines = [t for t in fig.data if t.fill != "toself" and t.x[0] is not None]
    assert len(lines) == 9 and sorted({t.xaxis for t in lines}) == ["x", "x2", "x3"]
    for ax, m in (("x", "ppnet"), ("x2", "eppnet"), ("x3", "protopool")):
        panel = [t for t in lines if t.xaxis == ax]
        assert [t.line.color for t in panel] == [viz.series_style(m, variant=v)["color"] for v in ("trained", "shuffled NIS", "randomised explainer")]
    legend = [t.name for t in fig.data if t.showlegend is not False]
    assert legend == ["trained", "shuffled NIS", "randomised explainer"]
    assert [t.fill for t in fig.data].count("toself") == 3 and fig.layout.legend.orientation == "h"
    assert (fig.layout.yaxis2.matches, fig.layout.xaxis3.matches) == ("y", "x")         # shared axes: the panels compare
    assert [a.text for a in fig.layout.annotations if "PPNet" in a.text]
    with pytest.raises(ValueError, match="no column"): viz.line_with_band(long, facet="seed")


def _seen_lab(hex_color, opacity, background):
    from skimage.color import rgb2lab
    c = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])/255
    return rgb2lab((opacity*c + (1 - opacity)*background)[None, None])[0, 0]


def test_label_colours_are_distinguishable():
    "Over dark and mid-grey tissue at the overlay's opacity every pair of mask labels differs by CIEDE2000 >= 18 (body/lung >= 30)."
    from skimage.color import deltaE_ciede2000
    from mri_protodiff.phantom import LABELS
    names = [n for n in LABELS if n != "background"]
    cols = {n: viz.label_color(k, n) for k, n in enumerate(LABELS) if k}
    assert len(set(cols.values())) == len(names)
    def de(a, b): return min(deltaE_ciede2000(_seen_lab(cols[a], viz.MASK_OPACITY, bg), _seen_lab(cols[b], viz.MASK_OPACITY, bg))
                             for bg in (0.05, 0.5))
    worst = min(de(a, b) for a, b in itertools.combinations(names, 2))
    assert worst >= 18, worst
    assert de("body", "lung") >= 30
    # and the grid uses them, with a legend even for a single label
    masks = np.zeros((2, 8, 8), np.uint8); masks[:, 2:5, 2:5] = LABELS.index("lung")
    fig = viz.image_grid(rng.uniform(-1, 1, (2, 1, 8, 8)), masks, label_names=LABELS)
    key = [t for t in fig.data if t.type == "scatter"]
    assert [t.name for t in key] == ["lung"] and key[0].marker.color == cols["lung"] and fig.layout.showlegend


def test_training_curve_log_ticks_are_few():
    "A loss over 1.3 decades gets ticks at 1-2-5 (4 labels), not plotly's 16 digit labels; wider ranges get powers of ten."
    loss = pd.DataFrame({"step": np.arange(40), "loss": np.geomspace(1.1, 0.055, 40)})
    fig = viz.training_curve(loss, smooth=0.9)
    assert list(fig.layout.yaxis.tickvals) == [0.1, 0.2, 0.5, 1.0] and list(fig.layout.yaxis.ticktext) == ["0.1", "0.2", "0.5", "1"]
    assert viz.log_ticks(3e-5, 2.0) == [1e-4, 1e-3, 1e-2, 0.1, 1.0]
    assert len(viz.log_ticks(0.31, 0.38)) >= 2


def test_wrapped_titles_fit_their_figure():
    t = "Denoiser spatial sensitivity over the trajectory: Spearman(NIS share, 1-SSIM (region)) (mean, 95% CI)"
    fig = viz.line_with_band(pd.DataFrame(dict(method="ppnet", timestep=[1, 2], faithfulness=[0, 1], ci_low=0, ci_high=1)), title=t)
    lines = fig.layout.title.text.split("<br>")
    assert len(lines) == 2 and " ".join(lines) == t and max(map(len, lines))*9 <= fig.layout.width


def test_figure_html_resizes_to_the_page_and_the_page_has_a_title_and_a_way_back(no_browser, tmp_path):
    "The HTML drops the fixed width (autosize + responsive), keeps the proportions; the page has <title>, <h1> and a relative back link."
    imgs = rng.uniform(-1, 1, (12, 1, 16, 16))
    fig = viz.image_grid(imgs, ncols=12, title="12 prototypes", panel_px=115)       # 1460 px wide: wider than a 1280 px page
    assert fig.layout.width > 1280
    frag = viz.figure_html(fig, include_plotlyjs=False)
    spec = json.loads(re.search(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*(\[.*\]),\s*(\{.*\}),\s*(\{.*\})\s*\)", frag, re.S).group(2))
    assert "width" not in spec and "height" not in spec and spec.get("autosize") is True
    assert f"max-width:{fig.layout.width}px;aspect-ratio:{fig.layout.width}/{fig.layout.height}" in frag
    assert '"responsive": true' in frag
    r = viz.save_figure(fig, tmp_path, "prototypes_ppnet", png=False)
    page = r["html"].read_text()
    assert "<title>12 prototypes</title>" in page and "<h1>12 prototypes</h1>" in page
    assert '<a href="../index.html">' in page and page.startswith("<!DOCTYPE html>")
    assert '<script src="plotly.min.js"' in page and "cdn.plot.ly" not in page
    assert '<a href="' not in viz.figure_page(fig, back=None)
    assert fig.layout.width == 1460          # the figure itself (and so its PNG) keeps its design size


@pytest.mark.skipif(not HAVE_BROWSER, reason="needs a Chromium-family browser (apt-get install -y chromium)")
@pytest.mark.parametrize("window", [1280, 2000])
def test_wide_figure_page_fits_the_window_in_chromium(tmp_path, window):
    "Headless Chromium: the 12-column grid's page has no horizontal overflow at 1280 px; at 2000 px it is drawn at its design width."
    fig = viz.image_grid(rng.uniform(-1, 1, (12, 1, 16, 16)), ncols=12, title="12 prototypes", panel_px=115)
    r = viz.save_figure(fig, tmp_path, "wide", png=False)
    probe = r["html"].parent/"probe.html"
    probe.write_text(r["html"].read_text().replace("</body>", """<script>
setTimeout(function(){var g=document.querySelector('.plotly-graph-div'), s=g.querySelector('svg.main-svg');
document.body.setAttribute('data-probe', JSON.stringify({scroll: document.documentElement.scrollWidth, client: document.documentElement.clientWidth,
 svg: s ? s.getBoundingClientRect().width : -1, svgh: s ? s.getBoundingClientRect().height : -1}));}, 1500);</script></body>"""))
    out = subprocess.run([viz.find_browser(), "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={window},900",
                          "--virtual-time-budget=8000", "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r"data-probe=\"([^\"]+)\"", out.stdout)
    assert m, out.stderr[-2000:]
    p = json.loads(m.group(1).replace("&quot;", '"'))
    assert p["scroll"] <= p["client"], p                       # no horizontal scrollbar
    assert 0 < p["svg"] <= p["client"], p
    if window == 2000: assert p["svg"] == pytest.approx(fig.layout.width, abs=2)
    else: assert p["svgh"] == pytest.approx(p["svg"] * fig.layout.height / fig.layout.width, rel=0.03)   # proportions kept


def test_histogram_keeps_the_largest_value():
    "plotly's bins are half-open: the largest value (here every value of PPNet: an LDS of +1) must still fall in the last bin."
    fig = viz.nis_histogram({"ppnet": [1.0, 1.0, 1.0], "eppnet": [-1.0, 1.0, 0.2]}, nbins=20)
    b = fig.data[0].xbins
    assert b.start == -1.0 and int((1.0 - b.start) // b.size) == 19 and b.start + 20*b.size == pytest.approx(b.end)
