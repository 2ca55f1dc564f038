"""Cost of adamw2 against optax.adamw, measured side by side in one process.

    python benchmarks/overhead.py            # ~10 min on 2 CPU cores, ~4 on a GPU
    python benchmarks/overhead.py --quick    # small shapes, for CI/smoke

Writes ``benchmarks/results/<device>-overhead.{md,json}``, ``<device>`` being
``cpu`` or the accelerator's name (e.g. ``nvidia-h200``). All ratios are
against ``optax.adamw`` in the same process, with interleaved repetitions:

* optimizer update + apply on param trees shaped like GPT-2 small (a list of
  layers, and stacked as ``nnx.scan`` makes them), GPT-2 medium and ViT-B/16:
  time, compile time, optimizer-state bytes, and "kernels" — fusions, custom
  calls and copies in the compiled HLO, a proxy for kernel launches;
* how the compiled update grows with the model: non-product ops (kernels that
  are not matrix products) that adamw2 adds per added same-shaped matrix,
  GPT-2-small shapes at 12 and 24 layers, and any solver (LAPACK/cuSOLVER)
  custom call;
* one whole training step of the GPT example (list of layers and
  ``--scan``), at GPT-2-small size on an accelerator (12 x 768, block 1024,
  vocab 50304, batch 8) and at the example's default size on a CPU.
"""

import argparse
import json
import os
import platform
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_spectral

HERE = os.path.dirname(os.path.abspath(__file__))
SOLVER_TARGETS = ('lapack', 'cusolver', 'potrf', 'geqrf', 'orgqr', 'syevd',
                  'gesvd', 'getrf', 'eigh', 'hipsolver')


def transformer_params(n_layer, d, embeddings, stacked=False, abstract=False):
  """A transformer's param tree: embeddings plus ``n_layer`` blocks, as a
  list of layers or stacked as ``nnx.scan`` would (leading layer axis)."""
  keys = iter(jax.random.split(jax.random.key(0), 8 * n_layer + 8))
  if abstract:
    normal = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    ones = zeros = normal
  else:
    normal = lambda *shape: 0.02 * jax.random.normal(next(keys), shape)
    ones, zeros = (lambda *s: jnp.ones(s)), (lambda *s: jnp.zeros(s))
  def block(lead=()):
    return {
        'ln1': {'scale': ones(*lead, d), 'bias': zeros(*lead, d)},
        'qkv': {'kernel': normal(*lead, d, 3 * d),
                'bias': zeros(*lead, 3 * d)},
        'proj': {'kernel': normal(*lead, d, d), 'bias': zeros(*lead, d)},
        'ln2': {'scale': ones(*lead, d), 'bias': zeros(*lead, d)},
        'fc': {'kernel': normal(*lead, d, 4 * d), 'bias': zeros(*lead, 4 * d)},
        'fc_out': {'kernel': normal(*lead, 4 * d, d), 'bias': zeros(*lead, d)},
    }
  params = {k: normal(*shape) for k, shape in embeddings.items()}
  params['ln_f'] = {'scale': ones(d), 'bias': zeros(d)}
  if stacked:
    params['layers'] = block((n_layer,))
  else:
    params.update({f'h{i}': block() for i in range(n_layer)})
  return params


def stacked_dimension_numbers(params):
  """Stacked (layers, d_in, d_out) kernels per layer; stacked biases and
  scales (layers, d) are not matrices."""
  def spec(path, p):
    stacked = jax.tree_util.keystr(path[:1]) == "['layers']"
    if p.ndim == 3 or (p.ndim == 2 and not stacked):
      return optax_spectral.SpectralDimensionNumbers(p.ndim - 2, p.ndim - 1)
    return None
  return jax.tree_util.tree_map_with_path(spec, params)


GPT2 = lambda d, vocab=50304, block=1024: {'wte': (vocab, d), 'wpe': (block, d)}


