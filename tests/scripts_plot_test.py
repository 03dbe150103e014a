"""Smoke tests of scripts/plot.py --features: a figure from two fake workdirs, and its errors."""

import functools
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _plot(*args):
  return subprocess.run([sys.executable, os.path.join(_REPO, 'scripts', 'plot.py'), *args],
                        cwd=_REPO, capture_output=True, text=True, timeout=120, check=False)


def _write(workdir, embeddings, labels, **extra):
  os.makedirs(workdir, exist_ok=True)
  np.savez(os.path.join(workdir, 'embeddings.npz'), embeddings=embeddings, labels=labels, **extra)


def test_features_figure(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, size=200)
  angles = np.radians(90.0 * labels + rng.normal(scale=10.0, size=200))
  points = rng.uniform(1, 5, size=(200, 1)) * np.stack([np.cos(angles), np.sin(angles)], 1)
  a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
  _write(a, points.astype(np.float32), labels, class_names=np.array(['w', 'x', 'y', 'z']),
         title=np.array('softmax'))
  _write(b, 2 * points, labels)  # no class_names, no title: fallbacks
  out = tmp_path / 'f.png'
  result = _plot(f'--features={a},{b}', f'--out={out}')
  assert result.returncode == 0, result.stderr
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and out.stat().st_size > 10_000


def test_features_errors(tmp_path):
  bad = str(tmp_path / 'bad')
  _write(bad, np.zeros((5, 3)), np.zeros(5, int))
  result = _plot(f'--features={bad}')
  assert result.returncode != 0
  assert "embeddings.npz: embeddings must be [n, 2] (2-D features), got shape (5, 3)" in (
      result.stderr)
  assert not os.path.exists(os.path.join(bad, 'features.png'))
  for both_or_neither in ([f'--features={bad}', f'--workdir={bad}'], []):
    result = _plot(*both_or_neither)
    assert result.returncode != 0 and 'Pass exactly one of --workdir' in result.stderr


@functools.lru_cache(maxsize=None)  # the module once (its flags are defined only when run)
def _load_plot():
  spec = importlib.util.spec_from_file_location('plot_script', os.path.join(_REPO, 'scripts', 'plot.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize('lm', [True, False])
def test_curves_title_and_last_panel(tmp_path, monkeypatch, lm):
  workdir = tmp_path / ('ptb_lstm' if lm else 'digits')
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps(
      {'data': {'name': 'ptb' if lm else 'digits'}, 'head': {'name': 'adaptive'},
       'model': {'name': 'lstm'}}))
  rows = [{'step': s, 'train/loss': 5.0 / s, 'train/learning_rate': 1e-3} for s in (1, 2, 3)]
  rows += [{'step': 3, 'validation/nll': 4.0, 'validation/accuracy': 0.3}]  # no perplexity key
  (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  plot = _load_plot()
  saved = []
  monkeypatch.setattr(plot.plt.Figure, 'savefig', lambda fig, out, **k: saved.append((fig, out)))
  plot.plot_curves(str(workdir))
  fig, out = saved[0]
  assert out == str(workdir / 'curves.png')
  name = workdir.name
  assert fig.get_suptitle() == f'{name} (head adaptive, model lstm, data {"ptb" if lm else "digits"})'
  last = fig.axes[3]
  assert last.get_title() == ('perplexity' if lm else 'accuracy')
  assert last.get_yscale() == ('log' if lm else 'linear')
