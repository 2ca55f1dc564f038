"""adamw2 in the code users already have: Flax's own learning-rate
schedules, every way a program tells ``jit`` where its arrays live, bf16
params, and ``shard_map``."""

import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_spectral
from optax_spectral import _power_iteration
from conftest import sigma1

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'benchmarks'))
import scale_out  # pylint: disable=g-import-not-at-top,wrong-import-position

needs_8 = pytest.mark.skipif(
    jax.device_count() < 8, reason='needs 8 devices: conftest sets XLA_FLAGS '
    'before jax is imported; run pytest from the repository root')


# --- schedules written as Flax's examples write them ------------------------

def _rsqrt_schedule(init_value: float, shift: int = 0):
  # As in flax/examples/lm1b and gemma (train.py): plain Python arithmetic,
  # which a Python int count before the shift cannot take (0.0 ** -0.5).
  def schedule(count):
    return init_value * (count + shift) ** -0.5 * shift**0.5
  return schedule


def flax_lm_schedule(learning_rate: float, warmup_steps: int):
  return optax.join_schedules([
      optax.linear_schedule(0, learning_rate, warmup_steps),
      _rsqrt_schedule(learning_rate, warmup_steps)], [warmup_steps])


def _steps(tx, params, grads, n=4):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for i in range(n):
    g = jax.tree.map(lambda x, i=i: x * (1 + i), grads)
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


@pytest.fixture
def problem(rng):
  params = {'w': jnp.asarray(rng.normal(size=(12, 8)) * 0.3, jnp.float32),
            'b': jnp.zeros(8, jnp.float32)}
  grads = {'w': jnp.asarray(rng.normal(size=(12, 8)), jnp.float32),
           'b': jnp.asarray(rng.normal(size=8), jnp.float32)}
  return params, grads


@pytest.mark.parametrize('wrap', ['plain', 'multisteps', 'inject'])
def test_flax_schedule_equals_adamw_where_the_bound_is_off(problem, wrap):
  """The swap works on Flax's LM schedule, as written, under MultiSteps and
  inject_hyperparams: with the bound off (a huge tau, no ramp) every step is
  optax.adamw's with the same schedule."""
  params, grads = problem
  schedule = flax_lm_schedule(0.05, warmup_steps=2)
  off = dict(tau=1e9, ramp_steps=0)
  if wrap == 'plain':
    ours, theirs = optax_spectral.adamw2(schedule, **off), optax.adamw(
        schedule)
  elif wrap == 'multisteps':
    ours = optax.MultiSteps(optax_spectral.adamw2(schedule, **off), 2)
    theirs = optax.MultiSteps(optax.adamw(schedule), 2)
  else:
    ours = optax.inject_hyperparams(optax_spectral.adamw2)(
        learning_rate=schedule, **off)
    theirs = optax.inject_hyperparams(optax.adamw)(learning_rate=schedule)
  got, _ = _steps(ours, params, grads, n=6)
  want, _ = _steps(theirs, params, grads, n=6)
  assert float(jnp.abs(got['w'] - params['w']).max()) > 1e-3  # it moved
  for k in params:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7)


def test_schedule_is_only_called_inside_update(problem):
  """Never evaluated at construction or init, only as optax does: traced,
  with an int32 count, inside update."""
  params, grads = problem
  calls = []
  inner = flax_lm_schedule(0.05, warmup_steps=2)

  def schedule(count):
    calls.append(count)
    return inner(count)

  tx = optax_spectral.adamw2(schedule)
  bound_first = optax.chain(
      optax.scale_by_adam(),
      optax_spectral.scale_by_spectral_bound(learning_rate=schedule),
      optax.scale_by_learning_rate(schedule))
  for t in (tx, bound_first):
    t.init(params)
  assert not calls
  for t in (tx, bound_first):
    _steps(t, params, grads, n=1)
  assert calls and all(isinstance(c, jax.core.Tracer) and c.dtype == jnp.int32
                       for c in calls), calls


