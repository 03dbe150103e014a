"""notebooks/colab_tpu.ipynb: agrees with its jupytext twin, and runs top to bottom on a CPU.

The run executes the notebook with nbclient in a fresh kernel, as CI does: JAX_PLATFORMS=cpu and
one CPU device (the 8 fake devices of conftest.py are taken out of XLA_FLAGS), no network. The
cell tagged `install` (clone and pip install, for Colab) is dropped; after the cell tagged
`parameters` a cell sets SMALL=True, DOWNLOAD=False and WORK_DIR to a temporary folder (papermill's
convention: tag `injected-parameters`). Any failing cell fails the test with its traceback; then
the figures in WORK_DIR/figures and the runs' final metrics are checked. The language-model
section needs ../shared/data/tinyshakespeare beside the checkout (CI has it); without it the
notebook prints that it skipped the section, and so does this test.
"""

import json
import os

import matplotlib.image
import numpy as np
import pytest

nbformat = pytest.importorskip('nbformat')
jupytext = pytest.importorskip('jupytext')
nbclient = pytest.importorskip('nbclient')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'colab_tpu.ipynb')
TWIN = os.path.join(REPO, 'notebooks', 'colab_tpu.py')
SHARED_CORPUS = os.path.join(REPO, '..', 'shared', 'data', 'tinyshakespeare', 'input.txt')
FIGURES = ('heads_speedup.png', 'margin_reliability.png', 'margin_features.png')


def _cells(nb):
  return [(c.cell_type, c.source.strip(), sorted(c.metadata.get('tags', []))) for c in nb.cells]


def test_notebook_and_its_jupytext_twin_agree():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  twin = jupytext.read(TWIN)
  assert _cells(nb) == _cells(twin), (
      'notebooks/colab_tpu.ipynb and colab_tpu.py differ: run `jupytext --sync notebooks/colab_tpu.ipynb`')
  assert nb.metadata.get('accelerator') == 'TPU'  # Colab opens it on a TPU runtime
  for cell in nb.cells:  # committed without outputs: the diff stays reviewable text
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, cell.source[:60]
  tags = [t for _, _, ts in _cells(nb) for t in ts]
  assert tags.count('parameters') == 1 and tags.count('install') == 1


def _ci_notebook(work_dir):
  """The notebook as CI runs it: no install cell; small, offline parameters after 'parameters'."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells = [c for c in nb.cells if 'install' not in c.metadata.get('tags', [])]
  at = next(i for i, c in enumerate(nb.cells) if 'parameters' in c.metadata.get('tags', []))
  injected = nbformat.v4.new_code_cell(
      f'SMALL = True\nDOWNLOAD = False\nWORK_DIR = {str(work_dir)!r}',
      metadata={'tags': ['injected-parameters']})
  nb.cells.insert(at + 1, injected)
  return nb


def _image_is_a_figure(path):
  """A real plot: not tiny, not one flat colour; a few colours over a good share of the pixels."""
  img = matplotlib.image.imread(path)
  assert img.ndim == 3 and min(img.shape[:2]) >= 300, (path, img.shape)
  rgb = img[..., :3].reshape(-1, 3)
  ink = np.mean(np.any(rgb < 0.9, axis=1))  # share of non-white pixels
  colours = len(np.unique((rgb * 15).round(), axis=0))
  assert 0.02 < ink < 0.9 and colours >= 8, (path, ink, colours)


def _final(work_dir, run):
  with open(os.path.join(work_dir, 'runs', run, 'final_metrics.json')) as f:
    return json.load(f)


def test_notebook_runs_small_on_cpu_without_network(tmp_path, xla_flags):
  work_dir = tmp_path / 'work'
  nb = _ci_notebook(work_dir)
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=xla_flags(0), MPLBACKEND='Agg',
             PYTHONPATH=REPO)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': os.path.join(REPO, 'notebooks')}})
  try:
    client.execute(env=env)  # a failing cell raises CellExecutionError with its traceback
  finally:
    nbformat.write(nb, str(tmp_path / 'executed.ipynb'))  # for a look after a failure
  text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code' for o in c.outputs)
  assert 'backend cpu' in text and 'SMALL = True' in text

  for name in FIGURES:
    _image_is_a_figure(os.path.join(work_dir, 'figures', name))
  digits = _final(work_dir, 'digits')
  assert digits['test/accuracy'] > 0.9  # chance 0.1; digits:small reaches ~0.98
  margin = _final(work_dir, 'digits_cosface_2d')
  assert margin['test/accuracy'] > 0.4  # 2-D features, 300 steps: ~0.75 measured
  if os.path.exists(SHARED_CORPUS):
    lm = _final(work_dir, 'lm_tinyshakespeare_sampled')
    assert 1 < lm['test/perplexity'] < 2000, lm  # uniform over ~12k words would be ~12000
  else:
    assert 'skipped: no tinyshakespeare files' in text
    pytest.skip(f'the language-model section was skipped: no {SHARED_CORPUS}')
