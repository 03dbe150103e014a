# ---
# jupyter:
#   accelerator: TPU
#   colab:
#     provenance: []
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: accelerator,colab
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # softmax_jax on a Colab TPU
#
# The output layer as a **head**: train the default experiment, a large-vocabulary language
# model, benchmark the large-output heads against the full softmax, and look at what a margin head
# learns. *Runtime → Change runtime type → TPU* (one TPU v5e chip; Kaggle offers a v5e-8). It
# also runs on a CPU or GPU runtime.
#
# Every section takes its size from `SMALL` in the next cell: `True` runs the whole notebook in a
# few minutes on a CPU (the project's CI runs it so), `False` at full size (a TPU or GPU).
# `None` picks from the backend. This notebook is kept as text in `notebooks/colab_tpu.py`
# (jupytext); edit either and run `jupytext --sync notebooks/colab_tpu.ipynb`.

# %% tags=["parameters"]
SMALL = None  # True: small sizes (CPU, minutes); False: full sizes; None: False on a TPU or GPU
REPO_URL = 'https://github.com/OWNER/softmax_jax.git'  # the repository to clone on Colab
DATA_DIR = None  # holds ptb/ (ptb.{train,valid,test}.txt) or tinyshakespeare/ (input.txt);
                 # None: the checkout's ../shared/data, else WORK_DIR/data
CORPUS = 'tinyshakespeare'  # or 'ptb' (copy its three files into DATA_DIR/ptb first)
DOWNLOAD = True  # fetch Tiny Shakespeare's input.txt when DATA_DIR lacks it (needs a network)
WORK_DIR = '/tmp/softmax_jax_notebook'  # workdirs, TFDS data, figures/

# %% [markdown]
# ## Install
#
# On Colab: clone the repository and install its dependencies, keeping the preinstalled `jax`
# (built for the runtime's TPU or GPU): it is pinned with a constraints file, so a dependency that
# needs another jax stops the install with an error instead of replacing it. Inside a checkout
# (CI, a local Jupyter) this cell does nothing; the project's CI drops it (tag `install`).

# %% tags=["install"]
import importlib.metadata
import os
import re
import subprocess
import sys

if not os.path.exists('configs/digits.py') and not os.path.exists('../configs/digits.py'):
  if not os.path.exists('softmax_jax/configs'):
    subprocess.run(['git', 'clone', '-q', '--depth=1', REPO_URL, 'softmax_jax'], check=True)
  os.chdir('softmax_jax')
  keep = []
  for name in ('jax', 'jaxlib', 'libtpu'):
    try:
      keep.append(f'{name}=={importlib.metadata.version(name)}')
    except importlib.metadata.PackageNotFoundError:
      pass
  with open('/tmp/keep_jax.txt', 'w') as f:
    f.write('\n'.join(keep) + '\n')
  with open('requirements.txt') as f:  # the runtime's: not jax (kept) nor the test tools
    reqs = [r for r in (line.strip() for line in f) if r and not r.startswith('#') and not re.match(
        r'(jax|jaxlib|pytest|nbclient|nbformat|ipykernel|jupytext)\b', r)]
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '-c', '/tmp/keep_jax.txt', *reqs],
                 check=True)
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '-e', '.'], check=True)
  print('installed; kept', ', '.join(keep))

# %% [markdown]
# ## Setup: the backend and its devices

# %%
import json
import os
import shutil
import subprocess
import sys
import time

REPO = next((p for p in (os.getcwd(), os.path.dirname(os.getcwd()))
             if os.path.exists(os.path.join(p, 'configs', 'digits.py'))), None)
if REPO is None:
  raise FileNotFoundError(f'{os.getcwd()} is not in a softmax_jax checkout: run the Install cell.')
os.chdir(REPO)
sys.path[:0] = [REPO, os.path.join(REPO, 'scripts')]

import jax
import numpy as np
from IPython.display import Image, Markdown, display

