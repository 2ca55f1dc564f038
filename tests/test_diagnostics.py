"""diagnostics against numpy and hand-computed values."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_spectral
from optax_spectral import diagnostics


@pytest.mark.parametrize('s', [1, 3])
def test_sec_matches_numpy_per_head(rng, s):
  d, heads, hd = 12, 3, 4
  w_q = rng.normal(size=(d, heads * hd))
  w_k = rng.normal(size=(d, heads * hd))
  got = diagnostics.spectral_energy_concentration(
      jnp.asarray(w_q), jnp.asarray(w_k), s, num_heads=heads)
  for h in range(heads):
    cols = slice(h * hd, (h + 1) * hd)
    sv = np.linalg.svd(w_q[:, cols] @ w_k[:, cols].T, compute_uv=False)
    np.testing.assert_allclose(got[h], np.sum(sv[:s]**2) / np.sum(sv**2),
                               rtol=1e-4)


def test_sec_of_fused_kernel_and_rank_one():
  u = jnp.arange(1.0, 7.0)[:, None]
  qkv = jnp.concatenate([u * jnp.ones((1, 2)), u * jnp.ones((1, 2)),
                         jnp.zeros((6, 2))], axis=1)
  q, k, _ = diagnostics.split_fused_qkv(qkv)
  # W_q W_kᵀ = 2 u uᵀ is rank one: all energy in one direction.
  np.testing.assert_allclose(
      diagnostics.spectral_energy_concentration(q, k), [1.0], rtol=1e-5)
  with pytest.raises(ValueError):
    diagnostics.split_fused_qkv(jnp.ones((6, 4)))


def test_attention_entropy_hand_values():
  p = jnp.array([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]])
  np.testing.assert_allclose(diagnostics.attention_entropy(p),
                             [math.log(4), 0.0, math.log(2)], rtol=1e-6)


def test_bound_summary_and_collapse_warning():
  # σ1(W) 2.5 and 5 are above the floors of 4 x 4 and 3 x 3 matrices (2).
  params = {'big': jnp.eye(4) * 2.5, 'small': jnp.eye(4) * 100.0,
            'stack': jnp.stack([jnp.eye(3) * 5.0, jnp.eye(3) * 100.0])}
  tx = optax.chain(optax.sgd(1.0),
                   optax_spectral.scale_by_spectral_bound(tau=0.1))
  grads = {'big': jnp.ones((4, 4)), 'small': jnp.ones((4, 4)),
           'stack': jnp.ones((2, 3, 3))}
  _, state = tx.update(grads, tx.init(params), params)
  summary = diagnostics.bound_summary(state)
  # Step σ1 = 4 against τσ1(W) = 0.25 (bounded, factor 1/16) and 10 (not);
  # the stack: 3 against 0.5 (factor 1/6) and 10.
  assert summary['bound_fraction'] == 0.5
  np.testing.assert_allclose(summary['min_factor'], 0.25 / 4, rtol=1e-4)
  assert summary['min_factor_leaf'] == 'big'
  # One step so far: bounded on all recent steps, or none.
  assert summary['throttled_fraction'] == 0.5
  assert summary['most_throttled'] == 1.0
  assert summary['most_throttled_leaf'] == 'big'
  with pytest.warns(RuntimeWarning, match='collapsed at step 7'):
    assert diagnostics.warn_if_attention_collapsed(
        jnp.array([[1.0, 0.05]]), step=7)
  assert not diagnostics.warn_if_attention_collapsed(jnp.array([1.0, 0.5]))
