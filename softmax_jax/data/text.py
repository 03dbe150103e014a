"""Word-level language-modelling data: local TFDS corpora, stock lm1b, BPTT batches.

* 'ptb': Mikolov's PTB split, `ptb.{train,valid,test}.txt` in `source_dir` -> train/validation/
  test. Already tokenized, with `<unk>`: whitespace split, not lowercased.
* 'tinyshakespeare': `input.txt` in `source_dir`, its lines (blank ones included) split in order
  90% / 5% / 5% (`vocab.tinyshakespeare_bounds`). Lowercased (`lowercase` None or True),
  punctuation split off words (`vocab.WORD_PATTERN`), blank lines skipped.
* 'lm1b': stock TFDS `lm1b` via `tfds.data_source` (prepared in `data_dir`: that needs TensorFlow
  and a network; tests use `tfds.testing.mock_data`). Whitespace split. Validation is carved from
  the END of TFDS train, its last `min(LM1B_VALIDATION_LINES, n // 10)` records (TFDS shuffled
  train at preparation: a random held-out sample); train is read from the start, and only up to
  `max_train_tokens` tokens when that is > 0. Test: the whole TFDS test split (50 heldout shards).

PTB and Tiny Shakespeare go through the local builder `WordCorpus` (ArrayRecord, no TensorFlow),
prepared once into `data_dir/word_corpus/<name>/1.0.0` and read back with
`tfds.data_source('word_corpus/<name>')`. Its metadata records each source file's size and sha256
prefix; loading with an explicit `source_dir` whose files differ from them is an error.

Each split becomes one int32 stream with `<eos>` after each non-empty line (`vocab.line_tokens`);
the vocabulary comes from train only (after the `max_train_tokens` cut), frequency-sorted
(`vocab.build_vocab`); words unseen in train map to `<unk>`.
"""

import dataclasses
import functools
import itertools
import os
from typing import Any, Dict, Iterator, Optional

import numpy as np
import tensorflow_datasets as tfds

from softmax_jax.data.builders import prepare_once, prepare_stock
from softmax_jax.data.vocab import (DEFAULT_SOURCE_ROOT, SOURCE_FILES, SPECIALS, build_vocab,
                                    check_fingerprints, encode, file_fingerprint, line_tokens,
                                    read_lines, source_paths, tinyshakespeare_bounds)

LM_DATASETS = ('ptb', 'tinyshakespeare', 'lm1b')
SPLITS = ('train', 'validation', 'test')
LM1B_VALIDATION_LINES = 10_000
_PROSE = ('tinyshakespeare',)  # Untokenized: split punctuation off; lowercase by default.
_HOMEPAGES = {'ptb': 'https://www.fit.vutbr.cz/~imikolov/rnnlm/',
              'tinyshakespeare': 'https://github.com/karpathy/char-rnn'}
_READ_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class TextDataset:
  """A word-level corpus as token streams.

  Attributes:
    name: one of `LM_DATASETS`.
    vocab: id -> word, sorted by train count descending (ties alphabetical); holds '<eos>', '<unk>'.
    counts: `[V]` int64 train count of each id (non-increasing).
    splits: 'train', 'validation', 'test' -> `[n]` int32 token stream, `<eos>` at line ends.
  """
  name: str
  vocab: tuple
  counts: np.ndarray
  splits: dict

  @property
  def num_classes(self) -> int:
    return len(self.vocab)


class WordCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Local corpora (configs 'ptb', 'tinyshakespeare'), one record `{'text': line}` a line."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'One record per source line; Tiny Shakespeare split 90/5/5 by lines.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='ptb', description='Penn Treebank, Mikolov word-level split.'),
      tfds.core.BuilderConfig(name='tinyshakespeare',
                              description='Tiny Shakespeare (input.txt), lines 90/5/5 in order.'),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Pass the folder holding the raw files as download_config.manual_dir: '
      + '; '.join(f"{k}: {', '.join(v.values())}" for k, v in SOURCE_FILES.items())
      + f' (shared copies: {DEFAULT_SOURCE_ROOT}/<name>).')

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='Word-level LM corpus read from local raw text; metadata["source_files"] '
                    'holds each file\'s size and sha256 prefix.',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text()}),
        homepage=_HOMEPAGES[self.builder_config.name],
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    name = self.builder_config.name
    paths = source_paths(name, os.fspath(dl_manager.manual_dir))
    self.info.metadata['source_files'] = {
        os.path.basename(p): file_fingerprint(p) for p in paths.values()}
    if name == 'tinyshakespeare':
      lines = read_lines(paths['all'])
      return {s: self._generate_examples(lines[b])
              for s, b in tinyshakespeare_bounds(len(lines)).items()}
    return {split: self._generate_examples(read_lines(path)) for split, path in paths.items()}

  def _generate_examples(self, lines):
    for i, line in enumerate(lines):
      yield i, {'text': line}


def prepare_corpus(name: str, *, data_dir: Optional[str] = None,
                   source_dir: Optional[str] = None) -> WordCorpus:
  """Builds `WordCorpus/<name>` into `data_dir` on first use (from `source_dir`) and returns it.

  Args:
    name: 'ptb' or 'tinyshakespeare'.
    data_dir: TFDS data_dir (None: the TFDS default).
    source_dir: folder of the raw files (None: `DEFAULT_SOURCE_ROOT/<name>`). When given and the
      data is already prepared, its files must match the recorded fingerprints.

  Raises:
    FileNotFoundError: not prepared and raw files missing; or prepared and `source_dir` given
      but not a directory.
    ValueError: prepared from files that differ from those in the given `source_dir`.
  """
  if name not in SOURCE_FILES:
    raise ValueError(f'name must be one of {tuple(SOURCE_FILES)}, got {name!r}')
  builder = WordCorpus(config=name, data_dir=data_dir, file_format='array_record')
  if not builder.is_prepared():
    source = os.path.abspath(source_dir or os.path.join(DEFAULT_SOURCE_ROOT, name))
    source_paths(name, source)  # Fails early, naming the missing files.

    def prepare(b):
      b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=source))
    builder = prepare_once(
        lambda: WordCorpus(config=name, data_dir=data_dir, file_format='array_record'), prepare)
  elif source_dir is not None:
    if not os.path.isdir(source_dir):  # prepared: say so, do not ignore it
      raise FileNotFoundError(
          f'config.data.source_dir={source_dir!r} is not a directory. {name} is already prepared '
          f'in {builder.data_dir}; leave config.data.source_dir unset (None) to use that copy, '
          f'or point it to the folder of the raw {name} files.')
    check_fingerprints(name, source_dir, dict(builder.info.metadata.get('source_files', {})),
                       where=str(builder.data_dir))
  return builder


def _source_lines(source, start: int = 0, stop: Optional[int] = None) -> Iterator[str]:
  """Lazily yields `source[i]['text']` for i in [start, stop) as str (bytes decoded as UTF-8)."""
  stop = len(source) if stop is None else stop
  for first in range(start, stop, _READ_CHUNK):
    keys = list(range(first, min(stop, first + _READ_CHUNK)))
    try:
      records = source.__getitems__(keys)  # Batched ArrayRecord reads.
    except (AttributeError, TypeError):  # Plain sequences (mocks).
      records = [source[k] for k in keys]
    for record in records:
      text = record['text']
      yield text.decode('utf-8') if isinstance(text, bytes) else str(text)


def _lm1b_lines(data_dir: Optional[str]) -> Dict[str, Iterator[str]]:
  prepare_once(lambda: tfds.builder('lm1b', data_dir=data_dir), prepare_stock)  # fails fast offline
  train = tfds.data_source('lm1b', split='train', data_dir=data_dir)
  test = tfds.data_source('lm1b', split='test', data_dir=data_dir)
  n = len(train)
  n_val = min(LM1B_VALIDATION_LINES, n // 10)
  if n_val < 1:
    raise ValueError(f'lm1b train has {n} records; carving validation needs at least 10')
  return {'train': _source_lines(train, 0, n - n_val),
          'validation': _source_lines(train, n - n_val, n), 'test': _source_lines(test)}


def _field(cfg: Any, key: str, default: Any = None) -> Any:
  value = cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)
  return default if value is None else value


