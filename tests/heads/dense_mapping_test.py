"""DenseSoftmax(mapping=...): sparse output distributions (sparsemax, 1.5-entmax, alpha-entmax).

The head's loss, log_prob and eval_stats against float64 NumPy references of the maps and their
Fenchel-Young losses computed from the head's own logits; padding; the head contract; errors;
and one tiny training run (few compilations: the CI budget).
"""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax import ops
from softmax_jax import testing
from softmax_jax.heads.dense import DenseSoftmax
from softmax_jax.train import base_config, train_and_evaluate

K, D, N = 6, 5, 8
TEMPERATURES = (1.0, 0.5, 2.0)
SPARSE = [('sparsemax', 2.0), ('entmax15', 1.5), ('entmax_bisect', 1.3)]


def _ref_entmax(z, alpha):
  """float64 alpha-entmax `[(alpha - 1) z - tau]_+^(1/(alpha-1))` by 200 bisections on tau."""
  x = (alpha - 1) * np.asarray(z, np.float64)
  x = x - x.max(-1, keepdims=True)
  prob = lambda tau: np.maximum(x - tau, 0) ** (1 / (alpha - 1))
  lo, hi = np.full(x.shape[:-1] + (1,), -1.0), np.zeros(x.shape[:-1] + (1,))
  for _ in range(200):
    mid = (lo + hi) / 2
    big = prob(mid).sum(-1, keepdims=True) >= 1
    lo, hi = np.where(big, mid, lo), np.where(big, hi, mid)
  p = prob(lo)
  return p / p.sum(-1, keepdims=True)


def _ref_fy(z, labels, alpha):
  """float64 Fenchel-Young loss `<p, z - z_y> + (1 - sum p^alpha) / (alpha (alpha - 1))`."""
  z = np.asarray(z, np.float64)
  p = _ref_entmax(z, alpha)
  zy = np.take_along_axis(z, np.asarray(labels)[..., None], -1)
  return (p * (z - zy)).sum(-1) + (1 - (p ** alpha).sum(-1)) / (alpha * (alpha - 1))


def _data(seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(N, D)) * scale, jnp.float32),
          jnp.asarray(rng.integers(0, K, size=N), jnp.int32))


def _outputs(head, params, features, labels, log_prior):
  apply = lambda *a, **kw: head.apply({'params': params}, *a, **kw)
  return dict(z=apply(features, method='logits'), lp=apply(features, method='log_prob'),
              eval=apply(features, labels, train=False), train=apply(features, labels, train=True),
              pred=apply(features, method='predict'), top=apply(features, 3, method='top_k'),
              stats=apply(features, labels, temperatures=TEMPERATURES, log_prior=log_prior,
                          method='eval_stats'))


@pytest.mark.parametrize('mapping, alpha, check_padding', [
    ('sparsemax', 2.0, True), ('entmax15', 1.5, False), ('entmax_bisect', 1.3, False)])
