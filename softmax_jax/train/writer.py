"""Metrics to `metrics.jsonl` (one JSON object per line) and TensorBoard events (tensorboardX).

The file is rewritten only atomically (a temporary file renamed over it), so a kill at any moment
loses no row that was written; the final row of a run is written once, also when the run is
killed during its final evaluation and rerun.

Strict JSON: a value that is None or not finite (an empty frequency bucket's accuracy, the
`nonfinite_*` marker of a diverged run) is written as `null`, never as the bare `NaN` strict
parsers reject, and is left out of TensorBoard; `to_json` does the same for `final_metrics.json`.

TensorBoard (`workdir/tensorboard`, one run): scalars; at the start of each invocation the
resolved config as text ('config') and its flat values as hparams (the HPARAMS tab); at the end
the final metrics as the hparams metrics and images ('images/reliability', 'images/features',
'images/per_class_f1'). One value per tag and step: a second write of a tag at a step is logged
and skipped. A resumed run's event file purges the events after its start step (as
`metrics.jsonl` drops those rows). CLU's metric writers need TensorFlow (or torch) for TensorBoard,
so they are not used.
"""

import json
import math
import numbers
import os
import struct
from typing import Dict, Iterator, Optional, Sequence, Tuple

from absl import logging
import numpy as np
from tensorboardX import SummaryWriter
from tensorboardX import summary as tbx_summary


