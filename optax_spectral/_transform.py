"""``scale_by_spectral_bound``: the per-matrix step bound of AdamW²."""

import dataclasses
import functools
import importlib.util
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_spectral import _layout
from optax_spectral import _matrices
from optax_spectral import _power_iteration
from optax_spectral._power_iteration import compute_dtype
from optax_spectral._power_iteration import iterate_groups
from optax_spectral._power_iteration import orthonormalize

# Chosen by the sweep in benchmarks/defaults (see docs/notes.md, "Defaults").
DEFAULT_TAU = 0.02
DEFAULT_NUM_ITERATIONS = 1
# A cold start underestimates σ1 badly (−29% after one iteration on noise-like
# matrices): init converges σ1(W)'s vectors, and the first step σ1(Δ)'s on
# CPUs (accelerators bound that step with ‖Δ‖_F instead).
DEFAULT_NUM_ITERATIONS_FIRST = 20
# Columns of the block power iteration on the step. Products with 8 columns
# cost about 1.3x one column on CPU, and cut the worst underestimate on
# noise-like steps roughly in half.
DEFAULT_BLOCK_SIZE = 8
# Vectors in σ1(W)'s block. Two, not one: a product with one vector is a
# matrix-vector product, which XLA:CPU has no bf16 kernel for (it converts
# the whole matrix to f32 first: 2x the bf16 param bytes of scratch; two or
# more vectors multiply bf16 in place); memory-bound on accelerators, so
# the second costs nothing there, and a block of two converges faster when
# σ1 and σ2 are close.
WEIGHT_BLOCK_SIZE = 2
# Largest correction applied by extrapolating the last iteration (see
# ``scale_by_spectral_bound``). It can only tighten the bound.
DEFAULT_MAX_EXTRAPOLATION = 0.15
# The σ1(W) used in the bound is at least this times the σ1 of a
# variance-preserving random matrix of the same shape (docs/notes.md, "Small
# inits"): a small-init matrix may then grow at the rate a standard-init one
# may, instead of by 2% of its small self per step.
DEFAULT_WEIGHT_FLOOR = 1.0


# Per-matrix numbers of the last step, packed along a last axis and stacked
# per group like the vectors (one small array per group, not per leaf: an
# output per leaf is a kernel per leaf on accelerators). ``bounded_recent``
# is the fraction of recent steps on which the bound shrank the matrix's
# step: the mean over all steps so far, then an exponential average over
# about the last ``RECENT_STEPS``, so that a bound that throttles learning for
# long stretches shows (diagnostics.bound_summary).
STATS = ('sigma_weight', 'sigma_update', 'factor', 'bounded_recent')
RECENT_STEPS = 100


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=('weight', 'update', 'stats'),
                   meta_fields=('leaves',))
@dataclasses.dataclass(frozen=True)
class SpectralGroupState:
  """State of all bounded matrices of one shape and dtype, stacked.

  Matrices are stacked in the order of their leaves (see
  :func:`bounded_leaves`), a leaf with a batch of matrices contributing one
  row per matrix. Vectors are rows, on each matrix's longer side ``L``.

  Attributes:
    weight: σ1(W)'s block of singular vectors, ``(matrices, 2, L)`` (one
      row for a matrix with a side of 1), params' dtype.
    update: the step's block, ``(matrices, block_size, L)``, params' dtype.
    stats: float32 ``(matrices, 4)``: the last step's σ1(W), σ1(Δ) before
      the bound, applied factor and fraction of recent steps bounded
      (:data:`STATS`). Read it per leaf with :func:`spectral_stats`.
    leaves: static: ``(name, batch_shape)`` of each leaf whose matrices are
      stacked here, in row order (part of the tree structure, not data).
  """
  weight: jax.Array
  update: jax.Array
  stats: jax.Array
  leaves: tuple[tuple[str, tuple[int, ...]], ...]


