"""Smoke tests of scripts/plot.py --features: a figure from two fake workdirs, and its errors."""

import os
import subprocess
import sys

import numpy as np

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
