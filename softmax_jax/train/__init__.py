"""Training: state, the step, data-parallel drivers, checkpoints, metric writers, the loop."""

from softmax_jax.train.config import base_config, validate_config
from softmax_jax.train.interrupt import TrainingInterrupted
from softmax_jax.train.loop import evaluate, load_trained, train_and_evaluate
from softmax_jax.train.workdir import WorkdirError

__all__ = ['TrainingInterrupted', 'WorkdirError', 'base_config', 'evaluate', 'load_trained',
           'train_and_evaluate', 'validate_config']
