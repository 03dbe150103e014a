"""Classifier re-training (cRT): a new head on the frozen backbone's features, balanced or not.

Kang et al. (2020) decouple a long-tailed classifier into its representation and its classifier:
train end to end with plain instance sampling, then freeze the backbone and re-train only the
head, from scratch, on a class-balanced stream of the *real* training features. Here the
balancing is one of `SAMPLINGS` (`balance_features`):

  'instance'  the features as they are (the long tail; a control for the re-training itself)
  'class'     random oversampling with replacement (imbalanced-learn's `RandomOverSampler`): the
              real features once each, then copies drawn with replacement until every class has
              the largest class's count (the cRT baseline)
  'smote'     SMOTE in feature space (imbalanced-learn's `SMOTE`): the real features, then
              `f_i + lam (f_j - f_i)` towards one of the k nearest same-class neighbours
              (Euclidean, in feature space), every class grown to the largest class's count

'class' and 'smote' add the same number of examples per class; they differ only in whether the
added features are copies or interpolations. The pipeline:

    feats = features(model, variables, dataset.normalize(train.images), batch_size=512)
    x, y = balance_features(feats, train.labels, sampling='smote', seed=0)
    new = retrain_head(model, variables, x, y, steps=3000, batch_size=512, learning_rate=1e-3, seed=0)
    evaluate(model, new, dataset, 'test', batch_size=512, class_counts=dataset.class_counts)

The new head is a fresh instance of the run's own head module (its config, its real class counts),
re-initialised and trained with the plain cross-entropy `-log_prob[label]` of its evaluation
distribution (for LDAM, CE of `s * cos`; no margins, no re-weighting), so the model's evaluation
reads it unchanged.
"""

import functools
from typing import Any, Dict, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from softmax_jax import data as data_lib
from softmax_jax import metrics as metrics_lib
from softmax_jax import ops

SAMPLINGS = ('instance', 'class', 'smote')


def _integer(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
  """`value` as an int in [low, high), else ValueError naming `name`, what it got and what it needs."""
  ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, np.integer))
  if not ok or value < low or (high is not None and value >= high):
    span = f'>= {low}' if high is None else f'in [{low}, {high})'
    raise ValueError(f'{name} must be an integer {span}, got {value!r}.')
  return int(value)


def features(model, variables, images: np.ndarray, *, batch_size: int = 512) -> np.ndarray:
  """Backbone features of `images` in evaluation mode (no dropout, batch-norm running statistics).

  Args:
    model: a `HeadedModel` (e.g. `train.load_trained`'s `Classifier`).
    variables: its variables, `{'params': ..., **model_state}`.
    images: `[N, ...]` float, what the model takes (normalized: `Dataset.normalize`).
    batch_size: B >= 1; every batch has this shape (the last one is padded), so one compilation.

  Returns:
    `[N, d]` float32 numpy features (`model.features`).

  Raises:
    ValueError: `images` without a leading example axis or with no example, or a bad `batch_size`.
  """
  batch_size = _integer('batch_size', batch_size, 1)
  images = np.asarray(images)
  if images.ndim < 2 or len(images) == 0 or not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f'images must be [N, ...] float with N >= 1 (normalized, as the model takes '
                     f'them), got shape {images.shape} and dtype {images.dtype}.')
  out = []
  for start in range(0, len(images), batch_size):
    x = images[start:start + batch_size]
    k = len(x)
    if k < batch_size:
      x = np.concatenate([x, np.zeros((batch_size - k, *x.shape[1:]), x.dtype)])
    out.append(np.asarray(_features(model, variables, x), np.float32)[:k])
  return np.concatenate(out)


@functools.partial(jax.jit, static_argnames='model')
def _features(model, variables, images):
  return model.apply(variables, images, method='features')


