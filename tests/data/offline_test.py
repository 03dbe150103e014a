"""Stock TFDS datasets that are not prepared fail fast offline, with one line on how to get them."""

import socket
import time

import pytest

from softmax_jax.data import builders
from softmax_jax.data import pipeline
from softmax_jax.data import text


def _load(name, data_dir):
  if name == 'lm1b':
    return text._lm1b_lines(str(data_dir))  # pylint: disable=protected-access
  return pipeline.load_dataset({'name': name, 'data_dir': str(data_dir)})


@pytest.mark.parametrize('name', ['mnist', 'cifar10', 'lm1b'])
def test_offline_stock_dataset_fails_fast_with_one_line(name, tmp_path, monkeypatch):
  # Any connection attempt fails at once (as offline); a download would never be tried.
  def refuse(*args, **kwargs):
    raise OSError('network is unreachable')
  monkeypatch.setattr(socket, 'create_connection', refuse)
  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr('tensorflow_datasets.core.DatasetBuilder.download_and_prepare',
                      lambda *a, **k: pytest.fail('tried to download'))
  with pytest.raises(builders.NoNetworkError) as error:
    _load(name, tmp_path)
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith(f'{name} is not prepared in {tmp_path} and downloading it needs a '
                            'network')
  assert f"tfds.builder('{name}', data_dir='{tmp_path}').download_and_prepare()" in message
  assert 'config.data.data_dir' in message


def test_an_unroutable_proxy_fails_in_under_10_seconds(tmp_path, monkeypatch):
  # A proxy that does not answer (or a sandbox that accepts every TCP connection and sends
  # nothing): the probe's timeout decides, not TFDS's retries of about 210 s.
  for key in ('HTTPS_PROXY', 'https_proxy'):
    monkeypatch.setenv(key, 'http://10.255.255.1:9')
  start = time.monotonic()
  with pytest.raises(builders.NoNetworkError, match=r'mnist is not prepared .*needs a network '
                     r'\(https://storage.googleapis.com/ gave no answer within 4 s\)'):
    _load('mnist', tmp_path)
  assert time.monotonic() - start < 10