def test_bound_placed_before_the_schedule_gives_the_same_steps(problem):
  """``scale_by_spectral_bound(learning_rate=schedule)`` before the learning
  rate equals the bound placed last, and holds each step to τ σ1(W) (exact
  SVD) once the warmup's lr makes it bind."""
  params, grads = problem
  schedule = flax_lm_schedule(1.0, warmup_steps=2)
  tau = 0.02
  kw = dict(tau=tau, weight_floor=0, ramp_steps=0)
  last = optax.chain(optax.scale_by_adam(),
                     optax.scale_by_learning_rate(schedule),
                     optax_spectral.scale_by_spectral_bound(**kw))
  first = optax.chain(
      optax.scale_by_adam(),
      optax_spectral.scale_by_spectral_bound(learning_rate=schedule, **kw),
      optax.scale_by_learning_rate(schedule))
  states = [t.init(params) for t in (last, first)]
  p = params
  for i in range(5):
    outs = [t.update(grads, s, p) for t, s in zip((last, first), states)]
    (u_last, s_last), (u_first, s_first) = outs
    np.testing.assert_allclose(u_first['w'], u_last['w'], rtol=2e-5,
                               atol=1e-8)
    if i > 0:  # step 0 of the warmup has lr 0
      assert sigma1(u_last['w']) <= tau * sigma1(p['w']) * 1.01
    states = [s_last, s_first]
    p = optax.apply_updates(p, u_last)


def test_constant_learning_rate_is_still_checked():
  with pytest.raises(ValueError, match='learning_rate must be >= 0'):
    optax_spectral.adamw2(-1e-3)


# --- every way a program tells jit where its arrays live ---------------------

# Megatron's layout: same-shaped matrices sharded in different ways (wq
# and wo), so that stacking them would have to move pieces between devices.
_SPECS = {'wq': P('fsdp', 'tp'), 'wo': P('tp', 'fsdp'), 'w1': P('fsdp', 'tp'),
          'w2': P('tp', 'fsdp')}


def _layers(rng, n=3):
  shapes = {'wq': (64, 64), 'wo': (64, 64), 'w1': (64, 128), 'w2': (128, 64)}
  return {
      'layers': [{k: rng.normal(size=s) * 0.1 for k, s in shapes.items()}
                 for _ in range(n)],
      'embed': rng.normal(size=(256, 64)) * 0.1,
      'norm': np.ones(64)}


def _spec_of(path) -> P:
  name = jax.tree_util.keystr(path)
  for key, spec in _SPECS.items():
    if key in name:
      return spec
  return P('tp', 'fsdp') if 'embed' in name else P()


def _place(tree, mesh, dtype=jnp.float32):
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jax.device_put(jnp.asarray(x, dtype),
                                     NamedSharding(mesh, _spec_of(path))),
      tree)


def _grads(params, i):
  return jax.tree.map(lambda p: jnp.sin(3.0 * p + i).astype(p.dtype), params)


def _run(idiom, params, mesh, tx, steps=2):
  """Two steps of update + apply compiled as a program of ``idiom`` writes
  it; returns (params, state before, state after, the compiled step)."""
  state = tx.init(params)
  before = jax.tree.map(lambda x: x.sharding, state)

  def step(p, s, i):
    u, s = tx.update(_grads(p, i), s, p)
    return optax.apply_updates(p, u), s

  shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  kwargs = {}
  if idiom == 'in_shardings':  # the pjit idiom: shardings, no mesh context
    # (as such programs lay out the state: scalars replicated on the mesh)
    spec = jax.tree.map(lambda x: NamedSharding(mesh, P()) if x.ndim == 0
                        else x.sharding, state)
    kwargs = dict(in_shardings=(shardings(params), spec, None),
                  out_shardings=(shardings(params), spec))
  jitted = jax.jit(step, **kwargs)
  with scale_out.mesh_context(
      'shardings' if idiom == 'in_shardings' else idiom, mesh):
    compiled = jitted.lower(params, state, jnp.float32(0)).compile()
    for i in range(steps):
      params, state = jitted(params, state, jnp.float32(i))
  return params, before, state, compiled


def _assert_local(text, params):
  moves = [c for c in scale_out.collectives(
      text, scale_out.vector_bytes(params)) if c['matrix']]
  assert not moves, moves