def param_trees(quick: bool, accelerator: bool = True):
  """Builders, so that only one tree is in memory at a time. On a CPU,
  GPT-2 medium is left out: two optimizers' states, params and gradients of
  355M params do not fit 24 GiB."""
  if quick:
    return {'tiny': lambda: transformer_params(2, 128, {'wte': (1024, 128)})}
  # ViT-B/16 at 224px: 768-wide patch embedding of 16x16x3 pixels, 197
  # positions, 1000 classes.
  vit_b = {'patch_embed': (768, 768), 'pos': (197, 768), 'head': (768, 1000)}
  trees = {
      'GPT-2 small (124M)': lambda: transformer_params(12, 768, GPT2(768)),
      'GPT-2 small, scanned': lambda: transformer_params(
          12, 768, GPT2(768), stacked=True),
      'GPT-2 medium (355M)': lambda: transformer_params(24, 1024, GPT2(1024)),
      'ViT-B/16 (86M)': lambda: transformer_params(12, 768, vit_b),
  }
  if not accelerator:
    del trees['GPT-2 medium (355M)']
  return trees


def hlo_counts(text: str) -> dict:
  """Kernel-launch proxies from compiled HLO text (every computation once).

  ``kernels``: fusions, custom calls, copies and unfused matrix products
  (``dot``, ``convolution``) outside fused computations; ``products``: those
  that are matrix products (a fusion around a dot, a dot, a GEMM custom
  call); ``solver_calls``: custom calls into LAPACK/cuSOLVER. The bodies of
  fusions are not kernels of their own and are not counted.
  """
  bodies, name = {}, None
  for line in text.splitlines():
    if line and not line.startswith(' ') and line.rstrip().endswith('{'):
      name = line.split()[1 if line.startswith('ENTRY') else 0].lstrip('%')
      bodies[name] = []
    elif name is not None and line.startswith(' '):
      bodies[name].append(line)
  product = lambda l: re.search(r'\s(dot|convolution)\(', l)
  with_dot = {n for n, b in bodies.items() if any(product(l) for l in b)}
  fused = {m.group(1) for b in bodies.values() for l in b
           if re.search(r'\sfusion\(', l)
           for m in [re.search(r'calls=%?([\w.\-]+)', l)] if m}
  counts = {'kernels': 0, 'products': 0, 'solver_calls': []}
  for name, body in bodies.items():
    if name in fused:
      continue
    for line in body:
      op = re.search(
          r'\s(fusion|custom-call|copy|copy-start|dot|convolution)\(', line)
      if not op:
        continue
      target = re.search(r'custom_call_target="([^"]+)"', line)
      target = target.group(1).lower() if target else ''
      callee = re.search(r'calls=%?([\w.\-]+)', line)
      counts['kernels'] += 1
      counts['products'] += bool(
          op.group(1) in ('dot', 'convolution')
          or (op.group(1) == 'fusion' and callee
              and callee.group(1) in with_dot)
          or any(t in target for t in ('gemm', 'matmul', 'dot')))
      if any(t in target for t in SOLVER_TARGETS):
        counts['solver_calls'].append(target)
  counts['nonproduct'] = counts['kernels'] - counts['products']
  return counts


def _apply_step(tx):
  def step(p, s, g):
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s
  return jax.jit(step)


def compile_update(tx, params):
  """Update + apply compiled from shapes only: ``(compiled, counts, s)``."""
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        params)
  state = jax.eval_shape(tx.init, shapes)
  t = time.perf_counter()
  compiled = _apply_step(tx).lower(shapes, state, shapes).compile()
  seconds = time.perf_counter() - t
  counts = hlo_counts(compiled.as_text())
  # Scratch memory of the step beyond its inputs and outputs (no donation).
  memory = compiled.memory_analysis()
  counts['temp_bytes'] = int(getattr(memory, 'temp_size_in_bytes', -1))
  return compiled, counts, seconds


def compiled_counts(tx, params) -> tuple[dict, float]:
  """HLO counts and compile seconds of update + apply."""
  _, counts, seconds = compile_update(tx, params)
  return counts, seconds


