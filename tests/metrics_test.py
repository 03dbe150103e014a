"""Tests for softmax_jax.metrics against scikit-learn and naive float64 NumPy references."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from softmax_jax import metrics

KS = (2, 3, 7, 20)


def _data(k, n=300, seed=0):
  """Random float32 log-probs [n, k] and labels drawn from a subset of classes (some absent)."""
  rng = np.random.default_rng(seed + k)
  logits = 2.0 * rng.normal(size=(n, k))
  if k >= 7:
    logits[:, -1] -= 30.0  # the last class is never predicted (nor labelled, below)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  present = (2 * k) // 3 if k > 2 else k  # e.g. K=20: labels in [0, 13) only
  labels = rng.integers(0, present, size=n)
  return log_probs.astype(np.float32), labels.astype(np.int32)


def _sk_probs(log_probs):
  p = np.exp(log_probs.astype(np.float64))
  return p / p.sum(-1, keepdims=True)


def _ece_reference(log_probs, labels, num_bins):
  """Naive float64 loop over bins (Guo et al. 2017): (lower, upper] intervals."""
  conf = np.exp(log_probs.astype(np.float64).max(-1))
  correct = (log_probs.argmax(-1) == labels).astype(np.float64)
  ece, confs, accs, counts = 0.0, [], [], []
  for b in range(num_bins):
    lo, hi = b / num_bins, (b + 1) / num_bins
    in_bin = (conf > lo) & (conf <= hi)
    counts.append(in_bin.sum())
    if in_bin.any():
      confs.append(conf[in_bin].mean())
      accs.append(correct[in_bin].mean())
      ece += in_bin.mean() * abs(accs[-1] - confs[-1])
    else:
      confs.append(0.0)
      accs.append(0.0)
  return ece, np.array(confs), np.array(accs), np.array(counts)


@pytest.mark.parametrize("k", KS)
def test_accuracy_balanced_f1_match_sklearn(k):
  lp, y = _data(k)
  pred = lp.argmax(-1)
  assert k == 2 or len(np.unique(y)) < k  # some classes never occur in the labels
  np.testing.assert_allclose(metrics.accuracy(lp, y), skm.accuracy_score(y, pred), rtol=1e-6)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sklearn warns about predicted classes absent from labels
    want_bal = skm.balanced_accuracy_score(y, pred)
  np.testing.assert_allclose(metrics.balanced_accuracy(lp, y), want_bal, rtol=1e-6)
  want_f1 = skm.f1_score(y, pred, average="macro", zero_division=0)
  np.testing.assert_allclose(metrics.macro_f1(lp, y), want_f1, rtol=1e-6)
  p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=np.arange(k), zero_division=0)
  got = metrics.per_class_precision_recall_f1(lp, y)
  for name, want in (("precision", p), ("recall", r), ("f1", f)):
    np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-7, err_msg=name)
  np.testing.assert_array_equal(got["support"], s)
  assert got["support"].dtype == jnp.int32


@pytest.mark.filterwarnings("ignore:'k' .* greater than or equal to 'n_classes'")
@pytest.mark.parametrize("k", KS)
def test_top_k_and_rank_match_sklearn(k):
  lp, y = _data(k)
  for kk in sorted({1, 2, min(5, k), k}):
    score = _sk_probs(lp)[:, 1] if k == 2 else _sk_probs(lp)
    want = skm.top_k_accuracy_score(y, score, k=kk, labels=np.arange(k))
    np.testing.assert_allclose(metrics.top_k_accuracy(lp, y, k=kk), want, rtol=1e-6,
                               err_msg=f"k={kk}")
  # Rank = position of the label in the descending sort (tie-free data).
  want_rank = np.argmax(np.argsort(-lp, axis=-1, kind="stable") == y[:, None], axis=-1)
  np.testing.assert_array_equal(metrics.label_rank(lp, y), want_rank)


def test_top_k_ties_are_optimistic_and_accuracy_breaks_ties_by_index():
  lp = np.log(np.array([[0.4, 0.4, 0.2], [0.4, 0.4, 0.2], [0.5, 0.25, 0.25]], np.float32))
  y = np.array([1, 0, 2])
  np.testing.assert_array_equal(metrics.label_rank(lp, y), [0, 0, 1])
  np.testing.assert_allclose(metrics.top_k_accuracy(lp, y, k=1), 2 / 3)
  np.testing.assert_allclose(metrics.accuracy(lp, y), 1 / 3)  # argmax picks class 0 in row 0


@pytest.mark.parametrize("k", KS)
def test_nll_and_perplexity_match_log_loss(k):
  lp, y = _data(k)
  want = skm.log_loss(y, _sk_probs(lp), labels=np.arange(k))
  np.testing.assert_allclose(metrics.nll(lp, y), want, rtol=1e-5)
  np.testing.assert_allclose(metrics.perplexity(lp, y), np.exp(want), rtol=1e-5)


def test_nll_bfloat16_accumulates_in_float32():
  lp, y = _data(7, n=4096)
  lp16 = jnp.asarray(lp, jnp.bfloat16)
  got = metrics.nll(lp16, y)
  assert got.dtype == jnp.float32
  want = -np.mean(np.asarray(lp16, np.float64)[np.arange(len(y)), y])
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("k,num_bins", [(2, 15), (3, 10), (7, 15), (20, 1), (20, 7)])
def test_ece_and_reliability_bins_match_naive_loop(k, num_bins):
  lp, y = _data(k, n=500)
  ece, confs, accs, counts = _ece_reference(lp, y, num_bins)
  assert ece > 0.01  # random scores are miscalibrated: the test is not vacuous
  np.testing.assert_allclose(metrics.expected_calibration_error(lp, y, num_bins=num_bins), ece,
                             rtol=1e-5, atol=1e-7)
  bins = metrics.reliability_bins(lp, y, num_bins=num_bins)
  np.testing.assert_array_equal(bins["count"], counts)
  np.testing.assert_allclose(bins["confidence"], confs, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(bins["accuracy"], accs, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(bins["edges"], np.linspace(0, 1, num_bins + 1), atol=1e-7)


def test_ece_hand_computed():
  # Confidences 0.95 (right), 0.85 (wrong) in bin (0.8, 1]; 0.7 (right), 0.65 (wrong) in (0.6, 0.8].
  p = np.array([[0.95, 0.05], [0.85, 0.15], [0.3, 0.7], [0.65, 0.35]])
  y = np.array([0, 1, 1, 1])
  lp = np.log(p).astype(np.float32)
  # 2/4 * |0.5 - 0.9| + 2/4 * |0.5 - 0.675| = 0.2 + 0.0875
  np.testing.assert_allclose(metrics.expected_calibration_error(lp, y, num_bins=5), 0.2875,
                             rtol=1e-5)
  bins = metrics.reliability_bins(lp, y, num_bins=5)
  np.testing.assert_array_equal(bins["count"], [0, 0, 0, 2, 2])
  np.testing.assert_allclose(bins["confidence"], [0, 0, 0, 0.675, 0.9], rtol=1e-5)
  np.testing.assert_allclose(bins["accuracy"], [0, 0, 0, 0.5, 0.5])
  # One bin: ECE is |accuracy - mean confidence|.
  np.testing.assert_allclose(metrics.expected_calibration_error(lp, y, num_bins=1),
                             abs(0.5 - 0.7875), rtol=1e-5)


def test_bins_are_open_below_closed_above():
  # Confidences 0.5, 0.75, 1.0 (exact in float32) fall in (0.25, 0.5], (0.5, 0.75], (0.75, 1].
  with np.errstate(divide="ignore"):
    lp = np.log(np.array([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]], np.float32))  # log(0) = -inf
  bins = metrics.reliability_bins(lp, np.array([0, 1, 1]), num_bins=4)
  np.testing.assert_array_equal(bins["count"], [0, 1, 1, 1])
  np.testing.assert_allclose(bins["accuracy"], [0, 1, 1, 0])


_MASKED = {
    "accuracy": metrics.accuracy,
    "top3": lambda lp, y, where=None: metrics.top_k_accuracy(lp, y, k=3, where=where),
    "balanced": metrics.balanced_accuracy,
    "per_class": metrics.per_class_precision_recall_f1,
    "macro_f1": metrics.macro_f1,
    "ece": metrics.expected_calibration_error,
    "bins": metrics.reliability_bins,
    "nll": metrics.nll,
    "perplexity": metrics.perplexity,
}


def _padded(k):
  """Padded data and its valid slice. Padding rows: NaN scores with labels -1 or K + 3, or
  confident, correctly predicted rows (so any leak moves accuracy, F1 and calibration)."""
  lp, y = _data(k, n=120)
  where = np.random.default_rng(1).random(120) < 0.6
  lp_pad, y_pad = lp.copy(), y.copy()
  pad = np.flatnonzero(~where)
  lp_pad[pad[0::3]], y_pad[pad[0::3]] = np.nan, -1
  lp_pad[pad[1::3]], y_pad[pad[1::3]] = np.nan, k + 3
  y_pad[pad[2::3]] = lp[pad[2::3]].argmax(-1)
  return lp_pad, y_pad, where, lp[where], y[where]


@pytest.mark.parametrize("name", sorted(_MASKED))
def test_where_equals_slicing_and_jit_equals_eager(name):
  fn = _MASKED[name]
  lp_pad, y_pad, where, lp, y = _padded(7)
  want = fn(lp, y)
  got = fn(lp_pad, y_pad, where=where)
  jitted = jax.jit(lambda a, b, w: fn(a, b, where=w))(lp_pad, y_pad, where)
  for out in (got, jitted):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7), out, want)


def test_label_rank_under_jit_and_vmap():
  lp, y = _data(7, n=24)
  want = metrics.label_rank(lp, y)
  np.testing.assert_array_equal(jax.jit(metrics.label_rank)(lp, y), want)
  batched = jax.vmap(metrics.label_rank)(lp.reshape(4, 6, 7), y.reshape(4, 6))
  np.testing.assert_array_equal(batched.reshape(-1), want)


def test_all_padding_is_nan():
  lp, y = _data(3, n=8)
  assert np.isnan(metrics.accuracy(lp, y, where=np.zeros(8, bool)))
  assert np.isnan(metrics.nll(lp, y, where=np.zeros(8, bool)))


@pytest.mark.parametrize("k", [5, 7])  # top5_accuracy only when K > 5
def test_classification_metrics(k):
  lp_pad, y_pad, where, lp, y = _padded(k)
  got = metrics.classification_metrics(lp_pad, y_pad, where=where, prefix="test/")
  want = {"accuracy": metrics.accuracy(lp, y),
          "balanced_accuracy": metrics.balanced_accuracy(lp, y),
          "macro_f1": metrics.macro_f1(lp, y), "nll": metrics.nll(lp, y),
          "ece": metrics.expected_calibration_error(lp, y, num_bins=15)}
  if k > 5:
    want["top5_accuracy"] = metrics.top_k_accuracy(lp, y, k=5)
  assert set(got) == {"test/" + name for name in want}
  for name, value in want.items():
    assert type(got["test/" + name]) is float
    np.testing.assert_allclose(got["test/" + name], value, rtol=1e-6, err_msg=name)
  assert set(metrics.classification_metrics(lp, y)) == set(want)  # no prefix by default


def test_classification_metrics_rejects_out_of_range_labels():
  lp, y = _data(3, n=8)
  y[2] = 3
  with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=3\).*\[0, 3\]"):
    metrics.classification_metrics(lp, y)


@pytest.mark.parametrize("call,match", [
    (lambda lp, y: metrics.accuracy(lp[0], y), r"log_probs must be \[N, num_classes\].*\(7,\)"),
    (lambda lp, y: metrics.nll(lp[None], y), r"log_probs must be .*rank 2.*\(1, 10, 7\)"),
    (lambda lp, y: metrics.nll(lp[:, :0], y), r"num_classes >= 1.*\(10, 0\)"),
    (lambda lp, y: metrics.accuracy(lp.astype(np.int32), y), r"log_probs must be floating.*int32"),
    (lambda lp, y: metrics.macro_f1(lp, y[:9]), r"labels must be \[N\] = \(10,\).*shape \(9,\)"),
    (lambda lp, y: metrics.nll(lp, y.astype(np.float32)), r"labels must be integer.*float32"),
    (lambda lp, y: metrics.accuracy(lp, y, where=np.ones(9, bool)), r"where must be .*\(9,\)"),
    (lambda lp, y: metrics.accuracy(lp, y, where=np.ones(10)), r"where must be .*float"),
    (lambda lp, y: metrics.top_k_accuracy(lp, y, k=0), r"k must be .* \[1, num_classes=7\], got 0"),
    (lambda lp, y: metrics.top_k_accuracy(lp, y, k=8), r"k must be .*got 8"),
    (lambda lp, y: metrics.expected_calibration_error(lp, y, num_bins=0), r"num_bins .*got 0"),
    (lambda lp, y: metrics.reliability_bins(lp, y, num_bins=0), r"num_bins must be .*got 0"),
    (lambda lp, y: metrics.label_rank(lp, y[:, None]), r"labels must be \[N\].*\(10, 1\)"),
    (lambda lp, y: metrics.classification_metrics(lp[0], y), r"log_probs must be"),
])
def test_bad_inputs_raise(call, match):
  lp, y = _data(7, n=10)
  with pytest.raises(ValueError, match=match):
    call(lp, y)


def _by_frequency_reference(log_probs, labels, counts, many=100, few=20):
  """Naive loop: per-class recall over classes with test support, averaged per bucket."""
  pred = log_probs.argmax(-1)
  recalls = {"many": [], "medium": [], "few": []}
  for c, n in enumerate(counts):
    if (labels == c).any():
      bucket = "many" if n > many else "few" if n < few else "medium"
      recalls[bucket].append(np.mean(pred[labels == c] == c))
  return {b: np.mean(r) if r else np.nan for b, r in recalls.items()}


@pytest.mark.parametrize("k", [7, 20])
def test_accuracy_by_frequency_matches_loop(k):
  lp, y = _data(k, n=400)
  counts = np.random.default_rng(k).integers(0, 300, size=k)
  counts[:4] = [19, 20, 100, 101]
  got = metrics.accuracy_by_frequency(lp, y, class_counts=counts)
  want = _by_frequency_reference(lp, y, counts)
  for b in ("many", "medium", "few"):
    np.testing.assert_allclose(got[f"{b}_accuracy"], want[b], rtol=1e-6, err_msg=b)
  assert (got["many_classes"], got["medium_classes"], got["few_classes"]) == (
      np.sum(counts > 100), np.sum((counts >= 20) & (counts <= 100)), np.sum(counts < 20))
  got = metrics.accuracy_by_frequency(lp, y, class_counts=counts, many=50, few=10)
  want = _by_frequency_reference(lp, y, counts, many=50, few=10)
  np.testing.assert_allclose([got[f"{b}_accuracy"] for b in want], list(want.values()), rtol=1e-6)


def test_accuracy_by_frequency_bucket_boundaries():
  # Training counts 19, 20, 100, 101 -> few, medium, medium, many; test recalls 1, 1/2, 1/4, 0.
  labels = np.repeat(np.arange(4), 4)
  pred = np.array([0, 0, 0, 0, 1, 1, 3, 3, 2, 3, 3, 3, 0, 0, 0, 0])
  lp = np.log(np.full((16, 4), 0.1, np.float32))
  lp[np.arange(16), pred] = np.log(0.7)
  got = metrics.accuracy_by_frequency(lp, labels, class_counts=np.array([19, 20, 100, 101]))
  np.testing.assert_allclose([got["few_accuracy"], got["medium_accuracy"], got["many_accuracy"]],
                             [1.0, 0.375, 0.0])
  assert (got["few_classes"], got["medium_classes"], got["many_classes"]) == (1, 2, 1)


def test_accuracy_by_frequency_empty_bucket_is_nan_and_where_and_jit():
  lp_pad, y_pad, where, lp, y = _padded(7)
  counts = np.array([500, 200, 101, 150, 300, 1000, 5])  # no medium class; the few one (class 6)
  got = metrics.accuracy_by_frequency(lp_pad, y_pad, class_counts=counts, where=where)
  assert np.isnan(got["medium_accuracy"]) and got["medium_classes"] == 0
  assert np.isnan(got["few_accuracy"]) and got["few_classes"] == 1  # ... never in the labels
  assert not (y == 6).any()
  want = metrics.accuracy_by_frequency(lp, y, class_counts=counts)
  np.testing.assert_allclose(got["many_accuracy"], want["many_accuracy"], rtol=1e-6)
  np.testing.assert_allclose(want["many_accuracy"], metrics.balanced_accuracy(lp, y), rtol=1e-6)
  jitted = jax.jit(lambda a, b, w: metrics.accuracy_by_frequency(a, b, class_counts=counts,
                                                                 where=w))(lp_pad, y_pad, where)
  np.testing.assert_allclose(jitted["many_accuracy"], want["many_accuracy"], rtol=1e-6)


def test_classification_metrics_with_class_counts():
  lp_pad, y_pad, where, lp, y = _padded(7)
  counts = np.array([5, 30, 150, 20, 100, 101, 19])
  got = metrics.classification_metrics(lp_pad, y_pad, where=where, prefix="t/",
                                       class_counts=counts)
  plain = metrics.classification_metrics(lp_pad, y_pad, where=where, prefix="t/")
  by_freq = metrics.accuracy_by_frequency(lp, y, class_counts=counts)
  assert set(got) == set(plain) | {f"t/{b}_{s}" for b in ("many", "medium", "few")
                                    for s in ("accuracy", "count")}
  assert all(got[key] == value for key, value in plain.items())
  present = np.isin(np.arange(7), y)
  for b, in_bucket in (("many", counts > 100), ("medium", (counts >= 20) & (counts <= 100)),
                       ("few", counts < 20)):
    assert type(got[f"t/{b}_accuracy"]) is float
    np.testing.assert_allclose(got[f"t/{b}_accuracy"], by_freq[f"{b}_accuracy"], rtol=1e-6)
    assert got[f"t/{b}_count"] == np.sum(in_bucket & present) > 0


def test_empty_bucket_is_none_with_count_zero_and_strict_json():
  lp_pad, y_pad, where, lp, y = _padded(7)
  counts = np.array([500, 200, 101, 150, 300, 1000, 5])  # no medium class; the few one (class 6)
  assert not (y == 6).any()  # ... never among the valid labels
  got = metrics.classification_metrics(lp_pad, y_pad, where=where, class_counts=counts)
  assert got["medium_accuracy"] is None and got["medium_count"] == 0
  assert got["few_accuracy"] is None and got["few_count"] == 0
  assert got["many_count"] == np.unique(y).size
  np.testing.assert_allclose(got["many_accuracy"], metrics.balanced_accuracy(lp, y), rtol=1e-6)
  text = json.dumps(got, allow_nan=False)  # raises on NaN
  assert '"few_accuracy": null' in text


@pytest.mark.parametrize("kwargs,match", [
    (dict(class_counts=np.ones(6, int)), r"class_counts must be \[num_classes\] = \(7,\).*\(6,\)"),
    (dict(class_counts=np.ones(7)), r"class_counts must be .*integer.*float64"),
    (dict(class_counts=-np.arange(7)), r"class_counts must be >= 0, got min -6"),
    (dict(class_counts=np.ones(7, int), few=30, many=20), r"few must be <= many.*few=30.*many=20"),
    (dict(class_counts=np.ones(7, int), many=-1), r"many must be an int >= 0, got -1"),
    (dict(class_counts=np.ones(7, int), few=2.5), r"few must be an int >= 0, got 2.5"),
])
def test_accuracy_by_frequency_bad_inputs_raise(kwargs, match):
  lp, y = _data(7, n=10)
  with pytest.raises(ValueError, match=match):
    metrics.accuracy_by_frequency(lp, y, **kwargs)
  if "few" not in kwargs and "many" not in kwargs:
    with pytest.raises(ValueError, match=match):
      metrics.classification_metrics(lp, y, **kwargs)


def test_accuracy_by_frequency_needs_concrete_class_counts():
  lp, y = _data(7, n=10)
  fn = jax.jit(lambda c: metrics.accuracy_by_frequency(lp, y, class_counts=c))
  with pytest.raises(ValueError, match=r"class_counts must be concrete .*got a tracer"):
    fn(np.ones(7, np.int32))


def _tied(k, seed=3):
  """`_padded(k)` with ties: rows whose top classes tie (argmax and rank must break them alike)."""
  lp_pad, y_pad, where, _, _ = _padded(k)
  rng = np.random.default_rng(seed)
  rows = rng.choice(np.flatnonzero(where), 20, replace=False)
  for r in rows:  # two (or three) classes share the row's largest log-prob; the label is one
    top = np.argsort(-lp_pad[r])[:3 if r % 2 else 2]
    lp_pad[r, top] = lp_pad[r, top[0]]
    if r % 3 == 0:
      y_pad[r] = top[-1]
  lp_pad[where] -= np.logaddexp.reduce(lp_pad[where], axis=-1, keepdims=True)
  return lp_pad, y_pad, where


@pytest.mark.parametrize("k", [3, 7, 20])
@pytest.mark.parametrize("counts", [False, True])
def test_summary_from_stats_equals_classification_metrics(k, counts):
  from softmax_jax import heads  # pylint: disable=g-import-not-at-top
  lp_pad, y_pad, where = _tied(k)
  class_counts = np.random.default_rng(k).integers(0, 200, k) if counts else None
  want = metrics.classification_metrics(lp_pad, y_pad, where=where, prefix="v/",
                                        class_counts=class_counts)
  stats = heads.log_prob_eval_stats(lp_pad, y_pad, temperatures=(1.0, 2.0))
  one = {key: value[:, 0] if value.ndim == 2 else value for key, value in stats.items()}
  got = metrics.summary_from_stats(one, y_pad, num_classes=k, where=where, prefix="v/",
                                   class_counts=class_counts)
  assert set(got) == set(want)
  assert ("v/top5_accuracy" in got) == (k > 5) and ("v/few_accuracy" in got) == counts
  for key, value in want.items():
    if value is None:  # an empty bucket
      assert got[key] is None and got[key.replace("accuracy", "count")] == 0
      continue
    assert type(got[key]) is float
    np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
  # The same from statistics computed directly in float64 NumPy (ties: first index, strict rank).
  valid = np.where(where[:, None], lp_pad, 0.0).astype(np.float64)
  y = np.where(where, y_pad, 0)
  label = valid[np.arange(len(y)), y]
  ref = {"prediction": valid.argmax(-1), "label_rank": (valid > label[:, None]).sum(-1),
         "label_log_prob": label, "confidence": np.exp(valid.max(-1))}
  got64 = metrics.summary_from_stats(ref, y_pad, num_classes=k, where=where, prefix="v/",
                                     class_counts=class_counts)
  for key, value in want.items():
    if value is None:
      assert got64[key] is None
    else:
      np.testing.assert_allclose(got64[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("change,match", [
    (lambda s: s.pop("label_rank"), r"stats must hold 'label_rank'"),
    (lambda s: s.update(confidence=np.ones((10, 2), np.float32)),
     r"stats\['confidence'\] must be \[N\] = \(10,\).*\(10, 2\); select one temperature column"),
    (lambda s: s.update(prediction=np.zeros(10, np.float32)), r"'prediction'\] must be integer"),
    (lambda s: s.update(label_log_prob=np.zeros(9, np.float32)), r"'label_log_prob'\] must be"),
])
def test_summary_from_stats_bad_stats_raise(change, match):
  stats = {"prediction": np.zeros(10, np.int32), "label_rank": np.zeros(10, np.int32),
           "label_log_prob": np.zeros(10, np.float32), "confidence": np.ones(10, np.float32)}
  change(stats)
  with pytest.raises(ValueError, match=match):
    metrics.summary_from_stats(stats, np.zeros(10, np.int32), num_classes=7)


def test_summary_from_stats_bad_arguments_raise():
  stats = {"prediction": np.zeros(4, np.int32), "label_rank": np.zeros(4, np.int32),
           "label_log_prob": np.zeros(4, np.float32), "confidence": np.ones(4, np.float32)}
  y = np.array([0, 1, 2, 7])
  with pytest.raises(ValueError, match=r"labels must lie in \[0, num_classes=7\).*\[0, 7\]"):
    metrics.summary_from_stats(stats, y, num_classes=7)
  assert np.isfinite(metrics.summary_from_stats(stats, y, num_classes=7,
                                                where=y < 7)["accuracy"])
  with pytest.raises(ValueError, match=r"num_classes must be an int >= 1, got 0"):
    metrics.summary_from_stats(stats, y, num_classes=0)
  with pytest.raises(ValueError, match=r"where must be \[N\] = \(4,\) bool"):
    metrics.summary_from_stats(stats, y, num_classes=8, where=np.ones(4))
  with pytest.raises(ValueError, match=r"class_counts must be \[num_classes\] = \(8,\)"):
    metrics.summary_from_stats(stats, y, num_classes=8, class_counts=np.ones(7, int))
