"""The compute dtype of the backbones: checked once, by name, for every backbone.

Every backbone has a `dtype` attribute (`config.model.dtype`), the dtype of its activations and
matrix products (Flax's `dtype=`); parameters stay float32 (`param_dtype`), normalization and
attention-softmax statistics are computed in float32, and the features handed to the head are
float32 whatever the compute dtype (bfloat16 values are exact in float32), so the head's own
`dtype` (`config.head.dtype`) alone picks the head's matmul dtype.
"""

from typing import Any

import jax.numpy as jnp


def compute_dtype(module: str, dtype: Any) -> jnp.dtype:
  """`dtype` (a floating dtype or its name, e.g. 'bfloat16'; None: float32) as a `jnp.dtype`.

  Args:
    module: the backbone's class name, which starts the message.
    dtype: the backbone's `dtype` attribute.

  Returns:
    the dtype, float32 for None.

  Raises:
    ValueError: naming `dtype`, what it got and what it needs, for anything but a floating dtype.
  """
  if dtype is None:
    return jnp.dtype(jnp.float32)
  try:
    resolved = jnp.dtype(dtype)
    ok = jnp.issubdtype(resolved, jnp.floating)
  except TypeError:
    ok = False
  if not ok:
    raise ValueError(f"{module}: `dtype` (config.model.dtype, the compute dtype of the activations "
                     f"and matrix products) must be a floating dtype such as 'float32' or "
                     f"'bfloat16'; got {dtype!r}.")
  return resolved
