"""scale_by_spectral_bound and adamw2 against exact SVD and numpy AdamW."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_spectral
from optax_spectral import _power_iteration
from optax_spectral import SpectralDimensionNumbers as D
from conftest import allowed, floor_sigma, planted, ramp, sigma1


def _one_step(tx, updates, params):
  state = tx.init(params)
  return jax.jit(tx.update)(updates, state, params)


@pytest.mark.parametrize('shape', [(24, 10), (10, 24)])
@pytest.mark.parametrize('step_scale', [0.01, 1.0])
def test_factor_matches_exact_svd(rng, shape, step_scale):
  # σ1(W) = 2: above the floor for 24 x 10 (1.65), below it for 10 x 24
  # (2.55), where the floor (no ramp here) sets the bound.
  w = planted(rng, shape, top=2.0)
  d = planted(rng, shape, top=3.0) * step_scale
  tau = 0.1
  out, state = _one_step(
      optax_spectral.scale_by_spectral_bound(tau, ramp_steps=0),
      {'w': jnp.asarray(d, jnp.float32)}, {'w': jnp.asarray(w, jnp.float32)})
  factor = min(1.0, allowed(w, tau) / sigma1(d))
  np.testing.assert_allclose(out['w'], d * factor, rtol=1e-4, atol=1e-7)
  stats = optax_spectral.spectral_stats(state)
  np.testing.assert_allclose(stats['w/sigma_weight'], sigma1(w), rtol=1e-4)
  np.testing.assert_allclose(stats['w/sigma_update'], sigma1(d), rtol=1e-4)
  np.testing.assert_allclose(stats['w/factor'], factor, rtol=1e-4)


def test_accelerator_structure_matches_exact_svd(rng, monkeypatch):
  """On GPUs and TPUs every step runs the same unrolled iterations, with no
  control flow (CPUs run one loop, longer on the first step). σ1(W)'s cold
  start runs in init; the first step, whose block on Δ starts cold, is
  bounded with ‖Δ‖_F >= σ1(Δ), never above the bound; later steps (warm
  start) match the exact SVD."""
  monkeypatch.setattr(_power_iteration, 'launches_are_cheap', lambda: False)
  tau, w = 0.1, planted(rng, (24, 10), top=2.0)
  tx = optax_spectral.scale_by_spectral_bound(tau)
  params = {'w': jnp.asarray(w, jnp.float32)}
  state, update = tx.init(params), jax.jit(tx.update)
  text = update.lower(params, state, params).as_text()
  assert 'stablehlo.case' not in text and 'stablehlo.while' not in text
  np.testing.assert_allclose(
      optax_spectral.spectral_stats(state)['w/sigma_weight'], sigma1(w),
      rtol=1e-4)
  step = planted(rng, (24, 10), top=3.0)
  for i, scale in enumerate((1.0, 0.01, 1.0, 0.5)):
    d = step * scale  # the warm start stays converged: its estimate is exact
    out, state = update({'w': jnp.asarray(d, jnp.float32)}, state, params)
    sigma_d = np.linalg.norm(d) if i == 0 else sigma1(d)
    factor = min(1.0, allowed(w, tau, step=i) / sigma_d)
    np.testing.assert_allclose(out['w'], d * factor, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(optax_spectral.spectral_stats(state)[
        'w/sigma_update'], sigma_d, rtol=1e-4)
  assert sigma1(d) > 1.5 * allowed(w, tau), 'the bound should be active'


def test_nd_leaves_are_batches_of_matrices(rng):
  tau = 0.05
  # (heads, d_in, layers, d_out): matrix axes 1 and 3, batch axes 0 and 2.
  w_mats = planted(rng, (2, 3, 12, 8))
  d_mats = planted(rng, (2, 3, 12, 8)) * rng.uniform(0.01, 1, (2, 3, 1, 1))
  to_leaf = lambda x: np.transpose(x, (0, 2, 1, 3))
  # And a stacked (layers, d_in, d_out) leaf under the default spec.
  w3, d3 = planted(rng, (4, 6, 9)), planted(rng, (4, 6, 9))
  params = {'a': jnp.asarray(to_leaf(w_mats), jnp.float32),
            'b': jnp.asarray(w3, jnp.float32)}
  updates = {'a': jnp.asarray(to_leaf(d_mats), jnp.float32),
             'b': jnp.asarray(d3, jnp.float32)}
  dims = {'a': D(reduction_axis=1, output_axis=3), 'b': D(1, 2)}
  out, _ = _one_step(
      optax_spectral.scale_by_spectral_bound(tau, dimension_numbers=dims),
      updates, params)
  factor = np.minimum(1, tau * sigma1(w_mats) / sigma1(d_mats))
  np.testing.assert_allclose(out['a'], to_leaf(d_mats * factor[..., None,
                                                               None]),
                             rtol=1e-4, atol=1e-7)
  out_default, _ = _one_step(optax_spectral.scale_by_spectral_bound(tau),
                             updates, params)
  factor3 = np.minimum(1, tau * sigma1(w3) / sigma1(d3))
  np.testing.assert_allclose(out_default['b'], d3 * factor3[:, None, None],
                             rtol=1e-4, atol=1e-7)


def test_flattened_axes(rng):
  # A fused kernel (d_model, heads, head_dim) bounded as one 8 x 12 matrix.
  w, d = planted(rng, (8, 12)), planted(rng, (8, 12), top=9.0)
  tx = optax_spectral.scale_by_spectral_bound(
      0.1, dimension_numbers=D(reduction_axis=0, output_axis=(1, 2)))
  out, _ = _one_step(tx, {'k': jnp.asarray(d.reshape(8, 3, 4), jnp.float32)},
                     {'k': jnp.asarray(w.reshape(8, 3, 4), jnp.float32)})
  factor = min(1, 0.1 * sigma1(w) / sigma1(d))
  np.testing.assert_allclose(out['k'], (d * factor).reshape(8, 3, 4),
                             rtol=1e-4)


def test_vectors_pass_through_unless_asked(rng):
  params = {'b': jnp.ones(5), 's': jnp.asarray(2.0)}
  updates = {'b': jnp.full(5, 10.0), 's': jnp.asarray(5.0)}
  out, _ = _one_step(
      optax_spectral.scale_by_spectral_bound(0.1, ramp_steps=0), updates,
      params)
  np.testing.assert_array_equal(out['b'], updates['b'])
  np.testing.assert_array_equal(out['s'], updates['s'])
  # The default ramp (1 / tau = 10 steps) scales the first step of every
  # leaf the bound does not cover by 1/10.
  out, _ = _one_step(optax_spectral.scale_by_spectral_bound(0.1), updates,
                     params)
  np.testing.assert_allclose(out['b'], np.full(5, 1.0), rtol=1e-6)
  np.testing.assert_allclose(out['s'], 0.5, rtol=1e-6)
  out, _ = _one_step(
      optax_spectral.scale_by_spectral_bound(0.1, bound_vectors=True,
                                             ramp_steps=0), updates, params)
  # 1-D leaves as 1 x n matrices: σ1 is the L2 norm, here sqrt(5), below
  # the floor of a 1 x 5 matrix, 1 + sqrt(5); 0-D still passes.
  np.testing.assert_allclose(out['b'], updates['b'] * 0.1 * (1 + np.sqrt(5))
                             / np.sqrt(500), rtol=1e-5)
  np.testing.assert_array_equal(out['s'], updates['s'])


def _numpy_adamw2(w, grads, lr, tau, b1=0.9, b2=0.999, eps=1e-8, wd=1e-4,
                  weight_floor=1.0):
  """AdamW with the exact AdamW² bound, in float64: the step's σ1 is at most
  tau * max(σ1(W), weight_floor * (1 + sqrt(cols / rows)) * r), r ramping
  from tau to 1 by tau per step."""
  m = np.zeros_like(w)
  v = np.zeros_like(w)
  factors = []
  for t, g in enumerate(grads, start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    step = -lr * ((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
                  + wd * w)
    floor = weight_floor * (1 + np.sqrt(w.shape[1] / w.shape[0]))
    floor *= ramp(t - 1, 1 / tau)
    factor = min(1.0, tau * max(sigma1(w), floor) / sigma1(step))
    factors.append(factor)
    w = w + factor * step
  return w, factors


@pytest.mark.parametrize('weight_floor', [
    pytest.param(0.0, marks=pytest.mark.slow), 1.0,
    pytest.param(3.0, marks=pytest.mark.slow)])
def test_adamw2_matches_numpy_reference(rng, weight_floor):
  # σ1(W) starts at ~1.8 and grows: below, near and above the floors
  # (0, 1.76 and 5.3), so that each run crosses or sits on one side.
  w0 = rng.normal(size=(12, 7)) * 0.3
  target = rng.normal(size=(12, 7))
  lr, tau, steps = 0.05, 0.03, 12
  # Gradients of a fixed quadratic, replayed in numpy along JAX's path.
  # Converged estimates on both sides, so that only the rule is compared.
  tx = optax_spectral.adamw2(lr, tau=tau, num_iterations=30,
                             num_iterations_first=100,
                             num_iterations_weight=30, max_extrapolation=0.0,
                             weight_floor=weight_floor)
  params = {'w': jnp.asarray(w0, jnp.float32)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  grads = []
  for _ in range(steps):
    g = np.asarray(params['w'], np.float64) - target
    grads.append(g)
    u, state = update({'w': jnp.asarray(g, jnp.float32)}, state, params)
    params = optax.apply_updates(params, u)
  w_ref, factors = _numpy_adamw2(w0, grads, lr, tau,
                                 weight_floor=weight_floor)
  assert min(factors) < 0.9, 'the bound should be active in this test'
  np.testing.assert_allclose(params['w'], w_ref, rtol=2e-4, atol=2e-5)


def test_adamw2_without_bound_is_adamw(rng):
  params = {'w': jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
  grads = {'w': jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
  out2, _ = _one_step(optax_spectral.adamw2(1e-4, tau=10.0), grads, params)
  out, _ = _one_step(optax.adamw(1e-4), grads, params)
  np.testing.assert_allclose(out2['w'], out['w'], rtol=1e-6)


@pytest.mark.parametrize('schedule', [False, True])
def test_both_placements_give_the_same_update(rng, schedule):
  lr = optax.linear_schedule(3e-2, 1e-2, 5) if schedule else 2e-2
  last = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-2),
                     optax.scale_by_learning_rate(lr),
                     optax_spectral.scale_by_spectral_bound(0.02))
  early = optax.chain(
      optax.scale_by_adam(), optax.add_decayed_weights(1e-2),
      optax_spectral.scale_by_spectral_bound(0.02, learning_rate=lr),
      optax.scale_by_learning_rate(lr))
  params = {'w': jnp.asarray(planted(rng, (16, 9)), jnp.float32)}
  sa, sb = last.init(params), early.init(params)
  active = 0
  for _ in range(6):
    g = {'w': jnp.asarray(rng.normal(size=(16, 9)), jnp.float32)}
    ua, sa = jax.jit(last.update)(g, sa, params)
    ub, sb = jax.jit(early.update)(g, sb, params)
    np.testing.assert_allclose(ua['w'], ub['w'], rtol=1e-5, atol=1e-8)
    active += float(optax_spectral.spectral_stats(sa)['w/factor']) < 1
    params = optax.apply_updates(params, ua)
  assert active >= 3, 'the bound should be active in this test'


@pytest.mark.parametrize('structure', ['cpu', 'accelerators'])
def test_random_direction_gradients_stay_within_ten_percent(
    rng, monkeypatch, structure):
  """Default settings: applied σ1(Δ) <= 1.1 times the allowed step on every
  step (a small init: the ramping floor sets the bound, then the full floor
  after step 50). The accelerators' first step (‖Δ‖_F for σ1(Δ)) is never
  above it."""
  if structure == 'accelerators':
    monkeypatch.setattr(_power_iteration, 'launches_are_cheap', lambda: False)
  tau = inspect.signature(optax_spectral.adamw2).parameters['tau'].default
  shapes = {'square': (96, 96), 'wide': (64, 160), 'tall': (160, 64)}
  params = {k: jnp.asarray(rng.normal(size=s) * 0.02, jnp.float32)
            for k, s in shapes.items()}
  tx = optax_spectral.adamw2(0.1)
  state = tx.init(params)
  update = jax.jit(tx.update)
  ratios = {k: [] for k in shapes}
  for step in range(60):
    g = {k: jnp.asarray(rng.normal(size=s), jnp.float32)
         for k, s in shapes.items()}
    u, state = update(g, state, params)
    for k in shapes:
      ratios[k].append(sigma1(u[k]) / allowed(params[k], tau, step=step))
    params = optax.apply_updates(params, u)
  for k, r in ratios.items():
    assert max(r) <= 1.1, (k, max(r))
    assert min(r[1:]) >= 0.85, (k, 'bound should be active, not too tight')
    if structure == 'accelerators':
      assert r[0] <= 1 + 1e-4, (k, r[0])


def test_floor_is_sigma1_of_a_variance_preserving_random_matrix(rng):
  """1 + sqrt(cols / rows) is σ1 of a rows x cols matrix with entries of std
  1/sqrt(rows) (LeCun normal), to within 5% at these sizes."""
  for rows, cols in [(256, 256), (128, 512), (512, 128), (64, 1000)]:
    w = rng.normal(size=(rows, cols)) / np.sqrt(rows)
    np.testing.assert_allclose(sigma1(w), floor_sigma((rows, cols)),
                               rtol=0.05)


@pytest.mark.parametrize('weight_floor', [0.0, 1.0, 0.5])
def test_small_and_zero_matrices_move_at_the_floor(rng, weight_floor):
  """A matrix far below the floor may take a step of tau times the floor,
  not tau times its own small σ1 (weight_floor=0: the paper's rule), and a
  zero matrix moves either way (with no floor, unbounded)."""
  tau, shape = 0.02, (32, 96)
  w = rng.normal(size=shape) * 0.002
  d = rng.normal(size=shape)
  params = {'small': jnp.asarray(w, jnp.float32),
            'zero': jnp.zeros(shape, jnp.float32)}
  updates = {'small': jnp.asarray(d, jnp.float32),
             'zero': jnp.asarray(d, jnp.float32)}
  out, state = _one_step(optax_spectral.scale_by_spectral_bound(
      tau, weight_floor=weight_floor, ramp_steps=0), updates, params)
  limit = tau * max(sigma1(w), weight_floor * (1 + np.sqrt(96 / 32)))
  # The first step's 20 iterations from a random start underestimate a
  # random matrix's σ1 (close top singular values) by up to a few percent:
  # the step is then below the limit, never above it.
  assert limit * 0.97 <= sigma1(out['small']) <= limit * (1 + 1e-5), (
      sigma1(out['small']), limit)
  zero_limit = tau * weight_floor * (1 + np.sqrt(3)) or sigma1(d)
  np.testing.assert_allclose(sigma1(out['zero']), zero_limit, rtol=1e-3)
  with pytest.raises(ValueError, match='weight_floor'):
    optax_spectral.adamw2(1e-3, weight_floor=-1.0)


@pytest.mark.parametrize('ramp_steps', [None, 4])
def test_first_steps_ramp_the_floor_and_the_uncovered_leaves(rng, ramp_steps):
  """Over the ramp (1 / tau steps by default) a zero matrix may step tau
  times (t + 1) / length of its floor, and a bias moves as optax.adamw's
  times (t + 1) / length; both at full size after it."""
  tau, shape = 0.1, (8, 6)
  length = 1 / tau if ramp_steps is None else ramp_steps
  params = {'w': jnp.zeros(shape), 'b': jnp.zeros(6)}
  # Converged estimates (3 iterations of a 6-column block on 8 x 6 steps, no
  # extrapolation), so that only the rule is compared.
  tx = optax_spectral.adamw2(1.0, tau=tau, ramp_steps=ramp_steps,
                             num_iterations=3, max_extrapolation=0.0)
  ref = optax.adamw(1.0)
  state, ref_state = tx.init(params), ref.init(params)
  for step in range(12):
    g = {'w': jnp.asarray(rng.normal(size=shape), jnp.float32),
         'b': jnp.asarray(rng.normal(size=6), jnp.float32)}
    u, state = jax.jit(tx.update)(g, state, params)
    r, ref_state = ref.update(g, ref_state, params)
    np.testing.assert_allclose(u['b'], r['b'] * ramp(step, length),
                               rtol=1e-5)
    # Zero W: the bound is tau times the ramped floor, far below Adam's step.
    np.testing.assert_allclose(
        sigma1(u['w']), tau * floor_sigma(shape) * ramp(step, length),
        rtol=1e-3)
  with pytest.raises(ValueError, match='ramp_steps'):
    optax_spectral.adamw2(1e-3, ramp_steps=-1)


def test_bounded_recent_is_the_fraction_of_recent_steps_bounded():
  """Hand count: bounded on steps 1-3 (lr 1), free after (lr 1e-6): 3/5
  after 5 steps, 3/n after n = RECENT_STEPS, then an exponential average of
  weight 1/n."""
  params = {'w': jnp.eye(4)}
  lr = optax.piecewise_constant_schedule(1.0, {3: 1e-6})
  tx = optax.chain(optax.sgd(lr),
                   optax_spectral.scale_by_spectral_bound(0.05))
  state = tx.init(params)
  update = jax.jit(tx.update)
  g = {'w': jnp.ones((4, 4))}
  for _ in range(5):
    _, state = update(g, state, params)
  recent = optax_spectral.spectral_stats(state)['w/bounded_recent']
  np.testing.assert_allclose(recent, 3 / 5, rtol=1e-6)
  n = optax_spectral._transform.RECENT_STEPS  # pylint: disable=protected-access
  for _ in range(n - 5):
    _, state = update(g, state, params)
  recent = lambda: optax_spectral.spectral_stats(state)['w/bounded_recent']
  np.testing.assert_allclose(recent(), 3 / n, rtol=1e-4)  # mean of n steps
  _, state = update(g, state, params)
  np.testing.assert_allclose(recent(), 3 / n * (1 - 1 / n), rtol=1e-4)
