"""Instruments for the softmax bottleneck, in float64 NumPy on the host.

- `log_prob_rank`: the numerical rank and normalized singular spectrum of a log-probability
  matrix `[N contexts, K classes]`, row-centred. Yang et al. (2018) call a model's log-probability
  matrices equivalent up to a per-row shift (the normalizer); subtracting each row's mean gives the
  member of that family with the smallest rank, so that is the rank reported. A softmax over
  `h @ W + b` with features of width d gives `H W C + 1 (b C)`, `C = I - 1 1^T / K`: rank <= d + 1
  (<= d without a bias), whatever N and K.
- `matrix_spectrum`, `output_layer_spectrum`, `effective_rank`: the singular spectrum of any
  matrix, e.g. the output layer `W: [d, K]`, and its entropy effective rank; `anisotropy`: the mean
  cosine similarity of the final features (Godey et al. 2024 relate a flat head spectrum and
  anisotropic features to the saturation of small language models).
- `unargmaxable_classes`: classes that are never the argmax of `h @ W + b`, whatever the features
  (Grivas et al. 2022): an exact linear program per class, after cheap probes that prove most
  classes argmaxable.

**Tolerance.** A singular value counts toward the rank when it is larger than `tol`, by default
NumPy's `matrix_rank` rule `S.max() * max(N, K) * eps` with `eps` the machine epsilon of the
dtype the matrix was COMPUTED in: float32 log-probabilities from a device carry rounding errors
of ~1e-7 relative, which float64's eps would count as rank. Pass `eps=` when a float64 array
holds float32 results, `rtol=` for `S.max() * rtol`, or `tol=` for an absolute threshold.

References:
  Yang, Dai, Salakhutdinov, Cohen. Breaking the softmax bottleneck: a high-rank RNN language
  model. ICLR 2018.
  Godey, de la Clergerie, Sagot. Why do small language models underperform? Studying language
  model saturation via the softmax bottleneck. 2024.
  Grivas, Bogoychev, Lopez. Low-rank softmax can have unargmaxable classes in theory but rarely
  in practice. ACL 2022.
  Roy, Vetterli. The effective rank: a measure of effective dimensionality. EUSIPCO 2007.
"""

from typing import Any, Dict, Optional, Tuple

import numpy as np
from scipy import optimize

from softmax_jax.geometry import l2_normalize

_PROBE_BLOCK = 1 << 22  # float64 scores per block of the probes (32 MiB)


def _finite_real(name: str, a: np.ndarray) -> np.ndarray:
  """`a` (any shape) as finite real float64, or a ValueError naming `name` and the first bad entry."""
  if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
    raise ValueError(f'{name} must be real numbers, got dtype {a.dtype}.')
  a = a.astype(np.float64)
  if not np.isfinite(a).all():
    bad = np.argwhere(~np.isfinite(a))[0]
    raise ValueError(f'{name} must be finite, got {int((~np.isfinite(a)).sum())} NaN or inf '
                     f'entries, the first at {tuple(int(i) for i in bad)}.')
  return a


def _real_matrix(name: str, x, *, min_rows: int = 1) -> np.ndarray:
  """`x` as a finite real float64 `[N, K]` array, or a ValueError naming `name`."""
  a = np.asarray(x)
  if a.ndim != 2 or a.shape[0] < min_rows or a.shape[1] < 1:
    raise ValueError(f'{name} must be a matrix [N, K] with N >= {min_rows} and K >= 1, '
                     f'got shape {a.shape}.')
  return _finite_real(name, a)


def _machine_eps(dtype) -> float:
  if np.issubdtype(dtype, np.integer):
    return float(np.finfo(np.float64).eps)
  try:
    return float(np.finfo(dtype).eps)
  except ValueError:  # bfloat16 and other ml_dtypes types
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return float(ml_dtypes.finfo(dtype).eps)


def effective_rank(singular_values) -> float:
  """Entropy effective rank `exp(-sum_i p_i log p_i)`, `p = s / sum(s)` (Roy & Vetterli 2007).

  Between 1 (one nonzero singular value) and the number of values (all equal); 0 for all zeros.

  Args:
    singular_values: [r] non-negative.

  Returns:
    A float.

  Raises:
    ValueError: `singular_values` not a non-negative finite vector.
  """
  s = np.asarray(singular_values, dtype=np.float64)
  if s.ndim != 1 or not np.isfinite(s).all() or (s < 0).any():
    raise ValueError(f'singular_values must be a finite non-negative vector [r], got shape '
                     f'{s.shape} with min {s.min() if s.size else None}.')
  total = s.sum()
  if total == 0:
    return 0.0
  p = s[s > 0] / total
  return float(np.exp(-np.sum(p * np.log(p))))


