"""Tests for softmax_jax.calibration: temperature scaling against float64 NumPy references."""

import os
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy.special import log_softmax, logsumexp

from softmax_jax import calibration
from softmax_jax import metrics

fit, apply, diagram = (calibration.fit_temperature, calibration.apply_temperature,
                       calibration.reliability_diagram)


def _tempered(t_true, n=20000, k=10, seed=0):
  """Logits z = 3 N(0, 1) [n, k] and labels drawn from softmax(z / t_true)."""
  rng = np.random.default_rng(seed)
  z = 3.0 * rng.normal(size=(n, k))
  p = np.exp(log_softmax(z / t_true, axis=-1))
  labels = np.argmax(p.cumsum(-1) > rng.random((n, 1)), axis=-1)
  return z, labels


def _nll(z, labels, t):
  """Reference mean NLL of log_softmax(z / t), float64, scipy logsumexp."""
  z = np.asarray(z, np.float64) / t
  return np.mean(logsumexp(z, axis=-1) - z[np.arange(len(labels)), labels])


def _grid_temperature(z, labels, lo=0.05, hi=20.0):
  """Brute force: a log-spaced grid over [lo, hi], then two finer grids around its best point."""
  grid = np.geomspace(lo, hi, 401)
  for _ in range(3):
    best = int(np.argmin([_nll(z, labels, t) for t in grid]))
    grid = np.linspace(grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)], 201)
  return grid[int(np.argmin([_nll(z, labels, t) for t in grid]))]


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5], ids=["sharp", "calibrated", "soft"])
def test_fit_temperature_recovers_true_temperature(t_true):
  # Labels drawn from softmax(z / T) make T the maximum-likelihood target. Its standard error
  # from the Fisher information in beta = 1/T, I = mean_i Var_{softmax(beta z_i)}(z_i), is
  # se(T) = T^2 / sqrt(N I); the fit must land within 4 se (z-scores over 5 seeds: |z| < 1.9).
  # t_true = 1 is a perfectly calibrated model: T must come out ~1.
  z, y = _tempered(t_true)
  p = np.exp(log_softmax(z / t_true, axis=-1))
  fisher = np.mean((p * z**2).sum(-1) - (p * z).sum(-1) ** 2)
  se = t_true**2 / np.sqrt(len(y) * fisher)
  assert 4 * se < 0.05 * t_true  # the tolerance is tight enough to mean something
  t = calibration.fit_temperature(z, y)
  assert isinstance(t, float)
  assert abs(t - t_true) < 4 * se, (t, t_true, se)


@pytest.mark.parametrize("case", ["tempered", "overconfident", "neg_inf_and_padding", "k2"])
def test_fit_temperature_matches_grid_search(case):
  rng = np.random.default_rng(3)
  if case == "tempered":
    z, y = _tempered(1.7, n=2000)
  elif case == "overconfident":  # labels are right only 60% of the time but z is very peaked
    z, y = 8.0 * rng.normal(size=(1500, 5)), rng.integers(0, 5, 1500)
    y = np.where(rng.random(1500) < 0.6, z.argmax(-1), y)
  elif case == "k2":
    z, y = _tempered(0.3, n=1000, k=2)
  else:
    z, y = _tempered(0.8, n=1500, k=6)
    zero = rng.random(z.shape) < 0.2  # zero-probability classes ...
    zero[np.arange(len(y)), y] = False  # ... never at the label
    z[zero] = -np.inf
  where = None
  want = _grid_temperature(np.where(np.isfinite(z), z, -1e300), y)
  if case == "neg_inf_and_padding":  # padding rows hold NaN and bad labels
    where = np.ones(len(y) + 50, bool)
    where[-50:] = False
    z = np.concatenate([z, np.full((50, z.shape[1]), np.nan)])
    y = np.concatenate([y, np.full(50, -7)])
  t = calibration.fit_temperature(z, y, where=where)
  np.testing.assert_allclose(t, want, rtol=1e-4)
  sel = slice(None) if where is None else where
  zs = np.where(np.isfinite(z[sel]), z[sel], -1e300)
  assert _nll(zs, y[sel], t) <= _nll(zs, y[sel], want) + 1e-12  # at least as good as the grid