def time_interleaved(fns: dict, reps: int) -> dict:
  """Median and spread (IQR) of each fn's wall time, calls interleaved."""
  times = {k: [] for k in fns}
  for _ in range(reps):
    for k, f in fns.items():
      t = time.perf_counter()
      f()
      times[k].append(time.perf_counter() - t)
  return {k: {'median_s': float(np.median(v)),
              'iqr_s': float(np.subtract(*np.percentile(v, [75, 25])))}
          for k, v in times.items()}


def update_benchmark(params, variants: dict, reps: int):
  """Times ``update`` + ``apply_updates`` of each optimizer, interleaved.

  Every call starts from the same params, gradients and (second-step) state,
  so that several optimizers of a 355M-param model fit in memory together.
  """
  grads = jax.tree.map(lambda p: 1e-2 * jax.random.normal(
      jax.random.key(1), p.shape, p.dtype), params)
  fns, extra = {}, {}
  for name, tx in variants.items():
    step, counts, compile_s = compile_update(tx, params)
    # Past the first step, which runs the cold-start iterations.
    _, state = step(params, tx.init(params), grads)
    fns[name] = (lambda step=step, state=state:
                 jax.block_until_ready(step(params, state, grads)))
    fns[name]()
    extra[name] = {'compile_s': compile_s, **counts,
                   'state_bytes': state_bytes(tx, params)}
  timing = time_interleaved(fns, reps)
  return {k: {**timing[k], **extra[k]} for k in variants}


def growth(quick: bool) -> dict:
  """Non-product ops adamw2 adds per added matrix (list of layers).

  On a CPU, also for the accelerators' structure (stacked groups, unrolled
  iteration), compiled by XLA:CPU: the CPU's own structure multiplies each
  matrix in place (``launches_are_cheap``), which is not what a GPU runs.
  """
  from optax_spectral import _power_iteration  # pylint: disable=g-import-not-at-top
  layers, d = ((2, 4), 64) if quick else ((12, 24), 768)
  own = _power_iteration.launches_are_cheap()
  structures = {'this device': own}
  if own:
    structures['accelerators'] = False
  out = {}
  original = _power_iteration.launches_are_cheap
  try:
    for structure, cheap in structures.items():
      _power_iteration.launches_are_cheap = lambda cheap=cheap: cheap
      for n in layers:
        params = transformer_params(n, d, GPT2(d, 512 if quick else 50304),
                                    abstract=True)
        for name, tx in (('adamw', optax.adamw(1e-3)),
                         ('adamw2', optax_spectral.adamw2(1e-3))):
          if name == 'adamw' and structure != 'this device':
            out[f'{structure}|adamw|{n}'] = out[f'this device|adamw|{n}']
            continue
          counts, compile_s = compiled_counts(tx, params)
          out[f'{structure}|{name}|{n}'] = {**counts, 'compile_s': compile_s}
  finally:
    _power_iteration.launches_are_cheap = original
  lo, hi = layers
  added = 4 * (hi - lo)  # qkv, proj, fc, fc_out per layer
  extra = lambda s, k: (out[f'{s}|adamw2|{k}']['nonproduct']
                        - out[f'{s}|adamw|{k}']['nonproduct'])
  out['nonproduct_per_added_matrix'] = {
      s: (extra(s, hi) - extra(s, lo)) / added for s in structures}
  out['layers'], out['width'] = layers, d
  return out


TRAIN_STEP_VARIANTS = {'adamw': {}, 'adamw2': {}}


def train_step_setup(accelerator: bool, quick: bool):
  """The GPT example's config, a batch and a label for the benchmark."""
  sys.path.insert(0, os.path.join(HERE, '..', 'examples'))
  import common  # pylint: disable=g-import-not-at-top
  import gpt  # pylint: disable=g-import-not-at-top
  if accelerator and not quick:
    base = gpt.GPTConfig(vocab_size=50304, block_size=1024, n_layer=12,
                         n_head=12, n_embd=768)
    batch, label = 8, 'GPT-2 small size (12 x 768, block 1024, batch 8)'
  else:
    base = gpt.PRESETS['tiny' if quick else 'small']
    base = gpt.GPTConfig(**{**base.__dict__, 'vocab_size': 128})
    batch, label = 32, f"the example's {'tiny' if quick else 'small'} preset"
  rng = np.random.default_rng(0)
  x = rng.integers(0, base.vocab_size, (batch, base.block_size)).astype(
      np.int32)
  y = np.roll(x, -1, axis=1)
  jax.set_mesh(common.make_mesh())  # the model is annotated
  return base, x, y, label


