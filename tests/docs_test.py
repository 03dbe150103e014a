"""The API reference (pdoc, from the docstrings) builds, and the docstrings match the code.

The reference is what `pdoc -d google -o docs/api softmax_jax` writes (README, "API reference"):
built here into a temporary folder with every pdoc warning an error, so a docstring pdoc cannot
render fails the suite. pdoc renders a stale `Args:` entry without complaint, so a second test
reads every public function's Google-style `Args:` section and holds it to the signature: each
parameter documented, no entry for a parameter that does not exist. (The doctests of the public
ops are in tests/doctest_test.py.)
"""

import importlib
import inspect
import pathlib
import pkgutil
import re
import warnings

import pdoc
import pdoc.render
import pytest

import softmax_jax
from softmax_jax import ops

_SECTION = re.compile(r'^([A-Z][A-Za-z ]*):\s*$')
# `name:`, `name (type):`, `*args:` and grouped `a, b, c:` entries.
_ENTRY = re.compile(r'^(\*{0,2}\w+(?:,\s*\*{0,2}\w+)*)(?:\s*\([^)]*\))?\s*:')


def args_section(doc: str):
  """The parameter names a Google-style docstring's `Args:` section documents (None: no section)."""
  names, indent, inside = None, None, False
  for line in doc.splitlines():
    text = line.strip()
    if not text:
      continue
    depth = len(line) - len(line.lstrip())
    if _SECTION.match(text) and (not inside or depth < (indent or 1 << 30)):
      inside = _SECTION.match(text).group(1) in ('Args', 'Arguments')
      if inside:
        names, indent = names or [], None
      continue
    if inside:
      indent = depth if indent is None else indent
      if depth < indent:
        inside = False
      elif depth == indent:
        entry = _ENTRY.match(text)
        names.append(entry.group(1) if entry else f'<unparsed: {text[:40]}>')
  if names is None:
    return None
  return [n.strip().lstrip('*') for group in names for n in group.split(',')]


def public_functions():
  """(qualified name, function) for every public function defined in a softmax_jax module."""
  found = []
  for info in pkgutil.walk_packages(softmax_jax.__path__, 'softmax_jax.'):
    module = importlib.import_module(info.name)
    for name, obj in sorted(vars(module).items()):
      if (not name.startswith('_') and inspect.isfunction(obj)
          and obj.__module__ == module.__name__):
        found.append((f'{module.__name__}.{name}', obj))
  return found


def test_args_section_parser():
  doc = '''Summary.

  Args:
    x: `[B, K]` logits.
    tol, rtol: thresholds,
      continued: not an entry.
    *args: more.

  Returns:
    y: not an argument.
  '''
  assert args_section(inspect.cleandoc(doc)) == ['x', 'tol', 'rtol', 'args']
  assert args_section('No sections here.') is None


def test_documented_arguments_match_the_signatures():
  functions = public_functions()
  assert len(functions) > 100, 'the walk found too few functions: is the package importable?'
  wrong = []
  for qualname, fn in functions:
    documented = args_section(inspect.getdoc(fn) or '')
    if documented is None:
      continue
    params = [p for p in inspect.signature(fn).parameters if p not in ('self', 'cls')]
    stale = sorted(set(documented) - set(params))
    missing = [p for p in params if p not in documented]
    if stale or missing:
      wrong.append(f'{qualname}: documented but not parameters {stale}, undocumented {missing}')
  assert not wrong, 'Args: sections out of step with their signatures:\n' + '\n'.join(wrong)


def test_every_public_op_documents_its_arguments():
  """An op has an `Args:` section, or says its arguments are those of another op (`as \\`op\\``)."""
  undocumented = []
  for name in ops.__all__:
    obj = getattr(ops, name)
    if not inspect.isfunction(obj) or not inspect.signature(obj).parameters:
      continue
    doc = inspect.getdoc(obj) or ''
    if args_section(doc) is not None:
      continue
    refers = re.search(r'\bas `(\w+)`', doc)
    if not (refers and refers.group(1) in ops.__all__
            and args_section(inspect.getdoc(getattr(ops, refers.group(1))) or '')):
      undocumented.append(name)
  assert not undocumented, f'public ops without an Args: section: {undocumented}'


def test_the_api_reference_builds(tmp_path: pathlib.Path):
  pdoc.render.configure(docformat='google')
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # a docstring pdoc cannot render fails here
    pdoc.pdoc('softmax_jax', output_directory=tmp_path)
  pages = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob('*.html')}
  for page in ('softmax_jax.html', 'softmax_jax/ops.html', 'softmax_jax/heads.html',
               'softmax_jax/train.html', 'softmax_jax/models.html', 'softmax_jax/testing.html'):
    assert page in pages, f'{page} missing from the reference: {sorted(pages)[:20]}'
  ops_page = (tmp_path / 'softmax_jax' / 'ops.html').read_text()
  missing = [n for n in ops.__all__ if f'id="{n}"' not in ops_page]
  assert not missing, f'public ops without an entry in ops.html: {missing}'
  assert 'NaN rule' in ops_page  # the package docstring is the page's introduction


if __name__ == '__main__':
  pytest.main([__file__, '-n', '0'])
