"""linen_dimension_numbers: the matrices of Flax linen modules, from the
modules."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_spectral
from optax_spectral import SpectralDimensionNumbers as D
from conftest import allowed, sigma1


def _params(model, *args):
  """The model's params as shapes only (nothing to compile or allocate)."""
  return jax.eval_shape(model.init, jax.random.key(0), *args)['params']


def _specs(dims):
  """``{'a/b/kernel': spec}``, Nones included."""
  leaves = jax.tree_util.tree_flatten_with_path(
      dims, is_leaf=lambda x: x is None or isinstance(x, D))[0]
  return {jax.tree_util.keystr(p, simple=True, separator='/'): s
          for p, s in leaves}


def _described(model, *args):
  dims = optax_spectral.linen_dimension_numbers(model, *args)
  return _specs(dims), optax_spectral.bounded_leaves(_params(model, *args),
                                                     dims)


def test_attention_kernels_are_whole_matrices():
  model = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32,
                                          out_features=12)
  x = jnp.zeros((1, 3, 16))
  shapes = jax.tree.map(lambda a: a.shape, _params(model, x))
  assert shapes['query']['kernel'] == (16, 4, 8)  # (in, heads, head_dim)
  assert shapes['out']['kernel'] == (4, 8, 12)  # (heads, head_dim, out)
  specs, how = _described(model, x)
  for name in ('query', 'key', 'value'):
    assert specs[f'{name}/kernel'] == D(0, (1, 2))
    assert how[f'{name}/kernel'] == 'bounded: 16x32 matrix', how
    assert specs[f'{name}/bias'] is None
    assert how[f'{name}/bias'].startswith('passed through')
  assert specs['out/kernel'] == D((0, 1), 2)
  assert how['out/kernel'] == 'bounded: 32x12 matrix', how


class _Block(nn.Module):
  @nn.compact
  def __call__(self, ids, x, image, seq):
    e = nn.Embed(50, 8, name='embed')(ids)
    h = nn.LayerNorm(name='norm')(e)
    h = nn.RMSNorm(name='rms')(h)
    nn.Dense(24, name='fc')(h)
    nn.DenseGeneral(10, axis=(-2, -1), name='general')(x)  # (2, 4) -> 10
    # batch_dims: one (6 -> (2, 3)) kernel per index of x's leading axis.
    nn.DenseGeneral((2, 3), batch_dims=(0,), name='batched')(
        jnp.zeros((5, 7, 6)))
    nn.Einsum((4, 8, 6), 'bhi,hio->bho', name='einsum')(
        jnp.zeros((2, 4, 8)))
    # The equation given at the call instead of to the constructor.
    nn.Einsum((8, 6), name='einsum_at_call')(jnp.zeros((2, 8)),
                                             'bi,io->bo')
    nn.Conv(5, (3, 3), name='conv')(image)  # 3 channels in
    nn.Conv(4, 3, name='conv1d')(seq)  # int kernel_size: 1-D, 2 channels in
    nn.ConvTranspose(5, (2, 2), name='deconv')(image)
    return e


def test_module_types():
  args = (jnp.zeros((2, 3), jnp.int32), jnp.zeros((2, 2, 4)),
          jnp.zeros((1, 6, 6, 3)), jnp.zeros((1, 6, 2)))
  specs, how = _described(_Block(), *args)
  expected = {
      'embed/embedding': (D(0, 1), 'bounded: 50x8 matrix'),
      'norm/scale': (None, None), 'norm/bias': (None, None),
      'rms/scale': (None, None),
      'fc/kernel': (D(0, 1), 'bounded: 8x24 matrix'),
      'fc/bias': (None, None),
      'general/kernel': (D((0, 1), 2), 'bounded: 8x10 matrix'),
      'batched/kernel': (D(1, (2, 3)),
                         'bounded: batch (5,) (axes (0,)) of 6x6 matrices'),
      'batched/bias': (None, None),
      # Heads are in the input, kernel and output: a batch of 8x6 matrices.
      'einsum/kernel': (D(1, 2),
                        'bounded: batch (4,) (axes (0,)) of 8x6 matrices'),
      'einsum/bias': (None, None),
      'einsum_at_call/kernel': (D(0, 1), 'bounded: 8x6 matrix'),
      'conv/kernel': (D((0, 1, 2), 3), 'bounded: 27x5 matrix'),  # 3·3·3
      'conv1d/kernel': (D((0, 1), 2), 'bounded: 6x4 matrix'),  # 3·2
      'deconv/kernel': (D((0, 1, 2), 3), 'bounded: 12x5 matrix'),  # 2·2·3
  }
  for path, (spec, description) in expected.items():
    assert specs[path] == spec, (path, specs[path])
    if description is None:
      assert how[path].startswith('passed through'), (path, how[path])
    else:
      assert how[path] == description, (path, how[path])
  assert set(specs) == set(expected) | {
      'general/bias', 'einsum_at_call/bias', 'conv/bias', 'conv1d/bias',
      'deconv/bias'}
  assert all(specs[p] is None for p in set(specs) - set(expected))


