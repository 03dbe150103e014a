"""Temperature scaling and reliability diagrams, in float64 NumPy on the host.

Temperature scaling (Guo et al., On Calibration of Modern Neural Networks, ICML 2017) fits one
scalar T > 0 on held-out data so that `log_softmax(logits / T)` has the smallest mean negative
log-likelihood; the argmax, hence accuracy, is unchanged. With `beta = 1 / T` and the logits
shifted per row by the true-class logit, `d_ic = z_ic - z_iy`, the NLL

  f(beta) = mean_i logsumexp_c(beta d_ic),  f' = mean_i E_p[d_i],  f'' = mean_i Var_p[d_i] >= 0

(p = softmax(beta d_i)) is convex, so Newton's method on beta, safeguarded by bisection inside a
bracket where f' changes sign, finds the minimizer to near machine precision. A per-row
constant leaves f unchanged, so log-probabilities work as well as logits. Logits may hold -inf
(a class of probability 0) except at a valid row's label; NaN and +inf are rejected. Rows
with `where` False are ignored and may hold anything.

Without `[N, K]` on the host: a head's `eval_stats(..., temperatures=TEMPERATURE_GRID)` gives
each example's label log-probability at every grid temperature, `fit_temperature_from_stats`
minimizes their mean NLL over the grid (refined between grid points), and
`save_reliability_figure_from_stats` draws from each example's confidence and correctness.
"""

import numbers
import os
import warnings

import jax.numpy as jnp
import numpy as np

from softmax_jax import metrics

# 32 temperatures log-spaced over fit_temperature's default bounds (0.05, 20): a step of
# log(400) / 31 = 0.19 in log T. `fit_temperature_from_stats` on this grid lands within 0.5% of
# `fit_temperature` (median 0.015%) on 60 random miscalibrated problems (tests/calibration_test.py).
TEMPERATURE_GRID = tuple(float(t) for t in np.geomspace(0.05, 20.0, 32))

_MAX_ITERS = 100
_RTOL = 1e-10  # Newton stops when a step moves beta (hence T) by less than this, relatively


def _check_logits(logits, name="logits"):  # -> float64 [N, K]
  z = np.asarray(logits)
  if z.ndim != 2 or z.shape[0] < 1 or z.shape[1] < 1:
    raise ValueError(f"{name} must be [N, num_classes] (rank 2, N >= 1, num_classes >= 1), "
                     f"got shape {z.shape}.")
  if not (jnp.issubdtype(z.dtype, jnp.floating) or jnp.issubdtype(z.dtype, jnp.integer)):
    raise ValueError(f"{name} must be real numbers, got dtype {z.dtype}.")
  return z.astype(np.float64)


def _check_labels(labels, where, n, k):  # -> int64 [N], bool [N]
  y = np.asarray(labels)
  if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"labels must be [N] = ({n},) integer class ids, got shape {y.shape} and "
                     f"dtype {y.dtype}.")
  w = np.ones(n, bool) if where is None else np.asarray(where)
  if w.shape != (n,) or w.dtype != np.bool_:
    raise ValueError(f"where must be [N] = ({n},) bool, got shape {w.shape} and dtype {w.dtype}.")
  valid = y[w]
  if valid.size and (valid.min() < 0 or valid.max() >= k):
    raise ValueError(f"labels must lie in [0, num_classes={k}), got values in "
                     f"[{valid.min()}, {valid.max()}].")
  return y.astype(np.int64), w


