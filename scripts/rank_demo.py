r"""The softmax bottleneck on a synthetic target: softmax heads of width d against MoS heads.

  python scripts/rank_demo.py                 # the default table, a few minutes on one core
  python scripts/rank_demo.py --contexts=512 --steps=6000 --widths=8,16,32,64 --mixtures=1,2,4,8,16

Target: N = `--contexts` contexts over K = `--classes` classes; context i puts mass `--mass` on
`--modes` classes drawn at random (weights Dirichlet(5)) and spreads the rest uniformly. Its
row-centred log-probability matrix has full rank r = min(N, K - 1) (random supports; measured
and printed), far above any d + 1 in the table.

Students fit P* by minimizing the mean KL(P*_i || p_i) over contexts (full batch, Adam with a
cosine decay from `--lr`, `--steps` steps); context i has a free vector:
  - softmax, width d: `h_i` in R^d and `heads.DenseSoftmax`: `log p_i = log_softmax(h_i W + b)`,
    `W: [d, K]`. Its log-probability matrix has rank <= d + 1 whatever it learns.
  - MoS, width d, M components: `e_i` in R^D (D = `--feature_dim`) and
    `heads.MixtureOfSoftmaxes(num_mixtures=M, context_dim=d)`: M contexts `tanh(e_i C_m + c_m)` of
    width d through one output layer `W: [d, K]` (the same width as the softmax's), mixed by
    `softmax(e_i P)`. M = 1 is the control: the wider input alone, one softmax, rank <= d + 1.
The table gives each student's parameters, final KL (nats, float64 from the float32 model), the
rank of its row-centred log-probabilities (`diagnostics.log_prob_rank`, tolerance
`S.max() * max(N, K) * eps(float32)`), the bound d + 1 and the effective rank.
"""

import os
import sys
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from softmax_jax import diagnostics  # pylint: disable=g-import-not-at-top
from softmax_jax.heads import DenseSoftmax  # pylint: disable=g-import-not-at-top
from softmax_jax.heads import MixtureOfSoftmaxes  # pylint: disable=g-import-not-at-top

_CHUNK = 100  # optimizer steps per device call (one scan), so the host syncs rarely


def define_flags(fv=flags.FLAGS) -> None:
  """The command line's flags, on `fv` (tests pass their own `flags.FlagValues()`)."""
  flags.DEFINE_integer('contexts', 128, 'N, contexts (rows of the target).', flag_values=fv)
  flags.DEFINE_integer('classes', 1000, 'K, classes.', flag_values=fv)
  flags.DEFINE_integer('modes', 2, 'Classes that share `--mass` in each context.', flag_values=fv)
  flags.DEFINE_float('mass', 0.9, 'Probability on the modes; the rest is uniform.', flag_values=fv)
  flags.DEFINE_list('widths', ['4', '8', '16', '32'], 'Widths d of the softmax students.',
                    flag_values=fv)
  flags.DEFINE_list('mos_widths', ['8'], 'Widths d of the MoS students.', flag_values=fv)
  flags.DEFINE_list('mixtures', ['1', '2', '4', '8'], 'Components M of the MoS students.',
                    flag_values=fv)
  flags.DEFINE_integer('feature_dim', 64, 'D, the free context vector of the MoS students.',
                       flag_values=fv)
  flags.DEFINE_integer('steps', 3000, 'Optimizer steps per student.', flag_values=fv)
  flags.DEFINE_float('lr', 3e-2, 'Peak Adam learning rate (cosine decay to 0).', flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'Seed of the target and the initializations.', flag_values=fv)
  flags.DEFINE_bool('progress', True, 'Show a progress bar (stderr).', flag_values=fv)


def target_log_probs(num_contexts: int, num_classes: int, *, modes: int = 2, mass: float = 0.9,
                     seed: int = 0) -> np.ndarray:
  """`log P*`: `[N, K]` float64; row i has `mass` on `modes` random classes, the rest uniform."""
  if not 1 <= modes <= num_classes or not 0 <= mass < 1:
    raise ValueError(f'need 1 <= modes <= K = {num_classes} and 0 <= mass < 1, got modes={modes}, '
                     f'mass={mass}.')
  rng = np.random.default_rng(seed)
  p = np.full((num_contexts, num_classes), (1 - mass) / num_classes)
  for i in range(num_contexts):
    p[i, rng.choice(num_classes, modes, replace=False)] += mass * rng.dirichlet(np.full(modes, 5.0))
  return np.log(p)


class Student(nn.Module):
  """`() -> log p [N, K]`: free context vectors through a softmax (mixtures=0) or a MoS head."""
  num_contexts: int
  num_classes: int
  width: int
  mixtures: int  # 0: DenseSoftmax of width `width`
  feature_dim: int = 64

  @nn.compact
  def __call__(self):
    dim = self.width if self.mixtures == 0 else self.feature_dim
    h = self.param('contexts', nn.initializers.normal(1.0), (self.num_contexts, dim))
    if self.mixtures == 0:
      return DenseSoftmax(num_classes=self.num_classes).log_prob(h)
    return MixtureOfSoftmaxes(num_classes=self.num_classes, num_mixtures=self.mixtures,
                              context_dim=self.width).log_prob(h)