def load_text_dataset(cfg: Any) -> TextDataset:
  """Loads a word-level corpus as token streams with a train vocabulary.

  Args:
    cfg: `config.data` (ConfigDict, or any object/dict) with `name` (one of `LM_DATASETS`),
      `data_dir` (TFDS data_dir; None: default), `source_dir` (raw files of ptb/tinyshakespeare;
      None: `DEFAULT_SOURCE_ROOT/<name>`), `vocab_size` (0 or absent: every train token; else
      V > 2, see `vocab.build_vocab`: `<eos>`, `<unk>` plus the V - 2 most frequent words),
      `lowercase` (None or absent: True for tinyshakespeare, False otherwise),
      `max_train_tokens` (0 or absent: all; else train and its vocabulary are the first that many
      tokens, `<eos>` included) and `seq_len` (only checked here: >= 1).

  Returns:
    the `TextDataset`.

  Raises:
    ValueError: unknown name, bad vocab_size / max_train_tokens / seq_len, a split too short.
    FileNotFoundError: raw files missing (ptb, tinyshakespeare), naming path and file names.
  """
  name = _field(cfg, 'name')
  if name not in LM_DATASETS:
    raise ValueError(f'config.data.name must be one of {LM_DATASETS}, got {name!r}')
  vocab_size = int(_field(cfg, 'vocab_size', 0))
  if vocab_size < 0 or 0 < vocab_size <= len(SPECIALS):
    raise ValueError(f'config.data.vocab_size must be 0 (all train words) or > {len(SPECIALS)} '
                     f'(it counts the specials {SPECIALS}), got {vocab_size}')
  max_train_tokens = int(_field(cfg, 'max_train_tokens', 0))
  if max_train_tokens < 0:
    raise ValueError(f'config.data.max_train_tokens must be >= 0 (0: all), got {max_train_tokens}')
  seq_len = _field(cfg, 'seq_len')
  if seq_len is not None and int(seq_len) < 1:
    raise ValueError(f'config.data.seq_len must be >= 1, got {seq_len}')
  data_dir = _field(cfg, 'data_dir')
  if name == 'lm1b':
    lines = _lm1b_lines(data_dir)
  else:
    prepare_corpus(name, data_dir=data_dir, source_dir=_field(cfg, 'source_dir'))
    lines = {s: _source_lines(tfds.data_source(f'word_corpus/{name}', split=s, data_dir=data_dir,
                                               download=False)) for s in SPLITS}
  tokenize = functools.partial(line_tokens, split_punctuation=name in _PROSE,
                               lowercase=bool(_field(cfg, 'lowercase', name in _PROSE)))
  tokens = {s: tokenize(lines[s], max_tokens=max_train_tokens if s == 'train' else 0)
            for s in SPLITS}
  vocab, counts = build_vocab(tokens['train'], max_size=vocab_size)
  splits = {s: encode(tokens[s], vocab) for s in SPLITS}
  for split, stream in splits.items():
    if len(stream) < 2:
      raise ValueError(f"{name} split '{split}' has {len(stream)} tokens; an LM needs >= 2")
  return TextDataset(name=name, vocab=vocab, counts=counts, splits=splits)


def _check_stream(stream, batch_size: int, seq_len: int) -> np.ndarray:
  stream = np.asarray(stream)
  if stream.ndim != 1 or not np.issubdtype(stream.dtype, np.integer):
    raise ValueError(f'stream must be a 1-D integer array, got {stream.dtype}{list(stream.shape)}')
  for arg, value in (('batch_size', batch_size), ('seq_len', seq_len)):
    if value < 1:
      raise ValueError(f'{arg} must be >= 1, got {value}')
  return stream.astype(np.int32, copy=False)


def _window(rows: np.ndarray, i: int, seq_len: int) -> np.ndarray:
  """Columns `[i*T, (i+1)*T)` of `rows` `[B, L]` as a contiguous `[B, T]` array."""
  return np.ascontiguousarray(rows[:, i * seq_len:(i + 1) * seq_len])


