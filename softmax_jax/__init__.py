"""softmax_jax: the softmax bottleneck in JAX.

Subpackages: `ops` (pure functions), `heads` (Flax output layers over ops), `models`
(backbones), `data` (TFDS input pipelines), `train` (the loop), and `metrics`.
"""

__version__ = "0.1.0"