def test_fit_temperature_is_invariant_to_row_constants():
  z, y = _tempered(1.9, n=3000)
  rng = np.random.default_rng(1)
  t = calibration.fit_temperature(z, y)
  np.testing.assert_allclose(calibration.fit_temperature(log_softmax(z, axis=-1), y), t,
                             rtol=1e-8)
  shifted = z + 1e3 * rng.normal(size=(len(y), 1))
  np.testing.assert_allclose(calibration.fit_temperature(shifted, y), t, rtol=1e-8)
  np.testing.assert_allclose(calibration.fit_temperature(z.astype(np.float32), y), t, rtol=1e-5)


def test_fit_temperature_at_the_bounds_and_flat():
  z, y = _tempered(3.0, n=3000)
  unbounded = calibration.fit_temperature(z, y, bounds=(0.1, 100.0))
  assert 2.5 < unbounded < 3.5
  with pytest.warns(RuntimeWarning, match=r"high bound T = 2: .*overconfident; the "
                    rf"unconstrained minimizer is T = {unbounded:.4g}"):
    assert calibration.fit_temperature(z, y, bounds=(0.1, 2.0)) == 2.0  # optimum above high
  with pytest.warns(RuntimeWarning, match=r"low bound T = 4: "):
    assert calibration.fit_temperature(z, y, bounds=(4.0, 9.0)) == 4.0  # optimum below low
  separable = np.eye(4)[[0, 1, 2, 3, 1]] * 5.0  # argmax always right: NLL falls as T -> 0
  with pytest.warns(RuntimeWarning, match=r"low bound T = 0.05: the logits separate the data"):
    assert calibration.fit_temperature(separable, np.array([0, 1, 2, 3, 1])) == 0.05
  # Wrong on average (the label scores low): uniform beats every finite T, so no minimizer.
  with pytest.warns(RuntimeWarning, match=r"high bound T = 20: .*none at a finite T"):
    assert calibration.fit_temperature(-separable, np.array([0, 1, 2, 3, 1])) == 20.0
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # within the bounds: no warning
    assert calibration.fit_temperature(np.zeros((6, 3)), np.arange(6) % 3) == 1.0  # flat NLL
    assert calibration.fit_temperature(np.zeros((6, 3)), np.arange(6) % 3, bounds=(2, 3)) == 2.0
    calibration.fit_temperature(z, y)


def test_fit_temperature_never_raises_the_nll_above_t_equals_1():
  z, y = _tempered(3.0, n=3000)
  nll = lambda t: metrics.nll(calibration.apply_temperature(z, t), y)
  with pytest.warns(RuntimeWarning):
    t = calibration.fit_temperature(z, y, bounds=(0.5, 1.5))
  assert t == 1.5 and nll(t) < nll(1.0)  # at the bound, still better than no scaling


@pytest.mark.parametrize("t_true", [0.4, 2.5])  # under- and overconfident logits
def test_temperature_scaling_lowers_ece_and_nll_and_keeps_accuracy(t_true):
  z_val, y_val = _tempered(t_true, n=5000, seed=1)
  z_test, y_test = _tempered(t_true, n=5000, seed=2)
  t = calibration.fit_temperature(z_val, y_val)
  before = log_softmax(z_test, axis=-1).astype(np.float32)
  after = calibration.apply_temperature(z_test, t).astype(np.float32)
  ece_before = metrics.expected_calibration_error(before, y_test)
  ece_after = metrics.expected_calibration_error(after, y_test)
  assert ece_before > 0.05 and ece_after < 0.5 * ece_before, (ece_before, ece_after)
  assert metrics.nll(after, y_test) < metrics.nll(before, y_test)
  np.testing.assert_array_equal(after.argmax(-1), before.argmax(-1))


