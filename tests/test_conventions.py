"""Optax conventions users rely on, and the safety cases."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_spectral
from optax_spectral import _power_iteration
from conftest import floor_sigma, planted, sigma1


@pytest.fixture
def problem(rng):
  params = {'w': jnp.asarray(planted(rng, (10, 6)), jnp.float32),
            'b': jnp.asarray(rng.normal(size=6), jnp.float32)}
  grads = [{'w': jnp.asarray(rng.normal(size=(10, 6)), jnp.float32),
            'b': jnp.asarray(rng.normal(size=6), jnp.float32)}
           for _ in range(4)]
  return params, grads


def _run(tx, params, grads, jit=True):
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  outs = []
  for g in grads:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
    outs.append(u)
  return params, state, outs


def _assert_trees_close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def test_inject_hyperparams(problem):
  params, grads = problem
  ref, _, _ = _run(optax_spectral.adamw2(0.3, tau=0.01), params, grads)
  for static in [(), ('num_iterations',)]:
    tx = optax.inject_hyperparams(optax_spectral.adamw2, static_args=static)(
        learning_rate=0.3, tau=0.01)
    out, state, _ = _run(tx, params, grads)
    _assert_trees_close(out, ref, rtol=1e-5)
  # Injected tau and learning rate take effect: a huge tau is plain AdamW.
  state = tx.init(params)
  state.hyperparams['tau'] = jnp.asarray(1e6)
  state.hyperparams['learning_rate'] = jnp.asarray(0.01)
  u, _ = tx.update(grads[0], state, params)
  u_ref, _ = optax.adamw(0.01).update(grads[0], optax.adamw(0.01).init(params),
                                      params)
  _assert_trees_close(u, u_ref, rtol=1e-5)


def test_schedule_equals_constant(problem):
  params, grads = problem
  const, _, _ = _run(optax_spectral.adamw2(0.3, tau=0.01), params, grads)
  sched, _, _ = _run(optax_spectral.adamw2(optax.constant_schedule(0.3),
                                           tau=0.01), params, grads)
  _assert_trees_close(sched, const, rtol=1e-6)


def test_multi_steps(problem):
  params, grads = problem
  tx = optax.MultiSteps(optax_spectral.adamw2(0.3, tau=0.01),
                        every_k_schedule=2)
  out, state, _ = _run(tx, params, grads)
  mean = lambda a, b: jax.tree.map(lambda x, y: (x + y) / 2, a, b)
  ref, _, _ = _run(optax_spectral.adamw2(0.3, tau=0.01), params,
                   [mean(grads[0], grads[1]), mean(grads[2], grads[3])])
  _assert_trees_close(out, ref, rtol=1e-5, atol=1e-7)
  assert 'w/factor' in optax_spectral.spectral_stats(state)


def test_apply_if_finite_and_vectors_recover(problem):
  params, grads = problem
  nan = jax.tree.map(lambda g: g * jnp.nan, grads[0])
  sequence = [grads[0], nan, grads[1], grads[2]]
  tx = optax.apply_if_finite(optax_spectral.adamw2(0.3, tau=0.01), 5)
  out, _, updates = _run(tx, params, sequence)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates[1]))
  ref, _, _ = _run(optax_spectral.adamw2(0.3, tau=0.01), params,
                   [grads[0], grads[1], grads[2]])
  _assert_trees_close(out, ref, rtol=1e-5)


def test_unguarded_nan_step_does_not_poison_later_steps(problem):
  """Without apply_if_finite: the NaN step's update is NaN, later ones not."""
  params, grads = problem
  tx = optax.chain(optax.scale_by_adam(), optax.scale(-0.3),
                   optax_spectral.scale_by_spectral_bound(0.01))
  state = tx.init(params)
  _, state = tx.update(grads[0], state, params)
  # Adam's moments are poisoned by a NaN gradient; reset them so that only
  # our persistent vectors could carry the NaN forward.
  bad = jax.tree.map(lambda g: g * jnp.nan, grads[1])
  _, bad_state = tx.update(bad, state, params)
  for group in bad_state[2].groups.values():
    assert np.isfinite(np.asarray(group.weight)).all()
    assert np.isfinite(np.asarray(group.update)).all()
  recovered = (state[0], state[1], bad_state[2])
  u, _ = tx.update(grads[2], recovered, params)
  d = np.asarray(tx.update(grads[2], state, params)[0]['w']) / np.asarray(
      u['w'])
  assert np.isfinite(np.asarray(u['w'])).all()
  # The bounded step is tau * σ1(W), within the estimator's accuracy.
  np.testing.assert_allclose(sigma1(u['w']), 0.01 * sigma1(params['w']),
                             rtol=0.1)
  assert np.isfinite(d).all()


