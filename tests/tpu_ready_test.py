"""TPU-ready numerics (issue 16 item 3): no float64 in any jitted computation, float32 parameters,
bfloat16 compute dtypes close to float32, and the config keys that select them.

The float64 check (`float64_values`) walks the jaxpr, nested jaxprs too (jit, scan, while, cond,
custom derivatives), for float64 arrays. Under `jax.enable_x64(False)` (TPU's mode) no array can
be float64, so there the check is that nothing *asks* for float64 (jax warns; the tests make the
warning an error); under `jax.enable_x64(True)` it is the real check, since a float64 NumPy
constant or a float64 parameter then promotes the float32 computation to float64 (the first test
shows that the check sees it). Weakly typed Python scalars and float64 scalars are not counted
(see `float64_values`).
"""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from softmax_jax.data.pipeline import Dataset
from softmax_jax.data.pipeline import Split
from softmax_jax.data.text import TextDataset
from softmax_jax.heads import HEADS
from softmax_jax.models import BACKBONES
from softmax_jax.models import LM_BACKBONES
from softmax_jax.models import MLP
from softmax_jax.train import base_config
from softmax_jax.train.config import override_free_form
from softmax_jax.train.state import make_optimizer
from softmax_jax.train.step import train_step
from softmax_jax.train.task import build_task

K, D = 12, 16
F64_REQUEST = 'Explicitly requested dtype float64'


def _jaxprs(value):
  if hasattr(value, 'eqns'):
    yield value
  elif hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _jaxprs(v)


def float64_values(jaxpr, where: str = '') -> list:
  """Descriptions of the float64 arrays of `jaxpr` (a Jaxpr or ClosedJaxpr, nested ones too).

  Weakly typed values (Python scalars, cast to the other operand's float32 when used) and
  scalars (optax computes its schedule and Adam's bias correction `1 - b1**t` from the int step
  in the default float, float64 under x64, then casts them to the parameters' dtype) are not
  counted: they cost nothing on any device. Any float64 array is.
  """
  jaxpr = jaxpr.jaxpr if hasattr(jaxpr, 'jaxpr') else jaxpr
  found = []

  def visit(v, what):
    aval = v.aval
    if (getattr(aval, 'dtype', None) == np.float64 and not getattr(aval, 'weak_type', False)
        and aval.ndim > 0):
      found.append(f'{where or "top"}: {what} {aval}')

  for v in list(jaxpr.constvars) + list(jaxpr.invars):
    visit(v, 'input')
  for eqn in jaxpr.eqns:
    for v in list(eqn.invars) + list(eqn.outvars):
      visit(v, eqn.primitive.name)
    for param in eqn.params.values():
      for sub in _jaxprs(param):
        found += float64_values(sub, f'{where}/{eqn.primitive.name}')
  return found


def _no_float64(fn, *args):
  """Traces `fn(*args)`; asserts no float64 value in it (and, by the caller's filter, no request)."""
  found = float64_values(jax.make_jaxpr(fn)(*args))
  assert not found, f'{len(found)} float64 values, e.g. {found[:3]}'


def test_the_float64_check_finds_a_float64_constant_and_ignores_python_scalars():
  """The check can fail: a float64 NumPy constant promotes float32 to float64 under x64."""
  x = jnp.ones(3, jnp.float32)
  with jax.enable_x64(True):
    found = float64_values(jax.make_jaxpr(lambda x: jnp.sin(x * np.arange(3.0)))(x))
    assert any('mul' in f for f in found) and any('sin' in f for f in found), found
    nested = float64_values(jax.make_jaxpr(jax.jit(lambda x: jax.lax.scan(
        lambda c, _: (c, jnp.sum(c * np.ones(3))), x, None, length=2)[1]))(x))
    assert any(f.startswith('/jit/scan: ') for f in nested), nested  # found inside the loop
    assert not float64_values(jax.make_jaxpr(lambda x: jnp.where(x > 0, x * 2.0, -jnp.inf))(x))
  with jax.enable_x64(False), warnings.catch_warnings():
    warnings.filterwarnings('error', message=F64_REQUEST)
    with pytest.raises(UserWarning, match=F64_REQUEST):
      jax.make_jaxpr(lambda x: x.astype(jnp.float64))(x)


