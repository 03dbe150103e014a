"""A chex-based check that a head (ours or a user's) keeps the head contract of docs/architecture.md.

```python
from softmax_jax import testing
testing.assert_head_contract(MyHead(num_classes=10), features, labels)   # [N, d], [N] int
```

A head is a `flax.linen.Module` with `__call__(features [..., d], labels [...] int, *, train)
-> loss [...]`, `log_prob(features) -> [..., K]` and `predict(features) -> [...] int`; heads that
sample in training draw from the rng stream `'sample'`. `assert_head_contract` checks, for float32
and bfloat16 features, under `jax.jit` and without it (or one chex variant, `variant=self.variant`):

- it runs: `head.init`, then `log_prob`, `predict` and the losses under the transform;
- shapes and dtypes: `log_prob` `[..., K]` float32, losses `[...]` float32, `predict` `[...]` int;
- `log_prob` is normalized (`logsumexp(log_prob, -1) == 0`);
- `predict == argmax(log_prob, -1)` (a near-tie within `atol` counts as an argmax);
- the evaluation loss (`train=False`) is `-log_prob[label]` (unless `exact_eval_loss=False`);
  for a head whose loss is a Fenchel-Young loss (below), `FY(logits, label)` instead;
- losses are finite;
- `jax.vmap` over the leading axis equals the batched call (first dtype): `log_prob`, `predict`
  and both losses (the training loss with the same `'sample'` key in every mapped call: one shared
  sample, as in the batched call), so every loss must be per example;
- the training loss and its gradients (parameters and features) stay finite at extreme inputs,
  the features rescaled to `max |x| = 1e4`;
- a NaN propagates, for its example only (first dtype; the NaN rule of `softmax_jax.ops`): with
  one NaN entry in the first example's features, that example's evaluation and training losses
  are NaN and its `log_prob` row is all NaN; its `predict` is some id in [0, K) (an integer cannot
  be NaN, so it is not specified further; our heads give 0, as `jnp.argmax` returns the first
  NaN); every other example's `log_prob`, `predict` and losses are unchanged; and the training
  loss's gradient (at the extreme inputs) has a NaN in the parameters and in that example's
  features while the other examples' feature gradients are unchanged. A head that turns a NaN
  into a finite number (a zero norm guard, `nan_to_num`, a `where` that drops it) would let a
  diverged run train on; one that spreads it over the batch would stop runs for one bad example.

- `eval_stats` agrees with `log_prob` (heads that have an `eval_stats` method; a user's head
  without one skips this property): for each dtype, with temperatures (1, 2) and a log prior,
  'prediction' is an argmax of `log_prob` (near-ties within the tolerance count), 'label_rank'
  lies between the number of classes above the label's log-prob by more than the tolerance and
  the number above it by more than minus the tolerance, and 'label_log_prob' and 'confidence'
  equal `log_softmax(log_prob / t)[label]` and `max softmax(log_prob / t)`; likewise the
  'adjusted_' ones for `log_prob - log_prior`.

Fenchel-Young heads (sparse distributions: sparsemax, entmax): a head says that its loss is the
Fenchel-Young loss of a sparse mapping by a property `fenchel_young` returning `(mapping, alpha)`
(mapping 'sparsemax', 'entmax15' or 'entmax_bisect'; alpha used by 'entmax_bisect'; None: a
cross-entropy head, as for heads without the property), and then has `logits(features) ->
[..., K]` with `log_prob = log(mapping(logits))`. For such a head, `log_prob` may be -inf (outside
the support; still normalized), the evaluation loss must equal the op's FY loss on the head's own
logits (`ops.sparsemax_loss`, ...), and `eval_stats` is checked against the mapping at each
temperature, `mapping(logits / t)` (and `mapping((logits - log_prior) / t)` for 'adjusted_'):
'prediction' an argmax and 'label_rank' the rank of the label by the logits, 'label_log_prob'
(compared as probabilities, `exp`) and 'confidence' the label's and the largest probability, and,
when present, 'fy_loss' `FY(logits / t, label)` and 'support' `#{k : p_k > 0}` at t = 1.

A broken property raises `HeadContractError` (an `AssertionError`) whose message starts with the
head, the property (one of `PROPERTIES`) and where it broke, e.g.
`MyHead breaks "predict == argmax(log_prob)" (float32 features, jit): ...`.
"""

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax import ops

