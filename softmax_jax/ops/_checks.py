"""Argument checks shared by the ops (and the heads): chex assertions whose errors name the argument.

Two kinds of check, and the docstrings of the ops say which they use:

- **Static** checks (ranks, shapes, shape prefixes, dtypes, broadcasting): chex assertions on
  `.shape`/`.dtype`, so they run the same eagerly and under `jit`/`vmap`/`grad`, on tracers.
- **Value** checks (labels in [0, K), positive scalars): only on concrete values. A traced value
  passes them, and the op documents what it then returns (a NaN, never a clipped index).

A failed check raises `ArgumentError`: a `ValueError` (what callers of a numerical library catch)
that is also an `AssertionError` (what chex raises), with the message
`` `name` must <what it needs>; got <what it got>. `` and chex's own message chained behind it.
"""

import operator
from typing import Any, Callable, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

_ANY_RANK = frozenset(range(0, 65))


class ArgumentError(ValueError, AssertionError):
  """A public function got an argument of the wrong rank, shape, dtype or value."""


def is_traced(x) -> bool:
  """True for a tracer (under jit/vmap/grad): its values are unknown, only its shape and dtype."""
  return isinstance(x, jax.core.Tracer)


def chex_check(assertion: Callable[..., Any], *args, name: str, need: str, got: str, **kwargs) -> None:
  """Runs `assertion(*args, **kwargs)` (a chex assertion); on failure raises `ArgumentError`
  ``f'`{name}` must {need}; got {got}.'`` chained to chex's message."""
  try:
    assertion(*args, **kwargs)
  except AssertionError as e:
    raise ArgumentError(f'`{name}` must {need}; got {got}.') from e


def _shape(x) -> tuple:
  return tuple(np.shape(x))


def rank_at_least(x, min_rank: int, name: str, layout: str) -> None:
  """`x` has rank >= `min_rank`; `layout` says what the axes are, e.g. '[..., num_classes]'."""
  chex_check(chex.assert_rank, x, set(range(min_rank, 65)), name=name,
             need=f'have shape {layout} (rank >= {min_rank})', got=f'shape {_shape(x)}')


def rank(x, expected: int, name: str, layout: str) -> None:
  """`x` has rank exactly `expected`."""
  chex_check(chex.assert_rank, x, expected, name=name, need=f'have shape {layout} (rank {expected})',
             got=f'shape {_shape(x)}')


def last_dim_at_least(x, n: int, name: str, layout: str, dim: str = 'num_classes') -> None:
  """`x` is `[..., dim]` with dim >= n (so rank >= 1); `dim` names the last axis in `layout`."""
  need = f'have shape {layout} with {dim} >= {n}'
  chex_check(chex.assert_rank, x, set(range(1, 65)), name=name, need=need, got=f'shape {_shape(x)}')
  chex_check(chex.assert_axis_dimension_gteq, x, -1, n, name=name, need=need, got=f'shape {_shape(x)}')


def shape(x, expected: Sequence[Optional[int]], name: str, what: str = '') -> None:
  """`x.shape == expected` (None in `expected` matches any size); `what` explains `expected`."""
  expected = tuple(expected)
  chex_check(chex.assert_shape, x, expected, name=name,
             need=f'have shape {what + " = " if what else ""}{expected}', got=f'shape {_shape(x)}')


def shape_prefix(x, y, n: int, x_name: str, y_name: str) -> None:
  """The first `n` axes of `x` and `y` are equal."""
  chex_check(chex.assert_rank, x, set(range(n, 65)), name=x_name,
             need=f'have at least the {n} leading axes of `{y_name}` {_shape(y)[:n]}',
             got=f'shape {_shape(x)}')
  chex_check(chex.assert_equal_shape_prefix, [x, y], n, name=x_name,
             need=f'share its leading {n} axes with `{y_name}` {_shape(y)[:n]}',
             got=f'shape {_shape(x)}')


