"""ucmkd plot: the feature-cloud figure of a run next to its ce run."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ucmkd.api import load_pair, run
from ucmkd.cli import main
from ucmkd.diagnose import least_squares_map
from ucmkd.engine import get_teacher
from ucmkd.errors import ConfigError, DataError
from ucmkd.feature_plot import find_ce_run, plot_features

from factories import small_config


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A ucmkd cell and its ce sibling in a grid layout (runs/<setting>/<method>/seed0)."""
    root = tmp_path_factory.mktemp("grid")
    cache = str(tmp_path_factory.mktemp("cache"))
    out = {}
    for m in ("ucmkd", "ce"):
        cfg = small_config(m, epochs=2)
        cfg.data.cache_dir = cache
        student, teacher_data = load_pair(cfg)
        teacher, info = get_teacher(cfg, teacher_data)
        out[m] = root / "runs" / "s" / m / "seed0"
        run(cfg, run_dir=out[m], student=student, teacher_data=teacher_data, teacher=teacher, teacher_info=info)
    return out


def test_the_ce_sibling_is_found_and_checked(grid, tmp_path):
    assert find_ce_run(grid["ucmkd"]) == grid["ce"].resolve()
    assert find_ce_run(grid["ce"]) is None
    assert find_ce_run(tmp_path) is None


def test_plot_writes_a_png_of_two_panels(grid, tmp_path):
    path = plot_features(grid["ucmkd"], out=tmp_path / "f.png")
    w, h = Image.open(path).size
    assert (w, h) == (1040, 500)            # two panels: figsize (2 x 5.2, 5.0) at 100 dpi
    one = plot_features(grid["ce"], out=tmp_path / "ce.png")
    assert Image.open(one).size == (520, 500)
    assert plot_features(grid["ucmkd"]) == grid["ucmkd"] / "features.png"     # next to the run
    assert (grid["ucmkd"] / "features.png").is_file()


def test_without_a_ce_run_one_is_trained_next_to_the_run(grid, tmp_path):
    import shutil

    lone = tmp_path / "lone"
    shutil.copytree(grid["ucmkd"], lone)
    logs = []
    plot_features(lone, out=tmp_path / "g.png", log=logs.append)
    assert (lone / "plot-ce" / "result.json").is_file() and "training one" in logs[0]
    logs.clear()
    plot_features(lone, out=tmp_path / "g.png", log=logs.append)     # reused: trained once
    assert not logs


def test_bad_inputs_are_named(grid, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no result.json"):
        plot_features(grid["ucmkd"], ce_dir=tmp_path)
    with pytest.raises(ConfigError, match="unknown value"):
        plot_features(grid["ucmkd"], method="pca")
    monkeypatch.setitem(sys.modules, "umap", None)
    with pytest.raises(ConfigError, match="umap-learn"):
        plot_features(grid["ucmkd"], method="umap")


def test_cli_plot(grid, tmp_path, capsys):
    assert main(["plot", str(grid["ucmkd"]), "--ce", str(grid["ce"]), "--out", str(tmp_path / "c.png")]) == 0
    assert Image.open(tmp_path / "c.png").size == (1040, 500)


def test_least_squares_map_against_numpy():
    """The alignment map is the ridge least-squares solution (numpy's lstsq on the augmented
    system as the oracle, float64)."""
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(40, 5, generator=g), torch.arange(40) % 4
    zt, yt = torch.randn(60, 3, generator=g), torch.arange(60) % 4
    lin = least_squares_map(z, y, zt, yt, 4, ridge=1e-3)
    mu = np.stack([zt[yt == c].double().numpy().mean(0) for c in range(4)])
    x, t = z.double().numpy(), mu[y.numpy()]
    xc, tc = x - x.mean(0), t - t.mean(0)
    lam = 1e-3 * len(x) * xc.var()
    a = np.vstack([xc, np.sqrt(lam) * np.eye(5)])
    w = np.linalg.lstsq(a, np.vstack([tc, np.zeros((5, 3))]), rcond=None)[0]
    b = t.mean(0) - x.mean(0) @ w
    # float32 weights of a float64 solution: relative rounding 2^-24 per entry
    np.testing.assert_allclose(lin.weight.detach().numpy(), w.T, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(lin.bias.detach().numpy(), b, rtol=1e-6, atol=1e-7)


def test_the_plot_reads_the_runs_recorded_draw_even_under_a_marginal_mismatch(tmp_path):
    """A run records its sampler's draw (draw.npz); the plot reads it. Under
    pairing.mismatch_ratio the labelled items depend on the teacher pool, so a redraw without the
    teacher would differ: the fallback for runs without draw.npz redraws with it."""
    from ucmkd.api import prepare
    from ucmkd.data.pairing import DRAW_FILE, read_draw
    from ucmkd.export import load_student
    from ucmkd.feature_plot import _labelled

    cfg = small_config("ucmkd", epochs=1)
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.pairing.mismatch_ratio = 0.5
    run(cfg, run_dir=tmp_path / "r")
    ctx = prepare(cfg)
    draw = read_draw(tmp_path / "r" / DRAW_FILE)
    assert np.array_equal(draw["labelled"], ctx.sampler.labelled)
    assert np.array_equal(draw["teacher_pool"], ctx.sampler.teacher_pool)
    loaded = load_student(tmp_path / "r")
    assert np.array_equal(_labelled(loaded, ctx.student_data, ctx.teacher_data), ctx.sampler.labelled)
    (tmp_path / "r" / DRAW_FILE).unlink()              # a run written before runs recorded their draw
    assert np.array_equal(_labelled(loaded, ctx.student_data, ctx.teacher_data), ctx.sampler.labelled)


def test_the_plot_maps_student_features_with_the_runs_learned_projector(tmp_path, monkeypatch):
    """Feature dims differ: the run learned a projector (Distiller.feature_map), which the plot
    rebuilds from the run's best-validation state, not a map of its own."""
    from ucmkd.engine.checkpoint import load_checkpoint
    from ucmkd.engine.shadow import CEShadow
    from ucmkd.export import load_student
    from ucmkd.feature_plot import _student_map

    monkeypatch.setattr(CEShadow, "select", lambda self, records, chosen: chosen)    # the distilled student
    cfg = small_config("ucmkd", epochs=1)
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.model.student_feat_dim = cfg.model.teacher_feat_dim + 4
    student, teacher_data = load_pair(cfg)
    teacher, info = get_teacher(cfg, teacher_data)
    run(cfg, run_dir=tmp_path / "r", student=student, teacher_data=teacher_data, teacher=teacher, teacher_info=info)
    loaded = load_student(tmp_path / "r")
    d_s = cfg.model.student_feat_dim
    fmap, how = _student_map(loaded, teacher, student, teacher_data, d_s)
    assert how == "the run's projector"
    best = load_checkpoint(tmp_path / "r" / "latest.pt")["best_states"]["student"]["extra"]
    z = torch.randn(5, d_s)
    w, b = best["projector.weight"], best["projector.bias"]
    assert torch.allclose(fmap(z), z @ w.T + b, atol=1e-6)
