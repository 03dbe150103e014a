"""Metrics to `metrics.jsonl` (one JSON object per line) and TensorBoard events (tensorboardX)."""

import json
import os
from typing import Dict

from tensorboardX import SummaryWriter


class MetricWriter:
  """Writes scalars under a workdir; on resume, drops lines logged after the restored step."""

  def __init__(self, workdir: str, start_step: int):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(self.path):
      with open(self.path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)['step'] <= start_step]
      with open(self.path, 'w') as f:
        f.writelines(rows)
    self._file = open(self.path, 'a')
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self._file.write(json.dumps(dict(step=int(step), **scalars)) + '\n')
    self._file.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    self._file.close()
    self._tb.close()


def read_metrics(workdir: str):
  """All rows of `workdir/metrics.jsonl` as dicts."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]
