"""``bound=``: which matrices adamw2 bounds. Attention projections are found
by their modules' names, in Flax's own layers and in hand-written attention;
matrices left out take plain AdamW steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import allowed
from conftest import sigma1

import optax_spectral

# (leaf names of a model, the attention projections among them), by hand.
MODELS = {
    'flax nnx MultiHeadAttention': (
        ['blocks/0/attn/query/kernel', 'blocks/0/attn/key/kernel',
         'blocks/0/attn/value/kernel', 'blocks/0/attn/out/kernel',
         'blocks/0/mlp/linear1/kernel', 'blocks/0/mlp/linear2/kernel',
         'head/kernel'],
        {'query', 'key', 'value', 'out'}),
    'nanoGPT': (
        ['h/0/attn/c_attn/kernel', 'h/0/attn/c_proj/kernel',
         'h/0/mlp/c_fc/kernel', 'h/0/mlp/c_proj/kernel', 'wte/embedding'],
        {'h/0/attn/c_attn', 'h/0/attn/c_proj'}),
    'this repository\'s examples': (
        ['blocks/layers/0/qkv/kernel', 'blocks/layers/0/proj/kernel',
         'blocks/layers/0/fc/kernel', 'blocks/layers/0/fc_out/kernel',
         'wte/embedding'],
        {'qkv', 'layers/0/proj'}),
    'Hugging Face Llama': (
        ['model/layers/0/self_attn/q_proj/kernel',
         'model/layers/0/self_attn/k_proj/kernel',
         'model/layers/0/self_attn/v_proj/kernel',
         'model/layers/0/self_attn/o_proj/kernel',
         'model/layers/0/mlp/gate_proj/kernel',
         'model/layers/0/mlp/up_proj/kernel',
         'model/layers/0/mlp/down_proj/kernel', 'lm_head/kernel'],
        {'q_proj', 'k_proj', 'v_proj', 'o_proj'}),
    'Llama as plain dicts': (
        ['layers/0/wq', 'layers/0/wk', 'layers/0/wv', 'layers/0/wo',
         'layers/0/w1', 'layers/0/w2', 'layers/0/w3', 'embed', 'head'],
        {'wq', 'wk', 'wv', 'wo'}),
    'Flax gemma': (
        ['layer_0/attn/q_einsum/w', 'layer_0/attn/kv_einsum/w',
         'layer_0/attn/attn_vec_einsum/w', 'layer_0/mlp/gating_einsum',
         'layer_0/mlp/linear', 'embedder/input_embedding'],
        {'q_einsum', 'kv_einsum', 'attn_vec_einsum'}),
    'an MLP whose output is named out': (
        ['mlp/hidden/kernel', 'mlp/out/kernel', 'classifier/kernel'], set()),
}


def _tree(names, shape=(8, 8)):
  tree = {}
  for name in names:
    node = tree
    *parents, leaf = name.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.zeros(shape)
  return tree


@pytest.mark.parametrize('model', sorted(MODELS))
def test_attention_projections_are_found_by_name(model):
  names, attention = MODELS[model]
  described = optax_spectral.bounded_leaves(_tree(names), bound='attention')
  got = {n for n, how in described.items() if how.startswith('bounded')}
  want = {n for n in names if any(f'/{a}/' in f'/{n}/' for a in attention)}
  assert got == want, (got, want)
  for name in set(names) - want:
    assert described[name].startswith('not bounded'), described[name]
  # 'all' (the default) bounds every matrix.
  assert all(how.startswith('bounded') for how in
             optax_spectral.bounded_leaves(_tree(names)).values())


def test_flax_multihead_attention_is_found():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Block(nnx.Module):

    def __init__(self, rngs):
      self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8,
                                         decode=False, rngs=rngs)
      self.mlp = nnx.Linear(8, 16, rngs=rngs)

  model = Block(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  dims = optax_spectral.nnx_dimension_numbers(model)
  described = optax_spectral.bounded_leaves(params, dims, bound='attention')
  assert {n for n, how in described.items() if how.startswith('bounded')} == {
      f'attn/{p}/kernel' for p in ('query', 'key', 'value', 'out')}
  assert described['mlp/kernel'].startswith('not bounded')


def test_left_out_matrices_take_plain_adamw_steps(rng):
  """With bound='attention' the MLP's update is optax.adamw's, unramped,
  while the attention projection's step is held to the bound (exact SVD)."""
  params = {'attn': {'qkv': {'kernel': jnp.asarray(
      rng.normal(size=(16, 48)) * 0.25, jnp.float32)}},
            'mlp': {'fc': {'kernel': jnp.asarray(
                rng.normal(size=(16, 64)) * 0.25, jnp.float32)}}}
  grads = jax.tree.map(lambda p: jnp.asarray(
      rng.normal(size=p.shape), jnp.float32), params)
  tau, lr = 0.02, 0.1
  tx = optax_spectral.adamw2(lr, tau=tau, weight_decay=0.0,
                             bound='attention')
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  want, _ = optax.adamw(lr, weight_decay=0.0).update(
      grads, optax.adamw(lr, weight_decay=0.0).init(params), params)
  np.testing.assert_allclose(updates['mlp']['fc']['kernel'],
                             want['mlp']['fc']['kernel'], rtol=1e-6)
  w = params['attn']['qkv']['kernel']
  step = sigma1(updates['attn']['qkv']['kernel'])
  assert step <= allowed(w, tau, step=0) * 1.001, (step, allowed(w, tau, 0))
  # Unbounded, the same step would be far larger.
  assert sigma1(want['attn']['qkv']['kernel']) > 5 * step


def test_bound_predicate_and_bad_values():
  tree = _tree(['a/kernel', 'b/kernel'])
  described = optax_spectral.bounded_leaves(
      tree, bound=lambda name: name.startswith('a'))
  assert described['a/kernel'].startswith('bounded')
  assert described['b/kernel'].startswith('not bounded')
  with pytest.raises(ValueError, match='bound must be'):
    optax_spectral.adamw2(1e-3, bound='mlp')
