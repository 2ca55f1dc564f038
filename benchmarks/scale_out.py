"""Sharded at scale, compile only: adamw2 against optax.adamw per device.

    python benchmarks/scale_out.py            # ~10 minutes on 2 CPU cores
    python benchmarks/scale_out.py --quick    # a few configs (CI's test)
    python benchmarks/scale_out.py --idioms   # set_mesh / shardings alone /
                                              # with mesh:, f32 and bf16

Builds Llama-like param trees as abstract arrays (``jax.ShapeDtypeStruct``
with a ``NamedSharding``: nothing is allocated) at 1B, 8B and 70B shapes, as
a Python list of layers and as scanned (stacked) layers, on simulated CPU
devices over fsdp-only and fsdp x tp meshes, with Auto and Explicit axes;
compiles ``optax.apply_updates(params, tx.update(grads, state, params))``
(params and state donated, as a training loop does) for ``optax.adamw`` and
``optax_spectral.adamw2`` (and ``optax.contrib.muon`` as a reference), each
with the structure GPUs/TPUs compile (``_power_iteration.launches_are_cheap``
False: stacked groups where allowed, unrolled iteration) and the CPUs' one;
and a whole training step of the GPT example at ~1B shapes. Reports, per
config and per device: the temp memory over adamw's (as a multiple of the
per-device param bytes), the peak memory, the optimizer-state bytes, the
collectives by kind (count and bytes; and whether any all-gather moves a
matrix), and the compile time, each against adamw compiled the same way.

Writes benchmarks/results/cpu-scale_out{,-quick}.{md,json}.
"""

import argparse
import dataclasses
import json
import os
import re
import sys
import time

DEVICES = 64


def _set_devices(n: int) -> None:
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                 os.environ.get('XLA_FLAGS', ''))
  os.environ['XLA_FLAGS'] = (
      f'{flags} --xla_force_host_platform_device_count={n}')


if __name__ == '__main__':
  _set_devices(DEVICES)

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import AxisType  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position

import optax_spectral  # pylint: disable=g-import-not-at-top,wrong-import-position
from optax_spectral import _power_iteration  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclasses.dataclass(frozen=True)
class Shape:
  """A Llama-like decoder: grouped-query attention, SwiGLU MLP, untied
  embedding and head, RMS norm scales."""
  layers: int
  d: int
  kv: int       # width of the key and value projections
  mlp: int
  vocab: int = 128256


SHAPES = {
    '1B': Shape(16, 2048, 512, 8192),     # Llama-3.2-1B
    '8B': Shape(32, 4096, 1024, 14336),   # Llama-3-8B
    '70B': Shape(80, 8192, 1024, 28672),  # Llama-3-70B
    'test': Shape(2, 1024, 256, 2048, 2048),
}

# Column-parallel projections shard their output on 'tp', row-parallel
# their input (Megatron); fsdp takes the other axis. Norm scales replicated.
_COLUMN = ('wq', 'wk', 'wv', 'w1', 'w3')
_ROW = ('wo', 'w2')


def _layer_shapes(s: Shape) -> dict:
  return {'wq': (s.d, s.d), 'wk': (s.d, s.kv), 'wv': (s.d, s.kv),
          'wo': (s.d, s.d), 'w1': (s.d, s.mlp), 'w3': (s.d, s.mlp),
          'w2': (s.mlp, s.d), 'attn_norm': (s.d,), 'mlp_norm': (s.d,)}


def _spec(name: str, tp: bool) -> tuple:
  if name.endswith('norm'):
    return (None,)
  if not tp:
    return ('fsdp', None)
  if name in _ROW or name == 'embed':
    return ('tp', 'fsdp')
  return ('fsdp', 'tp')


def llama_params(shape: Shape, mesh, *, scan: bool, dtype=jnp.float32):
  """Abstract params: ``{'embed', 'layers', 'norm', 'head'}``, ``layers`` a
  list of per-layer dicts or one dict of ``(layers, ...)`` stacks."""
  tp = 'tp' in mesh.axis_names
  leaf = lambda shp, spec: jax.ShapeDtypeStruct(
      shp, dtype, sharding=NamedSharding(mesh, P(*spec)))
  per_layer = _layer_shapes(shape)
  if scan:
    layers = {k: leaf((shape.layers,) + v, (None,) + _spec(k, tp))
              for k, v in per_layer.items()}
  else:
    layers = [{k: leaf(v, _spec(k, tp)) for k, v in per_layer.items()}
              for _ in range(shape.layers)]
  return {'embed': leaf((shape.vocab, shape.d), _spec('embed', tp)),
          'layers': layers,
          'norm': leaf((shape.d,), (None,)),
          'head': leaf((shape.d, shape.vocab), _spec('head', tp))}