def test_apply_temperature():
  z, _ = _tempered(1.0, n=50, k=7)
  z32 = z.astype(np.float32)
  got = calibration.apply_temperature(z32, 2.5)
  assert got.dtype == np.float64 and got.shape == (50, 7)
  np.testing.assert_allclose(got, log_softmax(z32.astype(np.float64) / 2.5, axis=-1), rtol=1e-12)
  np.testing.assert_allclose(logsumexp(got, axis=-1), 0.0, atol=1e-12)
  lp = log_softmax(z, axis=-1)
  np.testing.assert_allclose(calibration.apply_temperature(lp, 1), lp, atol=1e-12)
  np.testing.assert_allclose(calibration.apply_temperature(z + 1e4, 0.5),
                             log_softmax(2 * z, axis=-1), atol=1e-9)  # stable for big logits
  z[3, 2], z[5] = -np.inf, np.nan
  got = calibration.apply_temperature(z, 3.0)
  assert got[3, 2] == -np.inf and np.isfinite(np.delete(got[3], 2)).all()
  assert np.isnan(got[5]).all() and np.isfinite(np.delete(got, [3, 5], axis=0)).all()


def test_reliability_diagram_draws_the_metric():
  z, y = _tempered(2.0, n=2000, k=5)
  lp = log_softmax(z, axis=-1).astype(np.float32)
  fig = Figure()
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  ece = calibration.reliability_diagram(ax, lp, y, num_bins=10, label="raw")
  np.testing.assert_allclose(ece, metrics.expected_calibration_error(lp, y, num_bins=10))
  assert f"{ece:.4f}" in " ".join(t.get_text() for t in ax.get_legend().get_texts())
  bins = metrics.reliability_bins(lp, y, num_bins=10)
  shown = np.asarray(bins["count"]) > 0
  bars, gaps = ax.containers
  np.testing.assert_allclose([b.get_height() for b in bars], np.asarray(bins["accuracy"])[shown])
  np.testing.assert_allclose([b.get_y() + b.get_height() for b in gaps],
                             np.asarray(bins["confidence"])[shown], rtol=1e-6)
  np.testing.assert_allclose([b.get_x() for b in bars], np.flatnonzero(shown) / 10)
  counts = np.asarray(bins["count"])[shown]
  assert [t.get_text() for t in ax.texts] == [str(int(c)) for c in counts]  # per-bin counts
  alphas = [b.get_facecolor()[3] for b in bars]  # opacity grows with the count
  assert alphas[int(np.argmax(counts))] == pytest.approx(1.0)
  assert np.all(np.diff(np.array(alphas)[np.argsort(counts)]) >= -1e-12)
  assert all(g.get_facecolor()[:3] != b.get_facecolor()[:3] and g.get_linewidth() >= 1
             for g, b in zip(gaps, bars))  # a distinct, outlined gap bar


def test_reliability_figure_shows_counts_run_name_and_ece(tmp_path, monkeypatch):
  z, y = _tempered(2.0, n=500, k=5)
  lp = log_softmax(z, axis=-1)
  fig = Figure()
  FigureCanvasAgg(fig)
  ax, counts_ax = fig.subplots(2)
  calibration.reliability_diagram(ax, lp, y, num_bins=8, counts_ax=counts_ax)
  bins = metrics.reliability_bins(lp, y, num_bins=8)
  count = np.asarray(bins["count"])
  np.testing.assert_array_equal([b.get_height() for b in counts_ax.containers[0]], count[count > 0])
  saved = []
  savefig = Figure.savefig
  monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), savefig(fig, *a, **k)))
  path = str(tmp_path / "digits_arcface" / "reliability.png")
  calibration.save_reliability_figure(path, {"test": (lp, y)}, num_bins=8)
  calibration.save_reliability_figure(str(tmp_path / "b.png"), {"t": (lp, y)}, title="")
  ece = float(metrics.expected_calibration_error(lp, y, num_bins=8))
  assert saved[0].get_suptitle() == "digits_arcface" and saved[1].get_suptitle() == ""
  assert saved[0].axes[0].get_title() == f"test: ECE {ece:.4f}"
  assert saved[0].axes[1].get_yscale() == "log"  # the count strip below the diagram
  assert os.path.getsize(path) > 10_000