def test_masked_and_partition(problem, rng):
  params, grads = problem
  params = dict(params, v=jnp.asarray(planted(rng, (5, 5)), jnp.float32))
  grads = [dict(g, v=jnp.ones((5, 5))) for g in grads]
  mask = {'w': True, 'b': False, 'v': False}
  tx = optax.chain(optax.sgd(1.0),
                   optax.masked(optax_spectral.scale_by_spectral_bound(0.1),
                                mask))
  _, state, outs = _run(tx, params, grads[:1])
  np.testing.assert_allclose(outs[0]['v'], -grads[0]['v'])
  factor = min(1, 0.1 * sigma1(params['w']) / sigma1(grads[0]['w']))
  np.testing.assert_allclose(outs[0]['w'], -grads[0]['w'] * factor,
                             rtol=1e-4)
  assert set(optax_spectral.spectral_stats(state)) == {
      'w/bounded_recent', 'w/factor', 'w/sigma_update', 'w/sigma_weight'}

  labels = {'w': 'bounded', 'b': 'plain', 'v': 'bounded'}
  tx = optax.partition({'bounded': optax_spectral.adamw2(0.3, tau=0.01),
                        'plain': optax.adamw(0.3)}, labels)
  out, state, _ = _run(tx, params, grads)
  ref_b, _, _ = _run(optax.adamw(0.3), params['b'], [g['b'] for g in grads])
  np.testing.assert_allclose(out['b'], ref_b, rtol=1e-6)
  stats = optax_spectral.spectral_stats(state)
  assert {k.split('/')[0] for k in stats} == {'w', 'v'}


def test_map_params(problem):
  params, _ = problem
  tx = optax_spectral.adamw2(1e-3)
  state = tx.init(params)
  cast = optax.tree.map_params(tx, lambda x: x.astype(jnp.bfloat16), state)
  assert cast[0][0].mu['w'].dtype == jnp.bfloat16
  # The spectral state is not params-shaped and is left alone.
  assert cast[1].groups['10x6 float32'].weight.dtype == jnp.float32


@pytest.mark.parametrize('structure', ['cpu', 'accelerators'])
def test_init_on_abstract_params(problem, monkeypatch, structure):
  params, grads = problem
  accelerators = structure == 'accelerators'
  monkeypatch.setattr(_power_iteration, 'launches_are_cheap',
                      lambda: not accelerators)
  tx = optax_spectral.adamw2(1e-3)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          params)
  shapes = jax.eval_shape(tx.init, abstract)
  direct = tx.init(abstract)
  concrete = tx.init(params)
  for other in (shapes, direct):
    assert jax.tree.structure(other) == jax.tree.structure(concrete)
    jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or
                 pytest.fail(f'{a} != {b}'), other, concrete)
  # Accelerators, concrete params: init converges σ1(W)'s vector (its cold
  # start, so that no step needs a branch for it). Shapes only, or CPUs
  # (whose first step runs it): random vectors.
  sigma = lambda s: float(optax_spectral.spectral_stats(s)['w/sigma_weight'])
  if accelerators:
    np.testing.assert_allclose(sigma(concrete), sigma1(params['w']),
                               rtol=1e-4)
  else:
    jax.tree.map(np.testing.assert_array_equal, direct, concrete)
  assert sigma(direct) == 0
  u, _ = jax.jit(tx.update)(grads[0], direct, params)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


def test_extra_args_accepted(problem):
  params, grads = problem
  tx = optax_spectral.adamw2(1e-3)
  state = tx.init(params)
  tx.update(grads[0], state, params, value=jnp.asarray(1.0), anything='x')


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16, jnp.float32,
                                   jnp.float64])
def test_dtypes_are_kept_through_cond(rng, dtype):
  with jax.enable_x64(dtype == jnp.float64):
    params = {'w': jnp.asarray(planted(rng, (8, 6)), dtype),
              'b': jnp.zeros(6, dtype)}
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.5, params)
    tx = optax_spectral.adamw2(1e-2)
    state = tx.init(params)

    @jax.jit
    def step(pred, state):
      return jax.lax.cond(pred, lambda: tx.update(grads, state, params),
                          lambda: (grads, state))

    updates, new_state = step(True, state)
    assert all(u.dtype == dtype for u in jax.tree.leaves(updates))
    assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(
        lambda x: x.dtype, state)
    # The power-iteration vectors keep the params' dtype too.
    group = new_state[1].groups[f'8x6 {jnp.dtype(dtype).name}']
    assert group.weight.dtype == group.update.dtype == dtype
    assert np.isfinite(np.asarray(updates['w'], np.float64)).all()


@pytest.mark.parametrize('start', ['random', 'zeros'])
def test_scan_converges_on_linear_regression(rng, start):
  """Thousands of steps in lax.scan fit a linear map, even from zeros."""
  x = jnp.asarray(rng.normal(size=(64, 8)), jnp.float32)
  w_true = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  y = x @ w_true
  w0 = (jnp.zeros((8, 4)) if start == 'zeros'
        else jnp.asarray(rng.normal(size=(8, 4)) * 0.01, jnp.float32))
  tx = optax_spectral.adamw2(3e-2, weight_decay=0.0)
  loss = lambda p: jnp.mean((x @ p['w'] - y) ** 2)

  def step(carry, _):
    p, s = carry
    u, s = tx.update(jax.grad(loss)(p), s, p)
    return (optax.apply_updates(p, u), s), None

  params = {'w': w0}
  (params, state), _ = jax.jit(
      lambda c: jax.lax.scan(step, c, length=2000))((params, tx.init(params)))
  assert float(loss(params)) < 1e-4 * float(jnp.mean(y ** 2))
  np.testing.assert_allclose(params['w'], w_true, atol=1e-2)