# Every head with its defaults, plus the options that bring counts, priors or masks in.
HEAD_CASES = [(name, {}) for name in sorted(HEADS)] + [
    ('dense', dict(fused=True, pad_classes_to=8, label_smoothing=0.1, chunk_size=8)),
    ('dense', dict(pad_classes_to=8, approx_top_k=True)),
    ('imbalanced', dict(loss='logit_adjusted')), ('imbalanced', dict(loss='ldam', drw_start_step=1)),
    ('margin', dict(kind='sphereface')), ('sampled', dict(sampler='unigram', loss='nce')),
]


def _make_head(name, options, **more):
  cls = HEADS[name]
  fields = {f for f in cls.__dataclass_fields__}
  extra = {'class_counts': tuple(range(K, 0, -1))} if 'class_counts' in fields else {}
  return cls(num_classes=K, **extra, **options, **more)


def _train_kwargs(head):
  return {'step': jnp.int32(3)} if getattr(type(head), 'uses_step', False) else {}


def _features_and_labels():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, D)), jnp.float32)
  return x, jnp.asarray([0, 3, K - 1, 5], jnp.int32)


RNGS = {'params': jax.random.PRNGKey(0), 'sample': jax.random.PRNGKey(1)}


@pytest.mark.parametrize('name, options', HEAD_CASES)
def test_no_float64_in_a_heads_loss_gradients_log_prob_predict_and_eval_stats(name, options):
  """Under x64 (where a float64 constant would promote) with float32 parameters and features:
  the training loss and its gradients, `log_prob`, `predict` and `eval_stats` (with a log
  prior) hold no float64 value. (An explicit float64 request would show up here as one too.)"""
  head = _make_head(name, options)
  x, y = _features_and_labels()
  with jax.enable_x64(True):
    shapes = jax.eval_shape(lambda: head.init(RNGS, x, y, train=False))
    variables = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), shapes)

    def everything(v, x):
      loss = lambda v, x: head.apply(v, x, y, train=True, rngs={'sample': RNGS['sample']},
                                     **_train_kwargs(head)).mean()
      return (jax.value_and_grad(loss, argnums=(0, 1))(v, x),
              head.apply(v, x, method='log_prob'), head.apply(v, x, method='predict'),
              head.apply(v, x, y, temperatures=(1.0, 2.0), log_prior=jnp.log(jnp.full((K,), 1 / K)),
                         method='eval_stats'))

    _no_float64(everything, variables, x)


@pytest.mark.parametrize('name', sorted(HEADS))
def test_every_head_creates_float32_parameters_also_under_x64(name):
  """`self.param(..., jnp.float32)`: without it a head's initializers follow `jnp.float_`, so
  under x64 the parameters (and every product with them) were float64."""
  head = _make_head(name, {})
  x, y = _features_and_labels()
  with jax.enable_x64(True):
    shapes = jax.eval_shape(lambda: head.init(RNGS, x, y, train=False))
  dtypes = {str(a.dtype) for a in jax.tree.leaves(shapes)}
  assert dtypes == {'float32'}, f'{type(head).__name__} parameters under x64: {dtypes}'


def _classification_config(dtype):
  c = base_config()
  c.model = dict(name='cnn', channels=(4,), convs_per_block=1, dense=8, dtype=dtype)
  c.head = dict(name='dense', dtype=dtype, pad_classes_to=8)
  c.batch_size = 8
  c.num_devices = 1
  c.optimizer.clip_global_norm = 1.0
  return c


def _tiny_images(k=6, n=16):
  rng = np.random.default_rng(0)
  split = lambda: Split(rng.integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8),
                        np.arange(n, dtype=np.int32) % k)
  return Dataset(name='digits', num_classes=k, input_shape=(8, 8, 1),
                 splits={s: split() for s in ('train', 'validation', 'test')},
                 mean=np.full(1, 0.5, np.float32), std=np.full(1, 0.25, np.float32))