def test_save_reliability_figure(tmp_path):
  z, y = _tempered(2.0, n=1000, k=5)
  where = np.arange(1000) % 7 != 0
  t = calibration.fit_temperature(z, y, where=where)
  path = str(tmp_path / "figs" / "reliability.png")
  panels = {"before": (log_softmax(z, axis=-1), y),
            "after temperature scaling": (calibration.apply_temperature(z, t), y)}
  assert calibration.save_reliability_figure(path, panels, num_bins=12, where=where) == path
  with open(path, "rb") as f:
    data = f.read()
  assert len(data) > 10_000 and data.startswith(b"\x89PNG")


@pytest.mark.parametrize("call,match", [
    (lambda z, y: fit(z[0], y), r"logits must be \[N, num_classes\].*\(3,\)"),
    (lambda z, y: fit(z[:0], y[:0]), r"logits must be .*N >= 1.*\(0, 3\)"),
    (lambda z, y: fit(z.astype(bool), y), r"logits must be real.*bool"),
    (lambda z, y: fit(z, y[:3]), r"labels must be \[N\] = \(4,\).*\(3,\)"),
    (lambda z, y: fit(z, y * 1.0), r"labels must be .*integer.*float64"),
    (lambda z, y: fit(z, y + 1), r"labels must lie in \[0, num_classes=3\).*\[1, 3\]"),
    (lambda z, y: fit(z, y - 1), r"labels must lie in .*\[-1, 1\]"),
    (lambda z, y: fit(z, y, where=np.ones(4)), r"where must be .*float"),
    (lambda z, y: fit(z, y, where=np.zeros(4, bool)), r"where must select"),
    (lambda z, y: fit(np.where(z > 2.5, np.nan, z), y), r"logits must be finite or -inf.*row 1"),
    (lambda z, y: fit(np.where(z > 2.5, np.inf, z), y), r"NaN or \+inf in row 1"),
    (lambda z, y: fit(np.where(z < -1, -np.inf, z), y), r"finite at the labels.*row 3"),
    (lambda z, y: fit(z, y, bounds=(0.0, 2.0)), r"bounds must be .*got \(0.0, 2.0\)"),
    (lambda z, y: fit(z, y, bounds=(3, 2)), r"bounds must be .*0 < low < high"),
    (lambda z, y: fit(z, y, bounds=(1, np.inf)), r"bounds must be .*inf\)"),
    (lambda z, y: fit(z, y, bounds=1.0), r"bounds must be .*got 1.0"),
    (lambda z, y: apply(z, 0.0), r"temperature must be .*> 0, got 0.0"),
    (lambda z, y: apply(z, -1), r"temperature must be .*got -1"),
    (lambda z, y: apply(z, np.nan), r"temperature must be .*got nan"),
    (lambda z, y: apply(z, "2"), r"temperature must be .*got '2'"),
    (lambda z, y: apply(z[None], 1.0), r"logits must be .*\(1, 4, 3\)"),
    (lambda z, y: diagram(None, z, y), r"log_probs must be normalized"),
    (lambda z, y: diagram(None, z[0], y), r"log_probs must be \[N, num"),
    (lambda z, y: diagram(None, log_softmax(z, -1), y + 1), r"labels must lie"),
    (lambda z, y: calibration.save_reliability_figure("x.png", {}), r"panels must be a non-empty"),
    (lambda z, y: calibration.save_reliability_figure("x.png", {"a": z}),
     r"panels\['a'\] must be a \(log_probs, labels\) pair, got ndarray"),
])
def test_bad_inputs_raise(call, match):
  z = np.array([[0.0, 1.0, 2.0], [3.0, 0.5, 0.0], [1.0, 1.0, 1.0], [-2.0, 0.0, 0.3]])
  y = np.array([0, 1, 2, 0])
  with pytest.raises(ValueError, match=match):
    call(z, y)


