"""Figures a researcher can trust: every method appears in every histogram (mass outside the reference range
in overflow bars and in the legend), a method keeps its colour in every figure, display names on axes and
legends, GMM-40 titles inside the figure and a note on samples outside the box."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

import targets
from harness import figures

METHODS = ("idem", "bnem", "mcmc", "fab")


@pytest.fixture
def kept(monkeypatch):
    """Keep the figures open (the module closes them after saving) and return them."""
    figs = []
    close = matplotlib.pyplot.close
    monkeypatch.setattr(figures.plt, "close", lambda fig=None: figs.append(fig))
    yield figs
    for f in list(figs):
        close(f)


def _dw4_samples() -> dict[str, np.ndarray]:
    ref = targets.get("dw4").reference("test", 300).numpy()
    rng = np.random.default_rng(0)
    return {
        "idem": ref * 3.0,  # every energy and most distances far above the reference range (vanished before)
        "bnem": ref * 0.2,  # collapsed: distances below the range, energies far above
        "mcmc": ref + 0.05 * rng.standard_normal(ref.shape).astype(np.float32),
        "fab": ref[::-1].copy(),
    }


def _legend(ax) -> list[str]:
    lg = ax.get_legend()
    return [t.get_text() for t in lg.get_texts()] if lg is not None else []


def test_every_method_appears_in_every_histogram_with_its_colour(kept, tmp_path):
    samples = _dw4_samples()
    paths = figures.particle_histograms("dw4", samples, tmp_path / "e.png", tmp_path / "d.png")
    assert [p.exists() for p in paths] == [True, True]
    assert len(kept) == 2
    for fig in kept:
        ax = fig.axes[0]
        labels = _legend(ax)
        assert labels[0].startswith("reference (test)")
        for m in METHODS:
            name = figures._display("method", m)
            hits = [lb for lb in labels if lb.startswith(name + " ") or lb == name]
            assert len(hits) == 1, (name, labels)
            # its step histogram is drawn in the method's fixed colour
            colours = {to_hex(a.get_edgecolor()) for a in ax.patches if a.get_label() == hits[0]}
            assert colours == {figures.method_color(m)}, (m, colours)
        # out-of-range mass is stated, and drawn as bars in the grey overflow zones
        assert any("above range" in lb for lb in labels if lb.startswith("iDEM"))
        lo, hi = ax.get_xlim()
        assert any(p.get_x() >= hi - (hi - lo) * 0.2 and p.get_height() > 0 for p in ax.patches
                   if type(p).__name__ == "Rectangle")
    # the distance axis is clipped to the reference's range, not stretched to the outliers
    e_ax, d_ax = kept[0].axes[0], kept[1].axes[0]
    d_ref = targets.get("dw4").interatomic_distances(targets.get("dw4").reference("test", 300)).numpy()
    assert d_ax.get_xlim()[1] < 2.5 * d_ref.max()
    assert e_ax.get_xlabel() == "energy E(x)" and d_ax.get_xlabel() == "interatomic distance"


def test_a_method_keeps_its_colour_across_figures(kept, tmp_path):
    from harness.tables import METHOD_ORDER

    builtin = ("dds", "pis", "fab", "idem", "nem", "bnem", "as", "asbs", "mcmc", "pt")
    assert set(builtin) == set(METHOD_ORDER)
    assert len({figures.method_color(m) for m in builtin}) == len(builtin)  # every method its own colour
    assert not {figures.method_color(m) for m in builtin} & set(figures._EXTRA_PALETTE)
    assert figures.method_color("external:my-sampler") == figures.method_color("external:my-sampler")
    rows = []
    for m, base in (("idem", 2.0), ("mcmc", 1.0), ("pis", 3.0)):
        for c, (ev, sec) in enumerate(((1e3, 1.0), (1e4, 10.0), (1e5, 100.0))):
            rows.append(dict(target="dw4", method=m, checkpoint=c, protocol="idem", u_energy_evals=ev,
                             u_train_seconds=sec, m_x_w2=base / (c + 1), m_e_w2=base * 10 ** -c))
    df = pd.DataFrame(rows)
    figures.curves_figure(df, "dw4", ["x_w2", "e_w2"], tmp_path / "c.png", protocol="idem")
    fig = kept[-1]
    for ax in fig.axes:
        cols = {to_hex(line.get_color()) for line in ax.get_lines() if len(line.get_xdata()) > 1}
        assert cols == {figures.method_color(m) for m in ("idem", "mcmc", "pis")}
        assert ax.get_legend() is None  # one legend, outside the panels
        assert "_" not in ax.get_ylabel()  # display names, not raw keys
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {"iDEM", "MCMC", "PIS"}
    ylabels = {ax.get_ylabel() for ax in fig.axes}
    assert ylabels == {"x-W2 (idem)", "E-W2² (idem)"}
    # and the samples figure uses the same colours
    figures.gmm_samples_figure({"idem": np.zeros((10, 2)), "pis": np.ones((10, 2))}, tmp_path / "g.png")
    g = kept[-1]
    for ax, m in zip(g.axes, ("idem", "pis")):
        assert to_hex(ax.collections[-1].get_facecolor()[0]) == figures.method_color(m)


def test_gmm_panels_keep_titles_inside_and_count_samples_outside_the_box(kept, tmp_path):
    x = np.zeros((100, 2), dtype=np.float32)
    x[:7] = 80.0  # outside the plotted [-50, 50]^2
    samples = {m: x for m in ("dds", "pis", "fab", "idem", "nem", "bnem", "mcmc", "pt")}
    figures.gmm_samples_figure(samples, tmp_path / "g.png")
    fig = kept[-1]
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    fb = fig.bbox
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        tb = ax.title.get_window_extent(r)
        assert tb.y1 <= fb.y1 + 0.5 and tb.y0 >= fb.y0 and tb.x0 >= fb.x0 - 0.5 and tb.x1 <= fb.x1 + 0.5
        notes = [t.get_text() for t in ax.texts]
        assert "7 of 100 outside the box" in notes