class MetricWriter:
  """Writes scalars under a workdir; on resume, drops lines logged after the restored step."""

  def __init__(self, workdir: str, start_step: int):
    self.workdir = workdir
    self.path = os.path.join(workdir, 'metrics.jsonl')
    if os.path.exists(self.path):
      self._rewrite(lambda row: row['step'] <= start_step)
    self._file = open(self.path, 'a')
    # purge_step: TensorBoard drops the earlier files' events from that step on (a resume).
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'),
                             purge_step=start_step + 1 if start_step else None)
    self._written = set()  # (tag, step) of this invocation
    self._hparams = None

  def _claim(self, tag: str, step: int) -> bool:
    """True the first time `tag` is written at `step`; else logs the duplicate and returns False."""
    if (tag, int(step)) in self._written:
      logging.warning('TensorBoard tag %r was already written at step %d: skipped', tag, step)
      return False
    self._written.add((tag, int(step)))
    return True

  def write(self, step: int, scalars: Dict[str, Optional[float]]) -> None:
    """Appends one row; None and non-finite values become `null` and skip TensorBoard."""
    scalars = finite_or_none(scalars)
    self._file.write(to_json(dict(step=int(step), **scalars)) + '\n')
    self._file.flush()
    for k, v in scalars.items():
      if v is not None and self._claim(k, step):
        self._tb.add_scalar(k, v, step)

  def write_final(self, step: int, scalars: Dict[str, Optional[float]]) -> None:
    """Writes the run's final row, replacing one with the same keys at `step` from an earlier try.

    The values also become the metrics of the hparams session opened by `write_config`.
    """
    keys = {'step', *scalars}
    self._file.close()
    self._rewrite(lambda row: not (row['step'] == step and set(row) == keys))
    self._file = open(self.path, 'a')
    self.write(step, scalars)
    if self._hparams is not None:
      metrics = [k for k, v in finite_or_none(scalars).items() if v is not None]
      exp, _, sei = tbx_summary.hparams(self._hparams, dict.fromkeys(metrics, 0.0))
      for tag, summary in (('_hparams_/experiment', exp), ('_hparams_/session_end_info', sei)):
        if self._claim(tag, step):
          self._tb.file_writer.add_summary(summary, step)

  def write_config(self, step: int, config) -> None:
    """The resolved `config` as text ('config', a markdown code block) and as hparams.

    Args:
      step: the step the run starts (or resumes) from.
      config: an `ml_collections.ConfigDict`; its flat values (`hparams_of`) open the hparams
        session that `write_final` closes with the final metrics.
    """
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if self._claim('config', step):
      self._tb.add_text('config', ''.join(f'    {line}\n' for line in text.splitlines()), step)
    self._hparams = hparams_of(json.loads(text))
    _, ssi, _ = tbx_summary.hparams(self._hparams, {})
    if self._claim('_hparams_/session_start_info', step):
      self._tb.file_writer.add_summary(ssi, step)

  def write_image(self, step: int, tag: str, image: np.ndarray) -> None:
    """One `[H, W, 3]` uint8 (or `[H, W, 4]`, alpha dropped) image under `tag`."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
      raise ValueError(f'image must be [H, W, 3] or [H, W, 4], got shape {image.shape}.')
    if image.dtype != np.uint8:  # floats in [0, 1], as matplotlib reads a PNG
      image = np.clip(np.round(np.asarray(image, np.float64) * 255), 0, 255).astype(np.uint8)
    if self._claim(tag, step):
      self._tb.add_image(tag, image[..., :3], step, dataformats='HWC')

  def write_figures(self, step: int, *, per_class: Optional[Dict[str, Sequence]] = None) -> None:
    """The end-of-run images that exist: the reliability diagram (`workdir/reliability.png`),
    the 2-D features (`workdir/embeddings.npz`) and, given `per_class`, the per-class F1.

    Args:
      step: the final step.
      per_class: None or {'f1': [K] float, 'support': [K] int, optionally 'class_names': [K]},
        e.g. `per_class_f1(...)` of the test split.
    """
    reliability = os.path.join(self.workdir, 'reliability.png')
    if os.path.exists(reliability):
      from matplotlib import image as mpl_image  # pylint: disable=g-import-not-at-top
      self.write_image(step, 'images/reliability', mpl_image.imread(reliability))
    embeddings = os.path.join(self.workdir, 'embeddings.npz')
    if os.path.exists(embeddings):
      with np.load(embeddings) as data:
        x, y = np.asarray(data['embeddings'], np.float64), np.asarray(data['labels'])
      if x.ndim == 2 and x.shape[1] == 2 and y.shape == x.shape[:1]:
        self.write_image(step, 'images/features', features_image(x, y))
    if per_class is not None:
      self.write_image(step, 'images/per_class_f1', per_class_f1_image(**per_class))

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


class NullWriter:
  """`MetricWriter`'s interface, writing nothing: the writer of processes other than 0 in a
  multi-process run (process 0 writes metrics.jsonl, TensorBoard events and figures)."""

  def __init__(self, workdir: str = '', start_step: int = 0):
    del workdir, start_step

  def write(self, step, scalars) -> None:
    del step, scalars

  write_final = write

  def write_config(self, step, config) -> None:
    del step, config

  def write_image(self, step, tag, image) -> None:
    del step, tag, image

  def write_figures(self, step, *, per_class=None) -> None:
    del step, per_class

  def close(self) -> None:
    pass


def hparams_of(config: Dict[str, object]) -> Dict[str, object]:
  """Flat hparams `{'head.name': 'dense', 'optimizer.learning_rate': 0.001, ...}` of a config dict.

  Strings, bools and numbers pass; tuples and lists become strings; None is left out.
  """
  out = {}
  for key, value in sorted(config.items()):
    if isinstance(value, dict):
      out.update({f'{key}.{k}': v for k, v in hparams_of(value).items()})
    elif isinstance(value, (list, tuple)):
      out[key] = str(tuple(value))
    elif isinstance(value, (str, bool, numbers.Real)):
      out[key] = value
  return out


def per_class_f1(prediction, label, *, num_classes: int, where=None) -> Dict[str, np.ndarray]:
  """`{'f1': [K] float64, 'support': [K] int64}` from `[N]` int predictions and labels.

  F1 of class c is `2 tp / (predicted + support)`, 0.0 for a class neither predicted nor present
  (as `metrics.per_class_precision_recall_f1`); rows with `where` False are left out.
  """
  prediction, label = np.asarray(prediction).ravel(), np.asarray(label).ravel()
  keep = np.ones(label.shape, bool) if where is None else np.asarray(where, bool).ravel()
  p, y = prediction[keep], label[keep]
  tp = np.bincount(y[p == y], minlength=num_classes)[:num_classes]
  support = np.bincount(y, minlength=num_classes)[:num_classes]
  predicted = np.bincount(p, minlength=num_classes)[:num_classes]
  denom = predicted + support
  f1 = np.divide(2.0 * tp, denom, out=np.zeros(num_classes), where=denom > 0)
  return {'f1': f1, 'support': support.astype(np.int64)}


def _render(draw, size: Tuple[float, float]) -> np.ndarray:
  """`draw(fig)` on an Agg figure of `size` inches -> `[H, W, 3]` uint8."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=size, dpi=90, layout='constrained')
  canvas = FigureCanvasAgg(fig)
  draw(fig)
  canvas.draw()
  return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def per_class_f1_image(f1, support, class_names=None) -> np.ndarray:
  """A bar chart of per-class F1 (`[K]`), annotated with each class's support, as `[H, W, 3]`."""
  f1, support = np.asarray(f1, np.float64), np.asarray(support)
  k = len(f1)
  names = [str(c) for c in class_names] if class_names is not None else [str(c) for c in range(k)]

  def draw(fig):
    ax = fig.subplots()
    ax.bar(np.arange(k), f1, color='tab:blue', edgecolor='black', linewidth=0.5)
    mean = f1[support > 0].mean() if (support > 0).any() else 0.0
    ax.set(ylim=(0, 1.08), xlabel='class', ylabel='F1',
           title=f'per-class F1 (test), mean over present classes {mean:.3f}')
    if k <= 40:
      ax.set_xticks(np.arange(k), names, rotation=90 if k > 12 else 0, fontsize=7)
      for i in range(k):
        ax.text(i, f1[i] + 0.01, f'n={support[i]}', ha='center', va='bottom', fontsize=6,
                rotation=90 if k > 12 else 0)
  return _render(draw, (min(3 + 0.3 * k, 16), 3.6))