def dtype(x, kind, name: str, need: str) -> None:
  """`x` has a dtype of `kind` (`float`, `int`, `bool` or a dtype), as `chex.assert_type` reads it."""
  chex_check(chex.assert_type, x, kind, name=name, need=need, got=f'dtype {jnp.result_type(x)}')


def broadcastable(x, target_shape: Sequence[int], name: str, target: str) -> None:
  """`x` broadcasts to `target_shape` (the shape of the argument named `target`)."""
  target_shape = tuple(target_shape)
  ok = True
  try:
    ok = jnp.broadcast_shapes(_shape(x), target_shape) == target_shape
  except ValueError:
    ok = False
  if not ok:
    raise ArgumentError(f'`{name}` must broadcast to the shape of `{target}` {target_shape}; '
                        f'got shape {_shape(x)}.')


def where_mask(where, x, *, name: str = 'where', target: str = 'logits'):
  """A bool mask broadcastable to `x`; None passes through. Returns it as an array."""
  if where is None:
    return None
  where = jnp.asarray(where)
  dtype(where, bool, name, 'be a bool mask')
  broadcastable(where, jnp.shape(x), name, target)
  return where


def in_range(name: str, ids, num_classes: int) -> None:
  """Concrete `ids` must lie in [0, K): raises naming the first bad one; traced ids pass (NaN later)."""
  if is_traced(ids):
    return
  a = np.asarray(ids)
  bad = np.argwhere((a < 0) | (a >= num_classes))
  if bad.size:
    pos = tuple(int(i) for i in bad[0])
    raise ArgumentError(f'`{name}` must lie in [0, {num_classes}); got {a[pos]} at position {pos} '
                        f'({len(bad)} out of range in all).')


def labels(labels_, num_classes: int, lead_shape: Sequence[int], logits_name: str = 'logits'):
  """Integer class ids of shape `lead_shape` (= `{logits_name}.shape[:-1]`) in [0, K).

  Shape and dtype are checked always; the range only for concrete labels (see `in_range`).
  Returns the labels as a jax array.
  """
  if not isinstance(labels_, jax.Array):
    labels_ = np.asarray(labels_)
  shape(labels_, lead_shape, 'labels', f'{logits_name}.shape[:-1]')
  dtype(labels_, int, 'labels', 'be integer class indices')
  in_range('labels', labels_, num_classes)
  return jnp.asarray(labels_)


def positive(name: str, value) -> None:
  """Concrete `value` (a scalar or array) must be finite and > 0; traced values pass."""
  if is_traced(value):
    return
  a = np.asarray(value)
  if not (np.all(np.isfinite(a)) and np.all(a > 0)):
    raise ArgumentError(f'`{name}` must be finite and > 0; got {value}.')


def finite_nonnegative(name: str, value) -> None:
  """Concrete `value` (a scalar or array) must be finite and >= 0; traced values pass."""
  if value is None or is_traced(value):
    return
  a = np.asarray(value, np.float64)
  bad = ~(np.isfinite(a) & (a >= 0))
  if a.ndim == 0 and bad:
    raise ArgumentError(f'`{name}` must be finite and >= 0; got {value}.')
  if a.ndim and bad.any():
    pos = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ArgumentError(f'`{name}` must be finite and >= 0; got {a[pos]} at position {pos} '
                        f'({int(bad.sum())} bad in all).')


def ignore_index_value(ignore_index) -> Optional[int]:
  """`ignore_index` is None or a concrete integer (it is compared with the labels); returns it."""
  if ignore_index is None:
    return None
  if is_traced(ignore_index):
    raise ArgumentError('`ignore_index` must be None or a Python int (static, like a shape: close '
                        'over it or bind it with functools.partial); got a tracer.')
  if isinstance(ignore_index, (bool, np.bool_)) or np.ndim(ignore_index):
    raise ArgumentError(f'`ignore_index` must be None or an int; got {ignore_index!r}.')
  try:
    return operator.index(ignore_index)
  except TypeError:
    raise ArgumentError(f'`ignore_index` must be None or an int; got {ignore_index!r}.') from None


