"""Metrics to `metrics.jsonl` (one JSON object per line) and TensorBoard events (tensorboardX).

The file is rewritten only atomically (a temporary file renamed over it), so a kill at any moment
loses no row that was written; the final row of a run is written once, also when the run is
killed during its final evaluation and rerun.
"""

import json
import os
from typing import Dict

from tensorboardX import SummaryWriter


class MetricWriter:
  """Writes scalars under a workdir; on resume, drops lines logged after the restored step."""

  def __init__(self, workdir: str, start_step: int):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(self.path):
      self._rewrite(lambda row: row['step'] <= start_step)
    self._file = open(self.path, 'a')
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    self._file.write(json.dumps(dict(step=int(step), **scalars)) + '\n')
    self._file.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, step)

  def write_final(self, step: int, scalars: Dict[str, float]) -> None:
    """Writes the run's final row, replacing one with the same keys at `step` from an earlier try."""
    keys = {'step', *scalars}
    self._file.close()
    self._rewrite(lambda row: not (row['step'] == step and set(row) == keys))
    self._file = open(self.path, 'a')
    self.write(step, scalars)

  def _rewrite(self, keep) -> None:
    with open(self.path) as f:
      lines = [line if line.endswith('\n') else line + '\n' for line in f
               if line.strip() and _parses(line) and keep(json.loads(line))]
    tmp = f'{self.path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
      f.writelines(lines)
    os.replace(tmp, self.path)

  def close(self) -> None:
    self._file.close()
    self._tb.close()


def _parses(line: str) -> bool:
  """False for a line cut short by a kill mid-write (dropped on resume)."""
  try:
    json.loads(line)
    return True
  except ValueError:
    return False


def read_metrics(workdir: str):
  """All rows of `workdir/metrics.jsonl` as dicts."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if line.strip()]
