"""Argument checks of the heads: chex assertions re-raised as ValueErrors that name the argument.

Three kinds, as in the ops:

- **Static** (`features_and_labels`): ranks, shapes and dtypes, read from `.shape`/`.dtype`, so
  they run the same eagerly and under `jit`/`vmap`/`grad`.
- **Concrete labels** (`features_and_labels` with `num_classes`): the label range [0, K), checked
  at the head boundary when the labels are concrete (eagerly, `head.init`), so the error names
  `labels` and the head before any op (a sampler's `true_classes`) sees them. Traced labels are
  not checked: the op under each head gives a traced out-of-range label a NaN loss.
- **Configuration** (`num_classes`, `compute_dtype`, `in_range`, `positive`,
  `integer_at_least`): Python attributes of a head, checked on every call of the head (they are
  always concrete, so under `jit` too).

The ops' private `_checks` module is not imported (docs/architecture.md: no private module across packages): these are the heads' own.
"""

import math
from typing import Any, Callable, Optional, Tuple

import chex
import jax
import jax.numpy as jnp
import numpy as np


def _chex(assertion: Callable[..., Any], *args, message: str) -> None:
  """Runs a chex `assertion(*args)`; on failure raises `ValueError(message)` chained to chex's."""
  try:
    assertion(*args)
  except AssertionError as e:
    raise ValueError(message) from e


def _array(x):
  """`x` itself if it has a dtype (an array or a tracer), else `np.asarray(x)` (lists, scalars)."""
  return x if hasattr(x, 'dtype') and hasattr(x, 'shape') else np.asarray(x)


def features_and_labels(head: str, features, labels=None, *,
                        num_classes: Optional[int] = None) -> Tuple[jax.Array, Optional[jax.Array]]:
  """`features: [..., d]` floating, rank >= 1; `labels`: None or integer, `features.shape[:-1]`.

  Args:
    head: the head's class name, which starts each message.
    features: [..., d] float array (a NumPy array or a nested list too).
    labels: [...] int array (a NumPy array or a list too), or None (log_prob, predict).
    num_classes: K; when given, concrete labels must lie in [0, K) (traced ones are not checked).

  Returns:
    `(features, labels)` as JAX arrays (`labels` None if it was None).

  Raises:
    ValueError: naming `features` or `labels`, what it got and what it needs.
  """
  features = _array(features)
  shape = tuple(np.shape(features))
  _chex(chex.assert_rank, features, set(range(1, 65)),
        message=f'{head}: `features` must have shape [..., d] (rank >= 1); got shape {shape}.')
  _chex(chex.assert_type, features, float,
        message=f'{head}: `features` must be floating; got dtype {np.dtype(features.dtype)}. '
                'Cast them (`features.astype(jnp.float32)`): the head computes in their dtype.')
  if labels is None:
    return jnp.asarray(features), None
  labels = _array(labels)
  _chex(chex.assert_shape, labels, shape[:-1],
        message=f'{head}: `labels` must have shape features.shape[:-1] = {shape[:-1]} (features: '
                f'[..., d] of shape {shape}); got shape {tuple(np.shape(labels))}. Did the '
                'backbone return features of the wrong rank?')
  _chex(chex.assert_type, labels, int,
        message=f'{head}: `labels` must be integer class ids; got dtype {np.dtype(labels.dtype)}.')
  if num_classes is not None and not isinstance(labels, jax.core.Tracer):
    y = np.asarray(labels)
    bad = (y < 0) | (y >= num_classes)
    if np.any(bad):
      at = tuple(int(i) for i in np.argwhere(bad)[0])
      raise ValueError(f'{head}: `labels` must lie in [0, {num_classes}) (num_classes = '
                       f'{num_classes}); got {y[at]} at position {at} ({int(np.sum(bad))} out of '
                       'range in all).')
  return jnp.asarray(features), jnp.asarray(labels)


def num_classes(head: str, value: Any) -> int:
  """`num_classes` is an int >= 2 (a softmax over one class is constant: loss 0, no gradient)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
    raise ValueError(f'{head}: `num_classes` must be an int >= 2 (the number of classes); '
                     f'got {value!r}.')
  return int(value)


def compute_dtype(head: str, dtype: Any) -> Any:
  """A head's `dtype` attribute is None or a floating dtype (an int one would round the kernel)."""
  if dtype is None:
    return None
  try:
    ok = jnp.issubdtype(jnp.dtype(dtype), jnp.floating)
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f'{head}: `dtype` (the matmul computation dtype) must be None or a floating '
                     f'dtype such as jnp.bfloat16; got {dtype!r} (an integer dtype would round '
                     'the kernel and the features to integers).')
  return dtype


def _number(head: str, name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
    raise ValueError(f'{head}: `{name}` must be a number; got {value!r}.')
  return float(value)


def in_range(head: str, name: str, value: float, lo: float, hi: float, why: str) -> None:
  """A configuration number lies in `[lo, hi)` (NaN never does); `why` says what it is."""
  v = _number(head, name, value)
  if not lo <= v < hi:
    raise ValueError(f'{head}: `{name}` must be in [{lo}, {hi}) ({why}); got {value!r}.')


def positive(head: str, name: str, value: float, why: str) -> None:
  """A configuration number is finite and > 0 (NaN and inf are not); `why` says what it is."""
  v = _number(head, name, value)
  if not 0 < v < math.inf:
    raise ValueError(f'{head}: `{name}` must be finite and > 0 ({why}); got {value!r}.')


def integer_at_least(head: str, name: str, value: Optional[Any], lo: int, why: str = '') -> int:
  """A configuration integer (an int, or an integral float) >= `lo`; returns it as an int."""
  ok = (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        and math.isfinite(float(value)) and float(value) == int(value) and int(value) >= lo)
  if not ok:
    why = f' ({why})' if why else ''
    raise ValueError(f'{head}: `{name}` must be an integer >= {lo}{why}; got {value!r}.')
  return int(value)


def axis_size_or_none(axis: Optional[str]) -> Optional[int]:
  """The size of mesh axis `axis` when called inside a shard_map over it; else None (also for
  `axis=None`). The vocabulary-parallel heads' test for "this is one shard"."""
  if axis is None:
    return None
  try:
    return jax.lax.axis_size(axis)
  except NameError:
    return None


def context_mesh(axis: Optional[str]):
  """The mesh of the context (`jax.set_mesh`) when it has `axis` and the caller is not already
  inside a shard_map over `axis`; else None."""
  if axis is None or axis_size_or_none(axis) is not None:
    return None
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or axis not in mesh.axis_names:
    return None
  return mesh


def row_axes(mesh, axis: str, num_rows: int):
  """The mesh axes other than `axis` over which `num_rows` rows split (None: replicated, when
  there are none or they do not divide `num_rows`)."""
  others = tuple(a for a in mesh.axis_names if a != axis)
  return others if others and num_rows % math.prod(mesh.shape[a] for a in others) == 0 else None