def _register_with_flax_serialization() -> None:
  """Lets ``flax.serialization`` (``to_bytes``, ``from_bytes``, the legacy
  ``flax.training.checkpoints``) save and restore the group state, which it
  does not know as a pytree node: its ``leaves`` stay the target's. Done at
  the first ``init`` if flax is installed (importing it costs ~0.4 s, which
  users without flax do not pay)."""
  if getattr(_register_with_flax_serialization, 'done', False):
    return
  _register_with_flax_serialization.done = True
  if importlib.util.find_spec('flax') is None:
    return
  from flax import serialization  # pylint: disable=g-import-not-at-top
  fields = ('weight', 'update', 'stats')
  serialization.register_serialization_state(
      SpectralGroupState,
      lambda g: {f: serialization.to_state_dict(getattr(g, f))
                 for f in fields},
      lambda g, state: dataclasses.replace(g, **{
          f: serialization.from_state_dict(getattr(g, f), state[f], name=f)
          for f in fields}),
      override=True)


class ScaleBySpectralBoundState(NamedTuple):
  """State of :func:`scale_by_spectral_bound`.

  ``groups`` is keyed by ``'<rows>x<cols> <dtype>'``: a
  :class:`SpectralGroupState` per shape, so that the per-step work and its
  outputs run once per group, not once per matrix. None of it is shaped like
  the params (libraries such as ``nnx.Optimizer`` give param-shaped state the
  param's sharding).
  """
  count: jax.Array
  groups: dict[str, SpectralGroupState]