def test_zero_matrix_moves_and_zero_update_is_finite(problem):
  params = {'w': jnp.zeros((4, 3))}
  # The floor bounds a zero matrix's step at tau * (1 + sqrt(3/4)), on the
  # first step tau of it (the ramp: 1 / tau steps).
  tx = optax_spectral.adamw2(0.1, tau=0.02)
  state = tx.init(params)
  u, state = tx.update({'w': jnp.ones((4, 3))}, state, params)
  np.testing.assert_allclose(sigma1(u['w']),
                             0.02 * floor_sigma((4, 3)) * 0.02, rtol=1e-4)
  # Without a floor (the paper's rule) it is not bounded, as in optax's
  # trust ratio: a zero matrix must still move.
  tx0 = optax_spectral.adamw2(0.1, tau=0.02, weight_floor=0.0)
  u, state0 = tx0.update({'w': jnp.ones((4, 3))}, tx0.init(params), params)
  assert float(jnp.abs(u['w']).max()) > 0
  assert float(optax_spectral.spectral_stats(state0)['w/factor']) == 1.0
  params = {'w': jnp.eye(4, 3)}
  u, state = tx.update({'w': jnp.zeros((4, 3))}, tx.init(params), params)
  assert np.isfinite(np.asarray(u['w'])).all()
  stats = optax_spectral.spectral_stats(state)
  assert all(np.isfinite(np.asarray(v)).all() for v in stats.values())


def test_clear_errors(problem):
  params, grads = problem
  tx = optax_spectral.adamw2(1e-3)
  state = tx.init(params)
  with pytest.raises(ValueError, match='params'):
    tx.update(grads[0], state)
  D = optax_spectral.SpectralDimensionNumbers
  bad_dims = [
      {'w': D(0, 2), 'b': None},           # axis out of range
      {'w': D(0, 0), 'b': None},           # overlapping axes
      {'w': D(0, 1)},                      # wrong structure
      {'w': (0, 1), 'b': None},            # not a spec
  ]
  for dims in bad_dims:
    with pytest.raises(ValueError, match='dimension_numbers'):
      optax_spectral.adamw2(1e-3, dimension_numbers=dims).init(params)
  with pytest.raises(ValueError):
    bad_mask = optax_spectral.adamw2(1e-3, mask={'w': True})
    bad_mask.update(grads[0], bad_mask.init(params), params)
  for kwargs in ({'tau': 0.0}, {'num_iterations': 0},
                 {'max_extrapolation': -1.0}, {'block_size': 1.5}):
    with pytest.raises(ValueError):
      optax_spectral.adamw2(1e-3, **kwargs)
  bound = optax_spectral.scale_by_spectral_bound()
  other = {'w': jnp.ones((3, 3)), 'b': jnp.ones(6)}
  with pytest.raises(ValueError, match='do not match'):
    bound.update(other, bound.init(params), other)


def test_bounded_leaves_table(problem):
  D = optax_spectral.SpectralDimensionNumbers
  params = {'w': jnp.zeros((4, 3)), 'b': jnp.zeros(3), 'i': jnp.zeros(
      (2, 2), jnp.int32), 'qkv': jnp.zeros((8, 2, 4))}
  table = optax_spectral.bounded_leaves(
      params, {'w': D(), 'b': None, 'i': None, 'qkv': D(0, (1, 2))})
  assert table == {'b': 'passed through: its dimension_numbers is None',
                   'i': 'passed through: dtype int32',
                   'qkv': 'bounded: 8x8 matrix',
                   'w': 'bounded: 4x3 matrix'}
  table = optax_spectral.bounded_leaves(params, bound_vectors=True)
  assert table['b'] == 'bounded: 1x3 matrix'
  assert table['i'] == 'passed through: dtype int32'
  assert table['qkv'] == 'bounded: batch (8,) (axes (0,)) of 2x4 matrices'


def test_flax_serialization_round_trip(problem):
  """flax.serialization (to_bytes/from_bytes, the legacy
  flax.training.checkpoints) restores the state of a trained step exactly,
  and the restored state trains on as the original does."""
  from flax import serialization  # pylint: disable=g-import-not-at-top
  params, grads = problem
  tx = optax_spectral.adamw2(1e-2)
  fresh = tx.init(params)
  _, state = tx.update(grads[0], fresh, params)
  restored = serialization.from_bytes(fresh, serialization.to_bytes(state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Not the fresh state: a zeroed restore would give another second step.
  assert not np.array_equal(np.asarray(fresh[1].groups['10x6 float32'].stats),
                            np.asarray(restored[1].groups['10x6 float32'].stats))
  u1, _ = tx.update(grads[1], state, params)
  u2, _ = tx.update(grads[1], restored, params)
  np.testing.assert_array_equal(np.asarray(u1['w']), np.asarray(u2['w']))
