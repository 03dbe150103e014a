"""PTB word-level LM, the "small" LSTM of Zaremba et al. 2014 (published test perplexity 114.5).

`get_config('<head>[,small][,epochs=N][,mixtures=M]')`, head one of
  dense         full softmax over the 10k vocabulary (the paper's setting)
  adaptive      adaptive softmax, cutoffs (2000, 6000), div_value 2 (Grave et al. 2017): the 2000
                most frequent words (86.9% of train tokens) in the head, 4000 (9.9%) in a tail of
                width 100, the last 4000 (3.2%) in a tail of width 50 (div 4 would leave 12 of d=200)
  sampled       sampled softmax, 1024 log-uniform (Zipf) samples (Jean et al. 2015); exact in eval
  hierarchical  hierarchical softmax over a Huffman tree of the train counts (Morin & Bengio 2005)
  mos           mixture of M softmaxes (Yang et al. 2018; M=5, `mixtures=M` to change it), contexts
                of width 200, streamed over the vocabulary in training (heads/mixture.py)
  sigsoftmax    the dense head with sigsoftmax, softmax(z + log sigmoid(z)) (Kanai et al. 2018)
`small`: a CPU smoke run of the same model (100 steps, < 1 min once PTB is prepared).
`epochs=N`: train N epochs (default 13), learning rate halved after each epoch from the 5th on.
`mixtures=M`: the number of MoS components (mos only).

The setting (Zaremba's "small", ptb_word_lm.py of the TensorFlow tutorials): 2 LSTM layers of 200,
200-d embeddings, 20 unrolled steps, batch 20 (the train stream cut into 20 contiguous rows, the
state carried across windows), every weight uniform(-0.1, 0.1) (the head keeps its own init),
no dropout, plain SGD, 13 epochs of (929,589 - 1) // 20 // 20 = 2323 steps, learning rate 1
halved every epoch after the 4th, gradients clipped to global norm 5. Zaremba's loss is the SUM
over the 20 steps of the batch-mean NLL; ours is the mean over all B x T tokens, 20x smaller, so
the same update is SGD with learning rate 20 and clipping at norm 5 / 20 = 0.25 (the defaults of
PyTorch's word_language_model example, for the same reason). The perplexity is evaluated with
the state carried across the whole split, 10 rows.

Run (from the repo root; PTB raw files in ../shared/data/ptb, prepared into data_dir on first use):
  python scripts/train.py --config=configs/ptb_lstm.py:dense --workdir=workdirs/ptb/dense
  python scripts/train.py --config=configs/ptb_lstm.py:adaptive --workdir=workdirs/ptb/adaptive
  python scripts/train.py --config=configs/ptb_lstm.py:dense,small --workdir=/tmp/ptb_small
  python scripts/train.py --config=configs/ptb_lstm.py:mos,mixtures=15 --workdir=workdirs/ptb/mos15

Accelerators: Zaremba's batch 20 and evaluation batch 10 are kept; with 8 devices (a TPU v5e-8)
the run uses the 5 that divide both, with a warning (train/parallel.py); --config.batch_size=24
--config.eval_batch_size=16 uses all 8 (another experiment). Each window is 20 sequential LSTM
steps of a [rows, 200] matmul: more devices split the rows but do not shorten that chain.
--config.model.dtype=bfloat16 --config.head.dtype=bfloat16 computes in bfloat16 (the TPU matrix
units' type; parameters, losses and softmax statistics stay float32).
"""

import os

from softmax_jax.train.config import base_config

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTB_DIR = os.path.normpath(os.path.join(_REPO, '..', 'shared', 'data', 'ptb'))
PTB_TRAIN_TOKENS = 929_589  # 887,521 words + 42,068 <eos> of ptb.train.txt

HEADS = {
    'dense': dict(name='dense'),
    'adaptive': dict(name='adaptive', cutoffs=(2000, 6000), div_value=2.0),
    'sampled': dict(name='sampled', num_sampled=1024, sampler='log_uniform'),
    'hierarchical': dict(name='hierarchical', tree='huffman'),
    'mos': dict(name='mos', num_mixtures=5),
    'sigsoftmax': dict(name='dense', sigsoftmax=True),
}


def get_config(arg: str = 'dense'):
  """See the module docstring for `arg`."""
  head, small, epochs, mixtures = None, False, 13, None
  number = lambda p, key: p.startswith(key) and p[len(key):].isdigit() and int(p[len(key):]) >= 1
  for p in (p for p in arg.split(',') if p):
    if p == 'small':
      small = True
    elif number(p, 'epochs='):
      epochs = int(p[len('epochs='):])
    elif number(p, 'mixtures='):
      mixtures = int(p[len('mixtures='):])
    elif p in HEADS and head is None:
      head = p
    else:
      raise ValueError(f"configs/ptb_lstm.py takes '<head>[,small][,epochs=N][,mixtures=M]' with "
                       f'head in {sorted(HEADS)} and N, M >= 1; got {arg!r} ({p!r} not understood).')
  if mixtures is not None and head != 'mos':
    raise ValueError(f'configs/ptb_lstm.py: mixtures={mixtures} is an option of the mos head, '
                     f'got head {head or "dense"!r} in {arg!r}.')
  c = base_config()
  c.data.name = 'ptb'
  c.data.source_dir = PTB_DIR
  c.data.vocab_size = 0  # PTB's own 10k (9,999 words with <unk>, plus <eos>)
  c.data.seq_len = 20
  c.model = dict(name='lstm', embed_dim=200, hidden=200, num_layers=2, dropout=0.0, init_scale=0.1)
  c.head = dict(HEADS[head or 'dense'])
  if mixtures is not None:
    c.head.num_mixtures = mixtures
  c.batch_size = 20
  c.eval_batch_size = 10
  steps_per_epoch = (PTB_TRAIN_TOKENS - 1) // c.batch_size // c.data.seq_len  # 2323
  c.num_steps = epochs * steps_per_epoch
  c.optimizer.name = 'sgd'
  c.optimizer.momentum = 0.0
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 0.0
  c.optimizer.learning_rate = 20.0  # = Zaremba's 1.0 on the loss summed over 20 steps (docstring)
  c.optimizer.clip_global_norm = 0.25  # = 5 on that sum
  c.optimizer.schedule = 'step'
  c.optimizer.warmup_steps = 0
  c.optimizer.decay_at = tuple(e / epochs for e in range(4, epochs))  # x0.5 at epochs 5, 6, ...
  c.optimizer.decay_factor = 0.5
  c.log_every = 100
  c.eval_every = steps_per_epoch
  c.checkpoint_every = 500
  if small:
    c.num_steps = 100
    c.log_every, c.eval_every, c.checkpoint_every = 25, 50, 50
  return c.lock()
