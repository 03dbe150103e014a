"""`config.mesh` with the vocabulary-parallel sampled head (its `[K, d]` table split on its rows).

On 8 fake CPU devices (tests/conftest.py): the synthetic Markov LM of lm_test (V = 24) with
`config.head.name='sampled'` trains on a 2 x 4 ('data', 'model') mesh to the per-step losses and
final metrics of the default 1-D data mesh (the same sample each step: one draw from the step's
'sample' key, replicated); the table `embedding [V, d]`, the bias and their Adam moments are
split on 'model' (`[V / 4, d]` per device), every other leaf replicated; a 'model' axis that does
not divide V is a named error; the compiled train and evaluation steps of an LM with V = 8192
hold neither the full `[V, d]` table nor any array with V columns on a device.
"""

import re

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from softmax_jax.data.text import TextDataset
from softmax_jax.train import train_and_evaluate
from tests.train.lm_test import V, markov_dataset
from tests.train.lm_test import small_config as lm_config
from tests.train.mesh_test import Recorder, compiled_lm_steps, losses

MESH = {'data': 2, 'model': 4}
HEAD = dict(name='sampled', num_sampled=6, sampler='log_uniform')


def test_language_model_sampled_mesh_matches_the_data_mesh(tmp_path):
  runs, seen = {}, None
  for name, mesh in (('1d', None), ('mesh', MESH)):
    config = lm_config(num_steps=10, num_devices=8, log_every=1, eval_every=1000, mesh=mesh)
    config.head = dict(HEAD)
    recorder = Recorder()
    with pytest.MonkeyPatch.context() as m:
      recorder.install(m)
      runs[name] = train_and_evaluate(config, str(tmp_path / name), dataset=markov_dataset())
    seen = recorder.seen
  want = losses(str(tmp_path / '1d'))
  # It trains (the comparison has content): the exact validation NLL falls below log V.
  assert len(want) == 10 and runs['1d']['validation/nll'] < np.log(V) - 0.05
  np.testing.assert_allclose(losses(str(tmp_path / 'mesh')), want, rtol=2e-5)
  for key in ('validation/nll', 'test/nll', 'test/accuracy', 'test/top5_accuracy'):
    np.testing.assert_allclose(runs['mesh'][key], runs['1d'][key], rtol=2e-5, err_msg=key)
  # The mesh run's placement: the table on its rows, the bias and the Adam moments likewise.
  d = seen['params']['head']['embedding'][1][1]
  split = {'embedding': (P('model', None), (V // 4, d)), 'bias': (P('model'), (V // 4,))}
  assert seen['params']['head'] == split
  adam = [s for s in jax.tree.leaves(seen['opt_state'], is_leaf=lambda x: isinstance(x, dict))
          if isinstance(s, dict) and 'head' in s]
  assert len(adam) == 2 and all(moments['head'] == split for moments in adam)
  is_leaf = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], P)
  others = [v for path, v in jax.tree_util.tree_leaves_with_path(seen, is_leaf=is_leaf)
            if "['head']" not in jax.tree_util.keystr(path)]
  assert len(others) > 4 and all(spec == P() for spec, _ in others)


def test_model_axis_must_divide_the_vocabulary(tmp_path):
  config = lm_config(num_steps=1, num_devices=8, mesh={'data': 1, 'model': 8})
  config.head = dict(HEAD)
  dataset = markov_dataset()  # V = 24 divides by 8: fold it to a vocabulary of 20
  splits = {k: (v % 20).astype(np.int32) for k, v in dataset.splits.items()}
  small = TextDataset(name=dataset.name, vocab=dataset.vocab[:20], splits=splits,
                      counts=np.bincount(splits['train'], minlength=20).astype(np.int64))
  with pytest.raises(ValueError, match=r"classes K = 20 must divide by the size 8 of the 'model' "
                                       r"axis.*pick a 'model' axis that divides K"):
    train_and_evaluate(config, str(tmp_path), dataset=small)


def test_no_device_holds_the_full_table_or_logits():
  """The compiled (SPMD-partitioned) train and evaluation steps of an LM with V = 8192 on the
  2 x 4 mesh: no array of a device is the `[V, d]` table or has V columns (the backbone's input
  embedding `[V, 16]` is replicated, d = 32 differs); the table's shards `[V / 4, d]` are there."""
  v, d = 8192, 32
  texts, state = compiled_lm_steps(v, dict(HEAD, num_sampled=64))
  assert state['params']['head']['embedding'].shape == (v, d)
  for name, text in texts.items():
    full = [line.strip()[:200] for line in text.splitlines()
            if re.search(rf'\[[0-9,]*,{v}\]|\[{v},{d}\]', line)]
    assert not full, (name, full[:3])
    assert re.search(rf'\[{v // 4},{d}\]', text), name  # the pattern sees the shards