print(f'jax {jax.__version__}, backend {jax.default_backend()}')
print(jax.devices())
SMALL = jax.default_backend() == 'cpu' if SMALL is None else SMALL
print('SMALL =', SMALL)
FIGURES = os.path.join(WORK_DIR, 'figures')
TFDS_DIR = os.path.join(WORK_DIR, 'tensorflow_datasets')
os.makedirs(FIGURES, exist_ok=True)

from softmax_jax.train import load_trained, train_and_evaluate
from softmax_jax.train.config import load_config_file


def fresh_workdir(name):
  """WORK_DIR/runs/<name>, emptied: a rerun trains again (the same workdir would resume)."""
  path = os.path.join(WORK_DIR, 'runs', name)
  shutil.rmtree(path, ignore_errors=True)
  return path


def summary_table(metrics, prefixes=('test/', 'validation/')):
  """Final metrics whose names start with `prefixes`, as a markdown table."""
  rows = [f'| {k} | {v:.4f} |' for k, v in sorted(metrics.items()) if k.startswith(prefixes)]
  return Markdown('\n'.join(['| metric | value |', '|---|---|', *rows]))


def show(path, name):
  """Displays the PNG at `path` and keeps a copy as FIGURES/<name>."""
  shutil.copy(path, os.path.join(FIGURES, name))
  display(Image(filename=path))


# %% [markdown]
# ## 1. The default experiment: digits, MLP + dense softmax
#
# `configs/digits.py` (scikit-learn's 8x8 digits, shipped inside scikit-learn: no download)
# through `train_and_evaluate`, the trainer `scripts/train.py` wraps. It shows a progress bar and
# ends with validation and test metrics, temperature scaling and `reliability.png`.

# %%
config = load_config_file('configs/digits.py' + (':small' if SMALL else '')).unlock()
config.data.data_dir = TFDS_DIR
start = time.time()
digits = train_and_evaluate(config.lock(), fresh_workdir('digits'))
print(f'{config.num_steps} steps in {time.time() - start:.1f} s')
display(summary_table(digits))

# %% [markdown]
# ## 2. A large-vocabulary language model
#
# Zaremba's small LSTM (`configs/ptb_lstm.py`) with a large-output head: `adaptive` (Grave et
# al. 2017) at full size, `sampled` (1024 log-uniform samples, exact softmax in evaluation) in the
# small run, whose CPU compile is shorter. The corpus is `CORPUS` from `DATA_DIR`; full size trains
# the PTB recipe (13 epochs of PTB's length).

# %%
LM_HEAD = 'sampled' if SMALL else 'adaptive'
shared = os.path.join(REPO, '..', 'shared', 'data')  # the project's copies, beside the checkout
data_dir = DATA_DIR or (shared if os.path.isdir(os.path.join(shared, CORPUS)) else
                        os.path.join(WORK_DIR, 'data'))
corpus_dir = os.path.abspath(os.path.join(data_dir, CORPUS))
missing = not os.path.exists(os.path.join(corpus_dir, 'input.txt'))
if CORPUS == 'tinyshakespeare' and DOWNLOAD and missing:
  import urllib.request
  os.makedirs(corpus_dir, exist_ok=True)
  urllib.request.urlretrieve('https://raw.githubusercontent.com/karpathy/char-rnn/master/data/'
                             'tinyshakespeare/input.txt', os.path.join(corpus_dir, 'input.txt'))
lm = None
if not os.path.isdir(corpus_dir) or not os.listdir(corpus_dir):
  print(f'skipped: no {CORPUS} files in {corpus_dir} (set DATA_DIR; DOWNLOAD for tinyshakespeare)')
else:
  config = load_config_file(f'configs/ptb_lstm.py:{LM_HEAD}' + (',small' if SMALL else '')).unlock()
  config.data.name, config.data.source_dir, config.data.data_dir = CORPUS, corpus_dir, TFDS_DIR
  if SMALL:  # a 64-wide LSTM, 40 steps, evaluated once at the end
    config.model.update(embed_dim=64, hidden=64)
    config.num_steps, config.log_every = 40, 20
    config.eval_every = config.checkpoint_every = config.num_steps
  lm = train_and_evaluate(config.lock(), fresh_workdir(f'lm_{CORPUS}_{LM_HEAD}'))
  print(f"{CORPUS}, head {LM_HEAD}: {lm['train/tokens_per_second']:.0f} tokens/s")
  display(summary_table(lm))

