"""Fashion-MNIST-LT (exponential profile, imbalance ratio 100): long-tail losses and resampling.

`get_config('<method>[,seed=N][,augment][,small]')`, method one of
  ce              cross-entropy (post-hoc logit adjustment is reported from this run: test_posthoc/)
  focal           focal loss, gamma 1 (Lin 2017)
  cb              class-balanced CE, beta 0.9999 (Cui 2019)
  cb_focal        class-balanced focal, beta 0.9999, gamma 1
  resample        CE with class-balanced sampling
  ldam_drw        LDAM (max margin 0.5, s 30, cosine logits) with deferred re-weighting at 80% of
                  training (Cao 2019)
  logit_adjusted  logit-adjusted CE, tau 1 (Menon 2021)
  smote           CE on the train split balanced once by SMOTE in input space, k = 5 (Chawla 2002;
                  imbalanced-learn); synthetic examples depend on the seed; heads and the
                  many/medium/few buckets see the real class counts
`augment` adds on-device random rotation (uniform in [-10, 10] degrees, edge fill) and colour
jitter: brightness +-0.2 and contrast x[0.8, 1.2], in units of the normalized images (std about 0.35 of
[0, 1] pixels, so +-0.2 is about +-0.07 of the pixel range), e.g. `configs/fashion_lt.py:ce,augment`.

Train keeps 5374 images of class 0 down to 53 of class 9 (13,333 in all; no class has < 20, so
the "few" bucket is empty); validation (6000) and test (10000) stay balanced. Run the table (WORKSPACE.md, "Imbalance"):
  python scripts/train.py --config=configs/fashion_lt.py:ldam_drw,seed=1 --workdir=workdirs/lt/ldam_drw_1

Measured 2026-11-23 on the 2-core dev box, 3 seeds, test balanced accuracy (~85 s per run): CE
84.10 ± 0.19, focal 84.04, CB 86.73, CB focal 86.50, resampling 86.85, LDAM-DRW 86.88,
logit-adjusted 87.44 ± 0.28, CE + post-hoc adjustment 87.44 ± 0.33 (WORKSPACE.md).

Accelerators: batch 128 and evaluation batch 512 split over 1, 2, 4 or 8 devices as they are.
--config.model.dtype=bfloat16 --config.head.dtype=bfloat16 computes in bfloat16 (the TPU matrix
units' type; parameters, losses and softmax statistics stay float32). Without the Debian package
(e.g. on Colab), --config.data.name=fashion_mnist reads the stock TFDS dataset (network and
TensorFlow).
"""

from softmax_jax.train.config import base_config

METHODS = {
    'ce': dict(loss='ce'),
    'focal': dict(loss='focal', gamma=1.0),
    'cb': dict(loss='cb', beta=0.9999),
    'cb_focal': dict(loss='cb_focal', beta=0.9999, gamma=1.0),
    'resample': dict(loss='ce'),
    'ldam_drw': dict(loss='ldam', max_margin=0.5, scale=30.0),
    'logit_adjusted': dict(loss='logit_adjusted', tau=1.0),
    'smote': dict(loss='ce'),
}
# `augment`: small rotations and colour jitter that keep a 28x28 garment recognizable.
AUGMENT = dict(rotation_degrees=10.0, brightness=0.2, contrast=0.2)


def get_config(arg: str = 'ce'):
  """See the module docstring for `arg`."""
  parts = [p for p in arg.split(',') if p]
  method, seed, small, augment = None, 0, False, False
  for p in parts:
    if p == 'small':
      small = True
    elif p == 'augment':
      augment = True
    elif p.startswith('seed='):
      seed = int(p[len('seed='):])
    elif p in METHODS and method is None:
      method = p
    else:
      raise ValueError(f"configs/fashion_lt.py takes '<method>[,seed=N][,augment][,small]' with method in "
                       f'{sorted(METHODS)}; got {arg!r} ({p!r} not understood).')
  method = method or 'ce'
  c = base_config()
  c.seed = seed
  c.data.name = 'fashion_mnist_idx'
  c.data.imbalance_ratio = 100.0
  c.data.sampling = {'resample': 'class', 'smote': 'smote'}.get(method, 'instance')
  c.model = dict(name='cnn', channels=(16, 32), convs_per_block=1, dense=128, dropout=0.2)
  c.head = dict(name='imbalanced', **METHODS[method])
  if augment:
    c.augment.update(AUGMENT)
  c.batch_size = 128
  c.num_steps = 1500  # ~14 epochs of the 13.3k long-tailed training images
  if method == 'ldam_drw':
    c.head.drw_start_step = int(0.8 * c.num_steps)  # Cao: epoch 160 of 200
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 100
  c.log_every = 100
  c.eval_every = 500
  c.checkpoint_every = 500
  if small:
    c.num_steps = 100
    c.log_every, c.eval_every, c.checkpoint_every = 25, 50, 50
    if method == 'ldam_drw':
      c.head.drw_start_step = 80
  return c.lock()