def test_head_matches_float64_reference_and_padding(mapping, alpha, check_padding):
  features, labels = _data()
  head = DenseSoftmax(num_classes=K, mapping=mapping, alpha=alpha)
  padded = DenseSoftmax(num_classes=K, mapping=mapping, alpha=alpha, pad_classes_to=4)  # K_pad 8
  params = head.init(jax.random.PRNGKey(0), features, labels)['params']
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda p: p + 0.3 * rng.normal(size=p.shape).astype(np.float32), params)
  # The padded head holds the same K columns and 2 random (unused) padding columns.
  pparams = {'kernel': jnp.concatenate([params['kernel'], jnp.ones((D, 2)) * 50.0], 1),
             'bias': jnp.concatenate([params['bias'], jnp.full((2,), 50.0)])}
  log_prior = jnp.log(jnp.arange(1.0, K + 1) / jnp.sum(jnp.arange(1.0, K + 1)))
  op_loss = {'sparsemax': ops.sparsemax_loss, 'entmax15': ops.entmax15_loss,
             'entmax_bisect': lambda a, b: ops.entmax_bisect_loss(a, b, alpha=alpha)}[mapping]

  def run(p, q, x, y, lpr):  # one compilation: both heads, and the op's loss on the logits
    out = _outputs(head, p, x, y, lpr)
    out['op_loss'] = op_loss(out['z'], y)
    # Temperatures without 1: the support (of t = 1) gets a column of its own.
    out['stats_no_1'] = head.apply({'params': p}, x, y, temperatures=TEMPERATURES[1:],
                                   method='eval_stats')
    return out, _outputs(padded, q, x, y, lpr) if check_padding else None

  out, pout = jax.jit(run)(params, pparams, features, labels, log_prior)
  z = np.asarray(out['z'], np.float64)
  ref_z = (np.asarray(features, np.float64) @ np.asarray(params['kernel'], np.float64)
           + np.asarray(params['bias'], np.float64))
  np.testing.assert_allclose(z, ref_z, rtol=1e-5, atol=1e-5)
  y = np.asarray(labels)

  # Loss (training and evaluation): the op's FY loss on the head's logits, and float64's.
  np.testing.assert_allclose(out['eval'], out['op_loss'], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out['train'], out['eval'], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out['eval'], _ref_fy(z, y, alpha), rtol=1e-4, atol=1e-5)

  # log_prob: log of the float64 map; exp sums to 1; exact zeros (-inf), some in every mapping.
  p_ref = _ref_entmax(z, alpha)
  lp = np.asarray(out['lp'])
  assert lp.dtype == np.float32 and lp.shape == (N, K)
  np.testing.assert_allclose(np.exp(lp), p_ref, atol=2e-5)
  np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=1e-5)
  assert np.array_equal(np.isneginf(lp), p_ref == 0) and np.isneginf(lp).any()
  assert (p_ref > 0).sum(-1).min() >= 1 and np.isfinite(lp).sum() > N  # not all one-hot
  np.testing.assert_array_equal(out['pred'], z.argmax(-1))
  values, ids = out['top']
  np.testing.assert_array_equal(ids, np.argsort(-z, -1)[:, :3])  # the z-order
  np.testing.assert_array_equal(values, np.take_along_axis(lp, np.asarray(ids), -1))

  # eval_stats: every key from float64 recomputations of the logits.
  stats = out['stats']
  for key, value in out['stats_no_1'].items():
    want = stats[key][..., 1:] if stats[key].ndim == 2 else stats[key]
    np.testing.assert_allclose(value, want, rtol=1e-6, atol=1e-6, err_msg=key)
  p_t = [_ref_entmax(z / t, alpha) for t in TEMPERATURES]
  np.testing.assert_array_equal(stats['support'], (p_ref > 0).sum(-1))
  assert stats['support'].dtype == jnp.int32 and stats['fy_loss'].dtype == jnp.float32
  np.testing.assert_allclose(stats['fy_loss'], np.stack([_ref_fy(z / t, y, alpha)
                                                         for t in TEMPERATURES], -1),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats['confidence'], np.stack([p.max(-1) for p in p_t], -1), atol=2e-5)
  want_lp = np.stack([p[np.arange(N), y] for p in p_t], -1)
  np.testing.assert_allclose(np.exp(stats['label_log_prob']), want_lp, atol=2e-5)
  assert np.array_equal(np.isneginf(stats['label_log_prob']), want_lp == 0)
  np.testing.assert_array_equal(stats['prediction'], z.argmax(-1))
  zy = z[np.arange(N), y][:, None]
  np.testing.assert_array_equal(stats['label_rank'], (z > zy).sum(-1))
  adjusted = z - np.asarray(log_prior, np.float64)
  np.testing.assert_allclose(stats['adjusted_confidence'][:, 2],
                             _ref_entmax(adjusted / 2.0, alpha).max(-1), atol=2e-5)
  np.testing.assert_array_equal(stats['adjusted_prediction'], adjusted.argmax(-1))

  if not check_padding:
    return
  # The padded head equals the unpadded one (its padding columns have large logits, so any leak shows).
  np.testing.assert_allclose(pout['lp'], out['lp'], rtol=1e-6, atol=1e-6)
  for key in ('eval', 'train', 'pred'):
    np.testing.assert_allclose(pout[key], out[key], rtol=1e-6, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               pout['stats'], out['stats'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6),
               pout['top'], out['top'])


