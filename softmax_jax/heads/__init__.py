"""Output heads (flax.linen) over `softmax_jax.ops`, all with one contract (see dense.py)."""

from softmax_jax.heads.dense import DenseSoftmax

HEADS = {'dense': DenseSoftmax}

__all__ = ['DenseSoftmax', 'HEADS']
