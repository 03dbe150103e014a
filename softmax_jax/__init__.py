"""softmax_jax: the softmax bottleneck in JAX.

Subpackages: `ops` (pure functions), `heads` (Flax output layers over ops), `models`
(backbones), `data` (TFDS input pipelines), `train` (the loop), `metrics`, and `testing`
(`assert_head_contract`, the chex check of the head contract, for our heads and a user's).
"""

__version__ = "0.1.0"