def _assert_kept(before, state):
  """Every array of the state keeps its sharding (the step counts, scalars
  that optax creates on one device, come back replicated, as adamw's do)."""
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state)):
    if b.ndim:
      assert b.sharding.is_equivalent_to(a, b.ndim), (a, b.sharding)


@needs_8
@pytest.mark.parametrize('idiom,axis_type', [
    ('in_shardings', AxisType.Auto), ('set_mesh', AxisType.Auto),
    ('with mesh', AxisType.Auto), ('set_mesh', AxisType.Explicit)])
def test_each_idiom_moves_vectors_and_keeps_shardings(rng, monkeypatch, idiom,
                                                      axis_type):
  """With the structure accelerators compile: no collective moves a matrix
  (e55407f stacked them where no mesh was visible: ``in_shardings`` and
  ``with mesh:``), the state and params keep their shardings, and the steps
  equal those of the same optimizer on unsharded params."""
  monkeypatch.setattr(_power_iteration, 'launches_are_cheap', lambda: False)
  tree = _layers(rng)
  tx = optax_spectral.adamw2(0.05)
  one = jax.make_mesh((1, 1), ('fsdp', 'tp'), devices=jax.devices()[:1])
  want, _, _, _ = _run('set_mesh', _place(tree, one), one, tx)
  mesh = jax.make_mesh((4, 2), ('fsdp', 'tp'), axis_types=(axis_type,) * 2)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', DeprecationWarning)  # ``with mesh:``
    params = _place(tree, mesh)
    got, before, state, compiled = _run(idiom, params, mesh, tx)
    temp = lambda c: c.memory_analysis().temp_size_in_bytes
    if idiom != 'set_mesh':
      # Where no mesh is visible under jit, the same program as inside
      # jax.set_mesh: no stacked copies of the matrices (e55407f: 1.43x).
      reference = _run('set_mesh', params, mesh, tx, steps=0)[3]
      assert temp(compiled) <= 1.05 * temp(reference), (
          temp(compiled), temp(reference))
  _assert_local(compiled.as_text(), params)
  _assert_kept(before, state)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@needs_8