# %% [markdown]
# ## 3. Large-output heads against the full softmax
#
# One training step (forward and backward) of each head at growing K, Zipf labels
# (`scripts/bench_heads.py`), at the preset of this backend (`benchmark.py --preset=auto`: `cpu`,
# `gpu` or `tpu`). The small run times the dense and sampled heads on a small grid. In this
# process: on a TPU VM a second process could not open the chip.

# %%
import bench_heads
import benchmark  # scripts/: the presets and --preset=auto

preset = benchmark.resolve_preset('auto')
max_run_gib = benchmark.PRESETS[preset]['max_run_gib']
heads = None
if SMALL:
  bench_heads.PRESETS['notebook_small'] = dict(K=[4000, 16000, 64000], N=128, d=32)
  preset, heads = 'notebook_small', ['dense', 'sampled']
print(f'preset {preset}: {bench_heads.PRESETS[preset]}')
rows = bench_heads.heads_suite(preset, timed=True, repeats=2 if SMALL else 5, max_load=0, wait_s=0,
                               max_run_gib=max_run_gib, only=heads)
display(Markdown(bench_heads.table(rows)))
bench_heads.plot(rows, os.path.join(WORK_DIR, 'heads.png'))
show(os.path.join(WORK_DIR, 'heads.png'), 'heads_speedup.png')

# %% [markdown]
# ## 4. A margin head: reliability and the learned 2-D features
#
# CosFace (margin 0.1: ten classes cannot keep the paper's 0.35 on a circle) over a small CNN
# whose last layer has 2 features, on digits. The run writes `reliability.png` (test, before and
# after temperature scaling); then the test features are drawn by `scripts/plot.py --features`,
# points and per-class angle histograms (a margin head separates classes by angle).

# %%
config = load_config_file('configs/digits.py' + (':small' if SMALL else '')).unlock()
config.data.data_dir = TFDS_DIR
config.model = dict(name='cnn', channels=(16, 32), convs_per_block=1, dense=128, dropout=0.0,
                    embedding=2)
config.head = dict(name='margin', kind='cosface', margin=0.1)
config.optimizer.learning_rate, config.optimizer.warmup_steps = 1e-2, 30
config.eval_every = config.checkpoint_every = config.num_steps
margin_dir = fresh_workdir('digits_cosface_2d')
margin = train_and_evaluate(config.lock(), margin_dir)
display(summary_table(margin, ('test/', 'test_ts/')))
show(os.path.join(margin_dir, 'reliability.png'), 'margin_reliability.png')

_, dataset, model, variables = load_trained(margin_dir)
test = dataset.splits['test']
features = jax.jit(lambda v, x: model.apply(v, x, method='features'))
embeddings = np.asarray(features(variables, dataset.normalize(test.images)))
np.savez(os.path.join(margin_dir, 'embeddings.npz'), embeddings=embeddings, labels=test.labels,
         class_names=np.array([str(k) for k in range(dataset.num_classes)]),
         title=np.array('CosFace m=0.1, 2-D'))
# scripts/plot.py in its own process (its flags would clash with benchmark's here), on the CPU.
subprocess.run([sys.executable, 'scripts/plot.py', f'--features={margin_dir}',
                f'--out={margin_dir}/features.png'], check=True,
               env=dict(os.environ, JAX_PLATFORMS='cpu'))
show(os.path.join(margin_dir, 'features.png'), 'margin_features.png')

# %% [markdown]
# ## Figures
#
# Every figure above is also in `WORK_DIR/figures/`.

# %%
print(json.dumps(sorted(os.listdir(FIGURES))))