def matrix_spectrum(matrix, *, center_rows: bool = False, tol: Optional[float] = None,
                    rtol: Optional[float] = None, eps: Optional[float] = None) -> Dict[str, Any]:
  """Singular spectrum and numerical rank of `matrix: [N, K]`, in float64.

  Args:
    matrix: [N, K] real, finite.
    center_rows: subtract each row's mean first (`matrix @ (I - 1 1^T / K)`).
    tol: absolute threshold: rank = #{s > tol}. Exclusive with `rtol`.
    rtol: relative threshold: tol = `rtol * S.max()`.
    eps: machine epsilon of the default rule `S.max() * max(N, K) * eps`; default that of
      `matrix`'s dtype (float32: 1.19e-7), float64's for integers.

  Returns:
    dict with 'rank' (int), 'tolerance' (the absolute threshold used), 'rule' (how it was set,
    in words), 'singular_values' ([min(N, K)] float64, descending), 'normalized_spectrum'
    (`s / s[0]`; zeros when `s[0] == 0`), 'effective_rank' (`effective_rank(s)`), 'gap_index'
    (the i, 1-based, with the largest `s_i / s_{i+1}`: where the spectrum falls off a cliff, e.g.
    d + 1 for float32 softmax log-probabilities, which the tolerance rule may be too coarse to
    see; among values above float64's round-off `S.max() * max(N, K) * 2.2e-16`, so exact
    deficiencies such as centring's or duplicate rows' do not count; 0 when fewer than 2 values
    are above it), 'shape'.

  Raises:
    ValueError: a bad `matrix`, or `tol`/`rtol`/`eps` negative, non-finite or both `tol` and
      `rtol` given.
  """
  name = 'log_probs' if center_rows else 'matrix'
  dtype = np.asarray(matrix).dtype
  a = _real_matrix(name, matrix)
  if tol is not None and rtol is not None:
    raise ValueError(f'give tol or rtol, not both; got tol={tol}, rtol={rtol}.')
  for key, value in (('tol', tol), ('rtol', rtol), ('eps', eps)):
    if value is not None and not (np.isfinite(value) and value >= 0):
      raise ValueError(f'{key} must be a finite number >= 0, got {value}.')
  if center_rows:
    a = a - a.mean(axis=1, keepdims=True)
  s = np.linalg.svd(a, compute_uv=False)
  top = float(s[0]) if s.size else 0.0
  if tol is not None:
    threshold, rule = float(tol), f'tol = {tol:.3g} (absolute)'
  elif rtol is not None:
    threshold, rule = rtol * top, f'S.max() * rtol, rtol = {rtol:.3g}'
  else:
    e = _machine_eps(dtype) if eps is None else float(eps)
    threshold = top * max(a.shape) * e
    rule = f'S.max() * max(N, K) * eps, eps = {e:.3g}' + ('' if eps is not None else f' ({dtype})')
  return {'rank': int(np.sum(s > threshold)), 'tolerance': float(threshold), 'rule': rule,
          'singular_values': s, 'normalized_spectrum': s / top if top > 0 else np.zeros_like(s),
          'effective_rank': effective_rank(s),
          'gap_index': _gap_index(s[s > top * max(a.shape) * np.finfo(np.float64).eps]),
          'shape': tuple(int(n) for n in a.shape)}


def _gap_index(s: np.ndarray) -> int:
  """1-based i maximizing s_i / s_{i+1} of positive descending `s` (0: fewer than 2 values)."""
  return int(np.argmax(s[:-1] / s[1:])) + 1 if len(s) >= 2 else 0


