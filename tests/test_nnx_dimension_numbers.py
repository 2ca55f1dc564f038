"""nnx_dimension_numbers: the matrices of Flax NNX modules, from the modules."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_spectral
from conftest import allowed, sigma1


def _abstract(make):
  """The module built with shapes only (``nnx_dimension_numbers`` reads no
  values): no random init to compile."""
  return nnx.eval_shape(make)


def _described(model):
  dims = optax_spectral.nnx_dimension_numbers(model)
  return optax_spectral.bounded_leaves(nnx.state(model, nnx.Param), dims)


def test_attention_kernels_are_whole_matrices():
  model = _abstract(lambda: nnx.MultiHeadAttention(
      num_heads=4, in_features=16, qkv_features=32, out_features=12,
      decode=False, rngs=nnx.Rngs(0)))
  how = _described(model)
  for name in ('query', 'key', 'value'):
    assert how[f'{name}/kernel'] == 'bounded: 16x32 matrix', how
    assert how[f'{name}/bias'].startswith('passed through')
  assert how['out/kernel'] == 'bounded: 32x12 matrix', how


class _Block(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.fc = nnx.Linear(8, 24, rngs=rngs)
    self.conv = nnx.Conv(3, 5, (3, 3), rngs=rngs)
    self.embed = nnx.Embed(50, 8, rngs=rngs)
    self.einsum = nnx.Einsum('bhi,hio->bho', (4, 8, 6), rngs=rngs)
    self.general = nnx.LinearGeneral((2, 4), 10, axis=(-2, -1), rngs=rngs)


def test_module_types():
  how = _described(_abstract(lambda: _Block(nnx.Rngs(0))))
  assert how['fc/kernel'] == 'bounded: 8x24 matrix'
  assert how['fc/bias'].startswith('passed through')
  assert how['norm/scale'].startswith('passed through')
  assert how['norm/bias'].startswith('passed through')
  assert how['conv/kernel'] == 'bounded: 27x5 matrix'  # 3·3 taps · 3 in
  assert how['embed/embedding'] == 'bounded: 50x8 matrix'
  # Heads appear in input, kernel and output: a batch of 8x6 matrices.
  assert how['einsum/kernel'] == (
      'bounded: batch (4,) (axes (0,)) of 8x6 matrices'), how['einsum/kernel']
  assert how['general/kernel'] == 'bounded: 8x10 matrix'


def test_stacked_layers_are_bounded_per_layer():
  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
                                  rngs=rngs)
  how = _described(_abstract(lambda: make(nnx.Rngs(0))))
  assert how['query/kernel'] == (
      'bounded: batch (3,) (axes (0,)) of 8x8 matrices'), how['query/kernel']
  assert how['out/kernel'] == (
      'bounded: batch (3,) (axes (0,)) of 8x8 matrices'), how['out/kernel']
  assert how['query/bias'].startswith('passed through')


class _Custom(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.ones((3, 4, 5)))


def test_unknown_modules_fall_back_to_the_default_with_a_warning():
  with pytest.warns(UserWarning, match='_Custom'):
    how = _described(_Custom())
  assert how['w'] == 'bounded: batch (3,) (axes (0,)) of 4x5 matrices'
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    _described(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
    dims = optax_spectral.nnx_dimension_numbers(_Custom(), unknown='skip')
  assert optax_spectral.bounded_leaves(
      nnx.state(_Custom(), nnx.Param), dims)['w'].startswith('passed through')
  with pytest.raises(ValueError, match='unknown'):
    optax_spectral.nnx_dimension_numbers(_Custom(), unknown='bound')


def test_attention_step_is_bounded_as_a_whole_matrix():
  """With nnx.Optimizer: σ1 of the whole d × heads·head_dim query step, by
  exact SVD, is at most τ σ1(W) (the default bounds per-row blocks)."""
  tau = 0.02
  model = nnx.MultiHeadAttention(num_heads=4, in_features=16, decode=False,
                                 rngs=nnx.Rngs(0))
  tx = optax_spectral.adamw2(
      1.0, tau=tau, num_iterations_first=50, max_extrapolation=0.0,
      dimension_numbers=optax_spectral.nnx_dimension_numbers(model))
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  before = np.asarray(model.query.kernel[...]).reshape(16, -1)

  @nnx.jit
  def step(model, opt):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    opt.update(model, grads)

  step(model, opt)
  after = np.asarray(model.query.kernel[...]).reshape(16, -1)
  ratio = sigma1(after - before) / allowed(before, tau)
  assert 0.98 < ratio < 1.001, ratio
