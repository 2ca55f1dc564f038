"""adamw2 under jax.jit with sharded params, on 8 simulated CPU devices."""

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

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason='needs 8 devices: conftest sets XLA_FLAGS '
    'before jax is imported; run pytest from the repository root')

SPECS = {
    'rows': P('fsdp', None),         # FSDP: contracted axis of Wᵀu sharded
    'cols': P(None, 'tp'),
    'both': P('fsdp', 'tp'),
    'stack': P(None, 'tp', 'fsdp'),  # (layers, d_in, d_out)
    'bias': P('tp'),
}


def _params(rng):
  shapes = {'rows': (32, 16), 'cols': (16, 24), 'both': (24, 32),
            'stack': (3, 8, 16), 'bias': (16,)}
  return {k: jnp.asarray(rng.normal(size=s) * 0.5, jnp.float32)
          for k, s in shapes.items()}


def _grads(params, i):
  return jax.tree.map(lambda p: jnp.sin(3.0 * p + i), params)


def _train(params, steps=3, jit=True):
  tx = optax_spectral.adamw2(0.1, tau=0.05)
  state = tx.init(params)

  def step(p, s, i):
    u, s = tx.update(_grads(p, i), s, p)
    return optax.apply_updates(p, u), s

  step = jax.jit(step) if jit else step
  types = [jax.tree.map(jax.typeof, state)]
  specs = []
  for i in range(steps):
    params, state = step(params, state, jnp.float32(i))
    types.append(jax.tree.map(jax.typeof, state))
    specs.append(jax.tree.map(lambda x: getattr(x.sharding, 'spec', None),
                              params))
  return params, types, specs


@pytest.mark.parametrize('axis_type', [AxisType.Explicit, AxisType.Auto])
@pytest.mark.parametrize('jit', [
    True, pytest.param(False, marks=pytest.mark.slow)])
def test_sharded_equals_unsharded(rng, axis_type, jit):
  params = _params(rng)
  expected, _, _ = _train(params, jit=jit)
  mesh = jax.make_mesh((4, 2), ('fsdp', 'tp'), axis_types=(axis_type,) * 2)
  with jax.set_mesh(mesh):
    sharded = {k: jax.device_put(v, NamedSharding(mesh, SPECS[k]))
               for k, v in params.items()}
    out, types, specs = _train(sharded, jit=jit)
  for k in params:
    np.testing.assert_allclose(out[k], expected[k], rtol=2e-5, atol=1e-6)
  strip = lambda spec: tuple(spec) + (None,) * (3 - len(spec))
  for step_specs in specs:  # every param keeps its PartitionSpec
    assert {k: strip(v) for k, v in step_specs.items()} == {
        k: strip(v) for k, v in SPECS.items()}
  # The optax convention: the state's type (shape, dtype, and under
  # Explicit axes, sharding) is the same after init and after each update.
  assert types[1] == types[2] == types[3]
  if axis_type == AxisType.Explicit and jit:
    assert types[0] == types[1]


@pytest.mark.parametrize('axis_type', [
    pytest.param(AxisType.Explicit, marks=pytest.mark.slow), AxisType.Auto])
def test_fsdp_matrix_is_never_gathered(axis_type):
  """The compiled update moves vectors between devices, never a matrix."""
  mesh = jax.make_mesh((8,), ('fsdp',), axis_types=(axis_type,))
  m, n = 1024, 256
  with jax.set_mesh(mesh):
    w = jax.device_put(jnp.ones((m, n)) * 0.01,
                       NamedSharding(mesh, P('fsdp', None)))
    params = {'w': w}
    tx = optax_spectral.adamw2(1e-3)
    state = tx.init(params)
    hlo = jax.jit(lambda g, s, p: tx.update(g, s, p)).lower(
        params, state, params).compile().as_text()
  collectives = [line for line in hlo.splitlines()
                 if any(op in line for op in ('all-gather(', 'all-reduce(',
                                              'all-to-all(',
                                              'collective-permute('))]
  assert collectives, 'expected vector all-reduces'
  for line in collectives:
    shape = line.split('=')[1].split('{')[0]
    dims = [int(d) for d in shape[shape.index('[') + 1:shape.index(']')]
            .split(',') if d.strip()]
    assert np.prod(dims, dtype=int) < m * n // 8, line


