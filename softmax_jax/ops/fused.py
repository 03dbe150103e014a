"""STUB: being written. Fused linear cross-entropy."""


def linear_cross_entropy(x, w, labels, **kwargs):
  raise NotImplementedError
