"""SIGINT and SIGTERM (Ctrl-C, preemption on Colab and clouds) stop a run at a checkpoint.

`with Interrupts() as interrupts:` installs handlers for both signals (main thread only; elsewhere
it does nothing; a signal the process ignores, as `nohup` and a shell's `cmd &` make SIGINT, stays
ignored). Inside `interrupts.deferred()` (the step loop) a first signal only sets
`interrupts.signum`: the loop finishes the step in flight, checkpoints it and raises
`TrainingInterrupted`. Outside it (data preparation, the final evaluation: nothing there is lost
by stopping) the first signal raises `TrainingInterrupted` at once. A second signal always acts at
once: SIGINT raises a plain `KeyboardInterrupt` (also in the middle of a checkpoint save, which
orbax makes atomic), SIGTERM terminates the process.
"""

import contextlib
import os
import signal
import threading
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
  """A run stopped by SIGINT or SIGTERM; the message says what was saved and how to resume.

  A `KeyboardInterrupt`, so that `except Exception` does not swallow it.

  Attributes:
    signum: the signal's number (its exit status, by convention, is 128 + signum).
  """

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum

  def __str__(self) -> str:
    return str(self.args[0])


class Interrupts:
  """Context manager: SIGINT/SIGTERM handlers for one run (see the module docstring).

  Attributes:
    signum: the first signal received, or None.
    resume_hint: how a rerun resumes, for the message of an immediate interruption; the caller
      keeps it current (e.g. 'Rerun with the same workdir to resume from checkpoint ...').
  """

  def __init__(self):
    self.signum: Optional[int] = None
    self.resume_hint = 'Rerun with the same workdir to resume.'
    self._deferring = False
    self._previous = {}

  def __enter__(self) -> 'Interrupts':
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:  # ignored on purpose (nohup, `cmd &`): keep
          self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  @contextlib.contextmanager
  def deferred(self):
    """Within this block a first signal only sets `signum` (the step loop checkpoints first)."""
    self._deferring = True
    try:
      yield self
    finally:
      self._deferring = False

  @staticmethod
  def name(signum: int) -> str:
    return signal.Signals(signum).name

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signum is not None:  # the second signal: stop now
      for sig, handler in self._previous.items():
        signal.signal(sig, handler)
      self._previous = {}
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self.signum = signum
    if not self._deferring:
      raise TrainingInterrupted(f'Interrupted by {self.name(signum)}. {self.resume_hint}', signum)
