"""``adamw2``: AdamW whose per-matrix step is bounded by its spectral norm."""

from typing import Any, Callable

import jax
import optax

from optax_spectral import _layout
from optax_spectral import _matrices
from optax_spectral import _transform


def adamw2(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    mu_dtype: Any | None = None,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    mask: Any | Callable[[optax.Params], Any] | None = None,
    *,
    nesterov: bool = False,
    tau: jax.typing.ArrayLike = _transform.DEFAULT_TAU,
    num_iterations: int | None = None,
    num_iterations_first: int | None = None,
    num_iterations_weight: int | None = None,
    block_size: int | None = None,
    max_extrapolation: jax.typing.ArrayLike = (
        _transform.DEFAULT_MAX_EXTRAPOLATION),
    weight_floor: jax.typing.ArrayLike = _transform.DEFAULT_WEIGHT_FLOOR,
    ramp_steps: jax.typing.ArrayLike | None = None,
    dimension_numbers: _matrices.DimensionNumbersOrFn = None,
    bound_vectors: bool = False,
    bound: Any = 'all',
    stack_matrices: bool | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW², AdamW that trains Transformers without learning-rate warmup.

  .. math::
    Δ_t = -α_t (\hat m_t / (\sqrt{\hat v_t} + ε) + λ W_{t-1}), \quad
    W_t = W_{t-1} + Δ_t \min\left(1, \frac{τ σ_1(W_{t-1})}{σ_1(Δ_t)}\right)

  ``optax.adamw`` followed by :func:`scale_by_spectral_bound`: every weight
  matrix's whole step, decoupled weight decay included, is at most ``tau``
  times the matrix's spectral norm, so σ1 grows by at most ``1 + tau`` per
  step. Swap it for ``optax.adamw`` and drop the warmup.

  Args:
    learning_rate: a float or an optax schedule, >= 0 (a negative float,
      which ``optax.adamw`` would take as gradient ascent, is a
      ``ValueError``; a schedule is only ever called inside ``update``, with
      a traced count, as optax calls it).
    b1: decay rate of the first moment.
    b2: decay rate of the second moment.
    eps: added to the denominator outside the square root.
    eps_root: added to the denominator inside the square root.
    mu_dtype: dtype of the first moment; ``None`` uses the params' dtype.
    weight_decay: decoupled weight decay, a float or a schedule.
    mask: which leaves get weight decay, as in ``optax.adamw``.
    nesterov: use Nesterov momentum (NAdamW).
    tau: the largest allowed ``σ1(Δ) / σ1(W)`` per step. Start from the
      default, 0.02 (README, "Choosing τ"), whatever the init and
      learning rate; lower it (0.01) if attention entropy
      still collapses; raise it only where the bound keeps shrinking most
      steps late in training at a learning rate AdamW with warmup handles
      (``diagnostics.bound_summary``'s ``throttled_fraction``).
    num_iterations: power iterations on the step per update (``None``: 1).
    num_iterations_first: power iterations from a cold start (``None``: 20;
      where they run, on CPUs and on GPUs/TPUs: see
      :func:`scale_by_spectral_bound`).
    num_iterations_weight: power iterations on ``W`` per update; ``None``
      runs as many as on the step.
    block_size: vectors in the block power iteration on the step (``None``:
      8). Shape settings default to ``None`` so that
      ``optax.inject_hyperparams(adamw2)`` works as it does for
      ``optax.adamw``.
    max_extrapolation: largest relative correction of the step's σ1 estimate.
    weight_floor: the σ1(W) in the bound is at least this times σ1 of a
      variance-preserving random matrix of its shape, so that small-init
      matrices are not throttled (see :func:`scale_by_spectral_bound`);
      ``0`` is the paper's rule.
    ramp_steps: over this many first steps the floor, and the steps of the
      leaves the bound does not cover (biases, norm scales), ramp in
      linearly; ``None``: ``1 / tau`` (50 steps); ``0``: no ramp (see
      :func:`scale_by_spectral_bound`).
    dimension_numbers: which axes of each leaf form a matrix; see
      :func:`scale_by_spectral_bound` and :func:`bounded_leaves`.
    bound_vectors: also bound 1-D leaves by their L2 norm.
    bound: which matrices are bounded: ``'all'`` (the paper's rule),
      ``'attention'`` (query, key, value and output projections, found by
      name) or a callable from a param's name to bool; see
      :func:`scale_by_spectral_bound`.
    stack_matrices: whether each step stacks same-shaped 2-D matrices into
      one copy (``None``: only on an accelerator where the program has one
      device; ``False`` saves about a param-sized buffer of scratch memory
      there; see :func:`scale_by_spectral_bound`).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` requires params.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_spectral
    >>> params = {'w': jnp.eye(4), 'b': jnp.zeros(4)}
    >>> tx = optax_spectral.adamw2(learning_rate=1e-2)  # was optax.adamw
    >>> state = tx.init(params)
    >>> grads = jax.grad(lambda p: jnp.sum((p['w'] + p['b']) ** 2))(params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)

  References:
    Qi et al., `Taming Transformer Without Using Learning Rate Warmup
    <https://arxiv.org/abs/2505.21910>`_, ICLR 2025.

    Loshchilov and Hutter, `Decoupled Weight Decay Regularization
    <https://arxiv.org/abs/1711.05101>`_, ICLR 2019.
  """
  _check_learning_rate(learning_rate)
  tx = optax.chain(
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                  mu_dtype=mu_dtype, weight_decay=weight_decay, mask=mask,
                  nesterov=nesterov),
      _transform.scale_by_spectral_bound(
          tau, num_iterations=num_iterations,
          num_iterations_first=num_iterations_first,
          num_iterations_weight=num_iterations_weight, block_size=block_size,
          max_extrapolation=max_extrapolation, weight_floor=weight_floor,
          ramp_steps=ramp_steps, dimension_numbers=dimension_numbers,
          bound_vectors=bound_vectors, bound=bound,
          stack_matrices=stack_matrices),
  )

  def update_fn(updates, state, params=None, **extra_args):
    if params is not None:  # (inside shard_map, shards differ from init's)
      _layout.check_whole_matrices({
          n: x for n, x in _matrices.named_leaves(params).items()
          if getattr(x, 'ndim', 0) >= 2})
    _check_like_init(updates, state)
    return tx.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _check_learning_rate(learning_rate) -> None:
  """A negative learning rate makes AdamW ascend the loss; optax.adamw takes
  it silently, adamw2 refuses a constant one. A schedule is never called
  here: optax calls it only inside ``update``, with a traced int32 count, and
  schedules written in plain Python arithmetic (Flax's examples' rsqrt
  branch, ``(count + shift) ** -0.5``, at a negative count) raise when
  called with a Python int outside their range."""
  if callable(learning_rate):
    return
  try:
    value = float(learning_rate)
  except (TypeError, ValueError):  # (a ConcretizationTypeError is one)
    return  # traced (inject_hyperparams) or not a number: optax decides
  if value < 0 or value != value:
    raise ValueError(
        f'learning_rate must be >= 0 (a negative one ascends the loss), got '
        f'{value}.')


def _check_like_init(updates, state) -> None:
  """A short ValueError naming the leaves, where optax would fail deep inside
  (``add got incompatible shapes``) on grads unlike the params of ``init``."""
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  adam = [x for x in jax.tree.leaves(state, is_leaf=is_adam) if is_adam(x)]
  if not adam:
    return
  shapes = lambda tree: {n: tuple(getattr(x, 'shape', ()))
                         for n, x in _matrices.named_leaves(tree).items()}
  want, got = shapes(adam[0].mu), shapes(updates)
  if want == got:
    return
  problems = [f'{n!r} missing' for n in sorted(set(want) - set(got))]
  problems += [f'{n!r} not in init' for n in sorted(set(got) - set(want))]
  problems += [f'{n!r} has shape {got[n]}, init saw {want[n]}'
               for n in sorted(set(want) & set(got)) if want[n] != got[n]]
  raise ValueError(
      'adamw2.update: the gradients do not match the params given to init ('
      + '; '.join(problems[:3])
      + (f'; {len(problems) - 3} more' if len(problems) > 3 else '')
      + '). If the model changed, create the state again for its params: '
      'state = tx.init(params) (Flax NNX: nnx.Optimizer(model, tx, '
      'wrt=nnx.Param)).')


def from_adamw_state(adamw_state: Any, tx: optax.GradientTransformation,
                     params: Any) -> Any:
  """The state of :func:`adamw2` that continues a run of ``optax.adamw``.

  Switching a running job from ``optax.adamw`` to ``adamw2``: Adam's moments
  and step count carry over, and the bound starts fresh (its first step starts
  the step's power iteration cold, and its ramp starts again: build ``tx`` with
  ``ramp_steps=0`` to continue at full step size). Do not restore an
  ``optax.adamw`` checkpoint into an ``adamw2`` state directly: ``adamw2``'s
  state is one level deeper (``(adamw state, bound state)``), so
  ``flax.training.checkpoints`` would silently restore zeroed moments and
  orbax refuses the structure.

  Args:
    adamw_state: the state of ``optax.adamw`` (e.g. restored from its
      checkpoint).
    tx: the :func:`adamw2` to continue with, built with the same
      ``optax.adamw`` arguments (``mask``, ``mu_dtype``, ...).
    params: the current params.

  Returns:
    A state for ``tx.update``.

  Examples:
    >>> import jax.numpy as jnp, optax, optax_spectral
    >>> params = {'w': jnp.eye(3)}
    >>> adamw_state = optax.adamw(1e-3).init(params)
    >>> tx = optax_spectral.adamw2(1e-3)
    >>> state = optax_spectral.from_adamw_state(adamw_state, tx, params)
    >>> _ = tx.update({'w': jnp.ones((3, 3))}, state, params)
  """
  fresh = tx.init(params)
  if not (isinstance(fresh, tuple) and len(fresh) == 2
          and isinstance(fresh[1], _transform.ScaleBySpectralBoundState)):
    raise ValueError('tx must be an optax_spectral.adamw2.')
  shapes = lambda tree: jax.tree.map(lambda x: (x.shape, x.dtype), tree)
  if jax.tree.structure(adamw_state) != jax.tree.structure(fresh[0]) or (
      shapes(adamw_state) != shapes(fresh[0])):
    raise ValueError(
        'adamw_state is not the state of an optax.adamw built with the same '
        'arguments as tx and these params (mask, mu_dtype, param shapes).')
  return (adamw_state, fresh[1])