def dimension_numbers(params):
  """Every weight matrix, per layer when stacked; not the norm scales."""
  dims = optax_spectral.SpectralDimensionNumbers(-2, -1)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: None if 'norm' in jax.tree_util.keystr(path) else dims,
      params)


def make_mesh(devices: int, tp: int, axis_type):
  if tp > 1:
    return jax.make_mesh((devices // tp, tp), ('fsdp', 'tp'),
                         axis_types=(axis_type,) * 2,
                         devices=jax.devices()[:devices])
  return jax.make_mesh((devices,), ('fsdp',), axis_types=(axis_type,),
                       devices=jax.devices()[:devices])


def optimizers(which=('adamw', 'adamw2')) -> dict:
  out = {}
  if 'adamw' in which:
    out['adamw'] = optax.adamw(1e-3, weight_decay=0.1)
  if 'adamw2' in which:
    out['adamw2'] = optax_spectral.adamw2(
        1e-3, weight_decay=0.1, dimension_numbers=dimension_numbers)
  if 'muon' in which:
    out['muon'] = optax.contrib.muon(1e-3)
  return out


# --- what a compiled program costs ------------------------------------------

_COLLECTIVE = re.compile(
    r'=\s*(\(?[^=]*?\)?)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|'
    r'collective-permute|collective-broadcast)(-start)?\(')
_ARRAY = re.compile(r'(pred|s8|u8|s16|u16|s32|u32|s64|u64|bf16|f16|f32|f64)'
                    r'\[([\d,]*)\]')
_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'bf16': 2,
          'f16': 2, 's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8,
          'f64': 8}


def _is_matrix(dims, nbytes: int, block_size: int, vector_bytes: int) -> bool:
  """Whether an array moved by a collective is (a piece of) a matrix: its
  last two axes both longer than the power iteration's block (a block of
  vectors is ``(…, k, L)`` or ``(…, L, k)``, a Gram ``k × k``), or more
  bytes than all the vectors of the largest group of matrices
  (``vector_bytes``): XLA moves matrix pieces as e.g. ``[1, 512, 1, 1,
  128]`` between reshapes."""
  return (len(dims) >= 2 and min(dims[-2:]) > block_size) or (
      nbytes > vector_bytes)


