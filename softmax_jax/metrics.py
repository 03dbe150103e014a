"""Classification metrics over log-probabilities, in jax.numpy and jit-safe.

Every function takes `log_probs: [N, num_classes] float` (a head's `log_prob`), integer
`labels: [N]` in `[0, num_classes)` and an optional `where: [N] bool` (False = padding, excluded
everywhere; padded rows may hold anything, NaN and out-of-range labels included).
`num_classes` is static, read from the shape. Means over zero valid examples are 0/0 = NaN.
Predictions are `argmax(log_probs)` (first index on ties), as a head's `predict`. Only `nll`,
`perplexity`, `expected_calibration_error` and `reliability_bins` need normalized
log-probabilities; the rest use the ordering alone, so logits work too. Sums accumulate in
float32 at least. `classification_metrics` is the host-side summary of an evaluation split.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _check(log_probs, labels, where=None):  # -> log_probs (>= float32), int32 labels, where
  log_probs, labels = jnp.asarray(log_probs), jnp.asarray(labels)
  if log_probs.ndim != 2 or log_probs.shape[1] < 1:
    raise ValueError("log_probs must be [N, num_classes] (rank 2, num_classes >= 1), "
                     f"got shape {log_probs.shape}.")
  if not jnp.issubdtype(log_probs.dtype, jnp.floating):
    raise ValueError(f"log_probs must be floating point, got dtype {log_probs.dtype}.")
  if labels.shape != log_probs.shape[:1]:
    raise ValueError(f"labels must be [N] = {log_probs.shape[:1]} to match log_probs "
                     f"{log_probs.shape}, got shape {labels.shape}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}.")
  if where is None:
    where = jnp.ones(labels.shape, bool)
  else:
    where = jnp.asarray(where)
    if where.shape != labels.shape or where.dtype != jnp.bool_:
      raise ValueError(f"where must be [N] = {labels.shape} bool, got shape {where.shape} "
                       f"and dtype {where.dtype}.")
  dtype = jnp.promote_types(log_probs.dtype, jnp.float32)  # bfloat16 -> float32; keeps float64
  return log_probs.astype(dtype), labels.astype(jnp.int32), where


def _masked_mean(values, where):  # 0/0 = NaN when no row is valid
  return jnp.sum(jnp.where(where, values, 0)) / jnp.sum(where)


def _safe_div(num, den):  # 0 where den == 0, as sklearn's zero_division=0
  return jnp.where(den > 0, num / jnp.maximum(den, 1), 0.0)


def _true_log_prob(log_probs, labels):
  return jnp.take_along_axis(log_probs, labels[:, None], axis=1)[:, 0]


def _rank(log_probs, labels):
  higher = log_probs > _true_log_prob(log_probs, labels)[:, None]
  return jnp.sum(higher, axis=-1, dtype=jnp.int32)


def _class_counts(log_probs, labels, where):
  """[K] int32 true positives, support (label counts) and predicted counts."""
  return _counts_of(jnp.argmax(log_probs, axis=-1), labels, where, log_probs.shape[1])


def _counts_of(pred, labels, where, k):  # the same from predictions [N]
  w = where.astype(jnp.int32)
  tp = jnp.bincount(labels, weights=w * (pred == labels), length=k)
  support = jnp.bincount(labels, weights=w, length=k)
  predicted = jnp.bincount(pred, weights=w, length=k)
  return tp, support, predicted


def _bin_sums(log_probs, labels, where, num_bins):
  """Per confidence bin (lower, upper]: [B] count, sum of confidence, sum of correct."""
  return _bins_of(jnp.exp(jnp.max(log_probs, axis=-1)), jnp.argmax(log_probs, axis=-1) == labels,
                  where, num_bins)


def _bins_of(confidence, correct, where, num_bins):  # the same from [N] confidence and correct
  if not isinstance(num_bins, int) or num_bins < 1:
    raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}.")
  conf = jnp.where(where, confidence, 0.0)
  correct = correct & where
  # conf in (b/B, (b+1)/B] -> bin b, as Guo et al.'s (conf > lower) & (conf <= upper).
  bins = jnp.clip(jnp.ceil(conf * num_bins).astype(jnp.int32) - 1, 0, num_bins - 1)
  count = jnp.bincount(bins, weights=where.astype(jnp.int32), length=num_bins)
  conf_sum = jnp.bincount(bins, weights=conf, length=num_bins)
  correct_sum = jnp.bincount(bins, weights=correct.astype(conf.dtype), length=num_bins)
  return count, conf_sum, correct_sum


@jax.jit
def label_rank(log_probs, labels):
  """Rank of the true label: `rank_i = #{c : log_probs[i, c] > log_probs[i, labels_i]}`.

  0 means top; ties count in the label's favour. Reference: Voorhees, TREC-8 QA (1999), MRR.

  Args:
    log_probs: [N, num_classes] float scores (ordering only).
    labels: [N] int true classes.

  Returns: [N] int32 ranks.
  """
  log_probs, labels, _ = _check(log_probs, labels)
  return _rank(log_probs, labels)


@jax.jit
def accuracy(log_probs, labels, *, where=None):
  """Accuracy: `mean_i [argmax_c log_probs[i, c] == labels_i]`. Ref: sklearn accuracy_score.

  Args:
    log_probs: [N, num_classes] float scores (ordering only; ties go to the first index).
    labels: [N] int true classes.
    where: [N] bool or None; False rows are excluded.

  Returns: [] float.
  """
  log_probs, labels, where = _check(log_probs, labels, where)
  return _masked_mean(jnp.argmax(log_probs, axis=-1) == labels, where)


@functools.partial(jax.jit, static_argnames="k")
def top_k_accuracy(log_probs, labels, *, k=5, where=None):
  """Top-k accuracy: `mean_i [label_rank_i < k]`. Ref: sklearn top_k_accuracy_score.

  Ties are optimistic: a row is correct when strictly fewer than k classes score higher than
  its label (so on ties `k=1` can exceed `accuracy`, which breaks ties by index); on tie-free
  scores this equals sklearn.

  Args:
    log_probs: [N, num_classes] float scores (ordering only).
    labels: [N] int true classes.
    k: static int in [1, num_classes].
    where: [N] bool or None; False rows are excluded.

  Returns: [] float.
  """
  log_probs, labels, where = _check(log_probs, labels, where)
  if not isinstance(k, int) or not 1 <= k <= log_probs.shape[1]:
    raise ValueError(f"k must be an int in [1, num_classes={log_probs.shape[1]}], got {k!r}.")
  return _masked_mean(_rank(log_probs, labels) < k, where)


@jax.jit
def per_class_precision_recall_f1(log_probs, labels, *, where=None):
  """Per class: `precision = tp/predicted, recall = tp/support, f1 = 2 tp/(predicted + support)`.

  0 where the denominator is 0. Ref: sklearn precision_recall_fscore_support, zero_division=0.

  Args:
    log_probs: [N, num_classes] float scores (ordering only).
    labels: [N] int true classes.
    where: [N] bool or None; False rows are excluded.

  Returns: dict of [num_classes] arrays 'precision', 'recall', 'f1' (float), 'support' (int32).
  """
  log_probs, labels, where = _check(log_probs, labels, where)
  tp, support, predicted = _class_counts(log_probs, labels, where)
  return {"precision": _safe_div(tp, predicted), "recall": _safe_div(tp, support),
          "f1": _safe_div(2 * tp, predicted + support), "support": support}


@jax.jit
def balanced_accuracy(log_probs, labels, *, where=None):
  """Balanced accuracy: mean recall `tp_c / support_c` over classes with support > 0.

  Args:
    log_probs: [N, num_classes] float scores (ordering only).
    labels: [N] int true classes.
    where: [N] bool or None; False rows are excluded.

  Returns: [] float. Ref: Brodersen et al., ICPR 2010; sklearn balanced_accuracy_score.
  """
  log_probs, labels, where = _check(log_probs, labels, where)
  tp, support, _ = _class_counts(log_probs, labels, where)
  present = support > 0
  return jnp.sum(jnp.where(present, _safe_div(tp, support), 0.0)) / jnp.sum(present)


@jax.jit
def macro_f1(log_probs, labels, *, where=None):
  """Macro F1: mean per-class F1 over classes present in the labels or the predictions.

  Classes neither labelled nor predicted are left out, as in sklearn f1_score(average='macro',
  zero_division=0) with its default `labels=None`.

  Args:
    log_probs: [N, num_classes] float scores (ordering only).
    labels: [N] int true classes.
    where: [N] bool or None; False rows are excluded.

  Returns: [] float.
  """
  log_probs, labels, where = _check(log_probs, labels, where)
  tp, support, predicted = _class_counts(log_probs, labels, where)
  present = support + predicted > 0
  f1 = _safe_div(2 * tp, predicted + support)
  return jnp.sum(jnp.where(present, f1, 0.0)) / jnp.sum(present)


@functools.partial(jax.jit, static_argnames="num_bins")
def reliability_bins(log_probs, labels, *, num_bins=15, where=None):
  """Reliability diagram: bins `(b/B, (b+1)/B]` of confidence `max_c exp(log_probs[i, c])`.

  Args:
    log_probs: [N, num_classes] float normalized log-probabilities.
    labels: [N] int true classes.
    num_bins: static int B >= 1.
    where: [N] bool or None; False rows are excluded.

  Returns: dict: 'confidence', 'accuracy' [B] float bin means (0 in empty bins), 'count' [B]
    int32, 'edges' [B + 1] float. Ref: Guo et al., On Calibration of Modern NNs, ICML 2017.
  """
  log_probs, labels, where = _check(log_probs, labels, where)
  count, conf_sum, correct_sum = _bin_sums(log_probs, labels, where, num_bins)
  return {"confidence": _safe_div(conf_sum, count), "accuracy": _safe_div(correct_sum, count),
          "count": count, "edges": jnp.linspace(0.0, 1.0, num_bins + 1, dtype=log_probs.dtype)}


@functools.partial(jax.jit, static_argnames="num_bins")
def reliability_bins_from_stats(confidence, correct, *, num_bins=15, where=None):
  """`reliability_bins` from per-example statistics (a head's `eval_stats`), no [N, K] needed.

  Args:
    confidence: [N] float, each example's largest probability (`eval_stats` 'confidence' column).
    correct: [N] bool, whether its prediction is its label.
    num_bins: static int B >= 1.
    where: [N] bool or None; False rows are excluded.

  Returns: dict as `reliability_bins`: 'confidence', 'accuracy' [B] float, 'count' [B] int32,
    'edges' [B + 1] float.
  """
  confidence, correct = jnp.asarray(confidence), jnp.asarray(correct)
  if confidence.ndim != 1 or not jnp.issubdtype(confidence.dtype, jnp.floating):
    raise ValueError(f"confidence must be [N] float, got shape {confidence.shape} and dtype "
                     f"{confidence.dtype}.")
  if correct.shape != confidence.shape or correct.dtype != jnp.bool_:
    raise ValueError(f"correct must be [N] = {confidence.shape} bool, got shape {correct.shape} "
                     f"and dtype {correct.dtype}.")
  where = jnp.ones(correct.shape, bool) if where is None else jnp.asarray(where)
  if where.shape != correct.shape or where.dtype != jnp.bool_:
    raise ValueError(f"where must be [N] = {correct.shape} bool, got shape {where.shape} and "
                     f"dtype {where.dtype}.")
  confidence = confidence.astype(jnp.promote_types(confidence.dtype, jnp.float32))
  count, conf_sum, correct_sum = _bins_of(confidence, correct, where, num_bins)
  return {"confidence": _safe_div(conf_sum, count), "accuracy": _safe_div(correct_sum, count),
          "count": count, "edges": jnp.linspace(0.0, 1.0, num_bins + 1, dtype=confidence.dtype)}


@functools.partial(jax.jit, static_argnames="num_bins")
def expected_calibration_error(log_probs, labels, *, num_bins=15, where=None):
  """ECE: `sum_b (n_b / N) |acc_b - conf_b|` over the bins of `reliability_bins`.

  Args:
    log_probs: [N, num_classes] float normalized log-probabilities.
    labels: [N] int true classes.
    num_bins: static int B >= 1.
    where: [N] bool or None; False rows are excluded.

  Returns: [] float in [0, 1]. Ref: Guo et al., ICML 2017; Naeini et al., AAAI 2015.
  """
  log_probs, labels, where = _check(log_probs, labels, where)
  count, conf_sum, correct_sum = _bin_sums(log_probs, labels, where, num_bins)
  return jnp.sum(jnp.abs(correct_sum - conf_sum)) / jnp.sum(count)


@jax.jit
def nll(log_probs, labels, *, where=None):
  """Mean negative log-likelihood `-mean_i log_probs[i, labels_i]` in nats. Ref: sklearn log_loss.

  Args:
    log_probs: [N, num_classes] float normalized log-probabilities.
    labels: [N] int true classes.
    where: [N] bool or None; False rows are excluded.

  Returns: [] float.
  """
  log_probs, labels, where = _check(log_probs, labels, where)
  return -_masked_mean(_true_log_prob(log_probs, labels), where)


@jax.jit
def perplexity(log_probs, labels, *, where=None):
  """Perplexity `exp(nll)`; arguments as `nll`. Ref: Jelinek et al., JASA 1977."""
  return jnp.exp(nll(log_probs, labels, where=where))


_BUCKETS = ("many", "medium", "few")


def _frequency_masks(class_counts, num_classes, many, few):  # -> [3, K] bool (many, medium, few)
  for name, t in (("many", many), ("few", few)):
    if not isinstance(t, (int, np.integer)) or isinstance(t, bool) or t < 0:
      raise ValueError(f"{name} must be an int >= 0, got {t!r}.")
  if few > many:
    raise ValueError(f"few must be <= many, got few={few} and many={many}.")
  if isinstance(class_counts, jax.core.Tracer):
    raise ValueError("class_counts must be concrete (host NumPy training counts), got a tracer.")
  n = np.asarray(class_counts)
  if n.shape != (num_classes,) or not np.issubdtype(n.dtype, np.integer):
    raise ValueError(f"class_counts must be [num_classes] = ({num_classes},) integer training "
                     f"counts, got shape {n.shape} and dtype {n.dtype}.")
  if n.size and n.min() < 0:
    raise ValueError(f"class_counts must be >= 0, got min {n.min()}.")
  return np.stack([n > many, (n >= few) & (n <= many), n < few])


@jax.jit
def _bucket_recall(log_probs, labels, where, masks):  # -> [3] mean recall per bucket
  tp, support, _ = _class_counts(log_probs, labels, where)
  in_bucket = masks & (support > 0)
  return jnp.sum(jnp.where(in_bucket, _safe_div(tp, support), 0.0), -1) / jnp.sum(in_bucket, -1)


def accuracy_by_frequency(log_probs, labels, *, class_counts, where=None, many=100, few=20):
  """Mean per-class recall within training-frequency buckets (many-, medium-, few-shot).

  Classes split by TRAINING count n_c: 'many' n_c > many, 'medium' few <= n_c <= many, 'few'
  n_c < few. Per bucket: mean of `tp_c / support_c` over its classes with test support > 0
  (balanced accuracy restricted to the bucket); NaN when there is none. Jit-safe in
  `log_probs`, `labels`, `where`; `class_counts` must be concrete. Ref: Liu et al., Large-Scale
  Long-Tailed Recognition in an Open World (OLTR), CVPR 2019.

  Args:
    log_probs: [N, num_classes] float scores (ordering only).
    labels: [N] int true classes.
    class_counts: [num_classes] int >= 0 training examples per class (host array).
    where: [N] bool or None; False rows are excluded.
    many: int; classes with more than `many` training examples are many-shot.
    few: int <= many; classes with fewer than `few` training examples are few-shot.

  Returns: dict: 'many_accuracy', 'medium_accuracy', 'few_accuracy' [] float and
    'many_classes', 'medium_classes', 'few_classes' int (classes in the bucket by training count).
  """
  log_probs, labels, where = _check(log_probs, labels, where)
  masks = _frequency_masks(class_counts, log_probs.shape[1], many, few)
  recall = _bucket_recall(log_probs, labels, where, masks)
  out = {f"{b}_accuracy": recall[i] for i, b in enumerate(_BUCKETS)}
  return out | {f"{b}_classes": int(masks[i].sum()) for i, b in enumerate(_BUCKETS)}


@jax.jit
def _stats_of(log_probs, labels):  # the per-example statistics a head's eval_stats returns
  return {"prediction": jnp.argmax(log_probs, axis=-1).astype(jnp.int32),
          "label_rank": _rank(log_probs, labels), "label_log_prob": _true_log_prob(log_probs, labels),
          "confidence": jnp.exp(jnp.max(log_probs, axis=-1))}


@functools.partial(jax.jit, static_argnames=("num_classes", "num_bins"))
def _summary(stats, labels, where, masks, num_classes, num_bins=15):
  """The scalars of `classification_metrics` from per-example statistics (one code path)."""
  pred, k = stats["prediction"], num_classes
  tp, support, predicted = _counts_of(pred, labels, where, k)
  present = support > 0
  out = {"accuracy": _masked_mean(pred == labels, where),
         "balanced_accuracy": jnp.sum(jnp.where(present, _safe_div(tp, support), 0.0))
                              / jnp.sum(present),
         "nll": -_masked_mean(stats["label_log_prob"], where)}
  seen = support + predicted > 0
  out["macro_f1"] = (jnp.sum(jnp.where(seen, _safe_div(2 * tp, predicted + support), 0.0))
                     / jnp.sum(seen))
  count, conf_sum, correct_sum = _bins_of(stats["confidence"], pred == labels, where, num_bins)
  out["ece"] = jnp.sum(jnp.abs(correct_sum - conf_sum)) / jnp.sum(count)
  if k > 5:
    out["top5_accuracy"] = _masked_mean(stats["label_rank"] < 5, where)
  if masks is not None:
    in_bucket = masks & present
    recall = (jnp.sum(jnp.where(in_bucket, _safe_div(tp, support), 0.0), -1)
              / jnp.sum(in_bucket, -1))
    out |= {f"{b}_accuracy": recall[i] for i, b in enumerate(_BUCKETS)}
    out |= {f"{b}_count": jnp.sum(in_bucket[i]) for i, b in enumerate(_BUCKETS)}
  return out


def _host_summary(stats, labels, where, num_classes, prefix, class_counts):
  valid = np.asarray(labels)[np.asarray(where)]
  if valid.size and (valid.min() < 0 or valid.max() >= num_classes):
    raise ValueError(f"labels must lie in [0, num_classes={num_classes}), got values in "
                     f"[{valid.min()}, {valid.max()}].")
  masks = (None if class_counts is None  # checked first, so a bad class_counts fails early
           else _frequency_masks(class_counts, num_classes, 100, 20))
  values = jax.device_get(_summary(stats, labels, where, masks, num_classes=num_classes))
  out = {prefix + name: float(value) for name, value in sorted(values.items())}
  for b in _BUCKETS if masks is not None else ():  # an empty bucket has no accuracy: None
    if out[f"{prefix}{b}_count"] == 0:
      out[f"{prefix}{b}_accuracy"] = None
  return out


def classification_metrics(log_probs, labels, *, where=None, prefix="", class_counts=None):
  """Scalar summary of an evaluation split, on the host (not jittable: returns Python floats).

  Keys `accuracy`, `balanced_accuracy`, `macro_f1`, `nll`, `ece` (15 bins), only when
  num_classes > 5 (else it is trivially 1) `top5_accuracy`, and only with `class_counts`
  `many_accuracy`, `medium_accuracy`, `few_accuracy` (`accuracy_by_frequency`, default
  thresholds) with `many_count`, `medium_count`, `few_count` (the classes each mean is over: in
  the bucket by training count and present among the valid labels), each as `prefix + key`.
  An empty bucket's accuracy is None (JSON null), never NaN, beside its count 0. Labels of valid rows must lie in [0, num_classes)
  (checked, as the values are concrete here). The same as `summary_from_stats` of the
  per-example statistics of `log_probs` (which is how it is computed).

  Args:
    log_probs: [N, num_classes] float normalized log-probabilities.
    labels: [N] int true classes.
    where: [N] bool or None; False rows are excluded.
    prefix: str put before every key, e.g. 'test/'.
    class_counts: [num_classes] int training counts per class, or None.

  Returns: dict[str, float], None for an empty bucket's accuracy.
  """
  lp, lab, w = _check(log_probs, labels, where)
  return _host_summary(_stats_of(lp, lab), lab, w, lp.shape[1], prefix, class_counts)


def summary_from_stats(stats, labels, *, num_classes, where=None, prefix="", class_counts=None,
                       nll=True):
  """`classification_metrics` from per-example statistics: the same keys and values, no [N, K].

  The statistics are those of a head's `eval_stats` with one temperature column selected
  (`{k: v[:, g] for k, v in stats.items()}` for 'label_log_prob' and 'confidence'): 'prediction'
  (argmax, first index on ties) gives accuracy, balanced accuracy, macro F1 and the frequency
  buckets; 'label_rank' (classes scoring strictly above the label) top-5 accuracy;
  'label_log_prob' the NLL; 'confidence' (the largest probability) with 'prediction' the ECE.
  Other keys (e.g. 'adjusted_*') are ignored. Not jittable (returns Python floats).

  Sparse heads (`DenseSoftmax(mapping='sparsemax'|...)`): their 'label_log_prob' is -inf for a
  label outside the support, so the NLL is undefined; `nll=False` leaves the key 'nll' out (the
  rest of the summary never reads 'label_log_prob'). Their optional statistics 'support' ([N]
  int, classes with p > 0) and 'fy_loss' ([N] float, the Fenchel-Young loss at the selected
  temperature) add the means 'support_size' and 'fy_loss' (whenever present).

  Args:
    stats: dict with [N] int 'prediction', 'label_rank' and [N] float 'label_log_prob',
      'confidence'.
    labels: [N] int true classes, in [0, num_classes) for valid rows.
    num_classes: K, an int >= 1 (static: decides `top5_accuracy` and the per-class counts).
    where: [N] bool or None; False rows are excluded.
    prefix: str put before every key, e.g. 'test/'.
    class_counts: [num_classes] int training counts per class, or None.
    nll: whether to report 'nll' (False: a sparse head's, undefined).

  Returns: dict[str, float], the keys of `classification_metrics` (without 'nll' if `nll` is
  False; None for an empty bucket's accuracy), plus 'support_size' and 'fy_loss' when `stats`
  holds 'support' and 'fy_loss'.

  Raises:
    ValueError: a missing key, a statistic that is not [N] (naming it and its shape, e.g. an
      unselected [N, G] column), a wrong dtype, `num_classes` not an int >= 1, labels out of
      range, or a bad `class_counts`.
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
      or num_classes < 1:
    raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}.")
  labels = jnp.asarray(labels)
  if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be [N] integer class ids, got shape {labels.shape} and dtype "
                     f"{labels.dtype}.")
  n = labels.shape[0]
  picked = {}
  for key, kind in (("prediction", jnp.integer), ("label_rank", jnp.integer),
                    ("label_log_prob", jnp.floating), ("confidence", jnp.floating)):
    if key not in stats:
      raise ValueError(f"stats must hold {key!r} (a head's eval_stats), got keys {sorted(stats)}.")
    value = jnp.asarray(stats[key])
    if value.shape != (n,):
      raise ValueError(f"stats[{key!r}] must be [N] = ({n},) like labels, got shape "
                       f"{value.shape}" + ("; select one temperature column, e.g. "
                                           f"stats[{key!r}][:, 0]." if value.ndim == 2 else "."))
    if not jnp.issubdtype(value.dtype, kind):
      raise ValueError(f"stats[{key!r}] must be {kind.__name__}, got dtype {value.dtype}.")
    picked[key] = (value.astype(jnp.int32) if kind is jnp.integer
                   else value.astype(jnp.promote_types(value.dtype, jnp.float32)))
  if where is None:
    where = jnp.ones((n,), bool)
  else:
    where = jnp.asarray(where)
    if where.shape != (n,) or where.dtype != jnp.bool_:
      raise ValueError(f"where must be [N] = ({n},) bool, got shape {where.shape} and dtype "
                       f"{where.dtype}.")
  out = _host_summary(picked, labels.astype(jnp.int32), where, int(num_classes), prefix,
                      class_counts)
  if not nll:
    del out[prefix + "nll"]
  w = np.asarray(where)
  for key, name in (("support", "support_size"), ("fy_loss", "fy_loss")):
    if key in stats:
      value = np.asarray(stats[key])
      if value.shape != (n,):
        raise ValueError(f"stats[{key!r}] must be [N] = ({n},) like labels, got shape "
                         f"{value.shape}.")
      out[prefix + name] = float(np.sum(np.where(w, value, 0), dtype=np.float64) / np.sum(w))
  return dict(sorted(out.items()))
