"""scripts/geometry.py end to end: a short margin-head run on 8 digit classes, then open-set analysis."""

import json
import os
import subprocess
import sys

import numpy as np

from softmax_jax.train import base_config, load_trained, train_and_evaluate
from softmax_jax.train.writer import read_events

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_margin_run_then_geometry_and_feature_plot(tmp_path):
  c = base_config()
  c.data.data_dir = str(tmp_path / 'tfds')
  c.data.classes = tuple(range(8))  # 8 and 9 held out
  c.model = dict(name='cnn', channels=(8,), convs_per_block=1, dense=32, embedding=2)
  c.head = dict(name='margin', kind='sphereface')
  c.batch_size, c.num_steps, c.num_devices, c.progress = 64, 100, 1, False
  c.optimizer.learning_rate, c.optimizer.warmup_steps = 3e-3, 10
  c.log_every = c.eval_every = c.checkpoint_every = 50
  workdir = str(tmp_path / 'run')
  final = train_and_evaluate(c, workdir)
  assert final['test/accuracy'] > 0.5  # 8 classes: chance is 0.125

  config, dataset, model, variables = load_trained(workdir)
  assert dataset.num_classes == 8 and tuple(config.data.classes) == tuple(range(8))
  assert set(variables) == {'params'}  # the CNN has no mutable collections
  assert variables['params']['head']['kernel'].shape == (2, 8)

  result = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'geometry.py'),
                           f'--workdir={workdir}', '--max_pairs=20000'],
                          capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert '| sphereface | run | 2 |' in result.stdout and result.stdout.count('|---') == 10, result.stdout
  with open(os.path.join(workdir, 'geometry.json')) as f:
    geo = json.load(f)
  assert geo['held_out_classes'] == [8, 9]
  assert geo['open_set']['pairs'] == 71 * 70 // 2  # every pair of the 71 test images of 8 and 9
  assert 0.5 <= geo['open_set']['accuracy'] <= 1 and 0 <= geo['open_set']['tar'] <= 1
  assert 0 < geo['angles']['min_inter_center_angle'] <= 180
  assert geo['closed_set']['pairs'] == 20000
  arrays = np.load(os.path.join(workdir, 'embeddings.npz'))
  assert arrays['embeddings'].shape == (len(dataset.splits['test']), 2)
  assert arrays['heldout_embeddings'].shape == (71, 2)
  assert set(np.unique(arrays['heldout_labels'])) == {8, 9}
  images = {(tag, step) for step, tag, kind in read_events(os.path.join(workdir, 'tensorboard'))
            if kind == 'image'}
  assert ('images/features', 100) in images and ('images/reliability', 100) in images, images

  out = str(tmp_path / 'features.png')
  result = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'plot.py'),
                           f'--features={workdir},{workdir}', f'--out={out}'],
                          capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.getsize(out) > 10000