def features_image(x, y) -> np.ndarray:
  """The 2-D features `x` ([n, 2]) coloured by label `y` ([n] int), as `[H, W, 3]` uint8."""
  def draw(fig):
    ax = fig.subplots()
    import matplotlib  # pylint: disable=g-import-not-at-top
    cmap = matplotlib.colormaps['tab10']
    for c in np.unique(y):
      ax.scatter(x[y == c, 0], x[y == c, 1], s=3, alpha=0.5, color=cmap(int(c) % 10),
                 linewidths=0, label=str(c))
    ax.set_aspect('equal', adjustable='datalim')
    ax.set_title('learned 2-D features (test)')
    if len(np.unique(y)) <= 20:
      ax.legend(fontsize=6, markerscale=3, loc='center left', bbox_to_anchor=(1, 0.5))
  return _render(draw, (5.0, 4.2))


def read_events(logdir: str) -> Iterator[Tuple[int, str, str]]:
  """`(step, tag, kind)` of every summary value in the event files under `logdir`, in file order.

  kind is 'scalar', 'image', 'text', 'hparams' or 'other'. A reader without TensorFlow or
  TensorBoard (the TFRecord framing: length, its CRC, the record, its CRC; CRCs not checked).
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  for name in sorted(os.listdir(logdir)):
    if 'tfevents' not in name:
      continue
    with open(os.path.join(logdir, name), 'rb') as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        plugin = value.metadata.plugin_data.plugin_name
        kind = ('image' if value.HasField('image') else 'scalar' if value.HasField('simple_value')
                else plugin if plugin in ('text', 'hparams') else 'other')
        yield int(event.step), value.tag, kind


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