def train_step_fn(base, scan: bool, name: str, options: dict, x, y):
  """``(fn, compile_s)``: one compiled, warm train step of the GPT example
  with optimizer ``name`` (adamw or adamw2) and ``options``."""
  import common  # pylint: disable=g-import-not-at-top
  import gpt  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  cfg = gpt.GPTConfig(**{**base.__dict__, 'scan': scan})
  model = gpt.GPT(cfg, nnx.Rngs(0))
  opt = nnx.Optimizer(model, common.make_optimizer(
      common.OptimizerConfig(name=name), model, **options), wrt=nnx.Param)
  # The optimizer is part of the traced graph: the first call compiles.
  t = time.perf_counter()
  jax.block_until_ready(gpt.train_step(model, opt, x, y))
  compile_s = time.perf_counter() - t
  fn = lambda: jax.block_until_ready(gpt.train_step(model, opt, x, y))
  fn()
  return fn, compile_s


def train_step_benchmark(reps: int, accelerator: bool, quick: bool):
  base, x, y, label = train_step_setup(accelerator, quick)
  result = {'config': label}
  for scan in (False, True):
    fns, compile_s = {}, {}
    for name, options in TRAIN_STEP_VARIANTS.items():
      fns[name], compile_s[name] = train_step_fn(
          base, scan, name.split()[0], options, x, y)
    timing = time_interleaved(fns, reps)
    result['scan' if scan else 'list'] = {
        k: {**timing[k], 'compile_s': compile_s[k]} for k in fns}
    del fns
  return result


def state_bytes(tx, params) -> int:
  shapes = jax.eval_shape(tx.init, params)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def device_name() -> str:
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return 'cpu'
  return re.sub(r'[^a-z0-9]+', '-', device.device_kind.lower()).strip('-')


