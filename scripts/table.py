r"""Markdown table (mean ± std over seeds) of the final metrics of several runs.

  python scripts/table.py --workdirs='workdirs/lt/*' \
      --metrics=balanced_accuracy,many_accuracy,medium_accuracy,few_accuracy,ece \
      --extra=ce:test_posthoc/,ce:test_ts/

Runs are grouped by workdir name without a trailing `_<seed>` (`ce_0`, `ce_1` -> `ce`); each
group gives one row of its f'{--prefix}<metric>' values from `final_metrics.json` (accuracies in
%); a metric written `/key` is read as `key` without prefix (e.g. `/temperature`,
`/test_ts/ece`). `--extra=group:prefix` adds a row of the same runs read under another prefix (e.g. the
post-hoc logit adjustment of the CE runs, or their temperature-scaled metrics).
"""

import collections
import glob
import json
import math
import os
import re

from absl import app
from absl import flags

flags.DEFINE_string('workdirs', None, 'Glob of workdirs.', required=True)
flags.DEFINE_list('metrics', ['accuracy', 'balanced_accuracy', 'nll', 'ece'], 'Metric names.')
flags.DEFINE_string('prefix', 'test/', 'Metric prefix of the main rows.')
flags.DEFINE_list('extra', [], 'group:prefix rows to add.')


def _cell(values, percent):
  values = [v * (100 if percent else 1) for v in values if v is not None and not math.isnan(v)]
  if not values:
    return '—'
  mean = sum(values) / len(values)
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
  digits = 2 if percent else 4
  return f'{mean:.{digits}f} ± {std:.{digits}f}' if len(values) > 1 else f'{mean:.{digits}f}'


def main(argv):
  del argv
  groups = collections.defaultdict(list)
  for workdir in sorted(glob.glob(flags.FLAGS.workdirs)):
    path = os.path.join(workdir, 'final_metrics.json')
    if os.path.isdir(workdir) and os.path.exists(path):
      with open(path) as f:
        groups[re.sub(r'_\d+$', '', os.path.basename(workdir))].append(json.load(f))
  if not groups:
    raise app.UsageError(f'no workdir with final_metrics.json matches {flags.FLAGS.workdirs!r}')
  rows = [(g, flags.FLAGS.prefix) for g in groups]
  for item in flags.FLAGS.extra:
    group, _, prefix = item.partition(':')
    if group not in groups:
      raise app.UsageError(f'--extra={item}: no group {group!r}; groups are {sorted(groups)}')
    rows.append((group, prefix))
  metrics = flags.FLAGS.metrics
  print('| run | seeds | ' + ' | '.join(metrics) + ' |')
  print('|---|---|' + '---|' * len(metrics))
  for group, prefix in rows:
    runs = groups[group]
    name = group if prefix == flags.FLAGS.prefix else f'{group} ({prefix.rstrip("/")})'
    extra = prefix != flags.FLAGS.prefix  # absolute keys belong to the main rows only
    keys = [None if extra and m.startswith('/') else m[1:] if m.startswith('/') else prefix + m
            for m in metrics]
    cells = [_cell([r.get(k) for r in runs] if k else [], 'accuracy' in (k or '')) for k in keys]
    print(f'| {name} | {len(runs)} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  app.run(main)
