"""DenseSoftmax: the full softmax over `features @ kernel + bias`, the reference head.

Every head in `softmax_jax.heads` shares this contract (see docs/architecture.md):

- `__call__(features [..., d], labels [...] int, *, train) -> loss [...]` per example;
- `log_prob(features [..., d]) -> [..., num_classes]`, exact and normalized;
- `predict(features [..., d]) -> [...] int`, equal to `argmax(log_prob(features), -1)`;
- `eval_stats(features [..., d], labels [...] int, *, temperatures=(1.0,), log_prior=None,
  chunk_size=None) -> dict` of per-example evaluation statistics of `log_prob`: 'prediction',
  'label_rank' `[...]` int32, 'label_log_prob', 'confidence' `[..., G]` float32 (one column per
  temperature), and with `log_prior [K]` the same prefixed 'adjusted_' (post-hoc logit
  adjustment); see `softmax_jax/heads/_eval.py`. Heads for large K (fused dense, sampled,
  hierarchical, adaptive) compute them chunk by chunk over the classes, never forming `[..., K]`.

NaN (every head, the NaN rule of `softmax_jax.ops`): a NaN in one example's features makes that
example's losses (training and evaluation) NaN and its `log_prob` row all NaN, never a finite
number, and leaves every other example's outputs unchanged; the training gradient has NaNs (in the
parameters and in that example's features). `predict` of a NaN row is some id in `[0, K)` (an
integer cannot be NaN; ours give 0, as `jnp.argmax` returns the first NaN): look for NaNs in the
loss, not in the predictions.

Checks (every head): the ranks, shapes and dtypes of `features` (floating, rank >= 1; int features
are rejected, not cast) and `labels` (integer, shape `features.shape[:-1]`) are chex assertions,
raised as a `ValueError` naming the argument, eagerly and under `jit`/`vmap`/`grad` alike. Labels
outside `[0, K)` raise, naming `labels`, only when they are concrete; traced ones (under `jit`)
give a NaN loss. The head's attributes (`num_classes >= 2`, a floating or None `dtype`, ...) are
checked on every call, in training and in evaluation alike.
`softmax_jax.testing.assert_head_contract` checks a head against this contract.

Sparse mappings (`mapping='sparsemax'|'entmax15'|'entmax_bisect'`): a head whose loss is a
Fenchel-Young loss says so with the property `fenchel_young -> (mapping, alpha)` (None for a
cross-entropy head) and has `logits(features) -> [..., K]`; its evaluation loss is then
`FY(logits, label)`, not `-log_prob[label]`, and `assert_head_contract` checks that instead.
"""

import functools
import math
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax import lax
from jax.sharding import PartitionSpec as P

from softmax_jax import ops
from softmax_jax.ops import vocab_parallel as vp_ops
from softmax_jax.heads import _checks
from softmax_jax.heads import _eval

MAPPINGS = ('softmax', 'sparsemax', 'entmax15', 'entmax_bisect')


