"""``scale_by_spectral_bound``: the per-matrix step bound of AdamW²."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_spectral import _matrices
from optax_spectral._power_iteration import compute_dtype
from optax_spectral._power_iteration import orthonormal_matmul
from optax_spectral._power_iteration import power_iteration

# Chosen by the sweep in benchmarks/defaults (see README, "Defaults").
DEFAULT_TAU = 0.02
DEFAULT_NUM_ITERATIONS = 1
# A cold start underestimates σ1 badly (−29% after one iteration on noise-like
# matrices); the first step pays for a converged estimate instead.
DEFAULT_NUM_ITERATIONS_FIRST = 20
# Columns of the block power iteration on the step. Products with 8 columns
# cost about 1.3x one column on CPU, and cut the worst underestimate on
# noise-like steps roughly in half.
DEFAULT_BLOCK_SIZE = 8
# Largest correction applied by extrapolating the last iteration (see
# ``scale_by_spectral_bound``). It can only tighten the bound.
DEFAULT_MAX_EXTRAPOLATION = 0.15


class SpectralMatrixState(NamedTuple):
  """State of one bounded leaf (a batch of matrices, ``batch`` may be ``()``).

  Attributes:
    weight_u: left singular vector of ``W``, ``batch + (rows, 1)``.
    weight_v: right singular vector of ``W``, ``batch + (cols, 1)``.
    update_u: left block of the step, ``batch + (rows, block_size)``.
    update_v: right block of the step, ``batch + (cols, block_size)``.
    sigma_weight: last step's estimate of σ1(W), float32, ``batch``.
    sigma_update: last step's estimate of σ1 of the unbounded step, float32.
    factor: last step's applied factor ``min(1, τ σ1(W) / σ1(Δ))``, float32.
  """
  weight_u: jax.Array
  weight_v: jax.Array
  update_u: jax.Array
  update_v: jax.Array
  sigma_weight: jax.Array
  sigma_update: jax.Array
  factor: jax.Array


class ScaleBySpectralBoundState(NamedTuple):
  """State of :func:`scale_by_spectral_bound`.

  ``matrices`` is keyed by leaf name (see :func:`bounded_leaves`) rather than
  shaped like the params: its arrays are vectors and scalars, and libraries
  such as ``nnx.Optimizer`` give param-shaped state the param's sharding.
  """
  count: jax.Array
  matrices: dict[str, SpectralMatrixState]


def _orthonormal_block(key: jax.Array, shape: tuple[int, ...],
                       dtype) -> jax.Array:
  return jnp.linalg.qr(jax.random.normal(key, shape, jnp.float32))[0].astype(
      dtype)


def _check_hyperparameters(tau, max_extrapolation, **counts):
  # Only concrete values are checked: under inject_hyperparams they are traced.
  if isinstance(tau, (int, float)) and not tau > 0:
    raise ValueError(f'tau must be positive, got {tau}.')
  if isinstance(max_extrapolation, (int, float)) and not max_extrapolation >= 0:
    raise ValueError(
        f'max_extrapolation must be >= 0, got {max_extrapolation}.')
  for name, n in counts.items():
    if isinstance(n, (int, float)) and (int(n) != n or n < 1):
      raise ValueError(f'{name} must be an integer >= 1, got {n}.')


def scale_by_spectral_bound(
    tau: jax.typing.ArrayLike = DEFAULT_TAU,
    *,
    learning_rate: optax.ScalarOrSchedule | None = None,
    num_iterations: int = DEFAULT_NUM_ITERATIONS,
    num_iterations_first: int = DEFAULT_NUM_ITERATIONS_FIRST,
    num_iterations_weight: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_extrapolation: jax.typing.ArrayLike = DEFAULT_MAX_EXTRAPOLATION,
    dimension_numbers: _matrices.DimensionNumbersOrFn = None,
    bound_vectors: bool = False,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  r"""Bounds each weight matrix's step by a fraction of its spectral norm.

  .. math::
    Δ ← Δ · \min\left(1, \frac{τ\,σ_1(W)}{σ_1(Δ)}\right)

  Placed last in a chain (after the learning rate and decoupled weight decay),
  ``Δ`` is the whole step and this is AdamW²'s rule
  ``α_t = min(α, τ σ1(W_{t-1}) / σ1(U_t))``: by Weyl's inequality, σ1 of each
  matrix then grows by at most a factor ``1 + τ`` per step. Placed before the
  learning-rate scaling, pass the same ``learning_rate``; the bound then uses
  ``|learning_rate(count)| · σ1(Δ)`` and the final update is the same.

  σ1 is estimated by warm-started power iteration, vectors kept in the state
  (:func:`power_iteration`), accumulating in at least float32:

  * ``σ1(W)``: one matrix-vector product per step, alternating ``W v`` and
    ``Wᵀ u``. ``W`` moves little per step, so its vectors stay converged; the
    estimate is a lower bound, which errs towards a tighter bound (by about
    1% when the bound is active for many steps in a row and turns ``W``).
    ``num_iterations_weight`` asks for full iterations instead.
  * ``σ1(Δ)``: ``Δ`` is new every step, so it gets ``num_iterations`` full
    iterations with a block of ``block_size`` vectors. A lower bound ``σ`` is
    loose on noise-like steps (about -10% to -12% worst case with the defaults
    when gradients change direction every step), which would make the bound
    looser than asked. The estimate is therefore extrapolated from the last
    iteration's convergence, ``σ · min(σ / σ_half, 1 + max_extrapolation)``
    (``σ_half = σ_max(Δ V) <= σ``): exact when converged, within 10% in the
    same worst case, and never more than ``max_extrapolation`` above ``σ``.
  * The first step runs ``num_iterations_first`` iterations on both, from a
    cold start.

  Guards: a matrix with ``σ1(W) = 0`` (e.g. zero-initialised) is not bounded
  on that step, as in optax's trust ratio, so it can still move; ``σ1(Δ) = 0``
  gives factor 1; a non-finite step leaves the persistent vectors unchanged.

  Args:
    tau: the largest allowed ``σ1(Δ) / σ1(W)`` per step. May be injected with
      ``optax.inject_hyperparams``.
    learning_rate: ``None`` when placed after the learning rate (recommended);
      otherwise the float or schedule that a later transform scales by.
    num_iterations: power iterations on ``Δ`` per step.
    num_iterations_first: power iterations on ``W`` and ``Δ`` on the first
      step, from a cold start.
    num_iterations_weight: ``None`` for one product with ``W`` per step
      (half an iteration), or a number of full iterations on ``W`` per step.
    block_size: vectors in the block power iteration on ``Δ`` (at most the
      matrix's smaller dimension).
    max_extrapolation: largest relative correction of the ``σ1(Δ)`` estimate;
      ``0`` keeps the plain lower bound.
    dimension_numbers: which axes of each leaf form the matrix:
      ``None`` (default: 2-D leaves are matrices; leaves with more dimensions
      are batches of matrices over their last two axes; 0-D and 1-D leaves
      pass through), a :class:`SpectralDimensionNumbers` for all leaves with
      two or more dimensions, a pytree of them with ``None`` for leaves not to
      bound, or a callable from params to such a pytree. Check the result with
      :func:`bounded_leaves`.
    bound_vectors: also bound 1-D leaves (biases, norm scales) by their L2
      norm, as ``1 × n`` matrices.
    seed: seed of the initial power-iteration vectors.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` requires params.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_spectral
    >>> params = {'w': jnp.eye(3)}
    >>> tx = optax.chain(optax.adam(1.0),
    ...                  optax_spectral.scale_by_spectral_bound(tau=0.1))
    >>> state = tx.init(params)
    >>> updates, state = tx.update({'w': jnp.ones((3, 3))}, state, params)
    >>> float(jnp.linalg.norm(updates['w'], ord=2)) <= 0.1 + 1e-6
    True

  References:
    Qi et al., `Taming Transformer Without Using Learning Rate Warmup
    <https://arxiv.org/abs/2505.21910>`_, ICLR 2025.
  """
  _check_hyperparameters(
      tau, max_extrapolation, num_iterations=num_iterations,
      num_iterations_first=num_iterations_first, block_size=block_size,
      **({} if num_iterations_weight is None else
         {'num_iterations_weight': num_iterations_weight}))

  def views_of(params):
    return {name: view for name, view in _matrices.resolve_views(
        params, dimension_numbers, bound_vectors).items()
            if not isinstance(view, str)}

  def init_fn(params):
    if type(params).__name__ == '_ParamsPlaceholder':
      # ``optax.tree.map_params`` inits with a placeholder to find the
      # param-shaped parts of the state. None of ours are: a leaf here makes
      # it leave ``matrices`` untouched.
      return ScaleBySpectralBoundState(count=jnp.zeros([], jnp.int32),
                                       matrices='not params-shaped')
    key = jax.random.key(seed)
    matrices = {}
    for i, (name, view) in enumerate(views_of(params).items()):
      dtype = view.dtype
      b = view.batch_shape
      m, n = view.rows, view.cols
      k = min(block_size, m, n)
      keys = jax.random.split(jax.random.fold_in(key, i), 4)
      zeros = jnp.zeros(b, jnp.float32)
      matrices[name] = SpectralMatrixState(
          weight_u=_orthonormal_block(keys[0], b + (m, 1), dtype),
          weight_v=_orthonormal_block(keys[1], b + (n, 1), dtype),
          update_u=_orthonormal_block(keys[2], b + (m, k), dtype),
          update_v=_orthonormal_block(keys[3], b + (n, k), dtype),
          sigma_weight=zeros, sigma_update=zeros,
          factor=jnp.ones(b, jnp.float32))
    return ScaleBySpectralBoundState(count=jnp.zeros([], jnp.int32),
                                     matrices=matrices)

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
          'scale_by_spectral_bound bounds each step by σ1 of the params: call '
          'update(updates, state, params) with the params before this step.')
    views = views_of(params)
    shapes = {n: v.batch_shape + (v.rows, v.cols) for n, v in views.items()}
    state_shapes = {n: m.weight_u.shape[:-1] + m.weight_v.shape[-2:-1]
                    for n, m in state.matrices.items()}
    if shapes != state_shapes:
      raise ValueError(
          'The bounded matrices of params do not match the optimizer state: '
          f'state has {state_shapes}, params give {shapes}. Was the state '
          'initialised with other params or dimension_numbers?')
    count = state.count
    if learning_rate is None:
      lr_scale = 1.0
    else:
      lr = learning_rate(count) if callable(learning_rate) else learning_rate
      lr_scale = jnp.abs(lr)
    new_matrices = {}

    def bound_leaf(path, update, param):
      name = _matrices.path_name(path)
      view = views.get(name)
      if view is None:
        return update
      st = state.matrices[name]
      w = view.to_matrices(param)
      d = view.to_matrices(update)

      def first_step():
        wr = power_iteration(w, st.weight_u, st.weight_v,
                             num_iterations_first)
        dr = power_iteration(d, st.update_u, st.update_v,
                             num_iterations_first)
        return (wr.sigma, wr.u, wr.v), tuple(dr)

      def later_step():
        dr = power_iteration(d, st.update_u, st.update_v, num_iterations)
        if num_iterations_weight is not None:
          wr = power_iteration(w, st.weight_u, st.weight_v,
                               num_iterations_weight)
          return (wr.sigma, wr.u, wr.v), tuple(dr)

        # One product with W per step, alternating sides; see the docstring.
        def left():
          s, u = orthonormal_matmul(w, st.weight_v, st.weight_u,
                                    transpose=False)
          return s, u, st.weight_v.astype(u.dtype)

        def right():
          s, v = orthonormal_matmul(w, st.weight_u, st.weight_v,
                                    transpose=True)
          return s, st.weight_u.astype(v.dtype), v

        wr = jax.lax.cond(count % 2 == 0, left, right)
        return wr, tuple(dr)

      (sigma_w, w_u, w_v), (sigma_d, sigma_half, d_u, d_v) = jax.lax.cond(
          count == 0, first_step, later_step)
      acc = compute_dtype(update.dtype)
      # Geometric extrapolation of the last iteration, capped: it only ever
      # raises the estimate, so the bound can only get tighter.
      ratio = sigma_d / jnp.where(sigma_half > 0, sigma_half, sigma_d)
      ratio = jnp.clip(jnp.nan_to_num(ratio, nan=1.0), 1,
                       1 + jnp.asarray(max_extrapolation, acc))
      sigma_d = sigma_d * ratio * jnp.asarray(lr_scale, acc)
      limit = jnp.asarray(tau, acc) * sigma_w
      # σ1(W) = 0: no bound (else a zero matrix never moves); σ1(Δ) = 0 or
      # non-finite: the comparison is False and the factor stays 1.
      active = (sigma_w > 0) & (sigma_d > limit)
      factor = jnp.where(active, limit / jnp.where(active, sigma_d, 1), 1)
      dtype = st.update_v.dtype  # the state keeps the dtype init gave it
      new_matrices[name] = SpectralMatrixState(
          weight_u=w_u.astype(dtype), weight_v=w_v.astype(dtype),
          update_u=d_u.astype(dtype), update_v=d_v.astype(dtype),
          sigma_weight=sigma_w.astype(jnp.float32),
          sigma_update=sigma_d.astype(jnp.float32),
          factor=factor.astype(jnp.float32))
      return (update * view.broadcastable(factor, update.ndim)).astype(
          update.dtype)

    updates = jax.tree_util.tree_map_with_path(bound_leaf, updates, params)
    return updates, ScaleBySpectralBoundState(
        count=optax.safe_increment(count),
        matrices={name: new_matrices[name] for name in state.matrices})

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def spectral_stats(opt_state: Any) -> dict[str, jax.Array]:
  """The last step's σ1 estimates and applied factors, for logging.

  Finds every :class:`ScaleBySpectralBoundState` inside ``opt_state`` (any
  chain, ``inject_hyperparams``, ``MultiSteps``, ``masked``, ``partition``, or
  ``nnx.Optimizer.opt_state``).

  Args:
    opt_state: an optimizer state that contains
      :func:`scale_by_spectral_bound`'s state.

  Returns:
    ``{'<leaf>/sigma_weight': σ1(W), '<leaf>/sigma_update': σ1(Δ) before the
    bound, '<leaf>/factor': applied factor}`` with one entry per bounded leaf;
    values have the leaf's batch shape (scalars for plain matrices). A factor
    below 1 means the bound was active.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_spectral
    >>> tx = optax_spectral.adamw2(1e-3)
    >>> params = {'w': jnp.eye(2)}
    >>> state = tx.init(params)
    >>> sorted(optax_spectral.spectral_stats(state))
    ['w/factor', 'w/sigma_update', 'w/sigma_weight']
  """
  is_state = lambda x: isinstance(x, ScaleBySpectralBoundState)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state)
           if is_state(x)]
  if not found:
    raise ValueError('opt_state contains no scale_by_spectral_bound state.')
  names = [name for s in found for name in s.matrices]
  prefix = len(names) != len(set(names))
  stats = {}
  for i, s in enumerate(found):
    for name, m in s.matrices.items():
      key = f'{i}/{name}' if prefix else name
      for field in ('sigma_weight', 'sigma_update', 'factor'):
        # jnp.asarray also unwraps nnx.Variable leaves of nnx.Optimizer.
        stats[f'{key}/{field}'] = jnp.asarray(getattr(m, field))
  return stats