def test_accepts_jax_and_bfloat16_arrays():
  z, y = _tempered(1.5, n=2000, k=4)
  want = calibration.fit_temperature(z, y)
  np.testing.assert_allclose(calibration.fit_temperature(jnp.asarray(z), jnp.asarray(y)), want,
                             rtol=1e-6)  # float32 on device
  got16 = calibration.fit_temperature(jnp.asarray(z, jnp.bfloat16), y)
  np.testing.assert_allclose(got16, want, rtol=2e-2)


def _label_log_probs(z, y, temperatures):
  """[N, G] float64 log_softmax(z / t)[label] per temperature (what eval_stats returns)."""
  return np.stack([log_softmax(z / t, axis=-1)[np.arange(len(y)), y] for t in temperatures], -1)


def test_temperature_grid_is_log_spaced_within_fit_temperatures_bounds():
  grid = np.asarray(calibration.TEMPERATURE_GRID)
  assert grid.ndim == 1 and len(grid) >= 3
  np.testing.assert_allclose(grid[[0, -1]], [0.05, 20.0])
  np.testing.assert_allclose(np.diff(np.log(grid)), np.log(grid[1] / grid[0]), rtol=1e-9)


@pytest.mark.filterwarnings("ignore:temperature scaling stopped")  # random problems hit bounds
def test_fit_temperature_from_stats_is_within_one_percent_of_fit_temperature():
  # 60 random problems: sharp to soft logits, 2 to 200 classes, accurate to near-random labels.
  rng = np.random.default_rng(0)
  errors = []
  for _ in range(60):
    n, k, scale = rng.integers(50, 2000), rng.integers(2, 200), np.exp(rng.uniform(-2, 3))
    z = rng.normal(size=(n, k)) * scale
    y = np.where(rng.random(n) < rng.uniform(0.1, 0.9), z.argmax(-1), rng.integers(0, k, n))
    where = rng.random(n) < 0.9
    lp = _label_log_probs(z, y, calibration.TEMPERATURE_GRID)
    lp[~where] = np.nan  # padding rows are ignored
    got = calibration.fit_temperature_from_stats(lp.astype(np.float32),
                                                 calibration.TEMPERATURE_GRID, where=where)
    errors.append(abs(got / calibration.fit_temperature(z, y, where=where) - 1))
  assert max(errors) < 0.01, max(errors)
  assert np.median(errors) < 0.001, np.median(errors)


@pytest.mark.parametrize("t_true", [0.5, 1.0, 2.5])
def test_fit_temperature_from_stats_recovers_true_temperature(t_true):
  z, y = _tempered(t_true)
  t = calibration.fit_temperature_from_stats(_label_log_probs(z, y, calibration.TEMPERATURE_GRID),
                                             calibration.TEMPERATURE_GRID)
  assert isinstance(t, float)
  np.testing.assert_allclose(t, calibration.fit_temperature(z, y), rtol=0.005)


def test_fit_temperature_from_stats_ends_of_the_grid():
  z, y = _tempered(1.0, n=500, k=4)
  grid = (0.5, 0.7, 1.0, 1.4, 2.0)
  assert calibration.fit_temperature_from_stats(_label_log_probs(z, y, grid), grid) == \
      pytest.approx(calibration.fit_temperature(z, y), rel=0.02)
  separable = np.eye(4)[y] * 5.0  # perfectly separated: the NLL falls as T -> 0
  with pytest.warns(RuntimeWarning, match=r"low bound T = 0.5: .*grid's start"):
    assert calibration.fit_temperature_from_stats(
        _label_log_probs(separable, y, grid), grid) == 0.5
  with pytest.warns(RuntimeWarning, match=r"high bound T = 0.2: .*grid's end"):
    assert calibration.fit_temperature_from_stats(
        _label_log_probs(z, y, (0.05, 0.1, 0.2)), (0.05, 0.1, 0.2)) == 0.2
  # No information (every column equal): the best point is the first, but T = 1 is kept.
  flat = np.tile(np.log(np.full((6, 1), 0.25)), (1, 5))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert calibration.fit_temperature_from_stats(flat, grid) == 1.0


