"""STUB: being written. Full-softmax family."""


def logsumexp(x, *, axis=-1, where=None, temperature=1.0):
  raise NotImplementedError


def softmax(x, *, where=None, temperature=1.0):
  raise NotImplementedError


def log_softmax(x, *, where=None, temperature=1.0):
  raise NotImplementedError


def cross_entropy(logits, labels, *, where=None, label_smoothing=0.0, class_weights=None):
  raise NotImplementedError


def soft_cross_entropy(logits, targets, *, where=None):
  raise NotImplementedError
