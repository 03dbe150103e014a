r"""Text from a trained language-model run: sampling rules, greedy or beam search.

  python scripts/generate.py --workdir=workdirs/ptb/dense --prompt="the company said"
  python scripts/generate.py --workdir=workdirs/ptb/dense --prompt="the" --method=sample \
      --top_p=0.9 --temperature=0.8 --num_samples=3
  python scripts/generate.py --workdir=workdirs/ptb/adaptive --prompt="in the" --method=beam --beam_size=5

Any head decodes (dense, adaptive, sampled, hierarchical, mixture): the loop samples from the head's
exact `log_prob` (softmax_jax/decode.py). Prompt words outside the vocabulary become `<unk>`.
"""

import os
import sys

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from softmax_jax import decode  # pylint: disable=g-import-not-at-top
from softmax_jax.train import load_trained  # pylint: disable=g-import-not-at-top
from softmax_jax.train.task import task_name  # pylint: disable=g-import-not-at-top


def define_flags() -> None:
  """The command line's flags (defined only when run as a script, so tests can import it)."""
  flags.DEFINE_string('workdir', None, 'A language-model workdir of scripts/train.py.', required=True)
  flags.DEFINE_string('prompt', '<eos>', 'Words to continue (space separated).')
  flags.DEFINE_enum('method', 'sample', list(decode.METHODS), 'Decoding rule.')
  flags.DEFINE_integer('max_new_tokens', 30, 'Tokens to generate.')
  flags.DEFINE_integer('num_samples', 3, 'Samples (method=sample) drawn in one batch.')
  flags.DEFINE_float('temperature', 1.0, 'Softmax temperature (0: greedy).')
  flags.DEFINE_integer('top_k', None, 'Keep the k most probable tokens.')
  flags.DEFINE_float('top_p', None, 'Keep the smallest set with probability >= top_p (nucleus).')
  flags.DEFINE_float('min_p', None, 'Keep tokens with probability >= min_p * the largest.')
  flags.DEFINE_integer('beam_size', 4, 'Beams (method=beam).')
  flags.DEFINE_float('length_penalty', 1.0, 'Beam length penalty alpha (method=beam).')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')


def prompt_ids(vocab, prompt: str) -> np.ndarray:
  """`[P]` ids of the prompt's words (`<unk>` for unknown ones; `<eos>` for an empty prompt)."""
  index = {w: i for i, w in enumerate(vocab)}
  words = prompt.split() or ['<eos>']
  return np.array([index.get(w, index['<unk>']) for w in words], np.int32)


def run(workdir: str, prompt: str, **options) -> list:
  """The generated texts (one per sample or beam) of the run in `workdir`."""
  config, dataset, model, variables = load_trained(workdir)
  if task_name(config) != 'language_model':
    raise ValueError(f'{workdir} is a {task_name(config)} run: generation needs a language model.')
  ids = prompt_ids(dataset.vocab, prompt)
  method = options.pop('method', 'sample')
  rows = options.pop('num_samples', 1) if method == 'sample' else 1
  seed = options.pop('seed', 0)
  if method == 'beam':  # a beam ends at the end of a line
    options.setdefault('eos_id', list(dataset.vocab).index('<eos>'))
  out = decode.generate(model, variables, np.tile(ids, (rows, 1)), method=method,
                        key=jax.random.PRNGKey(seed), **options)
  if method == 'beam':
    sequences, scores = out
    return [f'[{float(s):.3f}] {decode.decode_tokens(dataset.vocab, seq)}'
            for seq, s in zip(np.asarray(sequences)[0], np.asarray(scores)[0])]
  return [decode.decode_tokens(dataset.vocab, row) for row in np.asarray(out)]


def main(argv) -> None:
  del argv
  f = flags.FLAGS
  options = dict(method=f.method, max_new_tokens=f.max_new_tokens, num_samples=f.num_samples,
                 seed=f.seed)
  if f.method == 'sample':
    options.update(temperature=f.temperature, top_k=f.top_k, top_p=f.top_p, min_p=f.min_p)
  if f.method == 'beam':
    options.update(beam_size=f.beam_size, length_penalty=f.length_penalty)
  for i, text in enumerate(run(f.workdir, f.prompt, **options)):
    print(f'--- {i}: {f.prompt} | {text}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