def fit(log_target: np.ndarray, *, width: int, mixtures: int, feature_dim: int = 64,
        steps: int = 3000, lr: float = 3e-2, seed: int = 0, bar=None):
  """Fits one student to `log_target [N, K]`; returns a dict of its numbers and log-probs [N, K]."""
  n, k = log_target.shape
  model = Student(n, k, width, mixtures, feature_dim)
  params = model.init(jax.random.PRNGKey(seed))
  p_t, lp_t = jnp.asarray(np.exp(log_target), jnp.float32), jnp.asarray(log_target, jnp.float32)
  tx = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1)))

  def loss(p):
    return jnp.mean(jnp.sum(p_t * (lp_t - model.apply(p)), axis=-1))

  def body(carry, _):
    p, o = carry
    value, g = jax.value_and_grad(loss)(p)
    u, o = tx.update(g, o, p)
    return (optax.apply_updates(p, u), o), value

  run = jax.jit(lambda p, o, length: jax.lax.scan(body, (p, o), None, length=length),
                static_argnums=2)
  state, t0, done, curve = (params, tx.init(params)), time.perf_counter(), 0, []
  while done < steps:
    length = min(_CHUNK, steps - done)
    state, losses = run(*state, length)
    curve.append(losses)
    jax.block_until_ready(state)
    done += length
    if bar is not None:
      bar.update(length)
  seconds = time.perf_counter() - t0
  curve = np.concatenate([np.asarray(c) for c in curve]) if curve else np.zeros(0)
  lp = np.asarray(model.apply(state[0]), np.float64)
  kl = float(np.mean(np.sum(np.exp(log_target) * (log_target - lp), axis=-1)))
  rank = diagnostics.log_prob_rank(lp.astype(np.float32))
  return {'head': 'softmax' if mixtures == 0 else 'MoS', 'width': width, 'mixtures': mixtures,
          'params': int(sum(np.size(x) for x in jax.tree.leaves(params))), 'kl': kl,
          'rank': rank['rank'], 'bound': width + 1, 'effective_rank': rank['effective_rank'],
          'kl_half': float(curve[steps // 2]) if steps else float('nan'), 'seconds': seconds,
          'log_probs': lp}


def table(rows, target) -> str:
  """Markdown table of `fit` results, with the target's rank in the header line."""
  head = ['head', 'd', 'M', 'params', 'KL at steps/2', 'KL (nats)', 'rank', 'd+1', 'eff. rank', 's']
  lines = [f"target: N={target['shape'][0]}, K={target['shape'][1]}, row-centred rank "
           f"r={target['rank']}, effective rank {target['effective_rank']:.1f}, "
           f"entropy {target['entropy']:.3f} nats", '',
           '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    lines.append(f"| {r['head']} | {r['width']} | {r['mixtures'] or '-'} | {r['params']:,} | "
                 f"{r['kl_half']:.4f} | {r['kl']:.4f} | {r['rank']} | {r['bound']} | "
                 f"{r['effective_rank']:.1f} | "
                 f"{r['seconds']:.0f} |")
  return '\n'.join(lines)


def report(fv=flags.FLAGS):
  """Fits every student the flags ask for; prints the table and returns `(table, target, rows)`."""
  ints = lambda xs: [int(x) for x in xs]
  widths, mos_widths, mixtures = ints(fv.widths), ints(fv.mos_widths), ints(fv.mixtures)
  for name, values in (('widths', widths), ('mos_widths', mos_widths), ('mixtures', mixtures)):
    if any(v < 1 for v in values):
      raise app.UsageError(f'--{name} must be integers >= 1, got {values}.')
  lt = target_log_probs(fv.contexts, fv.classes, modes=fv.modes, mass=fv.mass, seed=fv.seed)
  t = diagnostics.log_prob_rank(lt)
  target = dict(t, entropy=float(-np.mean(np.sum(np.exp(lt) * lt, axis=-1))))
  runs = [(d, 0) for d in widths] + [(d, m) for d in mos_widths for m in mixtures]
  cost = lambda d, m: fv.steps * max(m, 1)  # MoS steps cost ~M softmax steps
  rows = []
  with tqdm(total=sum(cost(d, m) for d, m in runs), disable=not fv.progress, unit='step',
            desc='students') as bar:
    for d, m in runs:
      scaled = _Scaled(bar, max(m, 1))
      rows.append(fit(lt, width=d, mixtures=m, feature_dim=fv.feature_dim, steps=fv.steps,
                      lr=fv.lr, seed=fv.seed, bar=scaled))
  out = table(rows, target)
  print(out)
  return out, target, rows


class _Scaled:
  """A progress bar view that counts each step `factor` times (MoS steps cost ~M)."""

  def __init__(self, bar, factor):
    self.bar, self.factor = bar, factor

  def update(self, n):
    self.bar.update(n * self.factor)


def main(argv):
  del argv
  report(flags.FLAGS)


if __name__ == '__main__':
  define_flags()
  app.run(main)