def _lm_config(dtype, backbone):
  c = base_config()
  c.data.name, c.data.seq_len = 'ptb', 4
  # dropout 0: under x64 flax's Dropout draws its mask from float64 uniforms (jax.random.bernoulli
  # of a Python p), a [B, T, d] float64 array; under x64 off (TPU) they are float32.
  model = dict(name='lstm', embed_dim=8, hidden=8, num_layers=1) if backbone == 'lstm' else dict(
      name='transformer', d_model=8, num_layers=1, num_heads=2, mlp_dim=16, max_len=4, dropout=0.0)
  c.model = dict(model, dtype=dtype)
  c.head = dict(name='adaptive', cutoffs=(6,), dtype=dtype)
  c.batch_size = 4
  c.num_devices = 1
  return c


def _tiny_corpus(v=16):
  stream = (np.arange(200) * 7 % v).astype(np.int32)
  splits = {'train': stream[:120], 'validation': stream[120:160], 'test': stream[160:]}
  return TextDataset(name='ptb', vocab=tuple(f'w{i}' for i in range(v)),
                     counts=np.bincount(stream[:120], minlength=v).astype(np.int64), splits=splits)


def _abstract_state(task, tx, config):
  """Shapes and dtypes of `task.init_state(tx)`, from `jax.eval_shape` (no initializer runs: the
  LMs' eager init takes 10-20 s on this CPU)."""
  model = task.model

  def init():
    if config.data.name == 'ptb':
      tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
      variables = model.init(RNGS, tokens, tokens, carry=model.initial_carry(1), train=False)
      extra = {'carry': model.initial_carry(config.batch_size)}
    else:
      images = jnp.zeros((2, *task.dataset.input_shape), jnp.float32)
      variables = model.init(RNGS, images, jnp.zeros((2,), jnp.int32), train=False)
      extra = {}
    variables = dict(variables)
    params = variables.pop('params')
    return dict(step=jnp.zeros((), jnp.int32), params=params, model_state=variables,
                opt_state=tx.init(params), rng=jax.random.PRNGKey(0), **extra)

  return jax.eval_shape(init)


@pytest.mark.parametrize('task_kind, x64', [('classification', True), ('lstm', False),
                                            ('transformer', True)])
def test_no_float64_in_a_bfloat16_training_step(task_kind, x64):
  """`train.step.train_step` (loss, gradients, optax update, metrics) of a classifier (CNN,
  dense head padded to 8 classes) and of LMs (adaptive head), all with `dtype='bfloat16'`.
  Under x64 off (TPU's mode) the check is that nothing requests float64 (jax's warning, made an
  error); under x64 on, that no array is float64. Parameters stay float32 (and the step's
  `check_updated_state` asserts that the update keeps their dtypes)."""
  if task_kind == 'classification':
    config, dataset = _classification_config('bfloat16'), _tiny_images()
  else:
    config, dataset = _lm_config('bfloat16', task_kind), _tiny_corpus()
  with jax.enable_x64(x64), warnings.catch_warnings():
    warnings.filterwarnings('error', message=F64_REQUEST)
    task = build_task(config, dataset)
    schedule, tx = make_optimizer(config.optimizer, config.num_steps)
    state = _abstract_state(task, tx, config)
    assert {str(a.dtype) for a in jax.tree.leaves(state['params'])} == {'float32'}
    batch = next(iter(task.train_batches(0)))
    if task.resident is not None:  # a resident train split: the step gathers its batch
      batch = task.gather(task.resident, batch)
    _no_float64(functools.partial(train_step, task=task, tx=tx, schedule=schedule), state, batch)