def lm_steps_per_epoch(num_tokens: int, batch_size: int, seq_len: int) -> int:
  """Training steps per epoch of `lm_batches`: `(num_tokens - 1) // batch_size // seq_len`."""
  return max(num_tokens - 1, 0) // batch_size // seq_len


def lm_batches(stream, batch_size: int, seq_len: int, *, start_step: int = 0,
               num_steps: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
  """Zaremba et al. (2014) BPTT batches: B contiguous rows, windows advancing by T.

  With `L = (n - 1) // B`, row r reads inputs `stream[r*L : (r+1)*L]` and targets shifted by one,
  `stream[r*L + 1 : (r+1)*L + 1]`; step s is window `i = s % E` of the rows, columns
  `[i*T, (i+1)*T)`, `E = lm_steps_per_epoch(n, B, T) = L // T` (the last `L % T` columns and the
  last `n - 1 - B*L` targets are unused). Row r of step s+1 continues row r of step s (carry the
  LSTM state) except at an epoch start (`s % E == 0`: reset it there). Epochs repeat identically
  and step s's batch depends only on s: `start_step` resumes exactly.

  Args:
    stream: `[n]` integer token ids.
    batch_size: B >= 1.
    seq_len: T >= 1; needs `B * T <= n - 1`.
    start_step: first global step to yield (>= 0).
    num_steps: the global step to stop before (exclusive, like a training length; so a resumed
      run with the same `num_steps` ends where the uninterrupted one does); None: never stop.

  Returns:
    an iterator of `{'inputs': [B, T] int32, 'targets': [B, T] int32}` (arguments checked now).
  """
  stream = _check_stream(stream, batch_size, seq_len)
  steps = lm_steps_per_epoch(len(stream), batch_size, seq_len)
  if steps < 1:
    raise ValueError(f'batch_size * seq_len = {batch_size} * {seq_len} must be <= len(stream) - 1 '
                     f'= {len(stream) - 1}: lower batch_size or seq_len')
  if start_step < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}')
  row = (len(stream) - 1) // batch_size
  inputs = stream[:batch_size * row].reshape(batch_size, row)
  targets = stream[1:batch_size * row + 1].reshape(batch_size, row)
  global_steps = itertools.count(start_step) if num_steps is None else range(start_step, num_steps)
  return ({'inputs': _window(inputs, s % steps, seq_len),
           'targets': _window(targets, s % steps, seq_len)} for s in global_steps)


def lm_eval_batches(stream, batch_size: int, seq_len: int) -> Iterator[Dict[str, np.ndarray]]:
  """One pass that predicts every token after the first exactly once, in B contiguous rows.

  The n - 1 (input, target) pairs `(stream[j], stream[j+1])` are laid out row-major in a
  `[B, W*T]` grid, `W = ceil(ceil((n-1) / B) / T)` windows, so rows are contiguous (carry the
  state across windows) and only the end of the grid is padding (id 0, `mask` False).

  Args:
    stream: `[n]` integer token ids, n >= 2.
    batch_size: B >= 1.
    seq_len: T >= 1.

  Returns:
    an iterator over W batches `{'inputs', 'targets': [B, T] int32, 'mask': [B, T] bool}`;
    `mask` sums to n - 1 over the pass.
  """
  stream = _check_stream(stream, batch_size, seq_len)
  pairs = len(stream) - 1
  if pairs < 1:
    raise ValueError(f'stream must hold at least 2 tokens, got {len(stream)}')
  row_len = -(-pairs // batch_size)  # ceil((n - 1) / B) pairs a row...
  windows = -(-row_len // seq_len)  # ...rounded up to whole windows.
  size = batch_size * windows * seq_len
  grid = lambda x: np.pad(x, (0, size - pairs)).reshape(batch_size, windows * seq_len)
  inputs, targets = grid(stream[:-1]), grid(stream[1:])
  mask = grid(np.ones(pairs, bool))
  return ({'inputs': _window(inputs, w, seq_len), 'targets': _window(targets, w, seq_len),
           'mask': _window(mask, w, seq_len)} for w in range(windows))