def _log_softmax(z):  # float64 [N, K] -> [N, K]; -inf stays -inf, a row without finite max: NaN
  m = np.max(z, axis=-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    return z - m - np.log(np.sum(np.exp(z - m), axis=-1, keepdims=True))


def _slope_curvature(d, beta):  # d: [n, K] with d[i, y_i] = 0 -> f'(beta), f''(beta)
  p = np.exp(_log_softmax(beta * d))  # 0 where d == -inf
  d0 = np.where(np.isfinite(d), d, 0.0)
  mean = np.sum(p * d0, axis=-1)
  var = np.sum(p * (d0 - mean[:, None]) ** 2, axis=-1)
  return float(np.mean(mean)), float(np.mean(var))


def fit_temperature(logits, labels, *, where=None, bounds=(0.05, 20.0)):
  """The temperature `T = argmin_T -mean_i log_softmax(logits_i / T)[labels_i]` (Guo et al. 2017).

  Fit on validation data, then `apply_temperature` to the test logits. The NLL is convex in
  `1 / T`; it is minimized by safeguarded Newton in float64 to relative precision ~1e-10 in T.
  When the minimizer lies outside `bounds` the nearer bound is returned and a `RuntimeWarning`
  says so: at the low bound the logits separate the data (nearly), so the NLL falls as T -> 0;
  at the high bound they are overconfident beyond what `bounds` allow (the warning gives the
  unconstrained minimizer, or says there is none when predicting uniformly, T -> inf, beats
  every finite T). The bounds are kept (the caller chose them) rather than widened; a fit at a
  bound still lowers the NLL versus T = 1 when 1 lies within `bounds` (convexity), but a
  lower NLL need not mean a lower ECE. When the logits carry no information (every row's
  finite entries equal) the NLL is flat and 1.0, clipped to `bounds`, is returned; so is 1.0
  whenever it lies within `bounds` and the fitted T does not lower the NLL (rounding ties).

  Args:
    logits: [N, num_classes] float logits or log-probabilities (a per-row constant is
      irrelevant). Finite or -inf in valid rows, finite at their labels.
    labels: [N] int true classes in [0, num_classes) for valid rows.
    where: [N] bool or None; False rows are excluded; at least one row must be valid.
    bounds: (low, high) with 0 < low < high < inf; the search range for T.

  Returns: float T in [low, high].

  Raises:
    ValueError: a bad shape or dtype, labels out of range, bad `bounds`, no valid row, or NaN
      or +inf (or -inf at the label) in a valid row (naming it).

  Warns:
    RuntimeWarning: T is a bound (the minimizer lies at or beyond it).
  """
  z = _check_logits(logits)
  y, w = _check_labels(labels, where, *z.shape)
  ok = (isinstance(bounds, (tuple, list)) and len(bounds) == 2
        and all(isinstance(b, numbers.Real) and not isinstance(b, bool) for b in bounds))
  if not ok or not 0 < bounds[0] < bounds[1] < np.inf:
    raise ValueError(f"bounds must be (low, high) with 0 < low < high < inf, got {bounds!r}.")
  t_lo, t_hi = float(bounds[0]), float(bounds[1])
  if not w.any():
    raise ValueError("where must select at least one row, got none.")
  z, y = z[w], y[w]
  bad = np.isnan(z) | (z == np.inf)
  if bad.any():
    raise ValueError(f"logits must be finite or -inf in valid rows, got NaN or +inf in row "
                     f"{np.flatnonzero(w)[np.argmax(bad.any(-1))]}.")
  z_true = z[np.arange(len(y)), y]
  if not np.isfinite(z_true).all():
    raise ValueError(f"logits must be finite at the labels (-inf gives an infinite NLL), got "
                     f"-inf in row {np.flatnonzero(w)[np.argmin(np.isfinite(z_true))]}.")
  d = z - z_true[:, None]
  if np.all((d == 0) | (d == -np.inf)):
    return float(np.clip(1.0, t_lo, t_hi))
  b_lo, b_hi = 1.0 / t_hi, 1.0 / t_lo  # beta = 1 / T; f' is increasing in beta
  if _slope_curvature(d, b_lo)[0] >= 0:
    t = t_hi
    if _slope_curvature(d, 0.0)[0] < 0:  # a finite minimizer beyond the bound
      where_min = f"T = {1.0 / _newton(d, 0.0, b_lo):.4g}"
    else:
      where_min = "none at a finite T (uniform predictions, T -> inf, score better)"
    _warn_at_bound(t, "high", f"the logits are overconfident; the unconstrained minimizer is "
                   f"{where_min}")
  elif _slope_curvature(d, b_hi)[0] <= 0:
    t = t_lo
    _warn_at_bound(t, "low", "the logits separate the data (nearly), so the NLL keeps falling "
                   "as T -> 0")
  else:
    t = float(np.clip(1.0 / _newton(d, b_lo, b_hi), t_lo, t_hi))
  if t_lo <= 1.0 <= t_hi and t != 1.0 and _nll(d, y, 1.0 / t) >= _nll(d, y, 1.0):
    return 1.0  # scaling does not lower the fitted objective
  return t


def _nll(d, y, beta):  # the mean NLL at T = 1 / beta
  return float(-np.mean(_log_softmax(beta * d)[np.arange(len(y)), y]))


def _newton(d, b_lo, b_hi):  # the root of f' in (b_lo, b_hi), f'(b_lo) < 0 < f'(b_hi) or b_lo = 0
  beta = float(np.clip(1.0, b_lo, b_hi)) if b_lo > 0 else 0.5 * b_hi
  for _ in range(_MAX_ITERS):
    g, h = _slope_curvature(d, beta)
    if g == 0:
      break
    b_lo, b_hi = (beta, b_hi) if g < 0 else (b_lo, beta)
    step = -g / h if h > 0 else np.inf
    if abs(step) <= _RTOL * beta:  # converged; the error left is ~ step**2
      beta += step
      break
    beta = beta + step if b_lo < beta + step < b_hi else 0.5 * (b_lo + b_hi)  # else bisect
    if b_hi - b_lo <= _RTOL * beta:
      break
  return beta


def _warn_at_bound(t, side, why):
  warnings.warn(f"temperature scaling stopped at its {side} bound T = {t:.4g}: {why}. The fit "
                f"lowers the NLL it minimizes, which need not lower the ECE; compare both before "
                f"and after.", RuntimeWarning, stacklevel=3)


def fit_temperature_from_stats(label_log_probs, temperatures, *, where=None):
  """The temperature minimizing the mean NLL, from label log-probabilities at G temperatures.

  `label_log_probs[i, g] = log_softmax(logits_i / temperatures[g])[label_i]`, e.g. a head's
  `eval_stats(..., temperatures=TEMPERATURE_GRID)['label_log_prob']` gathered over a split. The
  mean NLL `f_g` is minimized over the grid; around the best point the interpolating polynomial
  of `f` in log T through up to 5 grid points (the best and two on each side) is minimized
  between the best point's neighbours. On `TEMPERATURE_GRID` this is within 0.5% of
  `fit_temperature` (median 0.015%), as tested; a coarser grid is less precise (the error falls
  about as the step in log T to the fourth power). The result lies in `[temperatures[0],
  temperatures[-1]]`: when the grid's best point is an end, that end is returned (a minimizer
  beyond the grid, as `fit_temperature` gives a bound; one within the first step is not refined)
  with a `RuntimeWarning`; the grid is not widened (the statistics exist only at its
  temperatures: evaluate at a wider grid to look further). When 1.0 is a grid temperature and
  the fitted T does not lower the mean NLL below that column's, 1.0 is kept. In float64 on the
  host.

  Args:
    label_log_probs: [N, G] float, each example's label log-probability at each temperature.
    temperatures: [G] finite temperatures > 0, strictly increasing, G >= 3.
    where: [N] bool or None; False rows are excluded; at least one row must be valid.

  Returns: float T.

  Raises:
    ValueError: a bad shape or dtype (naming the argument), temperatures not increasing and
      positive, no valid row, or a NaN or -inf label log-probability in a valid row (naming it).

  Warns:
    RuntimeWarning: T is the first or last grid temperature.
  """
  t = np.asarray(temperatures, np.float64)
  if t.ndim != 1 or t.size < 3 or not np.all(np.isfinite(t) & (t > 0)) or np.any(np.diff(t) <= 0):
    raise ValueError(f"temperatures must be [G] finite, > 0 and strictly increasing with G >= 3 "
                     f"(e.g. TEMPERATURE_GRID), got {temperatures!r:.200}.")
  lp = np.asarray(label_log_probs)
  if lp.ndim != 2 or lp.shape[1] != t.size or lp.shape[0] < 1:
    raise ValueError(f"label_log_probs must be [N, G] = [N, {t.size}] (one column per "
                     f"temperature, N >= 1), got shape {lp.shape}.")
  if not jnp.issubdtype(lp.dtype, jnp.floating):
    raise ValueError(f"label_log_probs must be floating, got dtype {lp.dtype}.")
  w = np.ones(lp.shape[0], bool) if where is None else np.asarray(where)
  if w.shape != lp.shape[:1] or w.dtype != np.bool_:
    raise ValueError(f"where must be [N] = ({lp.shape[0]},) bool, got shape {w.shape} and dtype "
                     f"{w.dtype}.")
  if not w.any():
    raise ValueError("where must select at least one row, got none.")
  lp = lp.astype(np.float64)[w]
  bad = ~np.isfinite(lp).all(-1)
  if bad.any():
    raise ValueError(f"label_log_probs must be finite in valid rows (NaN features, or a label of "
                     f"probability 0), got {lp[np.argmax(bad)]} in row "
                     f"{np.flatnonzero(w)[np.argmax(bad)]}.")
  f, u = -np.mean(lp, axis=0), np.log(t)
  g = int(np.argmin(f))
  one = np.flatnonzero(t == 1.0)
  if g in (0, t.size - 1):  # the minimizer lies beyond the grid (or within its first step)
    if one.size and f[one[0]] <= f[g]:
      return 1.0
    _warn_at_bound(float(t[g]), "high" if g else "low", (
        "the mean NLL keeps falling towards the grid's end (overconfident logits)" if g else
        "the mean NLL keeps falling towards the grid's start (separable data)"))
    return float(t[g])
  lo, hi = max(g - 2, 0), min(g + 3, t.size)
  xs = np.linspace(u[g - 1], u[g + 1], 4001)
  poly = np.polyfit(u[lo:hi] - u[g], f[lo:hi], hi - lo - 1)
  values = np.polyval(poly, xs - u[g])
  best = xs[np.argmin(values)] if values.min() < f[g] else u[g]
  if one.size and f[one[0]] <= min(values.min(), f[g]):
    return 1.0  # scaling does not lower the fitted objective
  return float(np.clip(np.exp(best), t[0], t[-1]))


def apply_temperature(logits, temperature):
  """Temperature-scaled log-probabilities `log_softmax(logits / T)` in float64.

  Rows are independent: a row holding NaN or +inf (e.g. padding) comes out NaN; -inf stays -inf.

  Args:
    logits: [N, num_classes] float logits or log-probabilities.
    temperature: float T > 0 (finite), e.g. from `fit_temperature`.

  Returns: [N, num_classes] float64 normalized log-probabilities (logsumexp over classes 0).
  """
  z = _check_logits(logits)
  if (not isinstance(temperature, numbers.Real) or isinstance(temperature, bool)
      or not 0 < temperature < np.inf):
    raise ValueError(f"temperature must be a finite real number > 0, got {temperature!r}.")
  return _log_softmax(z / float(temperature))


def reliability_diagram(ax, log_probs, labels, *, num_bins=15, where=None, label=None,
                        counts_ax=None):
  """Draws a reliability diagram (Guo et al. 2017, Fig. 1) on a matplotlib Axes.

  Bars: per-bin accuracy over confidence bins `(b/B, (b+1)/B]`, more opaque the more examples
  the bin holds, its count written above it; outlined red: the gap from each bar's top to the
  bin's mean confidence; dashed: the diagonal of perfect calibration; on `counts_ax`, a strip of
  the per-bin counts (log scale), as sklearn's CalibrationDisplay draws below its curve. The
  numbers are `metrics.reliability_bins` and the legend's ECE `metrics.expected_calibration_error`,
  so the picture and the metric agree (ECE = count-weighted mean height of the shading).

  Args:
    ax: matplotlib.axes.Axes to draw on.
    log_probs: [N, num_classes] float normalized log-probabilities.
    labels: [N] int true classes in [0, num_classes) for valid rows.
    num_bins: int B >= 1.
    where: [N] bool or None; False rows are excluded.
    label: str or None, names the accuracy bars in the legend.
    counts_ax: matplotlib.axes.Axes or None; where given, the per-bin counts are drawn on it.

  Returns: float, the ECE drawn in the legend.
  """
  lp = _check_logits(log_probs, "log_probs")
  _, w = _check_labels(labels, where, *lp.shape)
  with np.errstate(invalid="ignore"):
    lse = np.logaddexp.reduce(lp[w], axis=-1)
  if lse.size and not np.all(np.abs(lse) < 0.05):  # loose enough for bfloat16
    raise ValueError("log_probs must be normalized (logsumexp over classes = 0 in valid rows), "
                     f"got {lse[np.argmax(~(np.abs(lse) < 0.05))]}; use apply_temperature.")
  bins = metrics.reliability_bins(log_probs, labels, num_bins=num_bins, where=where)
  ece = float(metrics.expected_calibration_error(log_probs, labels, num_bins=num_bins,
                                                 where=where))
  return _draw(ax, bins, ece, num_bins, label, counts_ax)


def reliability_diagram_from_stats(ax, confidence, correct, *, num_bins=15, where=None,
                                   label=None, counts_ax=None):
  """`reliability_diagram` from per-example statistics: `confidence: [N]` float (the largest
  probability, a head's `eval_stats` 'confidence' column) and `correct: [N]` bool (prediction ==
  label); the bins are `metrics.reliability_bins_from_stats`. Returns the ECE drawn."""
  bins = metrics.reliability_bins_from_stats(confidence, correct, num_bins=num_bins, where=where)
  count = np.asarray(bins["count"], np.float64)
  gap = np.abs(np.asarray(bins["accuracy"], np.float64) - np.asarray(bins["confidence"]))
  return _draw(ax, bins, float(np.sum(count * gap) / np.sum(count)), num_bins, label, counts_ax)


def _draw(ax, bins, ece, num_bins, label, counts_ax=None):  # the bars of both diagrams; returns ece
  """Accuracy bars (opacity grows with the bin's count, the count written above), outlined red
  gap bars from accuracy to mean confidence, the diagonal; with `counts_ax`, the count strip."""
  bins = {k: np.asarray(v) for k, v in bins.items()}
  left, width, shown = bins["edges"][:-1], 1.0 / num_bins, bins["count"] > 0
  acc, conf, count = bins["accuracy"][shown], bins["confidence"][shown], bins["count"][shown]
  weight = np.sqrt(count / count.max()) if count.size else count  # a 1-example bin is faint
  colours = [(0.12, 0.47, 0.71, 0.25 + 0.75 * w) for w in weight]
  ax.bar(left[shown], acc, width=width, align="edge", color=colours, edgecolor="black",
         linewidth=0.5, label=f"{label or 'accuracy'} (ECE = {ece:.4f})")
  ax.bar(left[shown] + 0.2 * width, conf - acc, bottom=acc, width=0.6 * width, align="edge",
         color=(0.84, 0.15, 0.16, 0.45), edgecolor="darkred", linewidth=1.2,
         label="gap to mean confidence")
  for x, top, n in zip(left[shown], np.maximum(acc, conf), count):
    ax.text(x + width / 2, min(top + 0.01, 0.93), f"{int(n)}", ha="center", va="bottom",
            fontsize=5.5 if num_bins > 10 else 7, rotation=90 if num_bins > 10 else 0)
  ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
  ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", aspect="equal" if counts_ax is None else "auto")
  ax.set_xlabel("confidence" if counts_ax is None else "")
  ax.legend(loc="upper left", fontsize="small")
  if counts_ax is not None:
    counts_ax.bar(left[shown], count, width=width, align="edge", color="0.55", edgecolor="black",
                  linewidth=0.5)
    counts_ax.set(xlim=(0, 1), xlabel="confidence", ylabel="count")
    counts_ax.set_yscale("log")
  return ece


def save_reliability_figure(path, panels, *, num_bins=15, where=None, title=None):
  """Writes one reliability diagram per panel side by side (Agg backend, format from `path`).

  Args:
    path: str output file, e.g. 'reliability.png'; missing parent folders are created.
    panels: non-empty dict title -> (log_probs [N, num_classes], labels [N]), e.g.
      {'before': (lp, y), 'after temperature scaling': (apply_temperature(lp, t), y)}.
    num_bins: int B >= 1.
    where: [N] bool or None, applied to every panel.
    title: str or None, the figure's title (the run's name); None: the name of the folder
      holding `path` (the workdir, for WORKDIR/reliability.png); '' for none. Each panel is
      titled with its key and its ECE; below it, a strip of the per-bin counts.

  Returns: path.
  """
  _check_panels(panels, "log_probs, labels")
  return _figure(path, panels, lambda ax, pair, counts_ax: reliability_diagram(
      ax, *pair, num_bins=num_bins, where=where, counts_ax=counts_ax), title)


def save_reliability_figure_from_stats(path, panels, *, where=None, num_bins=15, title=None):
  """`save_reliability_figure` from per-example statistics (no [N, K] on the host).

  Args:
    path: str output file, e.g. 'reliability.png'; missing parent folders are created.
    panels: non-empty dict title -> (confidence [N] float, correct [N] bool), e.g.
      {'before': (stats['confidence'][:, g1], stats['prediction'] == y),
       'after temperature scaling': (stats['confidence'][:, g_fit], stats['prediction'] == y)}
      from a head's `eval_stats` (temperature scaling keeps the prediction).
    where: [N] bool or None, applied to every panel.
    num_bins: int B >= 1.
    title: str or None, as in `save_reliability_figure`.

  Returns: path.
  """
  _check_panels(panels, "confidence, correct")
  return _figure(path, panels, lambda ax, pair, counts_ax: reliability_diagram_from_stats(
      ax, *pair, num_bins=num_bins, where=where, counts_ax=counts_ax), title)


def _check_panels(panels, pair: str) -> None:  # a non-empty dict of title -> 2-tuple
  if not isinstance(panels, dict) or not panels:
    raise ValueError(f"panels must be a non-empty dict title -> ({pair}), got {panels!r:.80}.")
  for title, value in panels.items():
    if not isinstance(value, (tuple, list)) or len(value) != 2:
      raise ValueError(f"panels[{title!r}] must be a ({pair}) pair, got "
                       f"{type(value).__name__}.")


def _figure(path, panels, draw, title):  # one panel per item, side by side; writes path
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(4.2 * len(panels), 5.4), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(2, len(panels), squeeze=False, sharex="col",
                      gridspec_kw={"height_ratios": [4, 1]})
  for ax, counts_ax, (name, pair) in zip(axes[0], axes[1], panels.items()):
    ece = draw(ax, pair, counts_ax)
    ax.set_title(f"{name}: ECE {ece:.4f}")
  if title is None:
    title = os.path.basename(os.path.dirname(os.path.abspath(path)))
  if title:
    fig.suptitle(title)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  return path
