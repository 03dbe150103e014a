"""Training: the task interface, state, the step, data-parallel drivers, checkpoints, writers, the loop."""

from softmax_jax.train.config import base_config, validate_config
from softmax_jax.train.interrupt import TrainingInterrupted
from softmax_jax.train.loop import train_and_evaluate
from softmax_jax.train.runner import Diverged
from softmax_jax.train.task import TASKS, build_task, load_trained
from softmax_jax.train.workdir import WorkdirError

__all__ = ['Diverged', 'TASKS', 'TrainingInterrupted', 'WorkdirError', 'base_config', 'build_task',
           'load_trained', 'train_and_evaluate', 'validate_config']
