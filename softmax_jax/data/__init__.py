"""Data: local TFDS builders (digits, Fashion-MNIST IDX), stock TFDS datasets, NumPy batches.

`load_dataset(config.data)` returns a `Dataset` held in host memory; `train_batches` yields
deterministic, resumable shuffled batches and `eval_batches` one padded, masked pass.
No TensorFlow: everything is read through TFDS ArrayRecord data sources.
"""

from softmax_jax.data import builders
from softmax_jax.data.builders import check_labels
from softmax_jax.data.pipeline import (KNOWN_DATASETS, Dataset, Split, eval_batches, load_dataset,
                                       train_batches)

__all__ = [
    'KNOWN_DATASETS', 'Dataset', 'Split', 'builders', 'check_labels', 'eval_batches',
    'load_dataset', 'train_batches',
]
