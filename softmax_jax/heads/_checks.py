"""Argument checks of the heads: chex assertions re-raised as ValueErrors that name the argument.

Two kinds, as in the ops:

- **Static** (`features_and_labels`): ranks, shapes and dtypes, read from `.shape`/`.dtype`, so
  they run the same eagerly and under `jit`/`vmap`/`grad`.
- **Configuration** (`in_range`, `integer_at_least`): Python attributes of a head, checked when
  the head is first applied (they are always concrete).

The label *range* is not checked here: the op under each head checks concrete labels and gives a
NaN loss for traced out-of-range ones. The ops' private `_checks` module is not imported (DESIGN.md
rule 13): these are the heads' own.
"""

import math
from typing import Any, Callable, Optional

import chex
import numpy as np


def _chex(assertion: Callable[..., Any], *args, message: str) -> None:
  """Runs a chex `assertion(*args)`; on failure raises `ValueError(message)` chained to chex's."""
  try:
    assertion(*args)
  except AssertionError as e:
    raise ValueError(message) from e


def features_and_labels(head: str, features, labels=None) -> None:
  """`features: [..., d]` floating, rank >= 1; `labels`: None or integer, `features.shape[:-1]`.

  Args:
    head: the head's class name, which starts each message.
    features: [..., d] float array.
    labels: [...] int array, or None (log_prob, predict).

  Raises:
    ValueError: naming `features` or `labels`, what it got and what it needs.
  """
  shape = tuple(np.shape(features))
  _chex(chex.assert_rank, features, set(range(1, 65)),
        message=f'{head}: `features` must have shape [..., d] (rank >= 1); got shape {shape}.')
  _chex(chex.assert_type, features, float,
        message=f'{head}: `features` must be floating; got dtype {np.dtype(features.dtype)}.')
  if labels is None:
    return
  _chex(chex.assert_shape, labels, shape[:-1],
        message=f'{head}: `labels` must have shape features.shape[:-1] = {shape[:-1]} (features: '
                f'[..., d] of shape {shape}); got shape {tuple(np.shape(labels))}. Did the '
                'backbone return features of the wrong rank?')
  _chex(chex.assert_type, labels, int,
        message=f'{head}: `labels` must be integer class ids; got dtype {np.dtype(labels.dtype)}.')


def in_range(head: str, name: str, value: float, lo: float, hi: float, why: str) -> None:
  """A configuration number lies in `[lo, hi)`; `why` says what it is."""
  v = float(value)
  if not lo <= v < hi:
    raise ValueError(f'{head}: `{name}` must be in [{lo}, {hi}) ({why}); got {value!r}.')


def integer_at_least(head: str, name: str, value: Optional[Any], lo: int, why: str = '') -> int:
  """A configuration integer (an int, or an integral float) >= `lo`; returns it as an int."""
  ok = (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
        and math.isfinite(float(value)) and float(value) == int(value) and int(value) >= lo)
  if not ok:
    why = f' ({why})' if why else ''
    raise ValueError(f'{head}: `{name}` must be an integer >= {lo}{why}; got {value!r}.')
  return int(value)