def to_markdown(result: dict) -> str:
  r = result
  lines = [f"# Overhead against optax.adamw ({r['device_kind']}, jax "
           f"{r['jax']}, {r['cpu_count']} CPU cores)", '',
           f"Median of {r['reps']} interleaved repetitions in one process; "
           'ratios against optax.adamw. Kernels: fusions + custom calls + '
           'copies in the compiled HLO (a proxy for launches); non-product: '
           'those that are not matrix products; state: optimizer-state '
           'bytes over adamw\'s; temp MB: scratch memory of the compiled '
           'step beyond its inputs and outputs.', '',
           '## Optimizer update + apply', '',
           '| tree | optimizer | ms | ratio | compile s | kernels | '
           'non-product | state | temp MB |',
           '|---|---|---|---|---|---|---|---|---|']
  for tree, variants in r['update'].items():
    base = variants['optax.adamw']
    for k, v in variants.items():
      lines.append(
          f"| {tree} | {k} | {1e3 * v['median_s']:.2f} | "
          f"{v['median_s'] / base['median_s']:.3f} | {v['compile_s']:.2f} | "
          f"{v['kernels']} | {v['nonproduct']} | "
          f"{v['state_bytes'] / base['state_bytes']:.4f} | "
          f"{v.get('temp_bytes', -1) / 1e6:.0f} |")
  lines.append('')
  g = r['growth']
  if g:
    lo, hi = g['layers']
    lines += ['', f'## Growth of the compiled update ({lo} -> {hi} layers, '
              f"width {g.get('width', 768)})", '',
              '"accelerators": the structure GPUs and TPUs run (stacked '
              'groups, unrolled iteration), compiled here; "this device": '
              'what this device runs.', '',
              '| structure | optimizer | layers | kernels | non-product | '
              'products | solver calls | compile s |',
              '|---|---|---|---|---|---|---|---|']
    for k, v in g.items():
      if isinstance(v, dict) and '|' in k:
        structure, name, n = k.split('|')
        lines.append(f"| {structure} | {name} | {n} | {v['kernels']} | "
                     f"{v['nonproduct']} | {v['products']} | "
                     f"{len(v['solver_calls'])} | {v['compile_s']:.2f} |")
    lines += ['', 'Non-product ops adamw2 adds per added same-shaped matrix: '
              + ', '.join(f'{s}: **{x:.2f}**' for s, x in
                          g['nonproduct_per_added_matrix'].items()), '']
  t = r['train_step']
  if not t:
    return '\n'.join(lines) + '\n'
  lines += [f"## Whole training step of the GPT example, {t['config']}", '',
            '| layers | optimizer | step ms | ratio | compile s | ratio |',
            '|---|---|---|---|---|---|']
  for layout in ('list', 'scan'):
    base = t[layout]['adamw']
    for k, v in t[layout].items():
      lines.append(
          f"| {layout} | {k} | {1e3 * v['median_s']:.2f} | "
          f"{v['median_s'] / base['median_s']:.3f} | {v['compile_s']:.2f} | "
          f"{v['compile_s'] / base['compile_s']:.2f} |")
  return '\n'.join(lines) + '\n'


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--quick', action='store_true',
                 help='tiny shapes and few repetitions (CI)')
  p.add_argument('--reps', type=int, default=None)
  p.add_argument('--out-dir', default=os.path.join(HERE, 'results'))
  p.add_argument('--skip-train-step', action='store_true')
  args = p.parse_args(argv)
  accelerator = jax.devices()[0].platform != 'cpu'
  reps = args.reps or (5 if args.quick else 15 if not accelerator else 30)
  lr = 1e-3
  result = {'device_kind': jax.devices()[0].device_kind,
            'platform': platform.platform(), 'cpu_count': os.cpu_count(),
            'jax': jax.__version__, 'optax': optax.__version__, 'reps': reps,
            'update': {}}
  out = os.path.join(args.out_dir, f'{device_name()}-overhead')
  os.makedirs(args.out_dir, exist_ok=True)
  result['growth'] = None
  result['train_step'] = None

  def save():  # after every section, so that a cut-off run keeps its numbers
    with open(out + '.json', 'w') as f:
      json.dump(result, f, indent=1)
    with open(out + '.md', 'w') as f:
      f.write(to_markdown(result))

  for i, (tree_name, build) in enumerate(param_trees(args.quick, accelerator).items()):
    params = build()
    dims = ({'dimension_numbers': stacked_dimension_numbers}
            if 'scanned' in tree_name else {})
    variants = {'optax.adamw': optax.adamw(lr),
                'adamw2 (default)': optax_spectral.adamw2(lr, **dims)}
    if i == 0:  # settings and comparators on the first tree only (memory)
      variants.update({
          'adamw2 num_iterations=2': optax_spectral.adamw2(
              lr, num_iterations=2),
          'adamw2 block_size=1': optax_spectral.adamw2(lr, block_size=1),
          'optax.adamw + clip_by_global_norm': optax.chain(
              optax.clip_by_global_norm(1.0), optax.adamw(lr)),
          'optax.lamb': optax.lamb(lr),
      })
    print(f'{tree_name}: {len(variants)} optimizers', flush=True)
    result['update'][tree_name] = update_benchmark(params, variants, reps)
    save()
    del params, variants
    jax.clear_caches()
  if not accelerator or args.quick:
    # A property of the compiled graph, measured where the targets are set
    # (XLA:CPU); on an accelerator the per-tree kernel counts above show it.
    print('growth of the compiled update', flush=True)
    result['growth'] = growth(args.quick)
    save()
  if not args.skip_train_step:
    print('train step', flush=True)
    result['train_step'] = train_step_benchmark(reps, accelerator, args.quick)
    save()
  print(to_markdown(result))
  return result


if __name__ == '__main__':
  main()