@pytest.mark.parametrize("call,match", [
    (lambda lp: calibration.fit_temperature_from_stats(lp, (1.0, 2.0)),
     r"temperatures must be \[G\] .*G >= 3"),
    (lambda lp: calibration.fit_temperature_from_stats(lp, (1.0, 3.0, 2.0)), r"strictly incr"),
    (lambda lp: calibration.fit_temperature_from_stats(lp, (0.0, 1.0, 2.0)), r"> 0"),
    (lambda lp: calibration.fit_temperature_from_stats(lp[:, :2], (1.0, 2.0, 3.0)),
     r"label_log_probs must be \[N, G\] = \[N, 3\].*\(4, 2\)"),
    (lambda lp: calibration.fit_temperature_from_stats(lp.astype(int), (1.0, 2.0, 3.0)),
     r"label_log_probs must be floating"),
    (lambda lp: calibration.fit_temperature_from_stats(lp, (1.0, 2.0, 3.0), where=np.ones(4)),
     r"where must be \[N\] = \(4,\) bool"),
    (lambda lp: calibration.fit_temperature_from_stats(lp, (1.0, 2.0, 3.0),
                                                       where=np.zeros(4, bool)), r"where must sel"),
    (lambda lp: calibration.fit_temperature_from_stats(np.where(lp < -1.5, np.nan, lp),
                                                       (1.0, 2.0, 3.0)), r"finite in valid.*row"),
    (lambda lp: calibration.save_reliability_figure_from_stats("x.png", {}), r"non-empty"),
    (lambda lp: calibration.save_reliability_figure_from_stats("x.png", {"a": lp}),
     r"panels\['a'\] must be a \(confidence, correct\) pair"),
])
def test_from_stats_bad_inputs_raise(call, match):
  lp = -np.array([[0.1, 0.5, 0.9], [1.0, 1.2, 1.3], [2.0, 1.5, 1.4], [0.3, 0.6, 0.8]])
  with pytest.raises(ValueError, match=match):
    call(lp)


def test_reliability_diagram_from_stats_draws_what_the_log_prob_diagram_draws():
  z, y = _tempered(2.0, n=2000, k=5)
  lp = log_softmax(z, axis=-1).astype(np.float32)
  where = np.arange(2000) % 5 != 0
  axes = []
  for draw in (lambda ax: calibration.reliability_diagram(ax, lp, y, num_bins=10, where=where),
               lambda ax: calibration.reliability_diagram_from_stats(
                   ax, np.exp(lp.max(-1)), lp.argmax(-1) == y, num_bins=10, where=where)):
    fig = Figure()
    FigureCanvasAgg(fig)
    axes.append(fig.subplots())
    axes[-1].ece = draw(axes[-1])
  np.testing.assert_allclose(axes[1].ece, axes[0].ece, rtol=1e-5)
  np.testing.assert_allclose(axes[1].ece, metrics.expected_calibration_error(
      lp, y, num_bins=10, where=where), rtol=1e-5)
  for a, b in zip(*(ax.containers for ax in axes)):
    np.testing.assert_allclose([r.get_height() for r in b], [r.get_height() for r in a],
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose([r.get_x() for r in b], [r.get_x() for r in a])


def test_save_reliability_figure_from_stats(tmp_path):
  z, y = _tempered(2.0, n=1000, k=5)
  where = np.arange(1000) % 7 != 0
  grid = calibration.TEMPERATURE_GRID
  conf = np.stack([np.exp(log_softmax(z / t, axis=-1).max(-1)) for t in grid], -1)
  t = calibration.fit_temperature_from_stats(_label_log_probs(z, y, grid), grid, where=where)
  fitted = int(np.argmin(np.abs(np.log(np.asarray(grid) / t))))
  correct = z.argmax(-1) == y
  path = str(tmp_path / "figs" / "reliability.png")
  panels = {"before": (conf[:, grid.index(min(grid, key=lambda g: abs(g - 1)))], correct),
            "after temperature scaling": (conf[:, fitted], correct)}
  assert calibration.save_reliability_figure_from_stats(path, panels, where=where,
                                                        num_bins=12) == path
  with open(path, "rb") as f:
    data = f.read()
  assert len(data) > 10_000 and data.startswith(b"\x89PNG")
