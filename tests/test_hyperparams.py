"""Injectable hyperparameters, validated settings and short error messages."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_spectral
from conftest import planted, sigma1


def _params(rng, shape=(12, 8)):
  return {'w': jnp.asarray(planted(rng, shape, top=2.0), jnp.float32),
          'b': jnp.zeros(shape[-1])}


@pytest.mark.parametrize('factory', ['adamw2', 'scale_by_spectral_bound'])
def test_inject_hyperparams_traced_init_and_update(rng, factory):
  """As optax's common test: inject_hyperparams, jitted init and update, the
  same updates and state as without injection."""
  params = _params(rng)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape),
                                             jnp.float32), params)
  if factory == 'adamw2':
    plain = optax_spectral.adamw2(learning_rate=0.5)
    injected = optax.inject_hyperparams(optax_spectral.adamw2)(
        learning_rate=0.5)
  else:
    plain = optax_spectral.scale_by_spectral_bound(tau=0.05)
    injected = optax.inject_hyperparams(
        optax_spectral.scale_by_spectral_bound)(tau=0.05)
  jax.eval_shape(injected.init, params)
  state = jax.jit(plain.init)(params)
  u, new_state = jax.jit(plain.update)(grads, state, params)
  state_i = jax.jit(injected.init)(params)
  assert 'tau' in state_i.hyperparams
  assert 'block_size' not in state_i.hyperparams
  u_i, new_state_i = jax.jit(injected.update)(grads, state_i, params)
  close = lambda a, b: jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6),
      a, b)
  close(u_i, u)
  close(new_state_i.inner_state, new_state)
  # The bound was active, so that the comparison means something.
  assert float(optax_spectral.spectral_stats(new_state)['w/factor']) < 1


def test_injected_tau_can_be_changed_during_training(rng):
  params = _params(rng)
  tx = optax.inject_hyperparams(optax_spectral.scale_by_spectral_bound)(
      tau=0.1)
  state = tx.init(params)
  state.hyperparams['tau'] = jnp.asarray(0.01)
  d = {'w': jnp.asarray(planted(rng, (12, 8), top=3.0), jnp.float32),
       'b': jnp.ones(8)}
  u, _ = jax.jit(tx.update)(d, state, params)
  np.testing.assert_allclose(sigma1(u['w']), 0.01 * sigma1(params['w']),
                             rtol=1e-4)


def test_injected_ramp_steps_can_be_changed_during_training(rng):
  """An uncovered leaf's first step is 1 / ramp_steps of its update; set to
  0 (no ramp) it is the whole update."""
  params = _params(rng)
  tx = optax.inject_hyperparams(optax_spectral.scale_by_spectral_bound)(
      ramp_steps=4)
  state = tx.init(params)
  d = {'w': jnp.zeros((12, 8)), 'b': jnp.full(8, 2.0)}
  u, _ = jax.jit(tx.update)(d, state, params)
  np.testing.assert_allclose(u['b'], np.full(8, 0.5), rtol=1e-6)
  state.hyperparams['ramp_steps'] = jnp.asarray(0)
  u, _ = jax.jit(tx.update)(d, state, params)
  np.testing.assert_allclose(u['b'], np.full(8, 2.0), rtol=1e-6)


def test_inject_hyperparams_in_nnx_jit():
  """nnx.Optimizer built inside nnx.jit (the sharded-init pattern)."""
  model = nnx.Linear(6, 4, rngs=nnx.Rngs(0))

  @nnx.jit
  def make(model):
    return nnx.Optimizer(model, optax.inject_hyperparams(
        optax_spectral.adamw2)(learning_rate=1e-2), wrt=nnx.Param)

  opt = make(model)
  x = jnp.ones((3, 6))

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    opt.update(model, grads)

  before = np.asarray(model.kernel[...])
  step(model, opt)
  assert not np.allclose(before, np.asarray(model.kernel[...]))


def test_explicit_block_size_must_be_static():
  tx = optax.inject_hyperparams(optax_spectral.adamw2)(
      learning_rate=1e-2, block_size=2)
  with pytest.raises(ValueError, match='static_args'):
    jax.jit(tx.init)({'w': jnp.ones((4, 4))})
  tx = optax.inject_hyperparams(optax_spectral.adamw2,
                                static_args=('block_size',))(
                                    learning_rate=1e-2, block_size=2)
  state = jax.jit(tx.init)({'w': jnp.ones((4, 4))})
  (group,) = state.inner_state[1].groups.values()
  assert group.update.shape == (1, 2, 4)


@pytest.mark.parametrize('tau', [0, 0.0, -0.5, np.float32(0), np.array(0.),
                                 jnp.array(-1.), np.float32(-0.5),
                                 float('nan')])
def test_non_positive_tau_is_an_error(tau):
  with pytest.raises(ValueError, match='tau'):
    optax_spectral.adamw2(1e-3, tau=tau)
  with pytest.raises(ValueError, match='tau'):
    optax_spectral.scale_by_spectral_bound(tau)


def test_negative_max_extrapolation_is_an_error():
  with pytest.raises(ValueError, match='max_extrapolation'):
    optax_spectral.adamw2(1e-3, max_extrapolation=np.float32(-0.1))


@pytest.mark.parametrize('tau', [0.0, -0.5, float('nan')])
def test_injected_bad_tau_never_reverses_a_step(rng, tau):
  """A traced tau skips construction checks: the factor stays in (0, 1]."""
  params = _params(rng)
  grads = {'w': jnp.asarray(rng.normal(size=(12, 8)), jnp.float32),
           'b': jnp.ones(8)}
  tx = optax.inject_hyperparams(optax_spectral.adamw2)(learning_rate=0.1)
  state = tx.init(params)
  state.hyperparams['tau'] = jnp.asarray(tau, jnp.float32)
  u, state = jax.jit(tx.update)(grads, state, params)
  plain, _ = optax.adamw(0.1, weight_decay=1e-4).update(
      grads, optax.adamw(0.1, weight_decay=1e-4).init(params), params)
  cosine = jnp.vdot(u['w'], plain['w']) / (
      jnp.linalg.norm(u['w']) * jnp.linalg.norm(plain['w']))
  factor = float(optax_spectral.spectral_stats(state)['w/factor'])
  assert 0 < factor <= 1e-6
  assert np.all(np.isfinite(u['w']))
  assert not float(cosine) < 0.999  # same direction (NaN-safe: u may be ~0)
  # Never reversed, even where the step underflows to zero.
  assert np.all(np.asarray(u['w']) * np.asarray(plain['w']) >= 0)


def test_diagnostics_is_reachable_after_import():
  import importlib  # pylint: disable=g-import-not-at-top
  mod = importlib.reload(optax_spectral)
  assert callable(mod.diagnostics.bound_summary)


def test_malformed_dimension_numbers_error_is_short():
  params = {f'layer{i}': {'kernel': jnp.ones((4, 4)), 'bias': jnp.ones(4)}
            for i in range(40)}
  for bad in [(0, 1), {'layer0': 3}]:
    with pytest.raises(ValueError) as e:
      optax_spectral.adamw2(1e-3, dimension_numbers=bad).init(params)
    assert len(str(e.value)) < 600, len(str(e.value))
  with pytest.raises(ValueError, match='SpectralDimensionNumbers'):
    optax_spectral.bounded_leaves(params, (0, 1))


def test_colliding_leaf_names_are_an_error_at_init():
  params = {'a/b': jnp.ones((3, 3)), 'a': {'b': jnp.ones((3, 3))}}
  with pytest.raises(ValueError, match="named 'a/b'"):
    optax_spectral.adamw2(1e-3).init(params)


@pytest.mark.parametrize('grads', [
    {'w': jnp.ones((4, 5)), 'b': jnp.ones(3)},
    {'w': jnp.ones((4, 4))},
    {'w': jnp.ones((4, 4)), 'b': jnp.ones(3), 'c': jnp.ones(2)},
])
def test_adamw2_names_grads_unlike_init(grads):
  params = {'w': jnp.eye(4), 'b': jnp.zeros(3)}
  tx = optax_spectral.adamw2(1e-3)
  with pytest.raises(ValueError, match="'(w|b|c)'") as e:
    tx.update(grads, tx.init(params), params)
  assert 'init' in str(e.value) and len(str(e.value)) < 400


def test_switching_from_adamw_keeps_its_moments(rng):
  """Three steps of optax.adamw, then adamw2 with a bound that never binds:
  the fourth step equals optax.adamw's fourth step."""
  params = {'w': jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
  grads = [{'w': jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
           for _ in range(4)]
  adamw = optax.adamw(1e-2)
  state = adamw.init(params)
  for g in grads[:3]:
    _, state = adamw.update(g, state, params)
  expected, _ = adamw.update(grads[3], state, params)
  tx = optax_spectral.adamw2(1e-2, tau=1e3)
  switched = optax_spectral.from_adamw_state(state, tx, params)
  got, _ = tx.update(grads[3], switched, params)
  np.testing.assert_allclose(got['w'], expected['w'], rtol=1e-6)
  # A fresh adamw2 state would take Adam's first step instead.
  fresh, _ = tx.update(grads[3], tx.init(params), params)
  assert not np.allclose(fresh['w'], expected['w'], rtol=1e-3)
  with pytest.raises(ValueError, match='same arguments'):
    optax_spectral.from_adamw_state(
        optax.adamw(1e-2, mu_dtype=jnp.bfloat16).init(params), tx, params)