def log_prob_rank(log_probs, *, tol: Optional[float] = None, rtol: Optional[float] = None,
                  eps: Optional[float] = None) -> Dict[str, Any]:
  """Numerical rank and normalized spectrum of a row-centred log-probability matrix.

  `rank(L - rowmean(L))`, the smallest rank among `L + lambda 1^T` (Yang et al. 2018); a softmax
  over `h @ W + b` with features of width d has rank <= d + 1.

  Args:
    log_probs: [N, K] real, finite: N contexts, K classes (a head's `log_prob`).
    tol, rtol, eps: the threshold, as `matrix_spectrum` (default `S.max() * max(N, K) * eps`
      with the eps of `log_probs`' dtype).

  Returns:
    `matrix_spectrum(log_probs, center_rows=True, ...)`'s dict.

  Raises:
    ValueError: as `matrix_spectrum`, naming `log_probs`.

  References:
    Yang et al. Breaking the softmax bottleneck: a high-rank RNN language model. ICLR 2018.
  """
  return matrix_spectrum(log_probs, center_rows=True, tol=tol, rtol=rtol, eps=eps)


def output_layer_spectrum(kernel, *, tol: Optional[float] = None, rtol: Optional[float] = None,
                          eps: Optional[float] = None) -> Dict[str, Any]:
  """Singular spectrum of an output layer `kernel: [d, K]` (Godey et al. 2024, Sec. 4).

  A head whose normalized spectrum falls off early spends few directions on the classes.

  Args:
    kernel: [d, K] real, finite.
    tol, rtol, eps: as `matrix_spectrum`.

  Returns:
    `matrix_spectrum(kernel, ...)`'s dict.

  References:
    Godey et al. Why do small language models underperform? 2024.
  """
  return matrix_spectrum(_real_matrix('kernel', kernel), tol=tol, rtol=rtol,
                         eps=_machine_eps(np.asarray(kernel).dtype) if eps is None else eps)


def anisotropy(features) -> float:
  """Mean cosine similarity between the features of distinct contexts, `[n, d] -> float`.

  `sum_{i != j} u_i . u_j / (n (n - 1))` with `u = l2_normalize(features)` (a zero row counts as
  cosine 0), computed exactly as `(|sum_i u_i|^2 - sum_i |u_i|^2) / (n (n - 1))`. Near 0 for
  isotropic features; near 1 when they all point one way (Ethayarajh 2019; Godey et al. 2024).

  Args:
    features: [n, d] real, finite, n >= 2.

  Returns:
    A float in [-1 / (n - 1), 1].

  Raises:
    ValueError: `features` not a finite real matrix with at least 2 rows.
  """
  u = l2_normalize(_real_matrix('features', features, min_rows=2))
  n = u.shape[0]
  total = u.sum(axis=0)
  return float((total @ total - np.sum(u * u)) / (n * (n - 1)))


def _lp_margin(w: np.ndarray, b: np.ndarray, c: int, box) -> float:
  """max_h min_{j != c} (w_c - w_j) . h + b_c - b_j, capped at 1, h in the box (HiGHS)."""
  k, d = w.shape
  others = np.arange(k) != c
  a_ub = np.hstack([w[others] - w[c], np.ones((k - 1, 1))])
  cost = np.zeros(d + 1)
  cost[-1] = -1.0
  side = tuple(None if np.isinf(v) else float(v) for v in box)
  res = optimize.linprog(cost, A_ub=a_ub, b_ub=b[c] - b[others], bounds=[side] * d + [(None, 1.0)],
                         method='highs')
  if res.status != 0:
    raise RuntimeError(f'linprog failed for class {c}: {res.message}')
  return -float(res.fun)


