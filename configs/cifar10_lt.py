r"""CIFAR-10-LT (exponential profile, imbalance ratio 100) with ResNet-32: the setting of Cao et al.

`get_config('<method>[,small]')`, method one of
  ce              cross-entropy (post-hoc logit adjustment is reported from this run: test_posthoc/)
  ldam_drw        LDAM (max margin 0.5, s 30, cosine logits) with deferred re-weighting from epoch 160
  logit_adjusted  logit-adjusted CE, tau 1 (Menon 2021)
  cb              class-balanced CE, beta 0.9999 (Cui 2019)
  focal           focal loss, gamma 1 (Lin 2017)
  resample        CE with class-balanced sampling
'small' keeps everything but runs 20 steps (a smoke run; it still needs CIFAR-10).

Data: stock TFDS `cifar10` (downloaded on the first run: needs a network); 10% of train is carved
off for validation (temperature scaling), then train is cut to the exponential profile with
`data.imbalance_ratio = 100`; validation and test stay balanced. Recipe of Cao et al. 2019
(github.com/kaidic/LDAM-DRW): ResNet-32 (option-A shortcuts), random crop with 4 pixels of padding
and horizontal flip, SGD momentum 0.9 (no Nesterov), lr 0.1, weight decay 2e-4, batch 128, 200
epochs, linear warmup over the first 5 epochs, lr x0.01 at epochs 160 and 180; DRW (class-balanced
weights, beta 0.9999) from epoch 160.

Steps: Cao's long-tailed train set has 12,406 images (5,000 of class 0 down to 50 of class 9) and
his PyTorch loader keeps the last partial batch, so an epoch is ceil(12,406 / 128) = 97 steps and
200 epochs are 19,400 steps (warmup 485, decays and DRW at steps 15,520 and 17,460). Here the
validation carve comes first, so class 0 keeps the smallest per-class count of the carved train
(about 4,470 of the 4,500 expected) and the long-tailed train has about 11,100 images: the same
19,400 SGD updates are about 225 of its epochs (86 steps each: the pipeline drops the remainder).

Run (one per method; needs a GPU or TPU for reasonable time):
  python scripts/train.py --config=configs/cifar10_lt.py:ldam_drw --workdir=workdirs/cifar10_lt/ldam_drw

Published top-1 test accuracy, CIFAR-10-LT ratio 100, ResNet-32 (Cao's numbers are 100 - the top-1
error of their Table 2):
  CE (ERM)                70.4   Cao et al., "Learning Imbalanced Datasets with Label-Distribution-
                                 Aware Margin Loss", NeurIPS 2019, Table 2
  LDAM-DRW                77.0   Cao et al. 2019, Table 2
  logit-adjusted loss     77.7   Menon et al., "Long-tail learning via logit adjustment", ICLR 2021
Not run here: no GPU was lent.

Data: the first run downloads and prepares the stock TFDS dataset (cifar10), which needs a
network and TensorFlow (`pip install tensorflow`: Colab no longer preinstalls it).

Accelerators: batch 128 and evaluation batch 512 split over 1, 2, 4 or 8 devices as they are (16
per device on a TPU v5e-8: Cao's batch; a larger one is another experiment).
--config.model.dtype=bfloat16 --config.head.dtype=bfloat16 computes in bfloat16 (the TPU matrix
units' type; parameters, losses and softmax statistics stay float32).
"""

from softmax_jax.train.config import base_config

METHODS = {
    'ce': dict(loss='ce'),
    'ldam_drw': dict(loss='ldam', max_margin=0.5, scale=30.0),
    'logit_adjusted': dict(loss='logit_adjusted', tau=1.0),
    'cb': dict(loss='cb', beta=0.9999),
    'focal': dict(loss='focal', gamma=1.0),
    'resample': dict(loss='ce'),
}
LT_TRAIN_IMAGES = 12_406  # Cao's CIFAR-10-LT, ratio 100: sum_i int(5000 * 0.01^(i / 9))
BATCH_SIZE = 128
STEPS_PER_EPOCH = -(-LT_TRAIN_IMAGES // BATCH_SIZE)  # 97: Cao's loader keeps the last partial batch
EPOCHS, WARMUP_EPOCHS, DECAY_EPOCHS = 200, 5, (160, 180)


def get_config(arg: str = 'ce'):
  """See the module docstring for `arg`."""
  parts = [p for p in arg.split(',') if p]
  method, small = None, False
  for p in parts:
    if p == 'small':
      small = True
    elif p in METHODS and method is None:
      method = p
    else:
      raise ValueError(f"configs/cifar10_lt.py takes '<method>[,small]' with method in "
                       f'{sorted(METHODS)}; got {arg!r} ({p!r} not understood).')
  method = method or 'ce'
  c = base_config()
  c.data.name = 'cifar10'
  c.data.imbalance_ratio = 100.0
  c.data.sampling = 'class' if method == 'resample' else 'instance'
  c.model = dict(name='resnet', depth=32, widths=(16, 32, 64))
  c.head = dict(name='imbalanced', **METHODS[method])
  c.augment.crop_padding = 4
  c.augment.flip = True
  c.batch_size = BATCH_SIZE
  c.num_steps = EPOCHS * STEPS_PER_EPOCH  # 19,400
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 2e-4
  c.optimizer.schedule = 'step'
  c.optimizer.warmup_steps = WARMUP_EPOCHS * STEPS_PER_EPOCH  # 485
  c.optimizer.decay_at = tuple(e / EPOCHS for e in DECAY_EPOCHS)  # (0.8, 0.9)
  c.optimizer.decay_factor = 0.01
  if method == 'ldam_drw':
    c.head.drw_start_step = DECAY_EPOCHS[0] * STEPS_PER_EPOCH  # 15,520
  c.log_every = STEPS_PER_EPOCH
  c.eval_every = c.checkpoint_every = 10 * STEPS_PER_EPOCH
  if small:
    c.num_steps = 20
    c.optimizer.warmup_steps = 2
    c.log_every, c.eval_every, c.checkpoint_every = 5, 10, 10
    if method == 'ldam_drw':
      c.head.drw_start_step = 16
  return c.lock()