def test_nnx_optimizer_under_nnx_jit(monkeypatch):
  """``nnx.Optimizer`` on a model annotated with ``nnx.with_partitioning``,
  stepped by ``nnx.jit``: no matrix moves, the state keeps its shardings."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(_power_iteration, 'launches_are_cheap', lambda: False)

  class Model(nnx.Module):

    def __init__(self, rngs):
      init = nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                   ('fsdp', 'tp'))
      back = nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                   ('tp', 'fsdp'))
      self.up = nnx.List([nnx.Linear(64, 128, use_bias=False,
                                     kernel_init=init, rngs=rngs)
                          for _ in range(3)])
      self.down = nnx.List([nnx.Linear(128, 64, use_bias=False,
                                       kernel_init=back, rngs=rngs)
                            for _ in range(3)])

    def __call__(self, x):
      for up, down in zip(self.up, self.down):
        x = x + down(jax.nn.relu(up(x)))
      return x

  mesh = jax.make_mesh((4, 2), ('fsdp', 'tp'), axis_types=(AxisType.Auto,) * 2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 64)), jnp.float32)
  with jax.set_mesh(mesh):
    model = Model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax_spectral.adamw2(0.05),
                              wrt=nnx.Param)
    before = jax.tree.map(lambda v: v.sharding,
                          jax.tree.leaves(nnx.state(optimizer)))

    @nnx.jit
    def step(model, optimizer):
      loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
      optimizer.update(model, grads)
      return loss

    text = step.lower(model, optimizer).compile().as_text()  # (nnx.jit's)
    losses = [float(step(model, optimizer)) for _ in range(3)]
    after = jax.tree.leaves(nnx.state(optimizer))
  assert losses[-1] < losses[0]
  params = jax.tree.leaves(nnx.state(model, nnx.Param))
  _assert_local(text, params)
  _assert_kept(before, after)
  assert model.up[0].kernel[...].sharding.spec == P('fsdp', 'tp')


# --- bf16 params: products read them as they are -----------------------------

def test_bf16_products_read_the_matrices_in_bf16(monkeypatch):
  """The program handed to XLA multiplies each bf16 matrix (W and the step)
  as it is and accumulates in f32 inside the product: no f32 copy of a
  matrix reaches a product or a reduction (e55407f squared an f32 copy of
  the step for ‖Δ‖_F, which XLA:CPU kept: 2x the bf16 param bytes), on
  either structure."""
  for cheap in (False, True):
    monkeypatch.setattr(_power_iteration, 'launches_are_cheap',
                        lambda cheap=cheap: cheap)
    shape = (96, 160)
    params = {'w': [jax.ShapeDtypeStruct(shape, jnp.bfloat16)
                    for _ in range(2)]}
    tx = optax_spectral.adamw2(1e-3)
    state = jax.eval_shape(tx.init, params)
    text = jax.jit(lambda g, s, p: optax.apply_updates(
        p, tx.update(g, s, p)[0])).lower(params, state, params).as_text()
    matrix = f'tensor<{shape[0]}x{shape[1]}x'
    dots = [line for line in text.splitlines()
            if 'dot_general' in line and matrix in line]
    assert dots
    copies = {line.split('=')[0].strip() for line in text.splitlines()
              if 'stablehlo.convert' in line
              and line.rstrip().endswith(matrix + 'f32>')}
    reductions = [line for line in text.splitlines()
                  if 'stablehlo.reduce' in line and matrix in line]
    assert not [r for r in reductions if matrix + 'f32>' in r], reductions
    for line in dots:
      assert matrix + 'bf16>' in line and '-> tensor<' in line, line
      assert line.rstrip().endswith('f32>'), line  # accumulated in f32
      operands = line.split('dot_general')[1].split(',')[:2]
      assert not any(o.strip() in copies for o in operands), line


def test_bf16_estimate_matches_exact_svd(rng):
  """σ1 of bf16 params, estimated in f32 from bf16 products, against an
  exact SVD of the bf16 values."""
  from conftest import planted  # pylint: disable=g-import-not-at-top
  w = jnp.asarray(planted(rng, (48, 32), top=2.0), jnp.bfloat16)
  tx = optax_spectral.scale_by_spectral_bound()
  state = tx.init({'w': w})
  _, state = jax.jit(tx.update)({'w': w * 0}, state, {'w': w})
  got = float(optax_spectral.spectral_stats(state)['w/sigma_weight'])
  want = sigma1(np.asarray(w, np.float32))
  assert abs(got - want) <= 1e-3 * want, (got, want)


# --- shard_map: the update sees shards --------------------------------------

@needs_8
def test_shard_map_refuses_shards_and_takes_replicas(rng):
  mesh = jax.make_mesh((4, 2), ('d', 't'), axis_types=(AxisType.Auto,) * 2)
  params = {'w': jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}
  grads = jax.tree.map(jnp.sin, params)
  for tx in (optax_spectral.adamw2(0.1), optax.chain(
      optax.adam(0.1), optax_spectral.scale_by_spectral_bound())):
    state = tx.init(params)
    want, _ = jax.jit(tx.update)(grads, state, params)
    update = lambda g, s, p, tx=tx: tx.update(g, s, p)[0]
    # Data parallel inside shard_map: every device holds whole matrices.
    replicated = jax.shard_map(update, mesh=mesh, in_specs=(P(), P(), P()),
                               out_specs=P())
    np.testing.assert_allclose(jax.jit(replicated)(grads, state, params)['w'],
                               want['w'], rtol=1e-6)
    # Shards of a matrix: σ1 of a shard is not σ1 of the matrix.
    sharded = jax.shard_map(
        lambda g, p, tx=tx: tx.update(g, tx.init(p), p)[0], mesh=mesh,
        in_specs=(P('d'), P('d')), out_specs=P('d'))
    with pytest.raises(ValueError, match='differ between devices'):
      jax.jit(sharded)(grads, params)
    # Without check_vma jax cannot say which: refused, with the way out.
    unchecked = jax.shard_map(update, mesh=mesh, in_specs=(P(), P(), P()),
                              out_specs=P(), check_vma=False)
    with pytest.raises(ValueError, match='check_vma=False'):
      jax.jit(unchecked)(grads, state, params)
