"""Fashion-MNIST (real, 60k/10k 28x28), small CNN + dense softmax, from Debian's IDX files.

Data: `apt-get install -y dataset-fashion-mnist` puts the IDX files in
/usr/share/datasets/fashion-mnist/ (the default `source_dir`); the local TFDS builder
`fashion_mnist_idx` reads them (the stock `fashion_mnist` checksums fail on Debian's gzip headers).
With a network, `--config.data.name=fashion_mnist` uses the stock TFDS dataset instead.

Run:
  python scripts/train.py --config=configs/fashion_mnist.py --workdir=/tmp/fmnist

Measured 2026-11-23 on the 2-core dev box (WORKSPACE.md): test accuracy 0.9285, NLL 0.220,
ECE 0.023 after 6000 steps in 14 min.

Accelerators: batch 128 and evaluation batch 512 split over 1, 2, 4 or 8 devices as they are.
--config.model.dtype=bfloat16 --config.head.dtype=bfloat16 computes in bfloat16 (the TPU matrix
units' type; parameters, losses and softmax statistics stay float32). Stock fashion_mnist: the
first run needs a network and TensorFlow (`pip install tensorflow`: Colab no longer preinstalls
it).
"""

from softmax_jax.train.config import base_config


def get_config(arg: str = ''):
  """`arg`: '' (default run) or 'small' (a short smoke run)."""
  c = base_config()
  c.data.name = 'fashion_mnist_idx'
  c.model = dict(name='cnn', channels=(32, 64), convs_per_block=1, dense=256, dropout=0.3)
  c.batch_size = 128
  c.num_steps = 6000  # ~14 epochs of the 54k training images
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 200
  c.log_every = 100
  c.eval_every = 1000
  c.checkpoint_every = 1000
  if arg == 'small':
    c.num_steps = 200
    c.log_every, c.eval_every, c.checkpoint_every = 50, 100, 100
  elif arg:
    raise ValueError(f"configs/fashion_mnist.py takes '' or 'small', got {arg!r}.")
  return c.lock()