class _Layer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name='attn')(
        nn.LayerNorm(name='norm')(x))
    return nn.Dense(8, name='fc')(nn.Dense(16, name='up')(x)), None


class _Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    layers = nn.scan(_Layer, variable_axes={'params': 0},
                     split_rngs={'params': True}, length=3)
    return layers(name='layers')(x, None)[0]


def test_scan_stacked_layers_are_bounded_per_layer():
  x = jnp.zeros((1, 4, 8))
  shapes = jax.tree.map(lambda a: a.shape, _params(_Stack(), x))['layers']
  # nn.scan puts the layer axis first, under the scanned module's own name.
  assert shapes['attn']['query']['kernel'] == (3, 8, 2, 4)
  assert shapes['norm']['scale'] == (3, 8)
  specs, how = _described(_Stack(), x)
  assert specs['layers/attn/query/kernel'] == D(1, (2, 3))
  assert how['layers/attn/query/kernel'] == (
      'bounded: batch (3,) (axes (0,)) of 8x8 matrices')
  assert specs['layers/attn/out/kernel'] == D((1, 2), 3)
  assert how['layers/up/kernel'] == (
      'bounded: batch (3,) (axes (0,)) of 8x16 matrices')
  # Stacked biases and scales are 2-D, but are not matrices.
  for path in ('layers/norm/scale', 'layers/norm/bias', 'layers/fc/bias',
               'layers/attn/query/bias'):
    assert specs[path] is None, path
    assert how[path].startswith('passed through'), path


class _Custom(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param('w', nn.initializers.ones, (3, 4, 5))
    self.param('v', nn.initializers.ones, (5,))
    return nn.Dense(2)(x) + jnp.sum(w)


class _TwoCustoms(nn.Module):
  @nn.compact
  def __call__(self, x):
    return _Custom()(x) + _Custom()(x)


def test_unknown_modules_fall_back_to_the_default_with_one_warning():
  x = jnp.zeros((1, 3))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    specs, how = _described(_TwoCustoms(), x)
  assert len(caught) == 1, [str(w.message) for w in caught]
  assert "['_Custom']" in str(caught[0].message)
  assert specs['_Custom_0/w'] == D(-2, -1)
  assert how['_Custom_1/w'] == (
      'bounded: batch (3,) (axes (0,)) of 4x5 matrices')
  assert specs['_Custom_0/v'] is None
  assert how['_Custom_0/Dense_0/kernel'] == 'bounded: 3x2 matrix'

  with warnings.catch_warnings():
    warnings.simplefilter('error')
    dims = optax_spectral.linen_dimension_numbers(_TwoCustoms(), x,
                                                  unknown='skip')
    optax_spectral.linen_dimension_numbers(nn.Dense(2), x)
  how = optax_spectral.bounded_leaves(_params(_TwoCustoms(), x), dims)
  assert how['_Custom_0/w'].startswith('passed through')
  assert how['_Custom_0/Dense_0/kernel'] == 'bounded: 3x2 matrix'
  # nn.vmap's wrapper class ('Vmap_Custom') is called at the same path as the
  # module it wraps; the warning names the module.
  stacked = nn.vmap(_Custom, variable_axes={'params': 0},
                    split_rngs={'params': True})()
  with pytest.warns(UserWarning, match=r"types \['_Custom'\];"):
    specs = _specs(optax_spectral.linen_dimension_numbers(
        stacked, jnp.zeros((2, 1, 3))))
  assert specs['w'] == D(-2, -1)
  assert specs['Dense_0/kernel'] == D(1, 2)  # (2, 3, 2): one 3x2 per index
  with pytest.raises(ValueError, match='unknown'):
    optax_spectral.linen_dimension_numbers(_Custom(), x, unknown='bound')


def test_attention_step_is_bounded_as_a_whole_matrix():
  """σ1 of the whole in × heads·head_dim query step, by exact SVD, is at
  most τ max(σ1(W), floor) (the default would bound per-row blocks)."""
  tau = 0.02
  model = nn.MultiHeadDotProductAttention(num_heads=4)
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  params = model.init(jax.random.key(0), x)['params']
  tx = optax_spectral.adamw2(
      1.0, tau=tau, num_iterations_first=50, max_extrapolation=0.0,
      dimension_numbers=optax_spectral.linen_dimension_numbers(model, x))

  @jax.jit
  def step(params):
    grads = jax.grad(lambda p: jnp.sum(model.apply({'params': p}, x) ** 2))(
        params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates)

  before = np.asarray(params['query']['kernel']).reshape(16, -1)
  after = np.asarray(step(params)['query']['kernel']).reshape(16, -1)
  # The first step's bound: τ max(σ1(W), floor), the floor ramped (step 0).
  ratio = sigma1(after - before) / allowed(before, tau, step=0)
  assert 0.98 < ratio < 1.001, ratio
