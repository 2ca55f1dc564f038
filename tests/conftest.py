"""Shared test helpers: planted-spectrum matrices and exact σ1."""

import os
import re

# Eight simulated CPU devices for the sharding tests; must precede `import
# jax`. Single-device tests run on the first device as usual.
if 'xla_force_host_platform_device_count' not in os.environ.get(
    'XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8')
# The tests' programs are tiny, and compiling them is most of the suite's
# time: without LLVM's optimisations XLA:CPU compiles them ~35% faster, and
# they run slower by less than that saves. Numerics are XLA's either way
# (its fast-math settings do not change). CI also runs every test at the
# default level (.ci/run); XLA_FLAGS that set a level win.
if 'xla_backend_optimization_level' not in os.environ['XLA_FLAGS']:
  os.environ['XLA_FLAGS'] += ' --xla_backend_optimization_level=0'
# XLA:CPU's MLIR fusion emitters spend ~14 ms compiling each fusion, which
# for these tiny programs is most of a compile; its older LLVM IR emitters
# compile them about twice as fast (adamw2's update on a 2-layer model:
# 2.6 -> 1.3 s). Same HLO and the same fusions; floats may differ in the
# last bits (FMA contraction). CI's level-3 run keeps the default emitters.
# jaxlib 0.11 removed the flag, and XLA aborts the process on an unknown
# flag: only older jaxlibs get it.
def _jaxlib_before(major: int, minor: int) -> bool:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  version = re.findall(r'\d+', metadata.version('jaxlib'))[:2]
  return tuple(int(v) for v in version) < (major, minor)


if 'xla_cpu_use_fusion_emitters' not in os.environ['XLA_FLAGS'] and (
    'xla_backend_optimization_level=0' in os.environ['XLA_FLAGS']) and (
        _jaxlib_before(0, 11)):
  os.environ['XLA_FLAGS'] += ' --xla_cpu_use_fusion_emitters=false'

# Compiled programs are shared by all tests of a run (both xdist workers and
# subprocesses inherit the directory): several tests compile the same train
# step or update, and XLA:CPU compiles are most of the suite's time. One
# fresh directory per run, removed at its end, so each run starts cold.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  _cache = tempfile.mkdtemp(prefix='optax_spectral_tests_xla_')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5',
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest


def subprocess_env(devices: int) -> dict:
  """The environment for a test's Python subprocess: this run's XLA flags
  and compilation cache, with ``devices`` simulated CPU devices."""
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                 os.environ['XLA_FLAGS'])
  return dict(os.environ, XLA_FLAGS=(
      f'{flags} --xla_force_host_platform_device_count={devices}'))


def planted(rng, shape, top=3.0, rest=1.0):
  """A random batch of matrices with σ1 = top and other σ <= rest."""
  *batch, m, n = shape
  k = min(m, n)
  out = np.empty(shape)
  for idx in np.ndindex(*batch):
    u, _ = np.linalg.qr(rng.normal(size=(m, k)))
    v, _ = np.linalg.qr(rng.normal(size=(n, k)))
    s = np.concatenate([[top], rng.uniform(0.1, rest, k - 1)])
    out[idx] = (u * s) @ v.T
  return out


def sigma1(x):
  """Exact σ1 over the last two axes, in float64."""
  return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)[..., 0]


def floor_sigma(shape, weight_floor=1.0):
  """The floor of the σ1(W) in the bound: ``weight_floor`` times σ1 of a
  LeCun-normal ``rows x cols`` matrix, ``1 + sqrt(cols / rows)`` (the
  Marchenko–Pastur edge; checked against numpy in test_transform)."""
  rows, cols = shape[-2:]
  return weight_floor * (1 + np.sqrt(cols / rows))


def ramp(step, length):
  """The fraction of the floor (and of the uncovered leaves' steps) on the
  0-based ``step`` of a ramp over ``length`` steps: ``(step + 1) / length``,
  at most 1."""
  return min(1.0, (step + 1) / length)


def allowed(w, tau, weight_floor=1.0, step=None):
  """The largest step σ1 the bound allows a matrix ``w`` (batch over the
  leading axes), from an exact SVD; on 0-based ``step`` of the default ramp
  (over ``1 / tau`` steps), or after it when ``step`` is None."""
  floor = floor_sigma(np.shape(w), weight_floor)
  if step is not None:
    floor = floor * ramp(step, 1 / tau)
  return tau * np.maximum(sigma1(w), floor)


@pytest.fixture
def rng():
  return np.random.default_rng(0)


@pytest.fixture
def one_device(monkeypatch):
  """The examples' mesh on one device: for tests of what a training run
  computes rather than how it is sharded (on 8 simulated devices on 2 cores
  each step costs several times more). The sharding of the examples is
  tested on all 8 (test_examples, test_sharding)."""
  import jax  # pylint: disable=g-import-not-at-top
  import common  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(common, 'make_mesh', lambda: jax.make_mesh(
      (1,), (common.AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
      devices=jax.devices()[:1]))


@pytest.fixture(autouse=True)
def cpu_structure(monkeypatch):
  """Every test runs the structure CPUs run (one loop; the first step's
  iterations on Δ from a cold start), whatever the device, so that a test
  means the same on a GPU: there the compiled update has no control flow and
  bounds the first step with ‖Δ‖_F, and one-step comparisons with an exact
  SVD would not hold. Tests of the accelerators' structure patch
  ``launches_are_cheap`` themselves (after this fixture, so theirs wins)."""
  from optax_spectral import _power_iteration  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(_power_iteration, 'launches_are_cheap', lambda: True)