def balance_features(features: np.ndarray, labels: np.ndarray, *, sampling: str, seed: int,
                     k_neighbors: int = 5) -> Tuple[np.ndarray, np.ndarray]:
  """The features `[N, d]` balanced by `sampling` (one of `SAMPLINGS`, see the module docstring).

  With 'class' and 'smote' every class present grows to the largest class count (classes absent
  from `labels` stay absent); the real features come first, unchanged and in their order, then the
  added ones (imbalanced-learn's order, class by class). Deterministic in `seed`.

  Args:
    features: `[N, d]` float, finite.
    labels: `[N]` int class ids >= 0.
    sampling: 'instance', 'class' or 'smote'.
    seed: `random_state` of the sampler, an integer in [0, 2**32).
    k_neighbors: k >= 1, SMOTE's neighbours (only 'smote' reads it).

  Returns:
    `(features [M, d] float32, labels [M] int32)`, M = N for 'instance', else K' times the
    largest count (K' classes present).

  Raises:
    ValueError: an unknown `sampling`; a bad `seed` or `k_neighbors`; `features` not `[N, d]`
      finite float; `labels` not `[N]` integers >= 0; with 'smote', a class to grow that has fewer
      than k + 1 examples (naming `k_neighbors`, the class and its count).

  References:
    Kang et al., "Decoupling Representation and Classifier for Long-Tailed Recognition", ICLR 2020.
    Chawla et al., "SMOTE: Synthetic Minority Over-sampling Technique", JAIR 16, 2002.
    Lemaitre, Nogueira and Aridas, "Imbalanced-learn", JMLR 18, 2017.
  """
  if sampling not in SAMPLINGS:
    raise ValueError(f'sampling must be one of {SAMPLINGS}, got {sampling!r}.')
  seed = _integer('seed', seed, 0, 2**32)
  k = _integer('k_neighbors', k_neighbors, 1)
  x, y = np.asarray(features), np.asarray(labels)
  if x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f'features must be [N, d] float, got shape {x.shape} and dtype {x.dtype}.')
  if y.shape != x.shape[:1] or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f'labels must be [N] = {x.shape[:1]} integer class ids to match features '
                     f'{x.shape}, got shape {y.shape} and dtype {y.dtype}.')
  if len(y) and y.min() < 0:
    raise ValueError(f'labels must be class ids >= 0, got {y.min()}.')
  if not np.all(np.isfinite(x)):
    raise ValueError(f'features must be finite, got {np.sum(~np.isfinite(x))} NaN or infinite values.')
  x, y = x.astype(np.float32), y.astype(np.int32)
  counts = np.bincount(y)
  target = counts.max() if len(y) else 0
  if sampling == 'instance' or (counts[counts > 0] == target).all():
    return x, y
  if sampling == 'class':
    from imblearn.over_sampling import RandomOverSampler  # pylint: disable=g-import-not-at-top (sklearn)
    return _cast(RandomOverSampler(random_state=seed).fit_resample(x, y))
  data_lib.smote.check_class_sizes(counts, k)
  from imblearn.over_sampling import SMOTE  # pylint: disable=g-import-not-at-top (imports sklearn)
  return _cast(SMOTE(k_neighbors=k, random_state=seed).fit_resample(x, y))


def _cast(xy):
  return np.asarray(xy[0], np.float32), np.asarray(xy[1], np.int32)


def retrain_head(model, variables, features: np.ndarray, labels: np.ndarray, *, steps: int,
                 batch_size: int, learning_rate: float, seed: int) -> Dict[str, Any]:
  """`variables` with a new head: re-initialised and trained on `(features, labels)` alone.

  The head is `model.head` (the run's module: its config, its real class counts), initialised
  afresh from `PRNGKey(seed)` and trained for `steps` steps of Adam, learning rate cosine-decayed
  from `learning_rate` to 0, on the plain cross-entropy `mean_i -log_prob(f_i)[y_i]` of minibatches
  of `batch_size` rows drawn uniformly with replacement (keys `fold_in(PRNGKey(seed), step)`). The
  whole loop is one jitted `lax.scan` with the features on the device. Adam rather than Kang's
  SGD with momentum: the problem is convex, but its curvature follows the scale of the features
  (a run's ReLU outputs, of no fixed scale), to which Adam's per-coordinate steps are insensitive,
  so one learning rate serves every run (the runs of `configs/` train with AdamW already). No
  weight decay: `steps` and `learning_rate` are the regularization, chosen on validation.

  Args:
    model: a `HeadedModel` whose head has the head contract (`log_prob`).
    variables: the trained model's variables, `{'params': {'backbone': ..., 'head': ...}, ...}`.
    features: `[N, d]` float, the backbone's features (`features`, balanced by `balance_features`).
    labels: `[N]` int in [0, K).
    steps: >= 1 optimizer steps.
    batch_size: >= 1 rows a step.
    learning_rate: > 0, the peak (first) learning rate.
    seed: integer in [0, 2**32); the same seed gives the same head.

  Returns:
    the variables with `params['head']` replaced (the backbone's and the model state untouched).

  Raises:
    ValueError: a bad option, shapes that do not match (naming the argument), labels outside
      [0, K), or a new head whose parameter tree differs from the run's.
  """
  steps = _integer('steps', steps, 1)
  batch_size = _integer('batch_size', batch_size, 1)
  seed = _integer('seed', seed, 0, 2**32)
  if not (isinstance(learning_rate, (int, float)) and 0 < learning_rate < float('inf')):
    raise ValueError(f'learning_rate must be a finite number > 0, got {learning_rate!r}.')
  x, y = jnp.asarray(features, jnp.float32), jnp.asarray(labels)
  chex.assert_rank(x, 2, custom_message='retrain_head: `features` must be [N, d]')
  if y.shape != x.shape[:1] or not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f'labels must be [N] = {x.shape[:1]} integer class ids to match features '
                     f'{x.shape}, got shape {y.shape} and dtype {y.dtype}.')
  num_classes = model.head.num_classes
  if len(y) == 0 or int(y.min()) < 0 or int(y.max()) >= num_classes:
    raise ValueError(f'labels must lie in [0, K = {num_classes}) with N >= 1, got {len(y)} labels'
                     + (f' in [{int(y.min())}, {int(y.max())}].' if len(y) else '.'))
  head = model.head
  old = variables['params']['head']
  params = head.init({'params': jax.random.PRNGKey(seed)}, x[:1], y[:1].astype(jnp.int32),
                     train=False)['params']
  if jax.tree.structure(params) != jax.tree.structure(old) or any(
      a.shape != b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(old))):
    raise ValueError(f'retrain_head: the new head {type(head).__name__} has parameters '
                     f'{jax.tree.map(jnp.shape, params)}, not those of the run '
                     f'{jax.tree.map(jnp.shape, old)}: are `features` [N, d] from this model?')
  new, losses = _train(head, params, x, y.astype(jnp.int32), jax.random.PRNGKey(seed), steps=steps,
                       batch_size=batch_size, learning_rate=float(learning_rate))
  if not np.isfinite(float(losses[-1])):
    raise FloatingPointError(f'retrain_head: the loss of the last step is {float(losses[-1])}; '
                             'lower learning_rate or check the features for huge values.')
  return {**variables, 'params': {**variables['params'], 'head': new}}


