"""nnx.Optimizer integration, and the README/CI contract."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import optax_spectral
from conftest import allowed, sigma1

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(6, 16, rngs=rngs)
    self.layers = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(2)])
    self.out = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.hidden(x))
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return self.out(x)


def test_nnx_optimizer_bounds_every_kernel():
  model = MLP(nnx.Rngs(0))
  tau = 0.01
  optimizer = nnx.Optimizer(model, optax_spectral.adamw2(1.0, tau=tau),
                            wrt=nnx.Param)
  x = jnp.ones((8, 6))
  before = {k: np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(
      nnx.state(model, nnx.Param))[0] for k in [jax.tree_util.keystr(k)]}

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
    optimizer.update(model, grads)

  step(model, optimizer)
  after = {k: np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(
      nnx.state(model, nnx.Param))[0] for k in [jax.tree_util.keystr(k)]}
  stats = optax_spectral.spectral_stats(optimizer.opt_state)
  assert sorted(k for k in stats if k.endswith('/factor')) == [
      'hidden/kernel/factor', 'layers/0/kernel/factor',
      'layers/1/kernel/factor', 'out/kernel/factor']
  kernels = [k for k in before if 'kernel' in k]
  assert len(kernels) == 4
  for k in kernels:
    step_norm = sigma1(after[k] - before[k])
    # lr 1.0: the bound is active for every kernel (first step: the floor
    # ramps in over 1 / tau steps, so tau σ1(W) sets it). The first step's
    # σ1(W), 20 iterations from a random vector, may be a few percent low
    # on a random init (close top singular values): below, never above.
    limit = allowed(before[k], tau, step=0)
    assert 0.9 * limit <= step_norm <= 1.02 * limit, (k, step_norm, limit)
  bias = [k for k in before if 'bias' in k][0]
  # Not bounded, ramped: Adam's first step (1 per entry) times tau.
  np.testing.assert_allclose(np.abs(after[bias] - before[bias]).max(), tau,
                             rtol=1e-4)


def _readme_commands():
  with open(os.path.join(ROOT, 'README.md')) as f:
    return [line.strip() for line in f if line.startswith('    pip install')]


def test_readme_gives_two_commands_and_ci_runs_the_test_one():
  commands = _readme_commands()
  assert len(commands) == 2, commands
  demo, test = commands
  assert 'examples/compare.py' in demo and 'pytest' in test
  with open(os.path.join(ROOT, '.ci', 'run')) as f:
    ci = f.read()
  assert re.search(r'^' + re.escape(test) + r'$', ci, re.M), ci


def test_dependency_floors_are_the_versions_ci_tests():
  """Each ``>=`` floor in pyproject.toml is pinned in .ci/floors.txt, which
  .ci/run installs as constraints for a second test run."""
  import tomllib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    project = tomllib.load(f)['project']
  floors = {}
  for req in project['dependencies'] + [
      r for name, reqs in project['optional-dependencies'].items()
      if name in ('examples', 'test') for r in reqs]:
    m = re.fullmatch(r'([A-Za-z0-9_.-]+)>=([0-9.]+)', req)
    if m:
      floors[m[1].lower()] = m[2]
  with open(os.path.join(ROOT, '.ci', 'floors.txt')) as f:
    pins = dict(line.strip().lower().split('==') for line in f
                if '==' in line and not line.startswith('#'))
  assert {'jax', 'optax', 'flax', 'numpy'} <= set(floors)
  for name, version in floors.items():
    assert name in pins, f'{name} has a floor but .ci/floors.txt pins nothing'
    # 8.0 and 8.0.0 are the same version.
    norm = lambda v: tuple(int(x) for x in v.split('.')) + (0,) * (
        3 - len(v.split('.')))
    assert norm(pins[name]) == norm(version), (name, pins[name], version)
  with open(os.path.join(ROOT, '.ci', 'run')) as f:
    assert '-c .ci/floors.txt' in f.read()
