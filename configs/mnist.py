"""MNIST through the stock TFDS builder (needs a network the first time), small CNN + dense softmax.

Run:
  python scripts/train.py --config=configs/mnist.py --workdir=/tmp/mnist

Not measured on the project's offline machines (no network to download MNIST); see WORKSPACE.md.
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
