"""Knowledge distillation (Hinton et al. 2015) on the one trainer: any task, any teacher head.

`config.distill.teacher_workdir` names a trained run of `scripts/train.py`. The student (this
config's model and head) is trained on

    alpha * head_loss(student, label) + (1 - alpha) * ops.kd_loss(student log-probs,
                                                                   teacher log-probs, T)

per example (per token for language models), where `head_loss` is the student head's own training
loss and the teacher's target is its exact `log_prob` in evaluation mode (any head: dense,
adaptive, hierarchical, sampled, mixture; a sparse teacher's zero probabilities are allowed).
The student's side is its head's `log_prob` of the training-mode features, so the student head
must give full log-probabilities (a sparse-mapping student is refused: its log-probs are -inf off
the support, where the KL is infinite).

Where the teacher runs:

- *cached* (classification, `config.distill.cache_teacher`, a train split that stays on the
  devices (`ClassificationTask.resident`) and no augmentation): the teacher's log-probs of every
  training image are computed once at start-up, `[N, K]` float32 next to the images, and each step
  gathers its rows with the batch. Exact (the teacher is deterministic in evaluation mode) and the
  cheapest: the step pays only the student (WORKSPACE, issue 19, measures both).
- *in the step* (otherwise; always for language models): the teacher's variables are a
  replicated entry 'teacher' of the train state, and the step runs the teacher's forward pass on
  the (augmented) batch under `stop_gradient`. A language-model teacher carries its own recurrent
  state ('teacher_carry', split over devices like the student's carry, reset at each epoch start).
  The teacher's variables are then part of every checkpoint, so a resumed run needs nothing but its
  workdir; `train.load_trained` of a distilled run still reads the teacher's workdir (the
  state's template).

The teacher must predict the student's classes from the student's inputs: the same number of
classes and input shape (classification) or the same vocabulary, id for id (language models);
images are renormalized from the student's dataset statistics to the teacher's.
"""

import functools
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from softmax_jax.ops.distill import kd_loss


def check_teacher(config, task, teacher_config, teacher_dataset) -> None:
  """Raises ValueError unless the teacher predicts the student's classes from its inputs."""
  where = f'config.distill.teacher_workdir={config.distill.teacher_workdir!r}'
  student, teacher = task.dataset, teacher_dataset
  lm = hasattr(student, 'vocab')
  if lm != hasattr(teacher, 'vocab'):
    kinds = ('a language model', 'a classifier')
    raise ValueError(f'{where}: the teacher is {kinds[not hasattr(teacher, "vocab")]} '
                     f'(data {teacher_config.data.name!r}), the student {kinds[not lm]} '
                     f'(data {config.data.name!r}).')
  if teacher.num_classes != student.num_classes:
    raise ValueError(f'{where}: the teacher has {teacher.num_classes} classes (data '
                     f'{teacher_config.data.name!r}), the student {student.num_classes} (data '
                     f'{config.data.name!r}); they must be the same.')
  if lm and tuple(teacher.vocab) != tuple(student.vocab):
    first = next(i for i, (a, b) in enumerate(zip(teacher.vocab, student.vocab)) if a != b)
    raise ValueError(f'{where}: the teacher\'s vocabulary differs from the student\'s at id {first} '
                     f'({teacher.vocab[first]!r} vs {student.vocab[first]!r}); train both on the '
                     'same data and vocab_size.')
  if not lm and tuple(teacher.input_shape) != tuple(student.input_shape):
    raise ValueError(f'{where}: the teacher takes inputs {tuple(teacher.input_shape)} (data '
                     f'{teacher_config.data.name!r}), the student {tuple(student.input_shape)} (data '
                     f'{config.data.name!r}); they must be the same.')
  if getattr(task.model.head, 'fenchel_young', None) is not None:
    raise ValueError(f'config.head.mapping={task.model.head.mapping!r}: a sparse student head cannot '
                     'be distilled (its log-probs are -inf off its support, where the KL to the '
                     "teacher is infinite); use mapping='softmax'.")


def load_teacher(config, task, load_trained):
  """`(teacher config, teacher model, teacher variables, teacher dataset)` of `config.distill.teacher_workdir`.

  `load_trained` is `train.task.load_trained` (passed in: the task module builds this one's tasks).

  Raises:
    ValueError: no trained run there (naming the path), or a teacher that does not fit the student.
  """
  workdir = config.distill.teacher_workdir
  if not os.path.isdir(workdir):
    raise ValueError(f'config.distill.teacher_workdir={workdir!r} does not exist; it must be the '
                     'workdir of a trained run of scripts/train.py.')
  try:
    t_config, t_dataset, t_model, t_variables = load_trained(workdir)
  except FileNotFoundError as e:
    raise ValueError(f'config.distill.teacher_workdir={workdir!r} holds no trained run: {e}') from e
  check_teacher(config, task, t_config, t_dataset)
  logging.info('Distilling from %s (%s, %s head), alpha=%s, T=%s.', workdir, t_config.model.name,
               t_config.head.name, config.distill.alpha, config.distill.temperature)
  return t_config, t_model, jax.tree.map(np.asarray, t_variables), t_dataset