class _Group(NamedTuple):
  """Static plan: the leaves whose matrices share one shape and dtype."""
  rows: int
  cols: int
  dtype: Any
  names: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]  # batch shape per leaf

  @property
  def sizes(self) -> tuple[int, ...]:  # matrices per leaf
    return tuple(math.prod(b) for b in self.shapes)

  @property
  def leaves(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(zip(self.names, self.shapes))

  @property
  def key(self) -> str:
    return f'{self.rows}x{self.cols} {jnp.dtype(self.dtype).name}'

  @property
  def long(self) -> int:
    return max(self.rows, self.cols)


def _plan(views: dict[str, _matrices.MatrixView]) -> list[_Group]:
  groups = {}
  for name, view in views.items():
    key = (view.rows, view.cols, jnp.dtype(view.dtype))
    groups.setdefault(key, []).append((name, tuple(view.batch_shape)))
  return [_Group(m, n, dtype, tuple(x for x, _ in members),
                 tuple(s for _, s in members))
          for (m, n, dtype), members in groups.items()]


def _per_leaf(rows, leaves) -> dict[str, Any]:
  """A group's stacked rows ``(matrices, ...)`` split back per leaf:
  ``{name: batch_shape + rest}``, ``leaves`` as in
  :attr:`SpectralGroupState.leaves`."""
  out, start = {}, 0
  for name, shape in leaves:
    size = math.prod(shape)
    out[name] = rows[start:start + size].reshape(tuple(shape) + rows.shape[1:])
    start += size
  return out


@functools.partial(jax.jit, static_argnums=(1, 2))
def _initial_blocks(seed, shapes: tuple[tuple[int, int, int], ...],
                    dtypes: tuple) -> list[tuple[jax.Array, jax.Array]]:
  """Random orthonormal starting rows, ``(weight, update)`` per group of
  ``(batch, k, long)``. One compiled function for all groups: ``init``
  often runs eagerly, where each operation of each shape would compile."""
  sizes = [(b, j, long) for b, k, long in shapes
           for j in (min(WEIGHT_BLOCK_SIZE, k), k)]
  # One draw for all blocks: each random draw compiles its own generator.
  counts = [math.prod(s) for s in sizes]
  flat = jax.random.normal(jax.random.key(seed), (sum(counts),), jnp.float32)
  rows = [part.reshape(s) for part, s in
          zip(jnp.split(flat, np.cumsum(counts)[:-1]), sizes)]
  # Orthonormalised by the iteration's own Cholesky-QR, batched over all
  # groups: a solver QR per group cost seconds of compile time on CPUs.
  rows = [r.astype(d) for r, d in zip(orthonormalize(rows),
                                      [d for d in dtypes for _ in (0, 1)])]
  return list(zip(rows[::2], rows[1::2]))


@jax.jit
def _converged_weight_blocks(weights, blocks, iterations):
  """``(blocks, sigmas)`` per group after ``iterations`` (traced: one loop)
  power iterations on the params' matrices, from ``blocks``."""
  estimates = iterate_groups(weights, blocks, [iterations] * len(blocks))
  return [e.block for e in estimates], [e.sigma for e in estimates]


def _concrete(value):
  """``value`` as a numpy array, or None if it is traced (e.g. injected by
  ``optax.inject_hyperparams`` into a jitted ``init``)."""
  if isinstance(value, jax.core.Tracer):
    return None
  return np.asarray(value)


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
  """A concrete scalar must be finite and > 0 (>= 0 with ``allow_zero``):
  Python, numpy and JAX scalars alike. Traced values are sanitised in
  ``update`` instead."""
  v = _concrete(value)
  if v is None:
    return
  ok = (v.shape == () and np.issubdtype(v.dtype, np.number)
        and np.isfinite(v) and (v >= 0 if allow_zero else v > 0))
  if not ok:
    raise ValueError(f'{name} must be a finite number '
                     f'{">= 0" if allow_zero else "> 0"}, got {value!r}.')


def _count(name: str, value, default: int):
  """An iteration count or size: a Python int, or traced (injected)."""
  if value is None:
    return default
  v = _concrete(value)
  if v is None:
    return value
  if v.shape != () or not np.issubdtype(v.dtype, np.number) or (
      int(v) != v or v < 1):
    raise ValueError(f'{name} must be an integer >= 1, got {value!r}.')
  return int(v)


def _check_state(plan, state):
  """Raises a short ValueError if params differ from those ``init`` saw."""
  expected = {g.key: g.leaves for g in plan}
  found = {key: s.leaves for key, s in state.groups.items()}
  if expected != found:
    names = lambda d: {(n, b) for leaves in d.values() for n, b in leaves}
    odd = sorted(names(expected) ^ names(found))[:3]
    raise ValueError(
        'The bounded matrices of params do not match the optimizer state '
        f'(groups of matrices: state has {sorted(found)}, params give '
        f'{sorted(expected)}'
        + (f'; (leaf, batch shape) in one but not the other: {odd}'
           if odd else '')
        + '). The state was initialised for other params or '
        'dimension_numbers: create it again for these params, '
        'state = tx.init(params) (Flax NNX: nnx.Optimizer(model, tx, '
        'wrt=nnx.Param)); from_adamw_state carries Adam\'s moments over.')


class _Settings(NamedTuple):
  """The arguments of :func:`scale_by_spectral_bound`, checked: Python ints
  for counts (or traced, when injected), the rest as given."""
  tau: Any
  learning_rate: Any
  num_iterations: Any
  num_iterations_first: Any
  num_iterations_weight: Any
  block_size: int
  max_extrapolation: Any
  weight_floor: Any
  ramp_steps: Any
  stack_matrices: bool | None
  seed: int

  @property
  def unrolled(self) -> bool:
    """Whether every step runs the same unrolled iterations, with no control
    flow: on GPUs and TPUs (XLA:GPU makes the host wait for a branch's or
    loop's predicate). σ1(W)'s cold start then runs in ``init``, and the
    first step, whose block on Δ starts cold, is bounded with ‖Δ‖_F >= σ1(Δ):
    never looser than asked. On CPUs, and for traced counts
    (inject_hyperparams), one loop runs ``num_iterations_first`` iterations
    on the first step (on W too: there init leaves its vectors random)."""
    return not _power_iteration.launches_are_cheap() and all(
        isinstance(n, int) for n in (self.num_iterations,
                                     self.num_iterations_weight,
                                     self.num_iterations_first))


def _initial_groups(settings: _Settings, plan, views, leaves) -> dict:
  """Each group's state: random orthonormal blocks (converged on σ1(W) where
  steps run unrolled and the params are concrete), stored on the mesh."""
  blocks = _initial_blocks(
      settings.seed, tuple((sum(g.sizes), min(settings.block_size, g.rows,
                                               g.cols), g.long)
                           for g in plan), tuple(g.dtype for g in plan))
  sigmas = [jnp.zeros(sum(g.sizes), jnp.float32) for g in plan]
  if plan and settings.unrolled and not any(
      isinstance(leaves[n], jax.ShapeDtypeStruct) for n in views):
    # The cold start of σ1(W)'s vectors, here rather than on the first
    # step, so that no step needs a branch for it. Abstract params (shapes
    # only) keep random vectors, which the steps' iterations converge; until
    # then σ1(W) is underestimated, which errs towards a tighter bound.
    acc = [compute_dtype(g.dtype) for g in plan]
    weights, sigmas = _converged_weight_blocks(
        [[views[n].to_matrices(jnp.asarray(leaves[n])) for n in g.names]
         for g in plan], [w.astype(a) for (w, _), a in zip(blocks, acc)],
        jnp.asarray(settings.num_iterations_first, jnp.int32))
    blocks = [(w.astype(g.dtype), u)
              for g, w, (_, u) in zip(plan, weights, blocks)]
  # Stored sharded along their length where the params are on a mesh (each
  # device keeps its share), as every update leaves them.
  mesh = _layout.mesh_of([leaves[n] for n in views])
  specs = [_layout.vector_spec(mesh, g.long, [
      _layout.leaf_axes(leaves[n], views[n].long_axes) for n in g.names])
           for g in plan]
  stats = lambda g, sigma: jnp.stack(
      [sigma.astype(jnp.float32)] + [jnp.full(sum(g.sizes), x, jnp.float32)
                                     for x in (0, 1, 0)], -1)
  return {g.key: SpectralGroupState(
      weight=_layout.place(w, mesh, spec), update=_layout.place(u, mesh, spec),
      stats=stats(g, sigma), leaves=g.leaves)
          for g, (w, u), sigma, spec in zip(plan, blocks, sigmas, specs)}


class _Estimates(NamedTuple):
  weight: list    # per group: _power_iteration._Estimate of σ1(W)
  update: list    # per group: _power_iteration._Estimate of σ1(Δ)
  steps: list     # per group: the operands the iteration multiplied (Δ)


def _estimate(settings: _Settings, plan, views, state, param_leaves,
              update_leaves) -> _Estimates:
  """The batched estimate: one call for every matrix, W and Δ alike, so
  that the k×k work of each iteration is batched over all groups."""
  steady = [settings.num_iterations_weight] * len(plan) + [
      settings.num_iterations] * len(plan)
  if not settings.unrolled:
    # The cold start: a group whose last estimate is 0 (the first step, or
    # after a zero step: a warmup from lr 0, as Flax's examples start, a
    # zero-initialised matrix) has unconverged vectors; it runs
    # num_iterations_first, the others their steady count, in one loop.
    cold = [jnp.any(state.groups[g.key].stats[:, 0] == 0) for g in plan] + [
        jnp.any(state.groups[g.key].stats[:, 1] == 0) for g in plan]
    steady = [jnp.where(c, settings.num_iterations_first, n)
              for c, n in zip(cold, steady)]
  matrices = lambda leaves, g: [views[n].to_matrices(leaves[n])
                                for n in g.names]
  states = [state.groups[g.key] for g in plan]
  acc = [compute_dtype(g.dtype) for g in plan]
  # Stacked here (where stacking applies), so that the first step's ‖Δ‖_F
  # reads the copy the iteration multiplies.
  steps = [_power_iteration.stack_group(matrices(update_leaves, g),
                                        settings.stack_matrices)
           for g in plan]
  estimates = iterate_groups(
      [matrices(param_leaves, g) for g in plan] + steps,
      [s.weight.astype(a) for s, a in zip(states, acc)]
      + [s.update.astype(a) for s, a in zip(states, acc)],
      steady, settings.stack_matrices)
  return _Estimates(estimates[:len(plan)], estimates[len(plan):], steps)


def _bound(settings: _Settings, plan, state, estimates: _Estimates):
  """The rule: each matrix's factor ``min(1, τ max(σ1(W), floor) / σ1(Δ))``,
  the groups' next state, and the ramp of the first steps.

  Returns ``(groups, {leaf: factor of its matrices}, ramp)``.
  """
  count = state.count
  if settings.learning_rate is None:
    lr_scale = 1.0
  else:
    lr = settings.learning_rate
    lr_scale = jnp.abs(lr(count) if callable(lr) else lr)
  # Injected (traced) values are not checked at construction: a tau <= 0
  # or NaN becomes the smallest positive one (steps shrink to ~0 rather
  # than reverse), a negative or NaN max_extrapolation becomes 0.
  tau = jnp.asarray(settings.tau, jnp.float32)
  tau = jnp.where(tau > 0, tau, jnp.finfo(jnp.float32).tiny)
  extrapolation = jnp.asarray(settings.max_extrapolation, jnp.float32)
  extrapolation = jnp.where(extrapolation >= 0, extrapolation, 0)
  floor = jnp.asarray(settings.weight_floor, jnp.float32)
  floor = jnp.where(floor >= 0, floor, 0)
  # The ramp of the first steps, in (0, 1]: 1 once count + 1 >= its length;
  # 1 throughout for a length <= 0 or NaN (no ramp).
  length = (1 / tau if settings.ramp_steps is None else
            jnp.asarray(settings.ramp_steps, jnp.float32))
  ramp = jnp.where(length > 0, jnp.minimum(
      1, (count + 1).astype(jnp.float32) / length), 1)
  floor = floor * ramp
  groups, factors = {}, {}
  recent_weight = jnp.minimum(count + 1, RECENT_STEPS).astype(jnp.float32)
  for g, w, d, chunks in zip(plan, estimates.weight, estimates.update,
                             estimates.steps):
    s = state.groups[g.key]
    # Geometric extrapolation of the last iteration, capped: it only ever
    # raises the estimate, so the bound can only get tighter.
    ratio = d.sigma / jnp.where(d.sigma_half > 0, d.sigma_half, d.sigma)
    ratio = jnp.clip(jnp.nan_to_num(ratio, nan=1.0), 1, 1 + extrapolation)
    sigma_d = d.sigma * ratio
    if settings.unrolled:
      # A cold block on Δ (no earlier nonzero step: see _estimate) is
      # bounded with ‖Δ‖_F >= σ1(Δ).
      sigma_d = jnp.where(s.stats[:, 1] == 0, _power_iteration.frobenius_norms(
          chunks, compute_dtype(g.dtype)), sigma_d)
    sigma_d = sigma_d * jnp.asarray(lr_scale, jnp.float32)
    sigma_w = w.sigma
    # Floored at a multiple of σ1 of a variance-preserving random matrix
    # (entries of std 1/sqrt(rows)): 1 + sqrt(cols / rows).
    reference = 1 + math.sqrt(g.cols / g.rows)
    limit = tau * jnp.maximum(sigma_w, floor * reference)
    # A zero limit (σ1(W) = 0 and no floor): no bound, else a zero matrix
    # never moves; σ1(Δ) = 0 or non-finite: the comparison is False and the
    # factor stays 1.
    active = (limit > 0) & (sigma_d > limit)
    factor = jnp.where(active, limit / jnp.where(active, sigma_d, 1), 1)
    # In (0, 1] whatever an injected tau is: never reversed, never zero.
    factor = jnp.clip(factor, jnp.finfo(jnp.float32).tiny, 1)
    recent = s.stats[:, 3]
    recent = recent + ((factor < 1) - recent) / recent_weight
    groups[g.key] = SpectralGroupState(
        weight=w.block.astype(s.weight.dtype),
        update=d.block.astype(s.update.dtype),
        stats=jnp.stack([sigma_w, sigma_d, factor, recent],
                        -1).astype(jnp.float32),
        leaves=s.leaves)
    factors.update(_per_leaf(factor, g.leaves))
  return groups, factors, ramp


def _apply(updates, views, factors, ramp, plain=frozenset()):
  """Each bounded leaf's step times its matrices' factors; the steps of the
  other leaves the bound does not cover times the ramp, except matrices
  that ``bound`` left out (``plain``): plain AdamW steps."""
  def bound_leaf(path, update):
    name = _matrices.path_name(path)
    if name in plain:
      return update
    if name not in factors:  # not covered by the bound: ramped
      if not jnp.issubdtype(update.dtype, jnp.floating):
        return update
      return (update * ramp).astype(update.dtype)
    factor = views[name].broadcastable(factors[name], update.ndim)
    return (update * factor).astype(update.dtype)
  return jax.tree_util.tree_map_with_path(bound_leaf, updates)


def scale_by_spectral_bound(
    tau: jax.typing.ArrayLike = DEFAULT_TAU,
    *,
    learning_rate: optax.ScalarOrSchedule | None = None,
    num_iterations: int | None = None,
    num_iterations_first: int | None = None,
    num_iterations_weight: int | None = None,
    block_size: int | None = None,
    max_extrapolation: jax.typing.ArrayLike = DEFAULT_MAX_EXTRAPOLATION,
    weight_floor: jax.typing.ArrayLike = DEFAULT_WEIGHT_FLOOR,
    ramp_steps: jax.typing.ArrayLike | None = None,
    dimension_numbers: _matrices.DimensionNumbersOrFn = None,
    bound_vectors: bool = False,
    bound: Any = 'all',
    stack_matrices: bool | None = None,
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

  σ1 is estimated by warm-started power iteration (:func:`power_iteration`)
  on every matrix at once, batched by shape: one iteration per step on
  ``W`` (a block of two vectors) and on ``Δ`` (of ``block_size``), in
  float32 at least, with no solver call. σ1(W) in the bound is at least
  ``weight_floor`` times σ1 of a variance-preserving random matrix of its
  shape, ``1 + sqrt(cols / rows)``, so that small-init matrices are not
  throttled; over the first ``ramp_steps`` steps that floor, and the steps
  of the leaves the bound does not cover, ramp in linearly. The paper's rule
  is ``weight_floor=0, ramp_steps=0``. How each piece is computed, the cold
  start, the guards and what was measured: docs/notes.md, "How the bound is
  computed".

  Args:
    tau: the largest allowed ``σ1(Δ) / σ1(W)`` per step, > 0 (a concrete
      value that is not is a ``ValueError``). May be injected with
      ``optax.inject_hyperparams``; an injected value <= 0 shrinks steps to
      almost nothing rather than reversing them.
    learning_rate: ``None`` when placed after the learning rate (recommended);
      otherwise the float or schedule that a later transform scales by.
    num_iterations: power iterations on ``Δ`` per step; ``None``: 1.
    num_iterations_first: power iterations from a cold start: on ``W`` and
      ``Δ`` on the first step on CPUs; on ``W`` in ``init`` on GPUs and TPUs
      (whose first step uses ``‖Δ‖_F``, see above); ``None``: 20.
    num_iterations_weight: power iterations on ``W`` per step; ``None``
      (default) runs as many as on ``Δ``. A different number shares the loop
      and costs the larger of the two.
    block_size: vectors in the block power iteration on ``Δ`` (at most the
      matrix's smaller dimension); ``None``: 8.

    max_extrapolation: largest relative correction of the ``σ1(Δ)`` estimate;
      ``0`` keeps the plain lower bound.
    weight_floor: the σ1(W) in the bound is at least this times σ1 of a
      variance-preserving random matrix of the same shape, ``1 + sqrt(cols /
      rows)``; ``0`` is the paper's rule. Default 1. May be injected.
    ramp_steps: steps over which the floor, and the steps of the leaves the
      bound does not cover, ramp in linearly from ``1 / ramp_steps``;
      ``None`` (default): ``1 / tau``; ``0``: no ramp. May be injected.
    dimension_numbers: which axes of each leaf form the matrix:
      ``None`` (default: 2-D leaves are matrices; leaves with more dimensions
      are batches of matrices over their last two axes; 0-D and 1-D leaves
      pass through), a :class:`SpectralDimensionNumbers` for all leaves with
      two or more dimensions, a pytree of them with ``None`` for leaves not to
      bound, or a callable from params to such a pytree. Check the result with
      :func:`bounded_leaves`.
    bound_vectors: also bound 1-D leaves (biases, norm scales) by their L2
      norm, as ``1 × n`` matrices.
    bound: which matrices are bounded: ``'all'`` (default, the paper's
      rule), ``'attention'`` (the query, key, value and output projections,
      found by their modules' names: Flax's ``query``/``key``/``value``/
      ``out``, ``q_proj``, ``qkv``, ``wq``, ``c_attn``, anything under an
      ``attn``/``attention`` module, ...), or a callable from a param's name
      (``'blocks/0/attn/query/kernel'``) to bool. Matrices left out take
      plain AdamW steps; :func:`bounded_leaves` shows the choice.
    stack_matrices: whether each step copies a group's same-shaped 2-D
      matrices into one stack, so that each product is one kernel per shape
      (faster on one GPU; about one more param-sized buffer of scratch
      memory). ``None``
      (default): only on a GPU or TPU where the program has one device, or
      a known mesh of one (with several devices, stacks would gather
      matrices across them, and under ``jit``'s ``in_shardings`` alone no
      mesh is visible: there nothing is stacked). ``False`` saves that
      memory on one accelerator; ``True`` stacks also on several devices
      (right only if the params are replicated).
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
    >>> # σ1(W) = 1 is below the floor of a 3 x 3 matrix, 1 + sqrt(3/3) = 2:
    >>> float(jnp.linalg.norm(updates['w'], ord=2)) <= 0.1 * 2 + 1e-6
    True

  References:
    Qi et al., `Taming Transformer Without Using Learning Rate Warmup
    <https://arxiv.org/abs/2505.21910>`_, ICLR 2025.
  """
  _check_positive('tau', tau)
  _matrices.bound_rule(bound)  # a ValueError here, not at init
  _check_positive('max_extrapolation', max_extrapolation, allow_zero=True)
  _check_positive('weight_floor', weight_floor, allow_zero=True)
  if ramp_steps is not None:
    _check_positive('ramp_steps', ramp_steps, allow_zero=True)
  num_iterations = _count('num_iterations', num_iterations,
                          DEFAULT_NUM_ITERATIONS)
  num_iterations_first = _count('num_iterations_first', num_iterations_first,
                                DEFAULT_NUM_ITERATIONS_FIRST)
  num_iterations_weight = _count('num_iterations_weight',
                                 num_iterations_weight, num_iterations)
  block_size = _count('block_size', block_size, DEFAULT_BLOCK_SIZE)
  if not isinstance(block_size, int):
    raise ValueError(
        'block_size fixes the shape of the optimizer state, so it cannot be '
        'traced: with optax.inject_hyperparams, pass '
        "static_args=('block_size',) (the default, None, needs nothing).")

  settings = _Settings(
      tau=tau, learning_rate=learning_rate, num_iterations=num_iterations,
      num_iterations_first=num_iterations_first,
      num_iterations_weight=num_iterations_weight, block_size=block_size,
      max_extrapolation=max_extrapolation, weight_floor=weight_floor,
      ramp_steps=ramp_steps, stack_matrices=stack_matrices, seed=seed)

  def views_of(params, warn=False):
    """``(views of the bounded leaves, names of matrices bound= left out)``."""
    views = _matrices.resolve_views(params, dimension_numbers, bound_vectors,
                                    bound, warn=warn)
    return ({n: v for n, v in views.items() if not isinstance(v, str)},
            {n for n, v in views.items() if isinstance(v, str)
             and v.startswith(_matrices.NOT_CHOSEN)})

  def init_fn(params):
    if type(params).__name__ == '_ParamsPlaceholder':
      # ``optax.tree.map_params`` inits with a placeholder to find the
      # param-shaped parts of the state. None of ours are: leaves here make
      # it leave ``stats`` and ``groups`` untouched.
      return ScaleBySpectralBoundState(count=jnp.zeros([], jnp.int32),
                                       groups='not params-shaped')
    _register_with_flax_serialization()
    views, _ = views_of(params, warn=True)
    return ScaleBySpectralBoundState(
        count=jnp.zeros([], jnp.int32),
        groups=_initial_groups(settings, _plan(views), views,
                               _matrices.named_leaves(params)))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
          'scale_by_spectral_bound bounds each step by σ1 of the params: call '
          'update(updates, state, params) with the params before this step.')
    views, plain = views_of(params)
    plan = _plan(views)
    _check_state(plan, state)
    param_leaves = _matrices.named_leaves(params)
    _layout.check_whole_matrices({n: param_leaves[n] for n in views})
    update_leaves = _matrices.named_leaves(updates)
    groups, factors, ramp = _bound(
        settings, plan, state, _estimate(
            settings, plan, views, state, param_leaves, update_leaves))
    return _apply(updates, views, factors, ramp, plain), ScaleBySpectralBoundState(
        count=optax.safe_increment(state.count),
        groups={key: groups[key] for key in state.groups})

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
    bound, '<leaf>/factor': applied factor, '<leaf>/bounded_recent':
    fraction of recent steps (about the last 100) whose step the bound
    shrank}`` with one entry per bounded leaf; values have the leaf's batch
    shape (scalars for plain matrices). A factor below 1 means the bound was
    active.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_spectral
    >>> tx = optax_spectral.adamw2(1e-3)
    >>> params = {'w': jnp.eye(2)}
    >>> state = tx.init(params)
    >>> sorted(optax_spectral.spectral_stats(state))
    ['w/bounded_recent', 'w/factor', 'w/sigma_update', 'w/sigma_weight']
  """
  return {f'{key}/{field}': packed[..., j]
          for key, packed in packed_stats(opt_state).items()
          for j, field in enumerate(STATS)}


def packed_stats(opt_state: Any, host: bool = False) -> dict[str, Any]:
  """``{'<leaf>': stats}`` with the fields of :data:`STATS` on the last axis:
  what :func:`spectral_stats` unpacks. With ``host=True``, numpy arrays,
  fetched in one transfer of the groups' arrays (slicing per leaf on the
  device would dispatch an operation per leaf)."""
  is_state = lambda x: isinstance(x, ScaleBySpectralBoundState)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_state)
           if is_state(x)]
  if not found:
    raise ValueError('opt_state contains no scale_by_spectral_bound state.')
  groups = [(i, g) for i, s in enumerate(found) for g in s.groups.values()]
  names = [name for _, g in groups for name, _ in g.leaves]
  prefix = len(names) != len(set(names))
  # jnp.asarray also unwraps nnx.Variable leaves of nnx.Optimizer.
  arrays = [jnp.asarray(g.stats) for _, g in groups]
  if host:
    arrays = [np.asarray(a) for a in jax.device_get(arrays)]
  return {f'{i}/{name}' if prefix else name: packed
          for (i, g), stats in zip(groups, arrays)
          for name, packed in _per_leaf(stats, g.leaves).items()}
