"""The default ``dimension_numbers`` on Flax's own layers: right for nnx.Linear,
nnx.Embed, nnx.MultiHeadAttention (by name), stacked or not; biases and norm
scales never bounded, whatever their rank; anything else read as a batch
over the last two axes, and said so once at ``init``."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_spectral
from conftest import allowed
from conftest import sigma1


class Block(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(32, 16, rngs=rngs)
    self.norm = nnx.LayerNorm(16, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=16,
                                       qkv_features=8, decode=False,
                                       rngs=rngs)
    self.mlp = nnx.Linear(16, 24, rngs=rngs)
    self.proj = nnx.LinearGeneral(16, (2, 3), rngs=rngs)
    self.einsum = nnx.Einsum('bi,hio->bho', (2, 16, 5), (2, 5), rngs=rngs)
    self.conv = nnx.Conv(3, 4, kernel_size=(3, 3), rngs=rngs)


def _described(model):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    tx = optax_spectral.adamw2(1e-3)
    tx.init(nnx.state(model, nnx.Param))
  return (optax_spectral.bounded_leaves(nnx.state(model, nnx.Param)),
          [str(w.message) for w in caught])


def test_flax_layers_by_default():
  described, warned = _described(Block(nnx.Rngs(0)))
  # By hand: (in, heads, head_dim) = (16, 2, 4) kernels are one 16 x 8
  # matrix; the out kernel (2, 4, 16) one 8 x 16 matrix.
  for p in ('query', 'key', 'value'):
    assert described[f'attn/{p}/kernel'] == 'bounded: 16x8 matrix'
    assert described[f'attn/{p}/bias'] == 'passed through: a bias or norm scale'
  assert described['attn/out/kernel'] == 'bounded: 8x16 matrix'
  assert described['mlp/kernel'] == 'bounded: 16x24 matrix'
  assert described['embed/embedding'] == 'bounded: 32x16 matrix'
  # LinearGeneral's (2, 3) bias and the norm's scale and bias: never.
  for name in ('proj/bias', 'norm/scale', 'norm/bias', 'einsum/bias',
               'mlp/bias', 'conv/bias'):
    assert described[name] == 'passed through: a bias or norm scale', name
  # Other N-D kernels are read over their last two axes, and init says so
  # once, naming them and the fix.
  assert described['conv/kernel'] == (
      'bounded: batch (3, 3) (axes (0, 1)) of 3x4 matrices')
  assert described['einsum/kernel'] == (
      'bounded: batch (2,) (axes (0,)) of 16x5 matrices')
  # LinearGeneral's (16, 2, 3) kernel is read wrong (16 matrices of 2 x 3):
  # the warning names it with the others, and the fix.
  assert described['proj/kernel'] == (
      'bounded: batch (16,) (axes (0,)) of 2x3 matrices')
  assert len(warned) == 1, warned
  for name in ('conv/kernel', 'einsum/kernel', 'proj/kernel',
               'nnx_dimension_numbers(model)'):
    assert name in warned[0]
  assert 'attn/' not in warned[0]


def test_scanned_attention_and_biases():
  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
                                  rngs=rngs)

  described, warned = _described(make(nnx.Rngs(0)))
  assert described['query/kernel'] == (
      'bounded: batch (3,) (axes (0,)) of 8x8 matrices')
  assert described['out/kernel'] == (
      'bounded: batch (3,) (axes (0,)) of 8x8 matrices')
  # A (layers, heads, head_dim) bias: not a batch of matrices.
  assert described['query/bias'] == 'passed through: a bias or norm scale'
  assert not warned


def test_the_default_bounds_attention_as_one_matrix(rng):
  """The query kernel's step, as one in x heads*head_dim matrix, is held to
  the bound (exact SVD), as nnx_dimension_numbers would hold it."""
  model = nnx.MultiHeadAttention(num_heads=2, in_features=16, decode=False,
                                 rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  # One 16 x 16 matrix, not 16 matrices of 2 x 8 (one per input feature).
  assert optax_spectral.bounded_leaves(params)['query/kernel'] == (
      'bounded: 16x16 matrix')
  w = np.asarray(params['query']['kernel'][...])
  tau = 0.02
  tx = optax_spectral.adamw2(1.0, tau=tau)
  grads = jax.tree.map(lambda p: jnp.asarray(
      rng.normal(size=p.shape), jnp.float32), params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  step = np.asarray(updates['query']['kernel'][...]).reshape(16, -1)
  limit = allowed(w.reshape(16, -1), tau, step=0)
  assert 0.9 * limit <= sigma1(step) <= 1.001 * limit, (sigma1(step), limit)


def test_silencing_and_explicit_specs():
  model = Block(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    optax_spectral.adamw2(1e-3, dimension_numbers=(
        optax_spectral.SpectralDimensionNumbers(-2, -1))).init(params)
    optax_spectral.adamw2(1e-3, dimension_numbers=(
        optax_spectral.nnx_dimension_numbers(model))).init(params)


def test_clear_errors():
  import optax  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='learning_rate must be >= 0'):
    optax_spectral.adamw2(-1e-3)
  # A schedule is not called at construction (tests/test_idioms.py), so a
  # negative one is not checked, as optax does not check it.
  optax_spectral.adamw2(optax.linear_schedule(-1.0, 0.0, 10))
  optax_spectral.adamw2(0.0)  # allowed: a warmup starts there
  injected = optax.inject_hyperparams(optax_spectral.adamw2)(
      learning_rate=1e-3)
  params = {'w': jnp.eye(3)}
  injected.update(params, injected.init(params), params)
  # Params that differ from init's: the message says how to recover.
  tx = optax_spectral.adamw2(1e-3)
  state = tx.init(params)
  other = {'w': jnp.eye(4)}
  with pytest.raises(ValueError, match=r'state = tx.init\(params\)'):
    tx.update(other, state, other)