def collectives(hlo: str, vector_bytes: int, block_size: int = 8
                ) -> list[dict]:
  """Every collective of a compiled module: kind, result shapes and bytes,
  and whether it moves a matrix (:func:`_is_matrix`)."""
  out = []
  for line in hlo.splitlines():
    # Long tuples carry /*index=5*/ comments, whose '=' would cut them.
    line = re.sub(r'/\*index=\d+\*/', '', line)
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    shapes = [(t, [int(d) for d in dims.split(',') if d])
              for t, dims in _ARRAY.findall(m.group(1))]
    if m.group(3) and m.group(2) == 'all-gather':
      shapes = shapes[len(shapes) // 2:]  # (operand, result) of a start
    sizes = [_BYTES[t] * int(np.prod(d, dtype=np.int64)) for t, d in shapes]
    out.append({'kind': m.group(2), 'bytes': sum(sizes),
                'matrix': any(_is_matrix(d, b, block_size, vector_bytes)
                              for (_, d), b in zip(shapes, sizes)),
                'shapes': [f'{t}{d}' for t, d in shapes]})
  return out


def vector_bytes(params, block_size: int = 8) -> int:
  """Bytes of the largest group's blocks (k rows for the step, one for W,
  on each matrix's longer side) if it were moved whole: what one collective
  of vectors can move at most."""
  groups = {}
  for x in jax.tree.leaves(params):
    if x.ndim >= 2:
      *batch, m, n = x.shape
      groups[(m, n)] = groups.get((m, n), 0) + int(np.prod(batch, dtype=int))
  return max((b * (block_size + 1) * max(m, n) * 4
              for (m, n), b in groups.items()), default=0)


def shard_bytes(tree) -> int:
  """Bytes per device (the first device's shards) of an abstract tree."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(
        x, 'sharding', None) is not None else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
  return total


def abstract_state(tx, params, mesh):
  """The optimizer state as abstract arrays, laid out as ``tx.init`` lays
  it out for params on ``mesh`` (concrete params: Adam's moments like their
  params, adamw2's vectors as :mod:`optax_spectral._layout` says). Traced
  under an Explicit twin of the mesh, whose types carry the shardings that
  an eager ``init`` would give, then moved onto ``mesh``."""
  twin = jax.sharding.Mesh(
      mesh.devices, mesh.axis_names,
      axis_types=(AxisType.Explicit,) * len(mesh.axis_names))
  typed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(twin, x.sharding.spec)), params)
  with jax.set_mesh(twin):
    state = jax.eval_shape(tx.init, typed)
  spec = lambda x: getattr(getattr(x, 'sharding', None), 'spec', P())
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=NamedSharding(mesh, spec(x))), state)


# How a training program tells jit where its arrays live: ``jax.set_mesh``
# around the jit (jax's current idiom); the args' own shardings alone, as
# ``in_shardings`` give them (the pjit idiom: under jit no mesh is visible on
# Auto axes); the legacy ``with mesh:`` context (MaxText, t5x).
IDIOMS = ('set_mesh', 'shardings', 'with mesh')


def mesh_context(idiom: str, mesh):
  """The context a program of ``idiom`` compiles its step in."""
  if idiom == 'set_mesh':
    return jax.set_mesh(mesh)
  if idiom == 'with mesh':
    import warnings  # pylint: disable=g-import-not-at-top
    class Legacy:  # ``with mesh:``, whose deprecation warning is not ours
      def __enter__(self):
        with warnings.catch_warnings():
          warnings.simplefilter('ignore', DeprecationWarning)
          mesh.__enter__()
      def __exit__(self, *exc):
        return mesh.__exit__(*exc)
    return Legacy()
  if idiom == 'shardings':
    import contextlib  # pylint: disable=g-import-not-at-top
    return contextlib.nullcontext()
  raise ValueError(f'idiom must be one of {IDIOMS}, got {idiom!r}')


def compile_update(tx, params, mesh, idiom='set_mesh'):
  """Compiles update + apply on abstract args; returns its measurements."""
  state = abstract_state(tx, params, mesh)

  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  start = time.perf_counter()
  with mesh_context(idiom, mesh):
    compiled = jax.jit(
        step, donate_argnums=(0, 1),
        in_shardings=shardings((params, state, params)),
        out_shardings=shardings((params, state))).lower(
            params, state, params).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  coll = collectives(compiled.as_text(), vector_bytes(params))
  return {
      'compile_s': seconds,
      'temp': int(mem.temp_size_in_bytes),
      # jax's peak_memory_in_bytes leaves out temp memory on XLA:CPU.
      'peak': int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                  + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
      'state': shard_bytes(state),
      'collectives': summarize(coll),
      'matrix_moves': [f"{c['kind']} {c['shapes']}" for c in coll
                       if c['matrix']][:5],
  }


def summarize(coll: list[dict]) -> dict:
  kinds = {}
  for c in coll:
    entry = kinds.setdefault(c['kind'], {'count': 0, 'bytes': 0})
    entry['count'] += 1
    entry['bytes'] += c['bytes']
  return kinds


def run_config(size, scan, devices, tp, axis_type, structure, which,
               idiom='set_mesh', dtype='float32'):
  mesh = make_mesh(devices, tp, getattr(AxisType, axis_type))
  params = llama_params(SHAPES[size], mesh, scan=scan, dtype=jnp.dtype(dtype))
  _power_iteration.launches_are_cheap = lambda: structure == 'cpu'
  out = {'what': 'update + apply', 'size': size,
         'layers': 'scan' if scan else 'list', 'devices': devices,
         'mesh': f'fsdp {devices // tp} x tp {tp}' if tp > 1 else
                 f'fsdp {devices}', 'axes': axis_type,
         'structure': structure, 'idiom': idiom, 'dtype': dtype,
         'param_bytes': shard_bytes(params)}
  for name, tx in optimizers(which).items():
    try:
      out[name] = compile_update(tx, params, mesh, idiom)
    except Exception as e:  # pylint: disable=broad-except
      out[name] = {'error': f'{type(e).__name__}: {str(e)[:300]}'}
  return out


# --- a whole training step of the GPT example ---------------------------------

def gpt_config(quick: bool):
  sys.path.insert(0, os.path.join(HERE, '..', 'examples'))
  import gpt  # pylint: disable=g-import-not-at-top
  if quick:
    return gpt.GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2,
                         n_embd=128), 'tiny'
  # ~1.3B: GPT-2 XL's width at 24 layers, a GPT-2 vocabulary.
  return gpt.GPTConfig(vocab_size=50304, block_size=1024, n_layer=24,
                       n_head=16, n_embd=2048), '1.3B (24 x 2048)'


def compile_train_step(cfg, batch, devices, name, structure):
  """The GPT example's ``train_step`` (``nnx.Optimizer``, its ``fsdp``
  mesh, Auto axes) compiled on abstract state; its measurements."""
  import common  # pylint: disable=g-import-not-at-top
  import gpt  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  _power_iteration.launches_are_cheap = lambda: structure == 'cpu'
  mesh = jax.make_mesh((devices,), (common.AXIS,),
                       axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:devices])
  with jax.set_mesh(mesh):
    def build():
      model = gpt.GPT(cfg, nnx.Rngs(0))
      tx = common.make_optimizer(common.OptimizerConfig(name=name), model)
      return model, nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split(nnx.eval_shape(build))
    specs = nnx.get_partition_spec(state)
    abstract = jax.tree.map(
        lambda x, spec: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(
                mesh, spec if isinstance(spec, P) else P())),
        state, specs, is_leaf=lambda x: isinstance(x, P))
    tokens = jax.ShapeDtypeStruct((batch, cfg.block_size), jnp.int32,
                                  sharding=NamedSharding(mesh, P(common.AXIS)))

    def step(state, x, y):
      model, optimizer = nnx.merge(graphdef, state)
      loss, _ = gpt.train_step(model, optimizer, x, y)
      return nnx.state((model, optimizer)), loss

    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(
        abstract, tokens, tokens).compile()
    seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  params = nnx.state(nnx.merge(graphdef, abstract)[0], nnx.Param)
  coll = collectives(compiled.as_text(), vector_bytes(params))
  return {
      'compile_s': seconds, 'temp': int(mem.temp_size_in_bytes),
      'peak': int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                  + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
      'param_bytes': shard_bytes(params),
      'collectives': summarize(coll),
      'matrix_count': sum(c['matrix'] for c in coll),
      'matrix_moves': [f"{c['kind']} {c['shapes']}" for c in coll
                       if c['matrix']][:5]}


# --- a whole training step of a Llama-like model, with remat -----------------

def _rms(x):
  return x * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1,
                                    keepdims=True) + 1e-6).astype(x.dtype)


def llama_loss(params, tokens, shape: Shape, head_dim: int = 128):
  """Next-token loss of the tree of :func:`llama_params`: grouped-query
  attention, SwiGLU, every layer rematerialised (``jax.checkpoint``), as
  large models are trained. No activation annotations: the program's
  shardings come from its params' and tokens' alone."""
  def layer(x, p):
    b, t, d = x.shape
    h = _rms(x) * p['attn_norm']
    q = (h @ p['wq']).reshape(b, t, -1, head_dim)
    k = (h @ p['wk']).reshape(b, t, -1, head_dim)
    v = (h @ p['wv']).reshape(b, t, -1, head_dim)
    attn = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    x = x + attn.reshape(b, t, d) @ p['wo']
    h = _rms(x) * p['mlp_norm']
    return x + (jax.nn.silu(h @ p['w1']) * (h @ p['w3'])) @ p['w2']

  layer = jax.checkpoint(layer)
  x = params['embed'][tokens[:, :-1]]
  if isinstance(params['layers'], dict):
    x, _ = jax.lax.scan(lambda x, p: (layer(x, p), None), x,
                        params['layers'])
  else:
    for p in params['layers']:
      x = layer(x, p)
  logits = (_rms(x) * params['norm']) @ params['head']
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), tokens[:, 1:]).mean()


def compile_llama_step(size, scan, devices, tp, idiom, dtype, name,
                       seq=2048):
  """Forward, backward, update and apply of the Llama-like model, one
  sequence per device (batch over fsdp), params and state donated: peak
  memory and collectives, per device."""
  _power_iteration.launches_are_cheap = lambda: False
  shape = SHAPES[size]
  mesh = make_mesh(devices, tp, AxisType.Auto)
  params = llama_params(shape, mesh, scan=scan, dtype=jnp.dtype(dtype))
  (tx,) = optimizers((name,)).values()
  state = abstract_state(tx, params, mesh)
  tokens = jax.ShapeDtypeStruct(
      (devices // tp, seq + 1), jnp.int32,
      sharding=NamedSharding(mesh, P('fsdp', None)))

  def step(p, s, x):
    loss, g = jax.value_and_grad(llama_loss)(p, x, shape)
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  shardings = lambda tree: jax.tree.map(lambda x: x.sharding, tree)
  start = time.perf_counter()
  with mesh_context(idiom, mesh):
    compiled = jax.jit(
        step, donate_argnums=(0, 1),
        in_shardings=shardings((params, state, tokens)),
        out_shardings=shardings((params, state)) + (
            NamedSharding(mesh, P()),)).lower(params, state, tokens).compile()
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  coll = collectives(compiled.as_text(), vector_bytes(params))
  return {'compile_s': seconds, 'temp': int(mem.temp_size_in_bytes),
          'peak': int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                      + mem.temp_size_in_bytes - mem.alias_size_in_bytes),
          'param_bytes': shard_bytes(params),
          'collectives': summarize(coll)}


# --- the study ----------------------------------------------------------------

def update_configs(quick: bool):
  """(size, scan, devices, tp, axes, structure): every mesh, layout and
  axis type at 1B; at 8B over 16 devices; the scanned layers (cheap to
  compile) at 8B over 64 devices and at 70B; one list of 80 layers (a 70B
  list compiles for minutes); the CPUs' structure at 8B."""
  if quick:
    return [('test', scan, 8, tp, axes, 'accelerators')
            for scan in (False, True) for tp in (1, 2)
            for axes in ('Auto', 'Explicit')]
  grid = lambda size, devices, scans: [
      (size, scan, devices, tp, axes, 'accelerators') for scan in scans
      for tp in (1, 4) for axes in ('Auto', 'Explicit')]
  return (grid('1B', 16, (False, True)) + grid('1B', 64, (False, True))
          + grid('8B', 16, (False, True)) + grid('8B', 64, (True,))
          + grid('70B', 64, (True,))
          + [('70B', False, 64, 4, 'Auto', 'accelerators')]
          + [('8B', scan, 16, 4, axes, 'cpu') for scan in (False, True)
             for axes in ('Auto', 'Explicit')])


def ratio(a, b):
  return a / b if b else float('nan')


def _collective_text(kinds: dict) -> str:
  if not kinds:
    return 'none'
  return ', '.join(f"{k} {v['count']} / {v['bytes'] / 2**20:.1f} MiB"
                   for k, v in sorted(kinds.items()))


def _total(kinds: dict) -> int:
  return sum(v['bytes'] for v in kinds.values())


def to_markdown(result: dict) -> str:
  lines = [
      '# Sharded at scale, compile only (`benchmarks/scale_out.py`)', '',
      f"{result['devices_note']}; jax {result['jax']}, optax "
      f"{result['optax']}. Per device, against `optax.adamw` compiled the "
      'same way (params and state donated). *temp*: scratch memory over '
      "adamw's, as a multiple of the per-device param bytes; *peak*: "
      "arguments + outputs + temp − donated, over adamw's; *state*: "
      "optimizer-state bytes over adamw's; *collectives*: adamw2's (adamw "
      'has none) and their bytes as a share of the per-device param bytes; '
      '*moves a matrix*: a collective whose array has its last two axes '
      '(of more than one element) longer than the block of vectors.', '',
      '## Update + apply', '',
      '| size | layers | mesh | axes | structure | temp | peak | state | '
      'collectives (adamw2) | % of params | moves a matrix | compile '
      's (adamw2 / adamw) |',
      '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for r in result['update']:
    a, b = r['adamw'], r['adamw2']
    if 'error' in b or 'error' in a:
      lines.append(f"| {r['size']} | {r['layers']} | {r['mesh']} | "
                   f"{r['axes']} | {r['structure']} | "
                   f"{b.get('error', a.get('error'))} |||||||")
      continue
    lines.append(
        f"| {r['size']} | {r['layers']} | {r['mesh']} | {r['axes']} | "
        f"{r['structure']} | {ratio(b['temp'] - a['temp'], r['param_bytes']):.3f}× | "
        f"{ratio(b['peak'], a['peak']):.3f} | {ratio(b['state'], a['state']):.4f} | "
        f"{_collective_text(b['collectives'])} | "
        f"{100 * ratio(_total(b['collectives']), r['param_bytes']):.2f}% | "
        f"{'**yes**' if b['matrix_moves'] else 'no'} | "
        f"{b['compile_s']:.1f} / {a['compile_s']:.1f} |")
  if result.get('muon'):
    lines += ['', '### Reference: `optax.contrib.muon`', '',
              '| size | layers | mesh | axes | temp | collectives | gathers a '
              'matrix | compile s (muon / adamw) |', '|---|---|---|---|---|---|---|---|']
    for r in result['muon']:
      a, m = r['adamw'], r['muon']
      if 'error' in m:
        lines.append(f"| {r['size']} | {r['layers']} | {r['mesh']} | "
                     f"{r['axes']} | {m['error'][:120]} ||||")
        continue
      lines.append(
          f"| {r['size']} | {r['layers']} | {r['mesh']} | {r['axes']} | "
          f"{ratio(m['temp'] - a['temp'], r['param_bytes']):.3f}× | "
          f"{_collective_text(m['collectives'])} | "
          f"{'yes' if m['matrix_moves'] else 'no'} | "
          f"{m['compile_s']:.1f} / {a['compile_s']:.1f} |")
  if result.get('train_step'):
    lines += ['', f"## Whole training step: the GPT example at "
              f"{result['train_step']['model']}", '',
              '| structure | peak (adamw2 / adamw) | temp over adamw\'s (× '
              'params) | collectives adamw2 / adamw | collectives that move '
              'a matrix, adamw2 / adamw (the model\'s own FSDP gathers) | '
              'compile s (adamw2 / adamw) |', '|---|---|---|---|---|---|']
    for structure, r in result['train_step']['runs'].items():
      a, b = r['adamw'], r['adamw2']
      lines.append(
          f"| {structure} | {ratio(b['peak'], a['peak']):.4f} "
          f"({b['peak'] / 2**30:.2f} / {a['peak'] / 2**30:.2f} GiB) | "
          f"{ratio(b['temp'] - a['temp'], a['param_bytes']):.3f}× | "
          f"{_total(b['collectives']) / 2**20:.0f} / "
          f"{_total(a['collectives']) / 2**20:.0f} MiB | "
          f"{b['matrix_count']} / {a['matrix_count']} | "
          f"{b['compile_s']:.1f} / {a['compile_s']:.1f} |")
  return '\n'.join(lines) + '\n'


# --- the idioms: how programs tell jit where their arrays live ---------------

def idiom_configs(quick: bool):
  """(size, scan, devices, tp, dtype) of the issue-30 table, each compiled
  in every idiom of :data:`IDIOMS`: the 8B list of layers on fsdp 4 x tp 4
  and fsdp 16, and on fsdp 2 x tp 8 in bf16 and f32; the 8B scan."""
  if quick:
    return [('test', False, 8, 2, 'float32'), ('test', False, 8, 2,
                                               'bfloat16')]
  return [('8B', False, 16, 4, 'float32'), ('8B', False, 16, 1, 'float32'),
          ('8B', False, 16, 8, 'bfloat16'), ('8B', False, 16, 8, 'float32'),
          ('8B', True, 16, 4, 'float32'), ('8B', True, 16, 4, 'bfloat16')]


def bf16_dot_copy(shape=(4096, 4096)) -> float:
  """Temp memory of one ``bf16 (1, m) x bf16 (m, n) -> f32`` product on this
  backend, as a multiple of the matrix's bytes. XLA:CPU has no bf16
  matrix-vector product and converts the matrix to f32 first (2.0: an f32
  copy), though it multiplies bf16 blocks of 8 vectors in place (0); GPUs
  and TPUs multiply bf16 in place. adamw2 multiplies each W by one vector."""
  mat = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  vec = jax.ShapeDtypeStruct((1, shape[0]), jnp.bfloat16)
  compiled = jax.jit(lambda v, m: jnp.einsum(
      'km,mn->kn', v, m, preferred_element_type=jnp.float32)).lower(
          vec, mat).compile()
  return compiled.memory_analysis().temp_size_in_bytes / (
      np.prod(shape) * 2)


def idioms_markdown(result: dict) -> str:
  lines = [
      '# Sharded at scale in the idioms programs use '
      '(`benchmarks/scale_out.py --idioms`)', '',
      f"Simulated CPU devices; jax {result['jax']}, optax "
      f"{result['optax']}; the structure GPUs and TPUs compile. Each program "
      'compiled as it would be written: inside `jax.set_mesh`; with its '
      "arrays' shardings alone (`in_shardings`, no mesh context: the pjit "
      'idiom); inside the legacy `with mesh:`. *temp*: scratch memory of '
      "update + apply over adamw's, as a multiple of the per-device param "
      "bytes, params and state donated; *network*: adamw2's collectives as a "
      'share of the per-device param bytes (adamw has none).', '',
      'bf16: every product reads the bf16 matrix as it is and accumulates in '
      'f32 (`preferred_element_type`; `tests/test_idioms.py` checks the '
      'program). On this backend one bf16 matrix-vector product `(1, m) x '
      f"(m, n) -> f32` alone costs {result['bf16_dot_copy']:.2f}x its "
      "matrix's bytes of scratch (XLA:CPU has no bf16 matrix-vector kernel "
      'and converts the matrix to f32 first; blocks of two or more vectors '
      'it multiplies in place), which is why σ1(W) is iterated with two '
      'vectors.', '',
      '## Update + apply', '',
      '| size | layers | mesh | dtype | idiom | temp | network | moves a '
      'matrix | compile s (adamw2 / adamw) |', '|---|---|---|---|---|---|---|---|---|']
  for r in result['idioms']:
    a, b = r['adamw'], r['adamw2']
    if 'error' in a or 'error' in b:
      lines.append(f"| {r['size']} | {r['layers']} | {r['mesh']} | "
                   f"{r['dtype']} | {r['idiom']} | "
                   f"{b.get('error', a.get('error'))} ||||")
      continue
    temp = ratio(b['temp'] - a['temp'], r['param_bytes'])
    lines.append(
        f"| {r['size']} | {r['layers']} | {r['mesh']} | {r['dtype']} | "
        f"{r['idiom']} | {temp:.3f}× | "
        f"{100 * ratio(_total(b['collectives']), r['param_bytes']):.2f}% | "
        f"{'**yes**' if b['matrix_moves'] else 'no'} | "
        f"{b['compile_s']:.1f} / {a['compile_s']:.1f} |")
  if result.get('llama_step'):
    lines += ['', '## Whole training step with remat (Llama-like, one '
              f"sequence of {result['seq']} tokens per fsdp rank; params and "
              'state donated; peak: arguments + outputs + temp - donated)', '',
              '| size | layers | mesh | dtype | idiom | peak adamw2 / adamw '
              '| collectives adamw2 / adamw | compile s (adamw2 / adamw) |',
              '|---|---|---|---|---|---|---|---|']
    for r in result['llama_step']:
      a, b = r['adamw'], r['adamw2']
      lines.append(
          f"| {r['size']} | {r['layers']} | {r['mesh']} | {r['dtype']} | "
          f"{r['idiom']} | {ratio(b['peak'], a['peak']):.4f} "
          f"({b['peak'] / 2**30:.2f} / {a['peak'] / 2**30:.2f} GiB) | "
          f"{_total(b['collectives']) / 2**30:.2f} / "
          f"{_total(a['collectives']) / 2**30:.2f} GiB | "
          f"{b['compile_s']:.0f} / {a['compile_s']:.0f} |")
  return '\n'.join(lines) + '\n'


def run_idioms(args, tqdm):
  name = 'cpu-scale_out-idioms' + ('-quick' if args.quick else '')
  result = {'jax': jax.__version__, 'optax': optax.__version__,
            'devices_note': f'{jax.device_count()} simulated CPU devices',
            'bf16_dot_copy': bf16_dot_copy(), 'idioms': [], 'llama_step': [],
            'seq': 256 if args.quick else 2048}

  def save():
    with open(os.path.join(args.out, name + '.json'), 'w') as f:
      json.dump(result, f, indent=1)
    with open(os.path.join(args.out, name + '.md'), 'w') as f:
      f.write(idioms_markdown(result))

  configs = [(c, idiom) for c in idiom_configs(args.quick)
             for idiom in IDIOMS]
  for (size, scan, devices, tp, dtype), idiom in tqdm(
      configs, desc='update + apply, per idiom'):
    result['idioms'].append(run_config(
        size, scan, devices, tp, 'Auto', 'accelerators', ('adamw', 'adamw2'),
        idiom, dtype))
    save()
  steps = [('test' if args.quick else '8B', scan, 8 if args.quick else 16,
            2 if args.quick else 4, idiom, dtype)
           for scan in ((False,) if args.quick else (True, False))
           for dtype in ('float32', 'bfloat16') for idiom in IDIOMS]
  for size, scan, devices, tp, idiom, dtype in tqdm(
      steps, desc='training step, per idiom'):
    row = {'size': size, 'layers': 'scan' if scan else 'list',
           'mesh': f'fsdp {devices // tp} x tp {tp}', 'idiom': idiom,
           'dtype': dtype}
    for n in ('adamw', 'adamw2'):
      row[n] = compile_llama_step(size, scan, devices, tp, idiom, dtype, n,
                                  seq=result['seq'])
    result['llama_step'].append(row)
    save()
  print(idioms_markdown(result))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='a small tree on 8 devices (seconds)')
  parser.add_argument('--idioms', action='store_true',
                      help='only the idioms study: set_mesh, shardings '
                      'alone and `with mesh:`, f32 and bf16, update + apply '
                      'and a whole training step with remat (~20 minutes; '
                      'cpu-scale_out-idioms.md)')
  parser.add_argument('--out', default=os.path.join(HERE, 'results'))
  args = parser.parse_args(argv)
  if jax.device_count() < (8 if args.quick else 16 if args.idioms else 64):
    parser.error(f'needs {8 if args.quick else 64} devices; run it as a '
                 'script (it sets XLA_FLAGS before importing jax)')
  os.makedirs(args.out, exist_ok=True)
  if args.idioms:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    run_idioms(args, tqdm)
    return
  name = 'cpu-scale_out' + ('-quick' if args.quick else '')
  result = {'jax': jax.__version__, 'optax': optax.__version__,
            'devices_note': f'{jax.device_count()} simulated CPU devices',
            'update': [], 'muon': [], 'train_step': None}
  os.makedirs(args.out, exist_ok=True)

  def save():
    with open(os.path.join(args.out, name + '.json'), 'w') as f:
      json.dump(result, f, indent=1)
    with open(os.path.join(args.out, name + '.md'), 'w') as f:
      f.write(to_markdown(result))

  configs = update_configs(args.quick)
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  for config in tqdm(configs, desc='update + apply'):
    result['update'].append(run_config(*config, ('adamw', 'adamw2')))
    save()
  # Scanned layers only: muon's update of an 8B list of layers compiled for
  # more than three minutes here.
  muon = [('test' if args.quick else '8B', True, 8 if args.quick else 16,
           tp, axes, 'accelerators') for tp in (1, 2 if args.quick else 4)
          for axes in ('Auto', 'Explicit')]
  for config in tqdm(muon, desc='optax.contrib.muon'):
    result['muon'].append(run_config(*config, ('adamw', 'muon')))
    save()
  cfg, label = gpt_config(args.quick)
  devices = 8 if args.quick else 16
  runs = {}
  for structure in tqdm(('accelerators', 'cpu'), desc='train step'):
    # One sequence per device.
    runs[structure] = {
        n: compile_train_step(cfg, devices, devices, n, structure)
        for n in ('adamw', 'adamw2')}
  result['train_step'] = {'model': f'{label}, batch {devices} over '
                                   f'{devices} devices', 'runs': runs}
  save()
  print(to_markdown(result))


if __name__ == '__main__':
  main()