@functools.partial(jax.jit, static_argnames=('head', 'steps', 'batch_size', 'learning_rate'))
def _train(head, params, x, y, key, *, steps: int, batch_size: int, learning_rate: float):
  """`steps` Adam steps of the mean CE of minibatches drawn uniformly from `(x, y)`.

  Returns `(params, [steps] losses)`."""
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))

  def loss_fn(p, idx):
    log_probs = head.apply({'params': p}, x[idx], method='log_prob')
    return jnp.mean(ops.cross_entropy(log_probs, y[idx]))  # = -log_prob[label]: log_probs are normalized

  def step(carry, i):
    p, opt_state = carry
    idx = jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0, x.shape[0])
    loss, grads = jax.value_and_grad(loss_fn)(p, idx)
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), loss

  (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
  return params, losses


def evaluate(model, variables, dataset, split: str, *, batch_size: int = 512,
             class_counts: Optional[np.ndarray] = None, prefix: str = '') -> Dict[str, float]:
  """`metrics.summary_from_stats` of the model's `eval_stats` (temperature 1) on `split`.

  Args:
    model: a `Classifier` / `HeadedModel` over images.
    variables: its variables (e.g. `retrain_head`'s).
    dataset: the `data.Dataset` (`data.eval_batches` reads `split`).
    split: 'validation' or 'test' (or 'train').
    batch_size: evaluation batch size.
    class_counts: `[K]` training counts for the many / medium / few buckets, or None.
    prefix: put before every key.

  Returns:
    the summary's keys: accuracy, balanced_accuracy, macro_f1, nll (not for a sparse head), ece
    (15 bins), top5_accuracy when K > 5, and with `class_counts` the {many, medium, few}_accuracy
    and _count.
  """
  outs = []
  for batch in data_lib.eval_batches(dataset, split, batch_size):
    stats = jax.device_get(_eval_stats(model, variables, batch['image'], batch['label']))
    outs.append(dict(stats, label=batch['label'], mask=batch['mask']))
  stats = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
  picked = {k: stats[k][:, 0] if stats[k].ndim == 2 else stats[k]
            for k in ('prediction', 'label_rank', 'label_log_prob', 'confidence')}
  return metrics_lib.summary_from_stats(picked, stats['label'], num_classes=dataset.num_classes,
                                        where=stats['mask'], prefix=prefix, class_counts=class_counts,
                                        nll='fy_loss' not in stats)  # a sparse head's NLL: undefined


@functools.partial(jax.jit, static_argnames='model')
def _eval_stats(model, variables, images, labels):
  return model.apply(variables, images, labels, method='eval_stats', temperatures=(1.0,))
