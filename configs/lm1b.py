"""One Billion Word benchmark (Chelba et al. 2013), stock TFDS `lm1b`, for users with a network.

`get_config('[<backbone>][,<head>][,small]')`, backbone one of
  transformer   causal pre-LN Transformer, 6 layers, d_model 512, 8 heads, MLP 2048, dropout 0.1,
                windows of 256 tokens (default)
  lstm          2 LSTM layers of 1024 over 512-d embeddings, dropout 0.1, 64 unrolled steps, the
                state carried across windows
and head one of adaptive (default), dense, sampled, hierarchical. `small`: 1M train tokens,
a 2-layer d=128 model, 200 steps: a pipeline check that still downloads lm1b once.

Vocabulary: the 100,000 most frequent train words (`<eos>`, `<unk>` and 99,998 words; lm1b's
full vocabulary is ~793k words, the count Jozefowicz et al. 2016 and Grave et al. 2017 use:
`--config.data.vocab_size=0` keeps every train word, with the adaptive cutoffs to match, e.g.
`--config.head.cutoffs='(4000, 40000, 200000)'`). The adaptive head's cutoffs (4000, 20000) put
the 4000 most frequent words in the head (Grave et al.'s choice for lm1b's first cluster).

Memory: all train tokens are held as one int32 stream (~0.8B tokens, 3.2 GB) plus the line
tokenization while loading; `--config.data.max_train_tokens=N` keeps the first N. Validation is
10,000 lines held out from the end of TFDS train, test the TFDS test split (data/text.py).

Run (the first run downloads and prepares lm1b in data_dir: ~10 GB, needs TensorFlow):
  python scripts/train.py --config=configs/lm1b.py --workdir=workdirs/lm1b/transformer_adaptive
  python scripts/train.py --config=configs/lm1b.py:lstm,sampled --workdir=workdirs/lm1b/lstm_sampled

Accelerators: batch 64 and evaluation batch 64 (16 and 16 in the small variant) split over 1, 2,
4 or 8 devices as they are (8 rows per device on a TPU v5e-8; raise --config.batch_size with the
learning rate for throughput, another experiment). --config.model.dtype=bfloat16
--config.head.dtype=bfloat16 computes the Transformer or LSTM and the head in bfloat16 (the TPU
matrix units' type; parameters, losses and softmax statistics stay float32).
"""

from softmax_jax.train.config import base_config

BACKBONES = {
    'transformer': dict(name='transformer', d_model=512, num_layers=6, num_heads=8, mlp_dim=2048,
                        dropout=0.1, max_len=256),
    'lstm': dict(name='lstm', embed_dim=512, hidden=1024, num_layers=2, dropout=0.1, init_scale=0.05),
}
SEQ_LEN = {'transformer': 256, 'lstm': 64}
HEADS = {
    'adaptive': dict(name='adaptive', cutoffs=(4000, 20000), div_value=4.0),
    'dense': dict(name='dense'),
    'sampled': dict(name='sampled', num_sampled=8192, sampler='log_uniform'),
    'hierarchical': dict(name='hierarchical', tree='huffman'),
}


def get_config(arg: str = 'transformer'):
  """See the module docstring for `arg`."""
  backbone, head, small = None, None, False
  for p in (p for p in arg.split(',') if p):
    if p == 'small':
      small = True
    elif p in BACKBONES and backbone is None:
      backbone = p
    elif p in HEADS and head is None:
      head = p
    else:
      raise ValueError(f"configs/lm1b.py takes '[<backbone>][,<head>][,small]' with backbone in "
                       f'{sorted(BACKBONES)}, head in {sorted(HEADS)}; got {arg!r} ({p!r} not understood).')
  backbone = backbone or 'transformer'
  c = base_config()
  c.data.name = 'lm1b'
  c.data.vocab_size = 100_000
  c.data.max_train_tokens = 0
  c.data.seq_len = SEQ_LEN[backbone]
  c.model = dict(BACKBONES[backbone])
  c.head = dict(HEADS[head or 'adaptive'])
  c.batch_size = 64
  c.eval_batch_size = 64
  c.num_steps = 200_000
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 5e-4 if backbone == 'transformer' else 1e-3
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = 4000
  c.optimizer.end_learning_rate_fraction = 0.05
  c.optimizer.weight_decay = 0.01
  c.optimizer.b2 = 0.98
  c.optimizer.clip_global_norm = 1.0
  c.log_every = 200
  c.eval_every = 10_000
  c.checkpoint_every = 2000
  if small:
    c.data.max_train_tokens = 1_000_000
    c.data.vocab_size = 20_000
    if backbone == 'transformer':
      c.model.update(d_model=128, num_layers=2, num_heads=4, mlp_dim=512)
    else:
      c.model.update(embed_dim=128, hidden=128)
    if c.head.name == 'adaptive':
      c.head.cutoffs = (2000, 8000)
    if c.head.name == 'sampled':
      c.head.num_sampled = 1024
    c.batch_size = c.eval_batch_size = 16
    c.num_steps = 200
    c.optimizer.warmup_steps = 20
    c.log_every, c.eval_every, c.checkpoint_every = 50, 100, 100
  return c.lock()