@pytest.mark.parametrize('name', sorted(HEADS))
def test_a_bfloat16_head_is_finite_and_close_to_float32(name):
  """`dtype='bfloat16'`: float32 outputs, finite, within bfloat16 rounding of the float32 head
  on the same parameters (log-probabilities and the training loss; that the evaluation loss is
  `-log_prob[label]` in bfloat16 too is `assert_head_contract`'s check)."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(6, D)), jnp.float32)
  y = jnp.asarray(rng.integers(0, K, size=6), jnp.int32)
  head32, head16 = _make_head(name, {}, dtype='float32'), _make_head(name, {}, dtype='bfloat16')

  @jax.jit
  def outputs():  # one compilation, the initialization included
    variables = head32.init(RNGS, x, y, train=False)
    return [(head.apply(variables, x, method='log_prob'),
             head.apply(variables, x, y, train=True, rngs={'sample': RNGS['sample']},
                        **_train_kwargs(head))) for head in (head32, head16)]

  (lp32, train32), (lp16, train16) = outputs()
  for a in (lp16, train16):
    assert a.dtype == jnp.float32 and np.all(np.isfinite(a))
  # bfloat16 keeps 8 bits: x and w are rounded by <= 2^-9 relative, so a logit z moves by about
  # 2^-9 |z| (the margin head's s * cos with s = 64 by up to ~0.1): a relative tolerance.
  np.testing.assert_allclose(lp16, lp32, atol=0.05, rtol=0.02)
  np.testing.assert_allclose(np.exp(lp16), np.exp(lp32), atol=0.03)
  np.testing.assert_allclose(train16, train32, atol=0.05, rtol=0.02)
  assert not np.array_equal(lp16, lp32)  # the bfloat16 path did run in bfloat16


SMALL_BACKBONES = dict(
    mlp=dict(hidden=(8,)), cnn=dict(channels=(4,), convs_per_block=1, dense=8),
    resnet=dict(depth=8, widths=(4, 8, 8)), lstm=dict(vocab_size=11, embed_dim=8, hidden=8),
    transformer=dict(vocab_size=11, d_model=8, num_layers=1, num_heads=2, mlp_dim=16, max_len=4))


@pytest.mark.parametrize('name', sorted(SMALL_BACKBONES))
def test_a_bfloat16_backbone_keeps_float32_parameters_and_features(name):
  """`config.model.dtype='bfloat16'`: the same float32 parameters (and BatchNorm statistics) and
  float32 features (and LSTM carry); for the MLP, features close to the float32 backbone's on
  the same parameters (the others' bfloat16 graphs are traced in the training-step test, and the
  MLP's and LSTM's trained in bfloat16 in WORKSPACE; compiling them here takes 3-10 s each)."""
  cls = {**BACKBONES, **LM_BACKBONES}[name]
  m32, m16 = cls(**SMALL_BACKBONES[name]), cls(**SMALL_BACKBONES[name], dtype='bfloat16')
  if name in LM_BACKBONES:
    inputs = jnp.asarray(np.arange(8).reshape(2, 4) % 11, jnp.int32)
    init = lambda m: m.init(RNGS, inputs)
    run = lambda m, v: m.apply(v, inputs)
  else:
    inputs = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    init = lambda m: m.init(RNGS, inputs, train=False)
    run = lambda m, v: (m.apply(v, inputs, train=False), None)
  dtypes = lambda tree: jax.tree.map(lambda a: a.dtype, tree)
  assert dtypes(jax.eval_shape(lambda: init(m16))) == dtypes(jax.eval_shape(lambda: init(m32)))
  (f32, c32), (f16, c16) = jax.eval_shape(lambda: run(m32, init(m32))), jax.eval_shape(
      lambda: run(m16, init(m32)))
  assert f16.dtype == f32.dtype == jnp.float32 and dtypes(c16) == dtypes(c32)
  if name == 'mlp':
    (f32, _), (f16, _) = jax.jit(lambda: (lambda v: (run(m32, v), run(m16, v)))(init(m32)))()
    np.testing.assert_allclose(f16, f32, atol=0.05 * (float(np.max(np.abs(f32))) + 1e-6))
    assert not np.array_equal(f16, f32)  # the bfloat16 path did run in bfloat16


def test_the_compute_dtype_and_padding_are_config_keys():
  """`--config.model.dtype=bfloat16 --config.head.dtype=bfloat16 --config.head.pad_classes_to=128`
  reach the modules; a head that does not pad names the key; a bad dtype names the module."""
  config = base_config()
  override_free_form(config, {'model.dtype': 'bfloat16', 'head.dtype': 'bfloat16',
                              'head.pad_classes_to': '128'})
  assert (config.model.dtype, config.head.dtype, config.head.pad_classes_to) == (
      'bfloat16', 'bfloat16', 128)
  with pytest.raises(ValueError, match=r'Unknown config key config.head.pad_classes_to .*'
                     r"AdaptiveSoftmax \(head.name='adaptive'\)"):
    override_free_form(base_config(), {'head.name': 'adaptive', 'head.pad_classes_to': '128'})
  with pytest.raises(ValueError, match=r"^MLP: `dtype` \(config.model.dtype.*got 'int8'"):
    MLP(dtype='int8').init(jax.random.PRNGKey(0), jnp.ones((1, 4)), train=False)
