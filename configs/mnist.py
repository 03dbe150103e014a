"""MNIST through the stock TFDS builder (needs a network the first time), small CNN + dense softmax.

Run:
  python scripts/train.py --config=configs/mnist.py --workdir=/tmp/mnist

Not measured on the project's offline machines (no network to download MNIST); see WORKSPACE.md.

Data: the first run downloads and prepares the stock TFDS dataset, which needs a network and
TensorFlow (`pip install tensorflow`: Colab no longer preinstalls it).

Accelerators: batch 128 and evaluation batch 512 split over 1, 2, 4 or 8 devices as they are (16
per device on a TPU v5e-8). --config.model.dtype=bfloat16 --config.head.dtype=bfloat16 computes
in bfloat16 (the TPU matrix units' type; parameters, losses and softmax statistics stay
float32).
"""

from softmax_jax.train.config import base_config


def get_config(arg: str = ''):
  """`arg`: '' (default run) or 'small' (a short smoke run)."""
  c = base_config()
  c.data.name = 'mnist'
  c.model = dict(name='cnn', channels=(32, 64), dense=256, dropout=0.3)
  c.batch_size = 128
  c.num_steps = 4000
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 200
  c.log_every, c.eval_every, c.checkpoint_every = 100, 1000, 1000
  if arg == 'small':
    c.num_steps = 200
    c.log_every, c.eval_every, c.checkpoint_every = 50, 100, 100
  elif arg:
    raise ValueError(f"configs/mnist.py takes '' or 'small', got {arg!r}.")
  return c.lock()
