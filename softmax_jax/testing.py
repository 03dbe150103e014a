"""A chex-based check that a head (ours or a user's) keeps the head contract of DESIGN.md.

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
- losses are finite;
- `jax.vmap` over the leading axis equals the batched call (first dtype): `log_prob`, `predict`
  and both losses (the training loss with the same `'sample'` key in every mapped call: one shared
  sample, as in the batched call), so every loss must be per example;
- the training loss and its gradients (parameters and features) stay finite at extreme inputs,
  the features rescaled to `max |x| = 1e4`.

A broken property raises `HeadContractError` (an `AssertionError`) whose message starts with the
head, the property (one of `PROPERTIES`) and where it broke, e.g.
`MyHead breaks "predict == argmax(log_prob)" (float32 features, jit): ...`.
"""

import contextlib
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Variant = Callable[[Callable[..., Any]], Callable[..., Any]]

PROPERTIES = ('runs', 'shapes and dtypes', 'log_prob normalized', 'predict == argmax(log_prob)',
              'eval loss == -log_prob[label]', 'finite losses', 'vmap == batched call',
              'finite gradients at extreme inputs')


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
      evaluation loss is, by design, not the exact negative log-likelihood).
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

  def everything(p, xs, big, y):  # one function, so that a transform compiles once
    return outputs(p, xs, y), per_example(p, xs, y) if lead else None, gradients(p, big, y)

  transforms = {'variant': variant} if variant else {'jit': jax.jit, 'no jit': lambda f: f}
  names = '/'.join(jnp.dtype(d).name for d in dtypes)
  xs = [features.astype(d) for d in dtypes]
  big = [(features * (extreme / jnp.maximum(jnp.max(jnp.abs(features)), 1e-30))).astype(d)
         for d in dtypes]
  for t_name, t in transforms.items():
    try:
      out, v_out, grads = t(everything)(params, xs, big, labels)
    except Exception as e:  # pylint: disable=broad-except
      where = f'{names} features, {t_name}'
      for prop, part, x in (('runs', outputs, xs), ('vmap == batched call', per_example, xs),
                            ('finite gradients at extreme inputs', gradients, big)):
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
      if exact_eval_loss:
        with _property(head, 'eval loss == -log_prob[label]', where):
          chex.assert_trees_all_close(eval_loss, -_picked(lp, labels), atol=tol, rtol=tol)
      with _property(head, 'finite losses', where):
        chex.assert_tree_all_finite((eval_loss, train_loss))
      if v is not None:
        with _property(head, 'vmap == batched call', where + ', vmap over axis 0'):
          chex.assert_trees_all_close((v[0], v[2], v[3]), (lp, eval_loss, train_loss), atol=tol,
                                      rtol=tol)
          chex.assert_trees_all_close(_picked(lp, v[1]), jnp.max(lp, -1), atol=tol, rtol=0)
    with _property(head, 'finite gradients at extreme inputs', f'{names} features, {t_name}, '
                   f'max |x| = {extreme:g}; (training loss, (d/d params, d/d features)) per dtype'):
      chex.assert_tree_all_finite(grads)
