"""Plot colours: the frameworks stay clearly distinct for colour-blind readers and in greyscale, in every plot."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from compare import plots

# Machado, Oliveira & Fernandes (2009) simulation matrices at severity 1, applied to linear RGB.
SIMULATIONS = {
    "normal vision": np.eye(3),
    "protanopia": np.array([[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216],
                            [-0.003882, -0.048116, 1.051998]]),
    "deuteranopia": np.array([[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413],
                              [-0.011820, 0.042940, 0.968881]]),
    "tritanopia": np.array([[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602],
                            [0.004733, 0.691367, 0.303900]]),
}
MIN_DELTA_E = 50.0  # CIE76 distance: ~2.3 is just noticeable; the old red/orange pair was 23-37
MIN_LIGHTNESS_GAP = 20.0  # L* difference, so the pair also reads in greyscale (old pair: 14)


def _linear(colour: str) -> np.ndarray:
    srgb = np.array([int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return np.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)


def _lab(linear_rgb: np.ndarray) -> np.ndarray:
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    x = xyz @ np.clip(linear_rgb, 0, 1) / np.array([0.95047, 1.0, 1.08883])  # D65 white
    f = np.where(x > (6 / 29) ** 3, np.cbrt(x), x / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def distinct_for_everyone(a: str, b: str) -> list[str]:
    """Why colours ``a`` and ``b`` are too close (empty when they are clearly distinct)."""
    problems = []
    for name, matrix in SIMULATIONS.items():
        delta = float(np.linalg.norm(_lab(matrix @ _linear(a)) - _lab(matrix @ _linear(b))))
        if delta < MIN_DELTA_E:
            problems.append(f"{name}: delta E {delta:.1f}")
    gap = abs(_lab(_linear(a))[0] - _lab(_linear(b))[0])
    if gap < MIN_LIGHTNESS_GAP:
        problems.append(f"greyscale: lightness gap {gap:.1f}")
    return problems


def test_the_check_rejects_the_old_brand_colours():
    assert len(distinct_for_everyone("#ee4c2c", "#ff8f00")) >= 4  # torch red vs TensorFlow orange


def test_framework_colours_are_distinct_under_every_colour_blindness_and_in_greyscale():
    assert distinct_for_everyone(plots.COLORS["torch"], plots.COLORS["tensorflow"]) == []
    assert not set(plots._FALLBACK) & set(plots.COLORS.values())


@pytest.mark.parametrize("kind", ["bars", "curves"])
def test_every_plot_draws_a_framework_in_its_colour(tmp_path, monkeypatch, kind):
    import matplotlib.colors as mcolors
    from matplotlib.collections import PolyCollection

    drawn: dict[str, set[str]] = {}
    real_save = plots._save

    def save(fig, path):  # what the figure holds when it is written: legend entries and seed bands
        for ax in fig.axes:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                artist = handle.patches[0] if hasattr(handle, "patches") else handle
                colour = artist.get_facecolor() if hasattr(artist, "get_facecolor") else artist.get_color()
                drawn.setdefault(label, set()).add(mcolors.to_hex(colour))
            for band in (c for c in ax.collections if isinstance(c, PolyCollection)):  # bands across seeds
                drawn.setdefault("bands", set()).add(mcolors.to_hex(band.get_facecolor()[0]))
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    backends = ["torch", "tensorflow"]
    if kind == "bars":
        summary = pd.DataFrame({"model": ["m", "m"], "backend": backends, "train_img_s": [10.0, 12.0],
                                "train_img_s_seeds_ci_lo": [9.0, 11.0], "train_img_s_seeds_ci_hi": [11.0, 13.0],
                                "pipeline_img_s": [9.0, 10.0], "host_peak_rss_mib": [100.0, 120.0], "host_data_mib": [20.0, 20.0],
                                "device_peak_mib": [None, None], "device_data_mib": [None, None]})
        plots.plot_throughput(summary, backends, tmp_path / "t.png")
        plots.plot_memory(summary, backends, tmp_path / "m.png")
    else:
        curves = pd.DataFrame([{"model": "m", "backend": b, "seed": s, "epoch": e, "wall_s": e * 1.0,
                                "test_accuracy": 0.5, "train_loss": 1.0}
                               for b in backends for s in (0, 1) for e in (1, 2)])
        plots.plot_curves(curves, "m", backends, tmp_path / "c.png")
    bands = drawn.pop("bands", set())
    held = drawn.pop("dataset held", None)  # the hatched, unfilled overlay of the data's bytes: no framework's colour
    assert (held is not None) == (kind == "bars")
    assert drawn == {b: {plots.COLORS[b].lower()} for b in backends}
    assert bands == ({plots.COLORS[b].lower() for b in backends} if kind == "curves" else set())