def _probe(w: np.ndarray, b: np.ndarray, box, features, steps: int, tol: float,
           todo: np.ndarray) -> np.ndarray:
  """[K] bool: classes proven argmaxable (margin > tol at some feature vector or direction).

  Augmented probes x = (x_h, tau) score class j as x_h . w_j + tau b_j: tau > 0 is the point
  h = x_h / tau; tau = 0 a direction, along which a class with a positive margin wins far enough
  out (features in all of R^d only; in a box, tau = 1). Each uncertified class starts from the
  direction w_c - mean(w) (in a box: the point along it at the box's scale, clipped) and moves by
  relaxation steps onto its most violated constraint (Agmon-Motzkin), clipped to the box.
  """
  k, d = w.shape
  lo, hi = box
  free = np.isinf(lo) and np.isinf(hi)
  wt = np.hstack([w, b[:, None]])  # [K, d + 1]
  done = ~todo  # [K] bool; classes not asked about count as done

  def margins(x, cls):  # x [m, d + 1], cls [m] -> margin [m], runner-up [m]
    s = x @ wt.T
    own = s[np.arange(len(cls)), cls]
    s[np.arange(len(cls)), cls] = -np.inf
    j = np.argmax(s, axis=1)
    return own - s[np.arange(len(cls)), j], j

  def certify(x, cls, margin):
    tau = x[:, -1]
    if free:
      ok = margin > np.maximum(tol * tau, 1e-12 * np.linalg.norm(x, axis=1))
    else:  # tau = 1 and the point clipped into the box
      ok = margin > tol
    done[cls[ok]] = True

  # Given features, and h = 0 (the largest bias), as points.
  pts = [np.zeros((1, d))] + ([] if features is None else [features])
  block = max(1, _PROBE_BLOCK // k)
  for p in pts:
    p = p[np.all((p >= lo) & (p <= hi), axis=1)]
    for i in range(0, len(p), block):
      s = p[i:i + block] @ w.T + b
      top2 = np.partition(s, -2, axis=1)[:, -2:]  # [:, 1] the largest, [:, 0] the runner-up
      done[np.argmax(s, axis=1)[top2[:, 1] - top2[:, 0] > tol]] = True
  cls = np.flatnonzero(~done)
  x = np.hstack([w[cls] - w.mean(axis=0), np.zeros((len(cls), 1))])
  if not free:  # a point at the box's scale (1e3 if it is unbounded on a side), clipped
    size = max(abs(lo), abs(hi)) if np.isfinite(lo) and np.isfinite(hi) else 1e3
    x[:, :d] *= size / np.maximum(np.abs(x[:, :d]).max(axis=1, keepdims=True), 1e-300)
    x[:, :d] = np.clip(x[:, :d], lo, hi)
    x[:, -1] = 1.0
  for _ in range(steps + 1):
    if not len(cls):
      break
    for i in range(0, len(cls), block):
      xs, cs = x[i:i + block], cls[i:i + block]
      margin, j = margins(xs, cs)
      certify(xs, cs, margin)
      a = wt[cs] - wt[j]  # the most violated constraint: a . x > 0 wanted
      if not free:
        a[:, -1] = 0.0  # the point's tau stays 1
      target = 10 * tol * np.maximum(xs[:, -1], 1e-3)
      step = np.maximum(target - margin, 0) / np.maximum(np.sum(a * a, axis=1), 1e-300)
      xs += step[:, None] * a
      if free:
        xs[:, -1] = np.maximum(xs[:, -1], 0.0)
        xs /= np.maximum(np.linalg.norm(xs, axis=1, keepdims=True), 1e-300)
      else:
        xs[:, :d] = np.clip(xs[:, :d], lo, hi)
    keep = ~done[cls]
    cls, x = cls[keep], x[keep]
  return done


def _box(bound) -> Tuple[float, float]:
  """`bound` (None, b > 0, or (low, high) with None for an open side) as floats, inf for open."""
  if bound is None:
    return -np.inf, np.inf
  if np.ndim(bound) == 0:
    if not (isinstance(bound, (int, float, np.number)) and np.isfinite(bound) and bound > 0):
      raise ValueError(f'bound must be None, a finite number > 0 or a pair (low, high), '
                       f'got {bound}.')
    return -float(bound), float(bound)
  if len(bound) != 2:
    raise ValueError(f'bound must be None, a finite number > 0 or a pair (low, high), got {bound}.')
  lo, hi = (-np.inf if bound[0] is None else bound[0]), (np.inf if bound[1] is None else bound[1])
  if not (isinstance(lo, (int, float, np.number)) and isinstance(hi, (int, float, np.number))
          and not np.isnan(lo) and not np.isnan(hi) and lo < hi and lo < np.inf and hi > -np.inf):
    raise ValueError(f'bound=(low, high) needs numbers or None with low < high, got {bound}.')
  return float(lo), float(hi)


def unargmaxable_classes(kernel, bias=None, *, method: str = 'auto', bound=None, features=None,
                         probe_steps: int = 50, tol: float = 1e-6, classes=None) -> np.ndarray:
  """Class ids that are never the argmax of `h @ kernel + bias`, for any features h.

  Class c is argmaxable when some h (anywhere in R^d, or in the box `bound`) gives it a margin
  `min_{j != c} (z_c - z_j) > tol * scale` over every other class,
  `scale = max(|kernel|, |bias|)`: ties never count. Bias-free, a class is argmaxable on
  unbounded features exactly when its weight vector is a vertex of the convex hull of all of
  them (Grivas et al. 2022; "stolen probability", Demeter et al. 2020).

  Methods:
    'exact': one linear program per class (`scipy.optimize.linprog`, HiGHS):
      `max t  s.t.  (w_j - w_c) . h + t <= b_c - b_j  for all j != c,  t <= 1` (h in the box
      `bound`), c argmaxable iff
      t* > tol. K programs of K - 1 constraints: for small K (a few thousand).
    'fast': probes only, a sufficient test of argmaxability for large K: the rows of `features`,
      h = 0, and per class a direction w_c - mean(w) refined by up to `probe_steps` relaxation
      steps; returns every class no probe proved argmaxable, a SUPERSET of the unargmaxable ones
      (a class left out is certainly argmaxable).
    'auto': 'fast', then 'exact' on the classes it returns: the exact answer, fast when few
      classes are in doubt.

  Args:
    kernel: [d, K] real, finite (Flax's layout; transpose a `[K, d]` embedding).
    bias: [K] real, finite, or None.
    method: 'auto', 'exact' or 'fast'.
    bound: where the features can be: None (anywhere in R^d); b > 0, the box `|h_i| <= b` (e.g. 1
      after tanh); or `(low, high)`, the box `low <= h_i <= high`, None for an open side (e.g.
      `(0, None)` after a ReLU, `(-0.17, None)` after a GELU).
    features: [n, d] real, optional probe points (e.g. a model's validation features).
    probe_steps: relaxation steps per class of the probes (>= 0).
    tol: the margin, relative to `scale` (>= 0).
    classes: [m] int ids in [0, K) to test (default all), e.g. the answer of 'fast' to settle with
      'exact' when it is short enough.

  Returns:
    [u] int64, sorted class ids (among `classes`).

  Raises:
    ValueError: bad shapes, dtypes, non-finite values or options, naming the argument.
    RuntimeError: a linear program failed.

  References:
    Grivas, Bogoychev, Lopez. Low-rank softmax can have unargmaxable classes in theory but rarely
    in practice. ACL 2022.
  """
  w = _real_matrix('kernel', kernel).T  # [K, d]
  k, d = w.shape
  if bias is None:
    b = np.zeros(k)
  else:
    b = np.asarray(bias)
    if b.shape != (k,):
      raise ValueError(f'bias must be [K] = ({k},) to match kernel {w.T.shape}, '
                       f'got shape {b.shape}.')
    b = _finite_real('bias', b)
  if method not in ('auto', 'exact', 'fast'):
    raise ValueError(f"method must be 'auto', 'exact' or 'fast', got {method!r}.")
  box = _box(bound)
  if not (np.isfinite(tol) and tol >= 0):
    raise ValueError(f'tol must be a finite number >= 0, got {tol}.')
  if int(probe_steps) != probe_steps or probe_steps < 0:
    raise ValueError(f'probe_steps must be an integer >= 0, got {probe_steps}.')
  if features is not None:
    features = _real_matrix('features', features)
    if features.shape[1] != d:
      raise ValueError(f'features must be [n, d] with d = {d} (kernel {w.T.shape}), '
                       f'got shape {features.shape}.')
  todo = np.ones(k, bool)
  if classes is not None:
    ids = np.asarray(classes)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or (
        ids.size and (ids.min() < 0 or ids.max() >= k)):
      raise ValueError(f'classes must be [m] integer ids in [0, K = {k}), got {ids!r}.')
    todo = np.zeros(k, bool)
    todo[ids] = True
  if k == 1:
    return np.zeros(0, np.int64)
  scale = max(np.abs(w).max(), np.abs(b).max())
  if scale == 0:
    return np.flatnonzero(todo).astype(np.int64)  # every class ties with every other everywhere
  w, b = w / scale, b / scale
  if method == 'exact':
    doubt = np.flatnonzero(todo)
  else:
    doubt = np.flatnonzero(~_probe(w, b, box, features, int(probe_steps), tol, todo))
    if method == 'fast':
      return doubt.astype(np.int64)
  return np.array([c for c in doubt if _lp_margin(w, b, int(c), box) <= tol], np.int64)
