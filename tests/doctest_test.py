"""Runs the doctest examples of the public ops (`softmax_jax/ops/*.py`) as pytest cases.

Every name in `softmax_jax.ops.__all__` must have an `Example:` with at least one doctest
example, so an op added without one fails `test_every_public_op_has_an_example`. The examples
print only stable values (rounded floats, integer/bool lists, `allclose` identities), so they
pass on any CPU.
"""

import doctest
import importlib
import pkgutil

import pytest

from softmax_jax import ops

_FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS


def _public_modules():
  return [importlib.import_module(f'softmax_jax.ops.{m.name}')
          for m in pkgutil.iter_modules(ops.__path__) if not m.name.startswith('_')]


def _doctests():
  finder = doctest.DocTestFinder(exclude_empty=True)
  tests = []
  for module in _public_modules():
    tests.extend(t for t in finder.find(module) if t.examples)
  return sorted(tests, key=lambda t: t.name)


_TESTS = _doctests()


@pytest.mark.parametrize('test', _TESTS, ids=[t.name.split('.')[-1] for t in _TESTS])
def test_doctest(test):
  out = []
  runner = doctest.DocTestRunner(optionflags=_FLAGS, verbose=False)
  result = runner.run(test, out=out.append, clear_globs=True)
  assert result.failed == 0, ''.join(out)


def test_every_public_op_has_an_example():
  counts = {t.name.split('.')[-1]: len(t.examples) for t in _TESTS}
  missing = sorted(name for name in ops.__all__ if not counts.get(name))
  assert not missing, f'public ops without a doctest `Example:`: {missing}'


def test_examples_are_collected():
  # A finder that silently found nothing (e.g. a renamed module) would pass the case above only
  # if __all__ were empty; check the two lists agree in size too.
  assert len(_TESTS) >= len(ops.__all__)
