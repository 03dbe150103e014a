"""Metrics to `metrics.jsonl` (one JSON object per line) and TensorBoard events (tensorboardX).

The file is rewritten only atomically (a temporary file renamed over it), so a kill at any moment
loses no row that was written; the final row of a run is written once, also when the run is
killed during its final evaluation and rerun.

Strict JSON: a value that is None or not finite (an empty frequency bucket's accuracy, the
`nonfinite_*` marker of a diverged run) is written as `null`, never as the bare `NaN` strict
parsers reject, and is left out of TensorBoard; `to_json` does the same for `final_metrics.json`.
"""

import json
import math
import numbers
import os
from typing import Dict, Optional

from tensorboardX import SummaryWriter


class MetricWriter:
  """Writes scalars under a workdir; on resume, drops lines logged after the restored step."""

  def __init__(self, workdir: str, start_step: int):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(self.path):
      self._rewrite(lambda row: row['step'] <= start_step)
    self._file = open(self.path, 'a')
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, scalars: Dict[str, Optional[float]]) -> None:
    """Appends one row; None and non-finite values become `null` and skip TensorBoard."""
    scalars = finite_or_none(scalars)
    self._file.write(to_json(dict(step=int(step), **scalars)) + '\n')
    self._file.flush()
    for k, v in scalars.items():
      if v is not None:
        self._tb.add_scalar(k, v, step)

  def write_final(self, step: int, scalars: Dict[str, Optional[float]]) -> None:
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


def finite_or_none(scalars: Dict[str, Optional[float]]) -> Dict[str, Optional[float]]:
  """`{key: float(value)}`, with None for a value that is None, NaN or infinite."""
  out = {}
  for k, v in scalars.items():
    v = None if v is None else float(v)
    out[k] = v if v is not None and math.isfinite(v) else None
  return out


def to_json(values: Dict[str, object], **kwargs) -> str:
  """Strict JSON of a flat dict: float values that are NaN or infinite become `null`.

  Ints, strings, bools and None pass through; `kwargs` go to `json.dumps` (e.g. `indent=2,
  sort_keys=True`). Written with `allow_nan=False`, so a NaN that slipped past (nested) raises
  ValueError instead of writing a file strict parsers reject.
  """
  clean = {k: None if _is_float(v) and not math.isfinite(v) else
           (float(v) if _is_float(v) else v) for k, v in values.items()}
  return json.dumps(clean, allow_nan=False, **kwargs)


def _is_float(v) -> bool:  # Python and NumPy floats (not ints, not bools)
  return isinstance(v, numbers.Real) and not isinstance(v, numbers.Integral)


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