class _PartitionedMLP:
  """Built inside a function so that flax is only needed by this test."""

  @staticmethod
  def make(rngs):
    from flax import nnx  # pylint: disable=g-import-not-at-top

    class MLP(nnx.Module):

      def __init__(self, rngs):
        init = nnx.initializers.lecun_normal()
        part = nnx.with_partitioning
        self.l1 = nnx.Linear(
            16, 32, kernel_init=part(init, ('fsdp', 'tp')),
            bias_init=part(nnx.initializers.zeros_init(), ('tp',)),
            rngs=rngs)
        self.l2 = nnx.Linear(32, 8, kernel_init=part(init, ('tp', 'fsdp')),
                             rngs=rngs)

      def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)), out_sharding=P())

    return MLP(rngs)


@pytest.mark.parametrize('axis_type', [
    pytest.param(AxisType.Explicit, marks=pytest.mark.slow), AxisType.Auto])
def test_nnx_partitioned_model_trains_and_checkpoints(tmp_path, axis_type):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16)), jnp.float32)

  def train(model):
    optimizer = nnx.Optimizer(model, optax_spectral.adamw2(0.05, tau=0.02),
                              wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
      loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)
      optimizer.update(model, grads)
      return loss

    return optimizer, [float(step(model, optimizer)) for _ in range(4)]

  # The reference: the same model on one device (annotated variables need a
  # mesh to be created at all).
  single = jax.make_mesh((1, 1), ('fsdp', 'tp'), axis_types=(axis_type,) * 2,
                         devices=jax.devices()[:1])
  with jax.set_mesh(single):
    _, expected = train(_PartitionedMLP.make(nnx.Rngs(0)))
  mesh = jax.make_mesh((4, 2), ('fsdp', 'tp'), axis_types=(axis_type,) * 2)
  with jax.set_mesh(mesh):
    model = _PartitionedMLP.make(nnx.Rngs(0))
    optimizer, losses = train(model)
    assert model.l1.kernel[...].sharding.spec == P('fsdp', 'tp')
    assert model.l2.kernel[...].sharding.spec == P('tp', 'fsdp')
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert optax_spectral.spectral_stats(optimizer.opt_state)[
        'l1/kernel/factor'].shape == ()

    state = nnx.state(optimizer)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp_path / 'ckpt', state)
    checkpointer.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = checkpointer.restore(tmp_path / 'ckpt', abstract)
  saved, loaded = jax.tree.leaves(state), jax.tree.leaves(restored)
  assert len(saved) == len(loaded) > 10
  for a, b in zip(saved, loaded):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding.is_equivalent_to(b.sharding, a.ndim)


@pytest.mark.parametrize('structure', ['cpu', 'accelerators'])
def test_same_shape_matrices_with_different_shardings(rng, structure,
                                                      monkeypatch):
  """Same-shaped matrices sharded differently on an Explicit mesh are not
  stacked together (JAX refuses to): the update equals the unsharded one.
  Stacking is what accelerators run (CPUs multiply each matrix in place)."""
  monkeypatch.setattr(_power_iteration, 'launches_are_cheap',
                      lambda: structure == 'cpu')
  w = {k: jnp.asarray(rng.normal(size=(8, 6)), jnp.float32) for k in 'abc'}
  g = {k: jnp.asarray(rng.normal(size=(8, 6)), jnp.float32) for k in 'abc'}
  tx = optax_spectral.adamw2(0.5)
  expected, _ = jax.jit(tx.update)(g, tx.init(w), w)
  mesh = jax.make_mesh((2,), ('x',), axis_types=(AxisType.Explicit,),
                       devices=jax.devices()[:2])
  specs = {'a': P('x', None), 'b': P(None, 'x'), 'c': P('x', None)}
  with jax.set_mesh(mesh):
    put = lambda t: {k: jax.device_put(v, NamedSharding(mesh, specs[k]))
                     for k, v in t.items()}
    ws, gs = put(w), put(g)
    got, state = jax.jit(tx.update)(gs, tx.init(ws), ws)
  assert min(float(f) for k, f in optax_spectral.spectral_stats(
      state).items() if k.endswith('/factor')) < 1, 'bound should be active'
  for k in 'abc':
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-7)
    assert got[k].sharding.spec == specs[k]
