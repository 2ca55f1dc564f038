"""power_iteration against numpy.linalg.svd."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_spectral
from conftest import planted, sigma1


def _start(rng, shape, k):
  *batch, m, n = shape
  u = np.linalg.qr(rng.normal(size=(*batch, m, k)))[0]
  v = np.linalg.qr(rng.normal(size=(*batch, n, k)))[0]
  return jnp.asarray(u, jnp.float32), jnp.asarray(v, jnp.float32)


@pytest.mark.parametrize('shape', [(40, 12), (12, 40), (3, 2, 16, 24)])
@pytest.mark.parametrize('k', [1, 4])
def test_planted_spectrum_converges_to_svd(rng, shape, k):
  m = planted(rng, shape)
  u, v = _start(rng, shape, k)
  r = jax.jit(optax_spectral.power_iteration, static_argnums=3)(
      jnp.asarray(m, jnp.float32), u, v, 10)
  np.testing.assert_allclose(r.sigma, sigma1(m), rtol=1e-5)
  assert r.v.shape == v.shape and r.u.shape == u.shape
  # Returned blocks are orthonormal: the next call's warm start.
  gram = np.einsum('...ik,...il->...kl', r.v, r.v)
  np.testing.assert_allclose(gram, np.broadcast_to(np.eye(k), gram.shape),
                             atol=1e-5)


def test_estimates_are_ordered_lower_bounds(rng):
  m = rng.normal(size=(64, 48))
  u, v = _start(rng, m.shape, 1)
  r = optax_spectral.power_iteration(jnp.asarray(m, jnp.float32), u, v, 1)
  assert float(r.sigma_half) <= float(r.sigma) <= sigma1(m) * (1 + 1e-6)


def test_traced_iteration_count_matches_static(rng):
  m = jnp.asarray(rng.normal(size=(20, 30)), jnp.float32)
  u, v = _start(rng, m.shape, 2)
  static = optax_spectral.power_iteration(m, u, v, 3)
  traced = jax.jit(optax_spectral.power_iteration)(m, u, v, jnp.asarray(3))
  np.testing.assert_allclose(traced.sigma, static.sigma, rtol=1e-6)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_low_precision_accumulates_in_float32(rng, dtype):
  # A 512x512 matrix of values ~1: a sum of squares in bf16/f16 would lose
  # about 2-3 digits; σ1 of the rounded matrix must come out to 1e-3.
  m = jnp.asarray(planted(rng, (512, 512), top=30.0, rest=10.0), dtype)
  u, v = _start(rng, m.shape, 1)
  r = optax_spectral.power_iteration(m, u, v, 30)
  assert r.sigma.dtype == jnp.float32
  np.testing.assert_allclose(r.sigma, sigma1(m.astype(jnp.float32)),
                             rtol=1e-3)


def test_zero_and_nan_matrices_keep_the_warm_start(rng):
  u, v = _start(rng, (5, 7), 1)
  for m in (jnp.zeros((5, 7)), jnp.full((5, 7), jnp.nan)):
    r = optax_spectral.power_iteration(m, u, v, 2)
    np.testing.assert_array_equal(r.v, v)
    np.testing.assert_array_equal(r.u, u)
    assert not float(r.sigma) > 0