def labels_or_ignored(labels_, num_classes: int, lead_shape: Sequence[int], ignore_index,
                      logits_name: str = 'logits'):
  """`labels` (see there), except that a label equal to `ignore_index` is not range-checked.

  Returns `(labels, ignored)`: the labels as a jax array and a `[...]` bool array, True where the
  label equals `ignore_index` (None when `ignore_index` is None).
  """
  ignore_index = ignore_index_value(ignore_index)
  if ignore_index is None:
    return labels(labels_, num_classes, lead_shape, logits_name), None
  if not isinstance(labels_, jax.Array):
    labels_ = np.asarray(labels_)
  shape(labels_, lead_shape, 'labels', f'{logits_name}.shape[:-1]')
  dtype(labels_, int, 'labels', 'be integer class indices')
  if not is_traced(labels_):
    a = np.asarray(labels_)
    bad = np.argwhere((a != ignore_index) & ((a < 0) | (a >= num_classes)))
    if bad.size:
      pos = tuple(int(i) for i in bad[0])
      raise ArgumentError(f'`labels` must lie in [0, {num_classes}) or equal `ignore_index` = '
                          f'{ignore_index}; got {a[pos]} at position {pos} ({len(bad)} out of '
                          f'range in all).')
  labels_ = jnp.asarray(labels_)
  return labels_, labels_ == ignore_index


def static_int(name: str, value, low: int, high: Optional[int] = None, high_name: str = '') -> int:
  """A Python int (static, like a shape) in [low, high] (`high` None: no upper bound), returned as
  an int; else `ArgumentError` naming `name`, the range and what was given (a tracer included)."""
  need = (f'a Python int >= {low}' if high is None else
          f'a Python int in [{low}, {high_name + " = " if high_name else ""}{high}]')
  if is_traced(value):
    raise ArgumentError(f'`{name}` must be {need} (static, like a shape); got a tracer.')
  if isinstance(value, (bool, np.bool_)):
    raise ArgumentError(f'`{name}` must be {need}; got {value!r}.')
  try:
    v = operator.index(value)
  except TypeError:
    raise ArgumentError(f'`{name}` must be {need}; got {value!r}.') from None
  if v < low or (high is not None and v > high):
    raise ArgumentError(f'`{name}` must be {need}; got {v}.')
  return v


def sampled_values(sampled_values, lead_shape, log_q):
  """A sampler's output for labels of shape `lead_shape`, checked: `(sampled [S] int, its name
  in messages, true_expected_count (broadcastable to lead_shape) or None, sampled_expected_count
  [S] or None)`; the counts are required (and returned) only with `log_q`."""
  triple = sampled_values if isinstance(sampled_values, (tuple, list)) else (sampled_values,)
  if len(triple) not in (1, 3):
    raise ArgumentError(
        "`sampled_values` must be a sampler's (sampled, true_expected_count, "
        f'sampled_expected_count) or the sampled ids [S] alone; got {len(triple)} items.')
  sampled, true_count, sampled_count = (*triple, None, None)[:3]
  name = 'sampled_values.sampled' if len(triple) == 3 else 'sampled_values'
  sampled = jnp.asarray(sampled)
  rank(sampled, 1, name, '[S]')
  dtype(sampled, int, name, 'be integer class ids')
  if not log_q:
    return sampled, name, None, None
  if true_count is None or sampled_count is None:
    raise ArgumentError(
        '`sampled_values` must hold the expected counts, (sampled, true_expected_count, '
        'sampled_expected_count) from a sampler called with true_classes=labels (or pass '
        'subtract_log_q=False); got no expected counts.')
  true_count, sampled_count = jnp.asarray(true_count), jnp.asarray(sampled_count)
  shape(sampled_count, sampled.shape, 'sampled_values.sampled_expected_count',
        'sampled_values.sampled.shape')
  dtype(sampled_count, float, 'sampled_values.sampled_expected_count', 'be float')
  broadcastable(true_count, tuple(lead_shape), 'sampled_values.true_expected_count', 'labels')
  dtype(true_count, float, 'sampled_values.true_expected_count', 'be float')
  return sampled, name, true_count, sampled_count
