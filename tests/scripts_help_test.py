"""Discoverability (issue 22 item 7): train.py --help lists every config, --print_config, the README's
'Your model, our head' example, `HeadedModel` on a backbone without `train`, the console entry points.

Two subprocesses (the help and the print-out are absl's, printed as the script runs), the rest
in-process with one compilation per test.
"""

import dataclasses
import importlib.util
import os
import pathlib
import re
import runpy
import subprocess
import sys
import tomllib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax import cli
from softmax_jax.heads import DenseSoftmax, MarginSoftmax
from softmax_jax.models import HeadedModel

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted((REPO / 'configs').glob('*.py'))


def _script(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, str(REPO / 'scripts' / 'train.py'), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def _load(path):
  spec = importlib.util.spec_from_file_location(f'_cfg_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_help_lists_every_config_with_its_summary_and_args():
  result = _script('--help')
  assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr  # absl: --help exits 1
  out = result.stdout
  assert '--[no]print_config' in out
  listing = out.split('configs (--config=configs/FILE.py[:ARG]', 1)[1].split('\nflags:', 1)[0]
  assert len(CONFIGS) >= 9
  for path in CONFIGS:  # against the modules imported, not the script's ast parse
    module = _load(path)
    assert f'  {path.name}  {module.__doc__.splitlines()[0].strip()}\n' in listing, path.name
    default = module.get_config.__defaults__[0]
    assert (f'(no :ARG means :{default})' in listing) == bool(default), path.name
  # The args paragraphs, as the docstrings write them ('%' survives absl's formatting).
  assert "`get_config('<method>[,small]')`, method one of" in listing
  assert '86.9% of train tokens' in listing and 'ldam_drw' in listing
  assert "`arg`: '' (default run) or 'small'" in listing


def test_print_config_prints_keys_and_defaults_with_overrides_and_does_not_train(tmp_path):
  workdir = tmp_path / 'never'
  result = _script('--config=configs/digits.py:small', '--config.batch_size=7', '--config.head.name=margin',
                   '--config.head.kind=cosface', '--print_config', f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr
  assert not workdir.exists()
  lines = result.stdout.splitlines()
  assert lines[0].startswith('# --config=configs/digits.py:small')
  values = dict(line.split(' = ', 1) for line in lines if ' = ' in line and not line.startswith('#'))
  reference = _load(REPO / 'configs' / 'digits.py').get_config('small')
  assert values['batch_size'] == '7' and values['head.kind'] == "'cosface'" and values['head.name'] == "'margin'"
  assert values['num_steps'] == repr(reference.num_steps)
  assert values['model.hidden'] == repr(tuple(reference.model.hidden))
  assert values['optimizer.learning_rate'] == repr(reference.optimizer.learning_rate)
  assert values['model.dtype'] == "'float32'"  # a module default, as --config.model.dtype takes it
  margin = {f.name: f.default for f in dataclasses.fields(MarginSoftmax)}
  assert values['head.m2'] == repr(margin['m2']) and values['head.easy_margin'] == repr(margin['easy_margin'])
  assert 'head.num_classes' not in values  # the data sets it


def test_readme_your_model_our_head_example_runs(capsys):
  readme = (REPO / 'README.md').read_text()
  section = readme.split('## Your model, our head', 1)[1].split('\n## ', 1)[0]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  exec(compile(code, 'README.md', 'exec'), {})  # pylint: disable=exec-used
  assert re.match(r'loss \d+\.\d{3}, predictions \[', capsys.readouterr().out)


def test_headed_model_on_a_backbone_without_train_equals_the_composition():
  backbone, head = nn.Dense(6), DenseSoftmax(num_classes=5)
  model = HeadedModel(backbone=backbone, head=head)
  x, labels = jax.random.normal(jax.random.PRNGKey(0), (4, 3)), jnp.array([0, 4, 2, 1])

  @jax.jit
  def run(key):
    variables = model.init(key, x, labels, train=False)
    p = variables['params']
    features = backbone.apply({'params': p['backbone']}, x)
    ours = [model.apply(variables, x, labels, train=True), model.apply(variables, x, method='log_prob'),
            model.apply(variables, x, method='predict')]
    theirs = [head.apply({'params': p['head']}, features, labels, train=True),
              head.apply({'params': p['head']}, features, method='log_prob'),
              head.apply({'params': p['head']}, features, method='predict')]
    return ours, theirs

  ours, theirs = run(jax.random.PRNGKey(1))
  assert ours[1].shape == (4, 5) and ours[2].shape == (4,)
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # An independent reference for the loss: -log_prob[label].
  np.testing.assert_allclose(ours[0], -np.take_along_axis(np.asarray(ours[1]), labels[:, None], -1)[:, 0],
                             rtol=1e-5)


@pytest.mark.parametrize('command, script', [('softmax-jax-train', 'train'),
                                             ('softmax-jax-benchmark', 'benchmark')])
def test_entry_points_resolve_and_run_their_script(command, script, monkeypatch):
  scripts = tomllib.loads((REPO / 'pyproject.toml').read_text())['project']['scripts']
  module, _, attr = scripts[command].partition(':')
  function = getattr(importlib.import_module(module), attr)
  seen = {}

  def run_path(path, run_name):  # what runpy would run, without defining absl flags in this process
    seen.update(path=path, run_name=run_name, argv=list(sys.argv), sys_path0=sys.path[0])

  monkeypatch.setattr(runpy, 'run_path', run_path)
  monkeypatch.setattr(sys, 'argv', [command])
  monkeypatch.setattr(sys, 'path', list(sys.path))
  with pytest.raises(SystemExit) as exit_:
    function(['--help'])
  assert exit_.value.code == 0
  path = str(REPO / 'scripts' / f'{script}.py')
  assert seen == {'path': path, 'run_name': '__main__', 'argv': [path, '--help'],
                  'sys_path0': str(REPO / 'scripts')}


def test_entry_point_without_a_source_tree_says_what_to_do(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'scripts/train\.py of a source checkout.*pip install -e \.'):
    cli.script_path('train', repo=str(tmp_path))
  assert cli.script_path('benchmark') == str(REPO / 'scripts' / 'benchmark.py')
