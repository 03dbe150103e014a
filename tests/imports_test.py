"""The package's import graph: no cycles, and no private name or private module across packages.

Walks every module of `softmax_jax` by its source (ast), so the test sees imports inside
functions too, and does not depend on what happens to be imported already.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'softmax_jax')


def _modules():
  out = {}
  for folder, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith('.py'):
        rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(ROOT))[:-3].replace(os.sep, '.')
        out[rel[:-len('.__init__')] if rel.endswith('.__init__') else rel] = os.path.join(folder, f)
  return out


MODULES = _modules()


def _imports(name):
  """[(imported module, imported name or None, line)] of module `name`, within softmax_jax."""
  with open(MODULES[name]) as f:
    tree = ast.parse(f.read())
  package = name if MODULES[name].endswith('__init__.py') else name.rpartition('.')[0]
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(a.name, None, node.lineno) for a in node.names if a.name.startswith('softmax_jax')]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')
        base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      if not base.startswith('softmax_jax'):
        continue
      for a in node.names:
        sub = f'{base}.{a.name}'
        out.append((sub, None, node.lineno) if sub in MODULES else (base, a.name, node.lineno))
  return out


def _graph():
  return {m: sorted({target for target, _, _ in _imports(m) if target in MODULES and target != m})
          for m in MODULES}


def _cycle(graph):
  """One import cycle as a list of modules, or None (iterative DFS)."""
  color, parent = {}, {}
  for root in graph:
    if root in color:
      continue
    stack = [(root, iter(graph[root]))]
    color[root] = 'grey'
    while stack:
      node, children = stack[-1]
      child = next(children, None)
      if child is None:
        color[node] = 'black'
        stack.pop()
      elif color.get(child) == 'grey':
        path = [node]
        while path[-1] != child:
          path.append(parent[path[-1]])
        return path[::-1] + [child]
      elif child not in color:
        color[child], parent[child] = 'grey', node
        stack.append((child, iter(graph[child])))
  return None


def test_the_walk_sees_the_package():
  graph = _graph()
  assert {'softmax_jax.train.loop', 'softmax_jax.ops.fused', 'softmax_jax.heads.dense'} <= set(graph)
  assert 'softmax_jax.train.runner' in graph['softmax_jax.train.loop']


def test_the_cycle_finder_finds_a_planted_cycle():
  assert _cycle({'a': ['b'], 'b': ['c'], 'c': ['a']}) in (['a', 'b', 'c', 'a'], ['b', 'c', 'a', 'b'],
                                                          ['c', 'a', 'b', 'c'])
  assert _cycle({'a': ['b'], 'b': [], 'c': ['a', 'b']}) is None


def _is_package_init(module):
  return MODULES[module].endswith('__init__.py')


def test_no_import_cycles():
  # A package __init__ re-exports its submodules; edges into it from its own submodules would be
  # cycles by construction, and Python resolves them: only module-to-module edges count.
  graph = {m: [t for t in ts if not (_is_package_init(t) and m.startswith(t + '.'))]
           for m, ts in _graph().items()}
  cycle = _cycle(graph)
  assert cycle is None, f'import cycle: {" -> ".join(cycle)}'


def _package(module):
  return module if _is_package_init(module) else module.rpartition('.')[0]


@pytest.mark.parametrize('module', sorted(MODULES))
def test_no_private_name_or_private_module_across_packages(module):
  bad = []
  for target, name, line in _imports(module):
    target_module = target if target in MODULES else target.rpartition('.')[0]
    leaf = target.rpartition('.')[2]
    if name is not None and name.startswith('_') and target != module:
      bad.append(f'line {line}: private name {name} from {target}')
    if leaf.startswith('_') and not leaf.startswith('__') and _package(target_module) != _package(module):
      bad.append(f'line {line}: private module {target} from another package')
  assert not bad, f'{module}: ' + '; '.join(bad)
