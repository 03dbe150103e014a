"""Console entry points `softmax-jax-train` and `softmax-jax-benchmark` (pyproject `[project.scripts]`).

Each runs its script of the source tree, `scripts/train.py` or `scripts/benchmark.py`, exactly as
`python scripts/<name>.py` with the same flags would (`softmax-jax-train --help` lists the configs).
The scripts and `configs/` are not part of the installed package: with `pip install -e .` (how the
README installs) they are found next to this package's folder, in the clone. An install from a wheel
(`pip install .`, `pip install git+...`) has no source tree: the entry points then exit with status 2
and a message saying to clone the repository and install it with `pip install -e .`; the library
(`import softmax_jax`) works either way.
"""

import os
import runpy
import sys
from typing import NoReturn, Optional, Sequence

# The folder above this package: the clone, when installed editable (private: its value is a local path).
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_path(name: str, *, repo: Optional[str] = None) -> str:
  """The path of `scripts/<name>.py` in the source tree `repo`.

  Args:
    name: 'train' or 'benchmark' (any script of scripts/).
    repo: the source tree; by default the folder above this package, a clone when installed
      editable.

  Returns:
    The script's absolute path.

  Raises:
    FileNotFoundError: `repo` has no such script (an install from a wheel), saying what to do.
  """
  path = os.path.join(_REPO if repo is None else repo, 'scripts', f'{name}.py')
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'softmax-jax-{name} runs scripts/{name}.py of a source checkout, and there is none at {path} '
        f'(softmax_jax is installed from a wheel, without scripts/ and configs/). Clone the repository '
        f'and install it editable: git clone <repo> && cd <clone> && pip install -e .')
  return path


def _run(name: str, argv: Optional[Sequence[str]]) -> NoReturn:
  try:
    path = script_path(name)
  except FileNotFoundError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if argv is not None:
    sys.argv = [path, *argv]
  # As `python path`: the script's folder first on sys.path (benchmark.py imports its siblings),
  # __name__ == '__main__' and sys.argv[0] == path (so the script's docstring is --help's).
  sys.path.insert(0, os.path.dirname(path))
  runpy.run_path(path, run_name='__main__')
  sys.exit(0)


def train(argv: Optional[Sequence[str]] = None) -> NoReturn:
  """`softmax-jax-train [flags]`: runs scripts/train.py with `argv` (default: the command line's flags)."""
  _run('train', argv)


def benchmark(argv: Optional[Sequence[str]] = None) -> NoReturn:
  """`softmax-jax-benchmark [flags]`: runs scripts/benchmark.py with `argv` (default: the command line's flags)."""
  _run('benchmark', argv)