Variant = Callable[[Callable[..., Any]], Callable[..., Any]]

PROPERTIES = ('runs', 'shapes and dtypes', 'log_prob normalized', 'predict == argmax(log_prob)',
              'eval loss == -log_prob[label]', 'finite losses', 'vmap == batched call',
              'finite gradients at extreme inputs', 'NaN propagates',
              'eval_stats agrees with log_prob', 'eval loss == fenchel_young(logits, label)')

_TEMPERATURES = (1.0, 2.0)  # of the eval_stats check


class HeadContractError(AssertionError):
  """A head broke one property of the head contract (named in the message)."""


@contextlib.contextmanager
def _property(head: nn.Module, name: str, where: str) -> Iterator[None]:
  """Re-raises any failure inside as a `HeadContractError` naming the head, `name` and `where`."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    raise HeadContractError(f'{type(head).__name__} breaks "{name}" ({where}): '
                            f'{type(e).__name__}: {e}') from e


def _fenchel_young(head: nn.Module):
  """`(mapping(z), loss(z, labels))` from the ops for a head whose `fenchel_young` is
  `(mapping, alpha)`; None for a cross-entropy head."""
  spec = getattr(head, 'fenchel_young', None)
  if spec is None:
    return None
  mapping, alpha = spec
  if mapping == 'entmax_bisect':
    return (lambda z: ops.entmax_bisect(z, alpha=alpha),
            lambda z, y: ops.entmax_bisect_loss(z, y, alpha=alpha))
  fns = {'sparsemax': (ops.sparsemax, ops.sparsemax_loss),
         'entmax15': (ops.entmax15, ops.entmax15_loss)}
  if mapping not in fns:
    raise ValueError(f'{type(head).__name__}.fenchel_young names the mapping {mapping!r}; '
                     "softmax_jax.testing knows 'sparsemax', 'entmax15' and 'entmax_bisect'.")
  return fns[mapping]


def _picked(log_prob: jax.Array, index: jax.Array) -> jax.Array:
  """`log_prob[..., index]`: `[..., K]`, `[...]` int -> `[...]`."""
  return jnp.take_along_axis(log_prob, index[..., None].astype(jnp.int32), axis=-1)[..., 0]


def assert_head_contract(
    head: nn.Module,
    features: jax.typing.ArrayLike,
    labels: jax.typing.ArrayLike,
    *,
    rng: Union[int, jax.Array] = 0,
    variables: Optional[Any] = None,
    num_classes: Optional[int] = None,
    variant: Optional[Variant] = None,
    exact_eval_loss: bool = True,
    dtypes: Sequence[Any] = (jnp.float32, jnp.bfloat16),
    extreme: float = 1e4,
    atol: float = 1e-4,
) -> None:
  """Asserts that `head` keeps the head contract on `features` and `labels` (see the module doc).

  Args:
    head: the head module, e.g. `DenseSoftmax(num_classes=K)`.
    features: [..., d] float features (a few rows are enough; a leading batch axis enables the
      `vmap` check).
    labels: [...] int class ids in [0, K), `features.shape[:-1]`.
    rng: seed or key for `head.init` and the `'sample'` stream of the training loss.
    variables: the head's variables (None: `head.init` on float32 features, `train=False`).
    num_classes: K (None: `head.num_classes`).
    variant: one function transform to run every check under, e.g. `self.variant` in a
      `@chex.variants(...)` test; None: both `jax.jit` and no transform.
    exact_eval_loss: check that the evaluation loss is `-log_prob[label]` (False for a head whose
      evaluation loss is, by design, not the exact negative log-likelihood); for a Fenchel-Young
      head (`head.fenchel_young`, see the module doc) that it is `FY(head.logits, label)`.
    dtypes: feature dtypes to check (the features are cast; outputs must be float32 for each).
    extreme: the features' largest magnitude in the finite-gradients check.
    atol: absolute tolerance of the normalization, argmax-tie, loss and vmap comparisons
      (float32 features; bfloat16 features get `100 * atol` for comparisons across code paths).
      On accelerators whose float32 matmuls default to reduced precision (TF32, bfloat16 passes),
      run under `jax.default_matmul_precision('highest')` or raise `atol`.

  Raises:
    HeadContractError: naming the head, the broken property (one of `PROPERTIES`) and where
      (the feature dtype and the transform), with chex's message.
  """
  key = jax.random.PRNGKey(rng) if isinstance(rng, (int, np.integer)) else rng
  init_key, sample_key = jax.random.split(key)
  rngs = {'sample': sample_key}
  features, labels = jnp.asarray(features, jnp.float32), jnp.asarray(labels)
  lead = labels.shape
  k = head.num_classes if num_classes is None else num_classes
  if variables is None:
    with _property(head, 'runs', 'head.init'):
      variables = head.init({'params': init_key, **rngs}, features, labels, train=False)
  params = variables['params']
  rest = {c: v for c, v in variables.items() if c != 'params'}

  def apply(p, x, *args, **kwargs):
    return head.apply({'params': p, **rest}, x, *args, rngs=rngs, **kwargs)

  def outputs(p, xs, y):  # per dtype: log_prob [..., K], predict [...] int, eval, train loss [...]
    return [(apply(p, x, method='log_prob'), apply(p, x, method='predict'),
             apply(p, x, y, train=False), apply(p, x, y, train=True)) for x in xs]

  def per_example(p, xs, y):  # `outputs` of the first dtype under vmap over axis 0 (one shared rng)
    return jax.vmap(lambda xi, yi: outputs(p, [xi], yi)[0])(xs[0], y)

  def gradients(p, xs, y):  # per dtype: the training loss's sum and d/d(params, features)
    return [jax.value_and_grad(lambda p, x: jnp.sum(apply(p, x, y, train=True)), (0, 1))(p, x)
            for x in xs]

  def poisoned(p, nan_xs, y):  # first dtype, one NaN: outputs, and gradients at extreme inputs
    return outputs(p, nan_xs[:1], y)[0], gradients(p, nan_xs[1:], y)[0]

  has_stats = callable(getattr(head, 'eval_stats', None))
  fy = _fenchel_young(head)
  log_prior = jnp.log(jnp.linspace(1.0, 3.0, k) / jnp.sum(jnp.linspace(1.0, 3.0, k)))

  def stats(p, xs, y):  # per dtype: eval_stats with two temperatures and a log prior
    return [apply(p, x, y, temperatures=_TEMPERATURES, log_prior=log_prior, method='eval_stats')
            for x in xs] if has_stats else None

  def fy_logits(p, xs):  # per dtype: a Fenchel-Young head's logits [..., K]
    return [apply(p, x, method='logits') for x in xs] if fy else None

  def everything(p, xs, big, nan_xs, y):  # one function, so that a transform compiles once
    return (outputs(p, xs, y), per_example(p, xs, y) if lead else None, gradients(p, big, y),
            poisoned(p, nan_xs, y), stats(p, xs, y), fy_logits(p, xs))

  transforms = {'variant': variant} if variant else {'jit': jax.jit, 'no jit': lambda f: f}
  names = '/'.join(jnp.dtype(d).name for d in dtypes)
  xs = [features.astype(d) for d in dtypes]
  big = [(features * (extreme / jnp.maximum(jnp.max(jnp.abs(features)), 1e-30))).astype(d)
         for d in dtypes]
  nan_at = (0,) * len(lead) + (0,)  # one entry of the first example's features
  nan_xs = [x.at[nan_at].set(jnp.nan) for x in (xs[0], big[0])]
  for t_name, t in transforms.items():
    try:
      out, v_out, grads, nan_out, s_out, z_out = t(everything)(params, xs, big, nan_xs, labels)
    except Exception as e:  # pylint: disable=broad-except
      where = f'{names} features, {t_name}'
      for prop, part, x in (('runs', outputs, xs), ('vmap == batched call', per_example, xs),
                            ('finite gradients at extreme inputs', gradients, big),
                            ('NaN propagates', poisoned, nan_xs),
                            ('eval_stats agrees with log_prob', stats, xs)):
        with _property(head, prop, where):  # the first part that fails alone names the property
          t(part)(params, x, labels)
      with _property(head, 'runs', where):
        raise e
    for dtype, (lp, pred, eval_loss, train_loss), v in zip(dtypes, out, [v_out] + [None] * len(xs)):
      where = f'{jnp.dtype(dtype).name} features, {t_name}'
      tol = atol if jnp.dtype(dtype) == jnp.float32 else 100 * atol
      for name, value, shape, kind in (('log_prob', lp, (*lead, k), jnp.float32),
                                       ('predict', pred, lead, int),
                                       ('eval loss', eval_loss, lead, jnp.float32),
                                       ('train loss', train_loss, lead, jnp.float32)):
        with _property(head, 'shapes and dtypes', f'{where}, {name}'):
          chex.assert_shape(value, shape)
          chex.assert_type(value, kind)
      with _property(head, 'log_prob normalized', where):
        chex.assert_trees_all_close(jax.nn.logsumexp(lp, -1), jnp.zeros(lead), atol=atol, rtol=0)
      with _property(head, 'predict == argmax(log_prob)', where):
        chex.assert_trees_all_close(_picked(lp, pred), jnp.max(lp, -1), atol=tol, rtol=0)
      refs = None
      if fy:  # from the ops, on the head's own logits: one compilation for all of them
        z = z_out[dtypes.index(dtype)]
        with _property(head, 'shapes and dtypes', f'{where}, logits'):
          chex.assert_shape(z, (*lead, k))
        refs = jax.jit(functools.partial(_fy_references, fy))(z, labels, log_prior)
      if exact_eval_loss and fy:
        with _property(head, 'eval loss == fenchel_young(logits, label)', where):
          chex.assert_trees_all_close(eval_loss, refs['loss'], atol=tol, rtol=tol)
      elif exact_eval_loss:
        with _property(head, 'eval loss == -log_prob[label]', where):
          chex.assert_trees_all_close(eval_loss, -_picked(lp, labels), atol=tol, rtol=tol)
      with _property(head, 'finite losses', where):
        chex.assert_tree_all_finite((eval_loss, train_loss))
      if s_out is not None:
        with _property(head, 'eval_stats agrees with log_prob', where):
          if fy:
            _assert_fy_stats_agree(s_out[dtypes.index(dtype)], z, labels, log_prior, refs, tol)
          else:
            _assert_stats_agree(s_out[dtypes.index(dtype)], lp, labels, log_prior, tol)
      if v is not None:
        with _property(head, 'vmap == batched call', where + ', vmap over axis 0'):
          chex.assert_trees_all_close((v[0], v[2], v[3]), (lp, eval_loss, train_loss), atol=tol,
                                      rtol=tol)
          chex.assert_trees_all_close(_picked(lp, v[1]), jnp.max(lp, -1), atol=tol, rtol=0)
    with _property(head, 'finite gradients at extreme inputs', f'{names} features, {t_name}, '
                   f'max |x| = {extreme:g}; (training loss, (d/d params, d/d features)) per dtype'):
      chex.assert_tree_all_finite(grads)
    tol = atol if jnp.dtype(dtypes[0]) == jnp.float32 else 100 * atol
    with _property(head, 'NaN propagates', f'{jnp.dtype(dtypes[0]).name} features, {t_name}, '
                   f'features{list(nan_at)} = nan'):
      _assert_nan_propagates(out[0], grads[0][1][1], nan_out, k, tol)


def _assert_nan_propagates(clean, clean_feature_grad, poisoned, k: int, tol: float) -> None:
  """The first example of `poisoned` (outputs, (loss, (d/d params, d/d features))) is NaN, the
  others equal `clean` (outputs) and `clean_feature_grad`; raises AssertionError saying what not."""
  (lp, pred, eval_loss, train_loss), (_, (param_grad, feature_grad)) = poisoned
  first = lambda a, n=0: np.asarray(a, np.float32).reshape((-1,) + a.shape[a.ndim - n:])[0]
  rest = lambda a, n=0: jnp.reshape(a, (-1,) + a.shape[a.ndim - n:])[1:]
  for name, value in (('evaluation loss', eval_loss), ('training loss', train_loss)):
    if not np.isnan(first(value)):
      raise AssertionError(f'the {name} of the example with a NaN feature is {first(value)}, '
                           'not NaN: the NaN was turned into a finite number.')
  if not np.all(np.isnan(first(lp, 1))):
    raise AssertionError(f'the log_prob row of the example with a NaN feature has finite entries '
                         f'({first(lp, 1)}); it must be all NaN.')
  p0 = int(np.asarray(pred).reshape(-1)[0])
  if not 0 <= p0 < k:
    raise AssertionError(f'predict of the example with a NaN feature is {p0}, outside [0, {k}).')
  leaves = jax.tree.leaves(param_grad)  # (a head without parameters has none to check)
  if leaves and not any(np.any(np.isnan(np.asarray(g, np.float32))) for g in leaves):
    raise AssertionError('the training loss is NaN but its gradient with respect to the '
                         'parameters is finite: the NaN was dropped on the way back.')
  if not np.any(np.isnan(first(feature_grad, 1))):
    raise AssertionError('the gradient with respect to the NaN example\'s features is finite '
                         f'({first(feature_grad, 1)}); it must have a NaN.')
  clean_lp, _, clean_eval, clean_train = clean
  for name, value, ref, n in (('log_prob', lp, clean_lp, 1),
                              ('evaluation loss', eval_loss, clean_eval, 0),
                              ('training loss', train_loss, clean_train, 0),
                              ('feature gradient', feature_grad, clean_feature_grad, 1)):
    try:
      chex.assert_trees_all_close(rest(value, n), rest(ref, n), atol=tol, rtol=tol)
    except AssertionError as e:
      raise AssertionError(f'one NaN example changed the {name} of the other examples: {e}') from e
  try:  # predict of the others: an argmax of their clean log_prob (a near-tie within tol counts)
    others = rest(clean_lp, 1)
    chex.assert_trees_all_close(_picked(others, rest(pred)), jnp.max(others, -1), atol=tol, rtol=0)
  except AssertionError as e:
    raise AssertionError(f'one NaN example changed the predictions of the others: {e}') from e


def _assert_order_stats(stats, prefix: str, scores, labels, tol: float, what: str) -> None:
  """`stats[prefix + 'prediction']` is an argmax of `scores` and `stats[prefix + 'label_rank']`
  the number of classes scoring above the label (near-ties within `tol` count either way)."""
  missing = {prefix + key for key in ('prediction', 'label_rank', 'label_log_prob',
                                      'confidence')} - set(stats)
  if missing:
    raise AssertionError(f'eval_stats lacks {sorted(missing)}; it returned {sorted(stats)}.')
  pred, rank = stats[prefix + 'prediction'], stats[prefix + 'label_rank']
  chex.assert_type((pred, rank), (int, int))
  chex.assert_shape((pred, rank), labels.shape)
  chex.assert_trees_all_close(_picked(scores, pred), jnp.max(scores, -1), atol=tol, rtol=0,
                              custom_message=f'{prefix}prediction is not an argmax of the {what}')
  label = _picked(scores, labels)[..., None]
  low, high = jnp.sum(scores > label + tol, -1), jnp.sum(scores > label - tol, -1) - 1  # - the label
  if not bool(jnp.all((low <= rank) & (rank <= high))):
    raise AssertionError(f'{prefix}label_rank {np.asarray(rank)} is not the number of classes '
                         f'whose {what} is above the label\'s (between {np.asarray(low)} and '
                         f'{np.asarray(high)}).')


def _assert_stats_agree(stats, log_prob, labels, log_prior, tol: float) -> None:
  """`stats` (a head's eval_stats) are the statistics of `log_prob` (and of `log_prob -
  log_prior` for 'adjusted_'), within `tol` (near-ties count either way); AssertionError if not."""
  for prefix, lp in (('', log_prob), ('adjusted_', log_prob - log_prior)):
    _assert_order_stats(stats, prefix, lp, labels, tol, 'log-probabilities')
    want_lp, want_conf = [], []
    for t in _TEMPERATURES:
      scaled = jax.nn.log_softmax(lp / t, axis=-1)
      want_lp.append(_picked(scaled, labels))
      want_conf.append(jnp.exp(jnp.max(scaled, -1)))
    for key, want in (('label_log_prob', want_lp), ('confidence', want_conf)):
      got = stats[prefix + key]
      chex.assert_shape(got, (*labels.shape, len(_TEMPERATURES)))
      chex.assert_type(got, jnp.float32)
      chex.assert_trees_all_close(got, jnp.stack(want, -1), atol=tol, rtol=tol,
                                  custom_message=f'{prefix}{key} at temperatures {_TEMPERATURES}')


def _fy_references(fns, logits, labels, log_prior):
  """From the ops (`fns = (mapping, loss)`, one call each, on every view and temperature at
  once): the FY loss, and per view ('' and 'adjusted_') the label's and the largest probability
  and the FY loss `[..., G]` at each temperature, and the support at t = 1."""
  probs, loss = fns
  t = jnp.asarray(_TEMPERATURES, logits.dtype)[:, None]
  scaled = jnp.stack([logits, logits - log_prior])[..., None, :] / t  # [2, ..., G, K]
  y = jnp.broadcast_to(labels[..., None], scaled.shape[:-1])
  p = probs(scaled)
  fy_loss = loss(scaled, y)
  out = {'loss': fy_loss[0, ..., 0]}
  for v, prefix in enumerate(('', 'adjusted_')):
    out[prefix + 'label_log_prob'] = _picked(p[v], y[v])
    out[prefix + 'confidence'] = jnp.max(p[v], -1)
    out[prefix + 'fy_loss'] = fy_loss[v]
    out[prefix + 'support'] = jnp.sum(p[v, ..., 0, :] > 0, -1)
  return out


def _assert_fy_stats_agree(stats, logits, labels, log_prior, refs, tol: float) -> None:
  """`stats` (a Fenchel-Young head's eval_stats) are those of `mapping(logits / t)` (and of
  `mapping((logits - log_prior) / t)` for 'adjusted_'), within `tol`, with `refs` those of the
  ops (`_fy_references`); AssertionError if not."""
  for prefix, s in (('', logits), ('adjusted_', logits - log_prior)):
    _assert_order_stats(stats, prefix, s, labels, tol, 'logits')
    for key in ('label_log_prob', 'confidence', 'fy_loss'):
      if key == 'fy_loss' and prefix + key not in stats:
        continue  # optional
      value = refs[prefix + key]
      got = stats[prefix + key]
      chex.assert_shape(got, (*labels.shape, len(_TEMPERATURES)))
      chex.assert_type(got, jnp.float32)
      got = jnp.exp(got) if key == 'label_log_prob' else got  # compared as probabilities
      chex.assert_trees_all_close(got, value, atol=tol, rtol=tol,
                                  custom_message=f'{prefix}{key} at temperatures {_TEMPERATURES}')
    if prefix + 'support' in stats:  # optional
      chex.assert_type(stats[prefix + 'support'], int)
      chex.assert_trees_all_equal(
          stats[prefix + 'support'], refs[prefix + 'support'].astype(stats[prefix + 'support'].dtype),
          custom_message=f'{prefix}support is not #{{k : p_k > 0}} at t = 1')
