"""Data: local TFDS builders (digits, Fashion-MNIST IDX), stock TFDS datasets, NumPy batches.

`load_dataset(config.data)` returns a `Dataset` held in host memory; `train_batches` yields
deterministic, resumable shuffled or class-aware batches (`train_indices`: their example
indices) and `eval_batches` one padded, masked pass. `longtail` cuts long-tailed train splits (`config.data.imbalance_ratio`) and holds the
class-sampling weights and over/undersampling behind `train_batches(..., sampling=...)`.
`augment` augments image batches on device, inside the train step (crop, flip, rotation,
brightness/contrast: `augment_images`); `smote.smote_dataset` balances a train split with SMOTE.
`text` holds word-level language-modelling corpora (PTB, Tiny Shakespeare through a local TFDS
builder; stock lm1b), frequency-sorted vocabularies (`vocab`) and BPTT batches.
No TensorFlow: everything is read through TFDS ArrayRecord data sources.
"""

from softmax_jax.data import augment, builders, longtail, smote, text, vocab
from softmax_jax.data.augment import augment_images, color_jitter, random_crop_flip, random_rotation
from softmax_jax.data.builders import check_labels
from softmax_jax.data.longtail import (class_sampling_weights, long_tailed_counts, make_long_tailed,
                                       resampled_indices)
from softmax_jax.data.pipeline import (KNOWN_DATASETS, SAMPLING, Dataset, Split, eval_batches,
                                       load_dataset, train_batches, train_indices)
from softmax_jax.data.text import (LM_DATASETS, TextDataset, lm_batches, lm_eval_batches,
                                   load_text_dataset)
from softmax_jax.data.smote import smote_dataset
from softmax_jax.data.vocab import build_vocab

__all__ = [
    'LM_DATASETS', 'TextDataset', 'build_vocab', 'lm_batches', 'lm_eval_batches', 'load_text_dataset',
    'text', 'vocab', 'KNOWN_DATASETS', 'SAMPLING', 'Dataset', 'Split', 'augment', 'builders', 'check_labels',
    'class_sampling_weights', 'eval_batches', 'load_dataset', 'long_tailed_counts', 'longtail',
    'make_long_tailed', 'random_crop_flip', 'resampled_indices', 'train_batches', 'train_indices',
    'augment_images', 'color_jitter', 'random_rotation', 'smote', 'smote_dataset',
]