@pytest.mark.parametrize('mapping, alpha', SPARSE)
def test_head_contract(mapping, alpha):
  features, labels = _data(scale=2.0)
  head = DenseSoftmax(num_classes=K, mapping=mapping, alpha=alpha, pad_classes_to=4)
  assert head.fenchel_young == (mapping, alpha)
  testing.assert_head_contract(head, features[:4], labels[:4], variant=jax.jit,
                               dtypes=(jnp.float32,))


class _ClaimsSparsemax(DenseSoftmax):
  """An entmax15 head that claims a sparsemax loss: its loss is not the FY loss it declares."""

  @property
  def fenchel_young(self):
    return ('sparsemax', 2.0)


def test_contract_checks_the_fenchel_young_loss():
  # The same computations as test_head_contract's entmax15 and sparsemax cases (one compilation
  # each, served by the session's compilation cache when it runs after them).
  features, labels = _data(scale=2.0)
  prop = 'eval loss == fenchel_young(logits, label)'
  assert prop in testing.PROPERTIES
  with pytest.raises(testing.HeadContractError,
                     match=re.escape(f'_ClaimsSparsemax breaks "{prop}"')):
    testing.assert_head_contract(_ClaimsSparsemax(num_classes=K, mapping='entmax15',
                                                  pad_classes_to=4),
                                 features[:4], labels[:4], variant=jax.jit, dtypes=(jnp.float32,))


@pytest.mark.parametrize('options, match', [
    (dict(fused=True), r"mapping='sparsemax' cannot be combined with fused=True"),
    (dict(sigsoftmax=True), r"mapping='sparsemax' cannot be combined with sigsoftmax=True"),
    (dict(label_smoothing=0.1),
     r"mapping='sparsemax' cannot be combined with label_smoothing=0.1 .*label_smoothing=0.0 "),
    (dict(mapping='sparsemx'), r"`mapping` \(config.head.mapping\) must be one of .*'sparsemx'"),
    (dict(mapping='entmax_bisect', alpha=1.0), r"`alpha` .* must be a finite number > 1.*1.0"),
])
def test_bad_combinations_are_named(options, match):
  options = {'mapping': 'sparsemax', **options}
  features, labels = _data()
  with pytest.raises(ValueError, match=match):
    DenseSoftmax(num_classes=K, **options).init(jax.random.PRNGKey(0), features, labels)


def test_shortlist_decoding_is_refused():
  features, labels = _data()
  head = DenseSoftmax(num_classes=K, mapping='entmax15')
  variables = head.init(jax.random.PRNGKey(0), features, labels)
  with pytest.raises(ValueError, match=r"shortlist_log_prob .* mapping='entmax15'"):
    head.apply(variables, features, jnp.arange(3), method='shortlist_log_prob')


def test_sparsemax_digits_run_reports_support_and_fy_loss(tmp_path, caplog):
  c = base_config()
  c.data.data_dir = str(tmp_path / 'tfds')
  c.model.hidden = (32,)
  c.model.dropout = 0.0
  c.head.mapping = 'sparsemax'
  c.batch_size = 64
  c.num_steps = 40
  c.num_devices = 1
  c.optimizer.learning_rate = 1e-2
  c.optimizer.warmup_steps = 2
  c.progress = False
  c.log_every = c.eval_every = c.checkpoint_every = 1000
  with caplog.at_level(logging.INFO):
    final = train_and_evaluate(c, str(tmp_path / 'run'))
  for split in ('validation', 'test', 'test_ts'):
    assert {f'{split}/{k}' for k in ('accuracy', 'top5_accuracy', 'ece', 'support_size',
                                     'fy_loss')} <= set(final)
    assert 1 <= final[f'{split}/support_size'] <= 10
  assert not [k for k in final if k.endswith(('/nll', '/perplexity'))]
  assert all(np.isfinite(v) for v in final.values()), final
  assert 0.05 <= final['temperature'] <= 20 and final['test/accuracy'] > 0.7
  said = [r for r in caplog.records if 'NLL and perplexity are undefined' in r.getMessage()]
  assert len(said) == 1 and "mapping='sparsemax'" in said[0].getMessage()