class DenseSoftmax(nn.Module):
  """Full softmax head: `logits = features @ kernel + bias`, loss = cross-entropy.

  Vocabulary padding (`pad_classes_to=m`, `config.head.pad_classes_to`): the kernel is
  `[d, K_pad]` and the bias `[K_pad]` with `K_pad = ceil(K / m) * m` (m = 128, TPU's lane width,
  keeps the `[N, K_pad]` logits and their reductions in whole vector registers). The padded
  columns get logit `-inf`, so they have probability exactly 0, gradient exactly 0 (their
  parameters never move, except by weight decay), are never predicted nor returned by `top_k`,
  and are excluded from every loss, label-smoothing target and `eval_stats` statistic: the padded
  head equals the unpadded one with the first K columns of its weights. `log_prob` and `logits`
  return the K real classes (`padded=True`: all K_pad columns, the padded ones `-inf`); training
  works on the `[..., K_pad]` logits without slicing them.

  Sigsoftmax (`sigsoftmax=True`, Kanai et al. 2018): `log_prob = ops.log_sigsoftmax(z) =
  log_softmax(z + log_sigmoid(z))`, a distribution that is not a softmax of a rank-d linear map,
  and the training loss is its cross-entropy, `-log_prob[label]` (with label smoothing over the K
  classes); the fused path cannot compute it and raises.

  Top-k (`approx_top_k`): `predict` and `top_k` use `jax.lax.approx_max_k` (TPU's fast path,
  recall about `recall_target`; exact on CPU and GPU) instead of the exact argmax / top-k;
  `top_k_recall` measures it against the exact top-k. `eval_stats` stays exact either way.

  Sparse mappings (`mapping=`, `config.head.mapping`; `alpha`, `config.head.alpha`, for
  'entmax_bisect'): the head's distribution is `p = mapping(z)` (`ops.sparsemax`, `ops.entmax15`,
  `ops.entmax_bisect(alpha=)`), which gives many classes probability exactly 0. Training and
  evaluation loss: the mapping's Fenchel-Young loss (`ops.sparsemax_loss`, ...; the padded classes
  excluded by `where`), whose gradient is `p - onehot(label)`. `log_prob = log(p)` is normalized
  and exactly -inf outside the support (so the NLL of a label outside it is inf, and `log_prob` is
  for evaluation, not for gradients); `predict` is `argmax z` and `top_k` follows the z-order (it
  ranks classes outside the support too; their log-probabilities are -inf). `eval_stats` adds
  'support' and 'fy_loss' (`_eval.fenchel_young_eval_stats`; temperature t: `mapping(z / t)`).
  Not combinable with `fused` (its op is the softmax CE), `sigsoftmax` or `label_smoothing`, nor
  with `shortlist_log_prob`.

  Vocabulary parallel (`vocab_parallel_axis='model'`, issue 21), two ways. (1) Called INSIDE
  `jax.shard_map` with the params sharded on the class axis over that mesh axis (kernel
  `P(None, 'model')`, bias `P('model')`, features replicated over it), the head holds its shard
  `[d, K_pad/M]` and `__call__` (plain and `fused`), `log_prob`, `predict` and `eval_stats` run
  `ops/vocab_parallel.py`: the loss, the argmax and the evaluation statistics are reduced across
  shards by collectives, never forming `[N, K]` nor `[d, K]` on one device; `log_prob` returns
  this shard's `[..., K_pad/M]` columns (exact, globally normalized; padded ones -inf), which
  out_specs `P(..., 'model')` assemble. (2) Outside a shard_map but under a context mesh that has
  the axis (`jax.set_mesh(mesh)`, as the trainer's `config.mesh` runs its jitted steps), the
  params are the full `[d, K_pad]` ones (placed `P(None, 'model')` by the caller) and the same
  four methods wrap themselves in a `jax.shard_map` over that mesh (rows split over its other
  axes), so the backbone stays plain jit; `log_prob` then returns all K classes. Without either
  (e.g. `init`) the head is the plain one with the full params. K_pad must divide by M
  (`pad_classes_to`, e.g. M * 128, pads it). Not with `label_smoothing` in training,
  `sigsoftmax` or a sparse `mapping`; `eval_stats` forms this shard's `[N, K_pad/M]` logits
  (`chunk_size` unused); `top_k`, `logits` and `shortlist_log_prob` are not vocab-parallel (they
  raise inside a shard_map; under a context mesh they run the plain path on the sharded params).

  Attributes:
    num_classes: K >= 2, the number of classes.
    use_bias: whether to add a learned `[K]` bias (`[K_pad]` with padding).
    label_smoothing: eps of the smoothed target `(1 - eps) * onehot + eps / K` in training.
    fused: train through `ops.linear_cross_entropy`, which never builds the `[N, K]`
      logits (for large K); `log_prob` stays the exact full softmax either way.
    chunk_size: vocabulary chunk of the fused op (None: the op's default).
    dtype: computation dtype of the matmul, None or floating, e.g. 'bfloat16' (None: the
      features' dtype). Parameters stay float32; the matmul accumulates in float32 and the
      logits, losses and log-probabilities are float32.
    pad_classes_to: None (no padding) or m >= 1: pad the classes to a multiple of m (see above).
    approx_top_k: `predict` and `top_k` by `jax.lax.approx_max_k`.
    recall_target: approx_max_k's expected recall, in (0, 1].
    sigsoftmax: normalize `z + log_sigmoid(z)` instead of `z` (see above); not with `fused`.
    mapping: 'softmax' (cross-entropy), 'sparsemax', 'entmax15' or 'entmax_bisect' (see above).
    alpha: entmax_bisect's alpha, finite and > 1 (2: sparsemax, 1.5: entmax15).
    vocab_parallel_axis: None, or the mesh axis over which the classes are sharded when the
      head runs inside `jax.shard_map` (see above).

  References:
    Kanai et al., "Sigsoftmax: Reanalysis of the softmax bottleneck", NeurIPS 2018.
    Chern et al., "TPU-KNN: K Nearest Neighbor Search at Peak FLOP/s", NeurIPS 2022
    (`jax.lax.approx_max_k`).
    Martins & Astudillo, "From softmax to sparsemax", ICML 2016.
    Peters, Niculae & Martins, "Sparse sequence-to-sequence models", ACL 2019.
    Blondel, Martins & Niculae, "Learning with Fenchel-Young losses", JMLR 2020.
  """
  num_classes: int
  use_bias: bool = True
  label_smoothing: float = 0.0
  fused: bool = False
  chunk_size: Optional[int] = None
  dtype: Any = None
  pad_classes_to: Optional[int] = None
  approx_top_k: bool = False
  recall_target: float = 0.95
  sigsoftmax: bool = False
  mapping: str = 'softmax'
  alpha: float = 1.5
  vocab_parallel_axis: Optional[str] = None

  def _config(self) -> None:
    """Validates the attributes (on every call, so evaluation-only use is checked too)."""
    name = type(self).__name__
    _checks.num_classes(name, self.num_classes)
    _checks.compute_dtype(name, self.dtype)
    _checks.in_range(name, 'label_smoothing', self.label_smoothing, 0.0, 1.0,
                     'the smoothed target (1 - eps) onehot + eps / K')
    if self.chunk_size is not None:
      _checks.integer_at_least(name, 'chunk_size', self.chunk_size, 1, 'classes per fused chunk')
    if self.pad_classes_to is not None:
      _checks.integer_at_least(name, 'pad_classes_to', self.pad_classes_to, 1,
                               'config.head.pad_classes_to: the classes are padded to a multiple '
                               'of it, e.g. 128 (TPU lanes); None: no padding')
    _eval.check_recall_target(name, self.recall_target)
    if self.sigsoftmax and self.fused:
      raise ValueError(f'{name}: sigsoftmax=True needs the [..., K] logits, which fused=True '
                       '(ops.linear_cross_entropy, the softmax of x @ kernel only) never forms; '
                       'set fused=False (config.head.fused) or sigsoftmax=False.')
    if self.mapping not in MAPPINGS:
      raise ValueError(f'{name}: `mapping` (config.head.mapping) must be one of {MAPPINGS}; '
                       f'got {self.mapping!r}.')
    if self.mapping == 'entmax_bisect':
      ok = (isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool)
            and 1 < float(self.alpha) < math.inf)
      if not ok:
        raise ValueError(f'{name}: `alpha` (config.head.alpha) of mapping=\'entmax_bisect\' must '
                         f'be a finite number > 1 (2: sparsemax, 1.5: entmax15); got {self.alpha!r}.')
    if self.mapping != 'softmax':
      for key, value, default, why in (
          ('fused', self.fused, False, 'ops.linear_cross_entropy is the softmax cross-entropy'),
          ('sigsoftmax', self.sigsoftmax, False, 'sigsoftmax is a softmax of z + log_sigmoid(z)'),
          ('label_smoothing', self.label_smoothing, 0.0,
           'the Fenchel-Young loss takes integer labels, not a smoothed target')):
        if value != default:
          raise ValueError(f'{name}: mapping={self.mapping!r} cannot be combined with '
                           f'{key}={value!r} ({why}); use mapping=\'softmax\' '
                           f'(config.head.mapping) or {key}={default!r} (config.head.{key}).')

  @property
  def fenchel_young(self) -> Optional[Tuple[str, float]]:
    """`(mapping, alpha)` when the loss is the Fenchel-Young loss of a sparse mapping (alpha:
    2 for sparsemax, 1.5 for entmax15, `self.alpha` for entmax_bisect), None for the softmax
    cross-entropy: the protocol that `softmax_jax.testing` and the trainer read."""
    alphas = {'sparsemax': 2.0, 'entmax15': 1.5}
    if self.mapping == 'softmax':
      return None
    return self.mapping, alphas.get(self.mapping, float(self.alpha))

  def _sparse_fns(self) -> Tuple[Callable[..., jax.Array], Callable[..., jax.Array]]:
    """`(map, loss)` of the sparse mapping: `map(z, where=)`, `loss(z, labels, where=)`."""
    if self.mapping == 'entmax_bisect':
      return (functools.partial(ops.entmax_bisect, alpha=float(self.alpha)),
              functools.partial(ops.entmax_bisect_loss, alpha=float(self.alpha)))
    return {'sparsemax': (ops.sparsemax, ops.sparsemax_loss),
            'entmax15': (ops.entmax15, ops.entmax15_loss)}[self.mapping]

  def _real_classes(self) -> Optional[jnp.ndarray]:
    """`[K_pad]` bool, False at the padded classes (None without padding)."""
    offsets = self._class_offsets()
    return None if offsets is None else offsets == 0

  @property
  def padded_num_classes(self) -> int:
    """K_pad: K rounded up to a multiple of `pad_classes_to` (K without padding)."""
    m = 1 if self.pad_classes_to is None else int(self.pad_classes_to)
    return -(-self.num_classes // m) * m

  def _class_offsets(self) -> Optional[jnp.ndarray]:
    """`[K_pad]` float32: 0 for the K classes, -inf for the padding (None without padding)."""
    kp = self.padded_num_classes
    if kp == self.num_classes:
      return None
    return jnp.where(jnp.arange(kp) < self.num_classes, jnp.float32(0), jnp.float32(-jnp.inf))

  def _model_shards(self) -> Optional[int]:
    """M, the size of `vocab_parallel_axis` inside a shard_map over it; else None (plain head)."""
    m = _checks.axis_size_or_none(self.vocab_parallel_axis)
    return None if m is None else self._check_shards(m)

  def _check_shards(self, m: int) -> int:
    """Raises unless the head can be split in M = `m` shards of classes; returns M."""
    name = type(self).__name__
    if self.padded_num_classes % m:
      raise ValueError(f'{name}: the classes K = {self.padded_num_classes} must divide by the size '
                       f'{m} of mesh axis {self.vocab_parallel_axis!r} (vocab_parallel_axis); pad '
                       f'them, e.g. pad_classes_to={m * 128} (config.head.pad_classes_to).')
    for key, bad in (('sigsoftmax', self.sigsoftmax), ('mapping', self.mapping != 'softmax')):
      if bad:
        raise ValueError(f'{name}: vocab_parallel_axis cannot be combined with {key}='
                         f'{getattr(self, key)!r} (the vocab-parallel ops are the softmax of z).')
    return m

  def _not_vocab_parallel(self, what: str) -> None:
    if self._model_shards() is not None:
      raise ValueError(f'{type(self).__name__}.{what} is not vocabulary-parallel yet: call it '
                       f'outside the shard_map over {self.vocab_parallel_axis!r} (with gathered '
                       'params), or use loss / log_prob / predict / eval_stats inside it.')

  def _vocab_parallel(self, features, op, *, labels=None, extra=None, columns: bool = False):
    """`op(x [N, d], w [d, K_pad/M], b [K_pad/M] or None, y [N] or None, extra)` on this shard's
    classes, or None when the head is not vocabulary-parallel here (the plain path).

    Inside a shard_map over `vocab_parallel_axis` the head's params are its shard and `op` runs
    as it is. Under a context mesh with that axis (`jax.set_mesh`, the trainer's 2-D mesh), the
    params are the full `[d, K_pad]` ones and `op` runs in a `jax.shard_map` over the whole
    mesh: kernel `P(None, axis)`, bias and `extra` (a `[K_pad]` per-class array) `P(axis)`, the
    rows of `x` and `y` split over the mesh's other axes (replicated when N does not divide by
    them); the output is split like the rows (`columns=True`: `[N, K_pad]`, `P(rows, axis)`).
    The padded classes get bias -inf on the shard that holds them.
    """
    inside = self._model_shards() is not None
    mesh = None if inside else _checks.context_mesh(self.vocab_parallel_axis)
    if not inside and mesh is None:
      return None
    axis, num_classes = self.vocab_parallel_axis, self.num_classes
    kernel, bias = self._weights(features.shape[-1])
    dtype = self.dtype or features.dtype
    x = features.reshape(-1, features.shape[-1]).astype(dtype)
    y = None if labels is None else labels.reshape(-1)

    def run(x, w, b, y, extra):
      kl = w.shape[1]
      start = lax.axis_index(axis) * kl
      if self.padded_num_classes != num_classes:
        b = jnp.zeros((kl,), jnp.float32) if b is None else b
        b = jnp.where(start + jnp.arange(kl) < num_classes, b, -jnp.inf)
      if extra is not None and extra.shape[0] != kl:  # inside a shard_map: the full [K_pad]
        extra = lax.dynamic_slice_in_dim(extra, start, kl)
      return op(x, w.astype(dtype), b, y, extra)

    if inside:
      return run(x, kernel, bias, y, extra)
    self._check_shards(mesh.shape[axis])
    rows = _checks.row_axes(mesh, axis, x.shape[0])
    specs = (P(rows, None), P(None, axis), None if bias is None else P(axis),
             None if y is None else P(rows), None if extra is None else P(axis))
    out = P(rows, axis) if columns else P(rows)
    return jax.shard_map(run, mesh=mesh, in_specs=specs, out_specs=out)(x, kernel, bias, y, extra)

  @nn.compact
  def _weights(self, d: int):
    kp = self.padded_num_classes
    m = self._model_shards()
    kp = kp if m is None else kp // m  # this shard's columns
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (d, kp), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (kp,), jnp.float32) if self.use_bias else None
    return kernel, bias

  def logits(self, features: jnp.ndarray, *, padded: bool = False) -> jnp.ndarray:
    """Unnormalized logits `[..., K]` float32 (`padded=True`: `[..., K_pad]`, -inf padding)."""
    self._config()
    self._not_vocab_parallel('logits')
    features, _ = _checks.features_and_labels(type(self).__name__, features)
    kernel, bias = self._weights(features.shape[-1])
    dtype = self.dtype or features.dtype
    z = jnp.matmul(features.astype(dtype), kernel.astype(dtype), preferred_element_type=jnp.float32)
    z = z if bias is None else z + bias
    offsets = self._class_offsets()
    if offsets is None:
      return z
    return jnp.where(offsets == 0, z, -jnp.inf) if padded else z[..., :self.num_classes]

  def _real_labels(self, loss: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """NaN where a (traced) label is a padded class, as for any label outside [0, K)."""
    if self.padded_num_classes == self.num_classes:
      return loss
    return jnp.where(labels < self.num_classes, loss, jnp.nan)

  def __call__(self, features: jnp.ndarray, labels: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Per-example cross-entropy `[...]` for `features: [..., d]`, `labels: [...] int`."""
    self._config()
    features, labels = _checks.features_and_labels(type(self).__name__, features, labels,
                                                   num_classes=self.num_classes)
    smoothing = self.label_smoothing if train else 0.0
    if self.vocab_parallel_axis is not None and smoothing and (
        self._model_shards() is not None or _checks.context_mesh(self.vocab_parallel_axis) is not None):
      raise ValueError(f'{type(self).__name__}: vocab_parallel_axis does not take label_smoothing '
                       f'(got {smoothing}) yet; set config.head.label_smoothing=0.')
    loss = self._vocab_parallel(
        features, lambda x, w, b, y, _: vp_ops.vocab_parallel_cross_entropy(
            x, w, y, bias=b, axis_name=self.vocab_parallel_axis, fused=self.fused,
            chunk_size=self.chunk_size), labels=labels)
    if loss is not None:
      return self._real_labels(loss.reshape(labels.shape), labels)
    if self.fused:
      kernel, bias = self._weights(features.shape[-1])
      dtype = self.dtype or features.dtype
      kwargs = {} if self.chunk_size is None else {'chunk_size': self.chunk_size}
      loss = ops.linear_cross_entropy(
          features.astype(dtype), kernel.astype(dtype), labels, bias=bias,
          logit_offsets=self._class_offsets(), label_smoothing=smoothing, **kwargs)
    elif self.mapping != 'softmax':
      _, fy_loss = self._sparse_fns()
      loss = fy_loss(self.logits(features, padded=True), labels, where=self._real_classes())
    else:
      loss = ops.cross_entropy(self._scores(self.logits(features, padded=True)), labels,
                               label_smoothing=smoothing)
    return self._real_labels(loss, labels)

  def _scores(self, z: jnp.ndarray) -> jnp.ndarray:
    """What the softmax normalizes: `z`, or `z + log_sigmoid(z)` with `sigsoftmax` (-inf stays)."""
    return z + jax.nn.log_sigmoid(z) if self.sigsoftmax else z

  def log_prob(self, features: jnp.ndarray, *, padded: bool = False) -> jnp.ndarray:
    """Exact normalized log-probabilities `[..., K]` (logsumexp over the last axis is 0).

    `padded=True`: `[..., K_pad]`, exactly -inf (probability 0) at the padded classes. With a
    sparse `mapping`, `log(mapping(z))`: exactly -inf outside the support too.
    """
    if self.vocab_parallel_axis is not None:
      self._config()
      features, _ = _checks.features_and_labels(type(self).__name__, features)
      log_p = self._vocab_parallel(
          features, lambda x, w, b, y, _: vp_ops.vocab_parallel_log_softmax(
              x, w, bias=b, axis_name=self.vocab_parallel_axis), columns=True)
      if log_p is not None:
        log_p = log_p.reshape(*features.shape[:-1], log_p.shape[-1])
        if self._model_shards() is not None or padded:
          return log_p  # inside a shard_map: this shard's columns
        return log_p[..., :self.num_classes]
    z = self.logits(features, padded=True)
    if self.mapping != 'softmax':
      probs, _ = self._sparse_fns()
      log_p = jnp.log(probs(z, where=self._real_classes()))
      return log_p if padded else log_p[..., :self.num_classes]
    log_p = ops.log_sigsoftmax(z) if self.sigsoftmax else ops.log_softmax(z)
    return log_p if padded else log_p[..., :self.num_classes]

  def shortlist_log_prob(self, features: jnp.ndarray, shortlist_ids: jnp.ndarray, *,
                         where: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Log-probabilities `[..., S]` of the model restricted to a shortlist of classes (decoding).

    `ops.shortlist_log_softmax` on the head's kernel and bias: only the S shortlisted columns
    are read (O(S d) per example instead of O(K d)), and the result is the head's distribution
    renormalized over the shortlist (with `sigsoftmax`, over `z + log_sigmoid(z)` likewise).

    Args:
      features: [..., d].
      shortlist_ids: [S] (shared) or [..., S] (per example) distinct class ids in [0, K).
      where: optional bool broadcastable to `[..., S]`; False marks padding entries.
    """
    self._config()
    self._not_vocab_parallel('shortlist_log_prob')
    if self.mapping != 'softmax':
      raise ValueError(f'{type(self).__name__}: shortlist_log_prob renormalizes a softmax over the '
                       f'shortlist; mapping={self.mapping!r} has no such restriction. Decode from '
                       'log_prob, or train with mapping=\'softmax\'.')
    features, _ = _checks.features_and_labels(type(self).__name__, features)
    kernel, bias = self._weights(features.shape[-1])
    dtype = self.dtype or features.dtype
    return ops.shortlist_log_softmax(
        features.astype(dtype), kernel[:, :self.num_classes].astype(dtype), shortlist_ids,
        bias=None if bias is None else bias[:self.num_classes], where=where,
        sigsoftmax=self.sigsoftmax)

  def predict(self, features: jnp.ndarray) -> jnp.ndarray:
    """Most probable class `[...] int32`, `argmax(log_prob(features), -1)` (never a padded one;
    with `approx_top_k`, `jax.lax.approx_max_k` with k = 1); with a sparse `mapping`, `argmax z`,
    a class of the largest probability."""
    if self.vocab_parallel_axis is not None:
      self._config()
      features, _ = _checks.features_and_labels(type(self).__name__, features)
      ids = self._vocab_parallel(
          features, lambda x, w, b, y, _: vp_ops.vocab_parallel_predict(
              x, w, bias=b, axis_name=self.vocab_parallel_axis))
      if ids is not None:
        return ids.reshape(features.shape[:-1])
    if not self.approx_top_k:
      return jnp.argmax(self._order(features)[..., :self.num_classes], axis=-1).astype(jnp.int32)
    _, ids = self.top_k(features, 1)
    return ids[..., 0]

  def top_k(self, features: jnp.ndarray, k: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """The k most probable classes: `(log_probs [..., k] float32, ids [..., k] int32)`.

    Exact (`jax.lax.top_k`), or `jax.lax.approx_max_k` with `approx_top_k`, over the
    `[..., K_pad]` log-probabilities (padded classes, at -inf, are never returned; k <= K); with a
    sparse `mapping`, over the z-order, with their log-probabilities (-inf outside the support).
    """
    self._config()
    self._not_vocab_parallel('top_k')
    k = _checks.integer_at_least(type(self).__name__, 'k', k, 1, 'classes returned by top_k')
    if k > self.num_classes:
      raise ValueError(f'{type(self).__name__}: top_k `k` must be <= num_classes = '
                       f'{self.num_classes}; got {k}.')
    if self.mapping != 'softmax':
      z = self.logits(features, padded=True)
      _, ids = _eval.top_k(z, k, approx=self.approx_top_k, recall_target=self.recall_target)
      ids = jnp.minimum(ids, self.num_classes - 1)
      return jnp.take_along_axis(self.log_prob(features), ids, axis=-1), ids
    values, ids = _eval.top_k(self.log_prob(features, padded=True), k, approx=self.approx_top_k,
                              recall_target=self.recall_target)
    return values, jnp.minimum(ids, self.num_classes - 1)

  def _order(self, features: jnp.ndarray) -> jnp.ndarray:
    """`[..., K_pad]` scores in the order of `predict` and `top_k`: log_prob, or z (sparse)."""
    if self.mapping != 'softmax':
      return self.logits(features, padded=True)
    return self.log_prob(features, padded=True)

  def top_k_recall(self, features: jnp.ndarray, k: int) -> jnp.ndarray:
    """[] float32: recall of `jax.lax.approx_max_k` against the exact top-k on `features`
    (the fraction of the exact k most probable classes that the approximate search finds)."""
    self._config()
    log_p = self._order(features)
    _, exact = _eval.top_k(log_p, k)
    _, approx = _eval.top_k(log_p, k, approx=True, recall_target=self.recall_target)
    return _eval.top_k_recall(approx, exact)

  def eval_stats(self, features: jnp.ndarray, labels: jnp.ndarray, *, temperatures=(1.0,),
                 log_prior=None, chunk_size: Optional[int] = None) -> Dict[str, jnp.ndarray]:
    """Per-example statistics of `log_prob` for `features: [..., d]`, `labels: [...] int`.

    Keys 'prediction', 'label_rank' `[...]` int32, 'label_log_prob', 'confidence' `[..., G]`
    float32 for the G `temperatures`, and 'adjusted_*' with `log_prior: [K]` (see
    `softmax_jax/heads/_eval.py`), over the K real classes (padding excluded). With `fused=True`
    the logits are formed `chunk_size` classes at a time (None: the head's `chunk_size`, else
    2048), so memory does not grow with K. With a sparse `mapping`, the statistics of
    `mapping(z / t)` plus 'support' `[...]` int32 and 'fy_loss' `[..., G]` float32
    (`_eval.fenchel_young_eval_stats`; `chunk_size` unused).
    """
    opts = dict(temperatures=temperatures, log_prior=log_prior)
    if self.vocab_parallel_axis is not None:
      stats = self._vocab_parallel_eval_stats(features, labels, **opts)
      if stats is not None:
        return stats
    if self.mapping != 'softmax':
      z = self.logits(features)  # the K real classes: the padding takes no part
      _, labels = _checks.features_and_labels(type(self).__name__, features, labels,
                                              num_classes=self.num_classes)
      probs, fy_loss = self._sparse_fns()
      return _eval.fenchel_young_eval_stats(z, labels, probs=probs, loss=fy_loss, **opts)
    if not self.fused:
      return _eval.from_log_prob(self, features, labels, chunk_size=chunk_size, **opts)
    self._config()
    features, labels = _checks.features_and_labels(type(self).__name__, features, labels,
                                                   num_classes=self.num_classes)
    kernel, bias = self._weights(features.shape[-1])
    x = features.astype(self.dtype or features.dtype)
    # num_classes=K: the chunks cover columns [0, K) of the [d, K_pad] kernel, never the padding.
    return _eval.linear_eval_stats(x, kernel, bias, labels, class_axis=1, num_classes=self.num_classes,
                                   chunk_size=chunk_size or self.chunk_size, **opts)

  def _vocab_parallel_eval_stats(self, features, labels, *, temperatures, log_prior):
    """`eval_stats` by `ops.vocab_parallel.vocab_parallel_eval_stats` (None: not vocab-parallel
    here): per-shard `[N, K_pad/M]` logits, the statistics reduced across the shards."""
    self._config()
    features, labels = _checks.features_and_labels(type(self).__name__, features, labels,
                                                   num_classes=self.num_classes)
    ts = _eval.check_temperatures(temperatures)
    prior = _eval.check_prior(log_prior, self.num_classes)
    if prior is not None:
      prior = jnp.pad(prior, (0, self.padded_num_classes - self.num_classes))
    stats = self._vocab_parallel(
        features, lambda x, w, b, y, p: vp_ops.vocab_parallel_eval_stats(
            x, w, y, bias=b, axis_name=self.vocab_parallel_axis, temperatures=ts, log_prior=p),
        labels=labels, extra=prior)
    if stats is None:
      return None
    real = labels < self.num_classes  # a traced padded-class label: NaN, as out of range
    out = {}
    for key, value in stats.items():
      value = value.reshape(*labels.shape, *value.shape[1:])
      if key.endswith('label_log_prob'):
        value = jnp.where(real[..., None], value, jnp.nan)
      out[key] = value
    return out