class DistillTask:
  """A task trained towards a teacher's softmax (see the module doc); wraps the student's task.

  Everything but the state, the loss and the batches' teacher targets is the student task's:
  evaluation reports the student alone.
  """

  def __init__(self, base, config, teacher):
    """`base`: the student's task; `teacher`: `load_teacher(config, base, ...)`."""
    self.base, self.config = base, config
    self.alpha = float(config.distill.alpha)
    self.temperature = float(config.distill.temperature)
    _, self.teacher, variables, t_dataset = teacher
    self.lm = hasattr(base.dataset, 'vocab')
    if not self.lm:  # student-normalized images -> the teacher's normalization
      s, t = base.dataset, t_dataset
      self._scale = np.asarray(s.std / t.std, np.float32)
      self._shift = np.asarray((s.mean - t.mean) / t.std, np.float32)
    self.cached = (not self.lm and bool(config.distill.cache_teacher) and base.resident is not None
                   and not any(dict(config.augment).values()))
    self._variables = variables
    self.row_state_keys = tuple(base.row_state_keys) + (('teacher_carry',) if self.lm else ())
    logging.info('Teacher log-probs: %s.', 'cached once for the resident train split' if self.cached
                 else 'computed in each step')

  def __getattr__(self, name):  # the student task's members (model, dataset, evaluate, ...)
    if name == 'base':  # not set yet (e.g. while unpickling)
      raise AttributeError(name)
    return getattr(self.base, name)

  def _teacher_images(self, images):
    return images * self._scale + self._shift

  def _teacher_log_prob(self, variables, images):
    lp = self.teacher.apply(variables, self._teacher_images(images), method='log_prob')
    return jax.lax.stop_gradient(lp.astype(jnp.float32))

  def init_state(self, tx):
    state = self.base.init_state(tx)
    if not self.cached:
      state['teacher'] = self._variables
    if self.lm:
      state['teacher_carry'] = jax.tree.map(
          np.asarray, self.teacher.initial_carry(int(self.config.batch_size)))
    return state

  @functools.cached_property
  def resident(self):
    """The student's resident train split, with 'teacher_log_prob' `[N, K]` when cached."""
    resident = self.base.resident
    if not self.cached:
      return resident
    fn = jax.jit(self._teacher_log_prob)
    chunk = int(self.config.eval_batch_size)
    images = resident['image']
    log_probs = np.concatenate([np.asarray(fn(self._variables, images[i:i + chunk]))
                                for i in range(0, len(images), chunk)])
    return {**resident, 'teacher_log_prob': log_probs}

  def gather(self, resident, batch):
    out = self.base.gather(resident, batch)
    if self.cached:
      out['teacher_log_prob'] = resident['teacher_log_prob'][batch['index']]
    return out

  def _mix(self, head_losses, student_logits, teacher_log_probs):
    kd = kd_loss(student_logits, teacher_log_probs, temperature=self.temperature)
    return self.alpha * head_losses.astype(jnp.float32) + (1.0 - self.alpha) * kd

  def loss(self, params, state, batch, rng):
    if self.lm:
      return self._lm_loss(params, state, batch, rng)
    from softmax_jax.train.classification import classifier_loss  # pylint: disable=g-import-not-at-top

    def method(module, images, labels, *, train, step=None):
      if self.cached:
        target = batch['teacher_log_prob']
      else:  # on the images the student sees (augmented ones included)
        target = self._teacher_log_prob(state['teacher'], images)
      features = module.backbone(images, train=train)
      return self._mix(module.head(features, labels, train=train, **_step_kwargs(module, step)),
                       module.head.log_prob(features), target)

    return classifier_loss(self.model, params, state, batch, rng, method=method, **self.base.augment)

  def _lm_loss(self, params, state, batch, rng):
    target, teacher_carry = self.teacher.apply(
        state['teacher'], batch['inputs'], self.base.entering_carry(state, 'teacher_carry'),
        method='log_prob')
    target = jax.lax.stop_gradient(target.astype(jnp.float32))

    def method(module, tokens, labels, *, carry, train, step=None):
      features, carry = module.backbone(tokens, carry, train=train)
      losses = module.head(features, labels, train=train, **_step_kwargs(module, step))
      return self._mix(losses, module.head.log_prob(features), target), carry

    loss, updates = self.base.loss(params, state, batch, rng, method=method)
    return loss, {**updates, 'teacher_carry': jax.lax.stop_gradient(teacher_carry)}


def _step_kwargs(module, step):
  """`{'step': step}` for heads that take the training step (`uses_step`), as the models pass it."""
  return {'step': step} if step is not None and getattr(type(module.head), 'uses_step', False) else {}
