"""Cost of adamw2 against optax.adamw, measured side by side in one process.

    python benchmarks/overhead.py                # ~8 minutes on 2 CPU cores
    python benchmarks/overhead.py --quick        # small shapes, for CI/smoke

Measures, as ratios against ``optax.adamw`` with interleaved repetitions:
* the optimizer update + apply, and optimizer-state bytes, on param trees
  shaped like GPT-2 small (list of layers and scanned), GPT-2 medium and
  ViT-B/16; on GPT-2 small also other power-iteration settings and two
  comparators (adamw + clip_by_global_norm, lamb);
* one whole training step of the GPT example, and its compile time.
Writes benchmarks/results/overhead.{md,json}.
"""

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_spectral

HERE = os.path.dirname(os.path.abspath(__file__))


def transformer_params(n_layer, d, embeddings, stacked=False):
  """A transformer's param tree: embeddings plus ``n_layer`` blocks, as a
  list of layers or stacked as ``nnx.scan`` would (leading layer axis)."""
  keys = iter(jax.random.split(jax.random.key(0), 8 * n_layer + 8))
  normal = lambda *shape: 0.02 * jax.random.normal(next(keys), shape)
  def block(lead=()):
    return {
        'ln1': {'scale': jnp.ones(lead + (d,)), 'bias': jnp.zeros(lead + (d,))},
        'qkv': {'kernel': normal(*lead, d, 3 * d),
                'bias': jnp.zeros(lead + (3 * d,))},
        'proj': {'kernel': normal(*lead, d, d), 'bias': jnp.zeros(lead + (d,))},
        'ln2': {'scale': jnp.ones(lead + (d,)), 'bias': jnp.zeros(lead + (d,))},
        'fc': {'kernel': normal(*lead, d, 4 * d),
               'bias': jnp.zeros(lead + (4 * d,))},
        'fc_out': {'kernel': normal(*lead, 4 * d, d),
                   'bias': jnp.zeros(lead + (d,))},
    }
  params = {k: normal(*shape) for k, shape in embeddings.items()}
  params['ln_f'] = {'scale': jnp.ones(d), 'bias': jnp.zeros(d)}
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


def param_trees(quick: bool):
  """Builders, so that only one tree is in memory at a time."""
  if quick:
    return {'tiny': lambda: transformer_params(2, 128, {'wte': (1024, 128)})}
  gpt2 = lambda d, vocab=50304, block=1024: {'wte': (vocab, d),
                                             'wpe': (block, d)}
  # ViT-B/16 at 224px: 768-wide patch embedding of 16x16x3 pixels, 197
  # positions, 1000 classes.
  vit_b = {'patch_embed': (768, 768), 'pos': (197, 768), 'head': (768, 1000)}
  return {
      'GPT-2 small (124M)': lambda: transformer_params(12, 768, gpt2(768)),
      'GPT-2 small, scanned': lambda: transformer_params(
          12, 768, gpt2(768), stacked=True),
      'GPT-2 medium (355M)': lambda: transformer_params(24, 1024, gpt2(1024)),
      'ViT-B/16 (86M)': lambda: transformer_params(12, 768, vit_b),
  }


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
  so that eight optimizers of a 124M-param model fit in memory together.
  """
  grads = jax.tree.map(lambda p: 1e-2 * jax.random.normal(
      jax.random.key(1), p.shape, p.dtype), params)
  fns = {}
  for name, tx in variants.items():

    @jax.jit
    def step(p, s, g, tx=tx):
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    # Past the first step, which runs the cold-start iterations.
    _, state = step(params, tx.init(params), grads)
    fns[name] = (lambda step=step, state=state:
                 jax.block_until_ready(step(params, state, grads)))
    fns[name]()
  return time_interleaved(fns, reps)


def train_step_benchmark(reps: int, preset: str):
  sys.path.insert(0, os.path.join(HERE, '..', 'examples'))
  import common  # pylint: disable=g-import-not-at-top
  import gpt  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  data = gpt.CharData(gpt.pydoc_text())
  cfg = gpt.PRESETS[preset]
  cfg = type(cfg)(**{**cfg.__dict__, 'vocab_size': data.vocab_size})
  x, y = data.batch(np.random.default_rng(0), 32, cfg.block_size)
  fns, compile_s = {}, {}
  jax.set_mesh(common.make_mesh())  # the model is annotated
  for name in ('adamw', 'adamw2'):
    model = gpt.GPT(cfg, nnx.Rngs(0))
    opt = nnx.Optimizer(model, common.make_optimizer(
        common.OptimizerConfig(name=name)), wrt=nnx.Param)
    # The optimizer is part of the traced graph: the first call compiles.
    t = time.perf_counter()
    jax.block_until_ready(gpt.train_step(model, opt, x, y))
    compile_s[name] = time.perf_counter() - t
    fns[name] = (lambda model=model, opt=opt:
                 jax.block_until_ready(gpt.train_step(model, opt, x, y)))
    fns[name]()
  return time_interleaved(fns, reps), compile_s


def state_bytes(tx, params) -> int:
  shapes = jax.eval_shape(tx.init, params)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes))


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--quick', action='store_true')
  p.add_argument('--reps', type=int, default=None)
  p.add_argument('--out', default=os.path.join(HERE, 'results', 'overhead'))
  args = p.parse_args()
  reps = args.reps or (5 if args.quick else 15)
  lr = 1e-3
  result = {'device': jax.devices()[0].device_kind,
            'platform': platform.platform(), 'cpu_count': os.cpu_count(),
            'jax': jax.__version__, 'reps': reps, 'trees': {}}
  lines = [f"# Overhead against optax.adamw ({result['device']}, "
           f"{result['cpu_count']} cores, jax {result['jax']})", '',
           f'Optimizer update + apply; median of {reps} interleaved reps; '
           'ratio to optax.adamw in the same process. State: optimizer-state '
           'bytes relative to optax.adamw.', '']
  for i, (tree_name, build) in enumerate(param_trees(args.quick).items()):
    params = build()
    n = sum(x.size for x in jax.tree.leaves(params))
    dims = ({'dimension_numbers': stacked_dimension_numbers}
            if 'scanned' in tree_name else {})
    variants = {'optax.adamw': optax.adamw(lr),
                'adamw2 (default)': optax_spectral.adamw2(lr, **dims)}
    if i == 0:  # settings and comparators on the first tree only (memory)
      variants.update({
          'adamw2 num_iterations=2': optax_spectral.adamw2(
              lr, num_iterations=2),
          'adamw2 num_iterations=3': optax_spectral.adamw2(
              lr, num_iterations=3),
          'adamw2 block_size=1': optax_spectral.adamw2(lr, block_size=1),
          'adamw2 num_iterations_weight=1': optax_spectral.adamw2(
              lr, num_iterations_weight=1),
          'optax.adamw + clip_by_global_norm': optax.chain(
              optax.clip_by_global_norm(1.0), optax.adamw(lr)),
          'optax.lamb': optax.lamb(lr),
      })
    timing = update_benchmark(params, variants, reps)
    base = timing['optax.adamw']['median_s']
    base_bytes = state_bytes(variants['optax.adamw'], params)
    result['trees'][tree_name] = {'params': int(n), 'update': {
        k: {**v, 'ratio': v['median_s'] / base,
            'state_ratio': state_bytes(variants[k], params) / base_bytes}
        for k, v in timing.items()}}
    lines += [f'## {tree_name}: {n / 1e6:.0f}M params', '',
              '| optimizer | median ms | IQR ms | ratio | state |',
              '|---|---|---|---|---|']
    for k, v in result['trees'][tree_name]['update'].items():
      lines.append(f"| {k} | {1e3 * v['median_s']:.1f} | "
                   f"{1e3 * v['iqr_s']:.1f} | {v['ratio']:.3f} | "
                   f"{v['state_ratio']:.4f} |")
    lines.append('')
    del params, variants, timing
    jax.clear_caches()
  step, compile_s = train_step_benchmark(reps, 'tiny' if args.quick
                                         else 'small')
  result['train_step'] = {k: {**v, 'ratio': v['median_s'] /
                              step['adamw']['median_s']}
                          for k, v in step.items()}
  result['compile_s'] = {k: {'seconds': v, 'ratio': v / compile_s['adamw']}
                         for k, v in compile_s.items()}
  lines += ['## Whole training step of the GPT example, and its compile time',
            '', '| optimizer | step ms | ratio | compile s | ratio |',
            '|---|---|---|---|---|']
  for k in step:
    lines.append(
        f"| {k} | {1e3 * step[k]['median_s']:.1f} | "
        f"{result['train_step'][k]['ratio']:.3f} | {compile_s[k]:.2f} | "
        f"{result['compile_s'][k]['ratio']:.2f} |")
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + '.json', 'w') as f:
    json.dump(result, f, indent=1)
  text = '\n'.join(lines) + '\n'
  with open(args.out + '.md', 'w') as f:
    f.write(text)
  print(text)


if __name__ == '__main__':
  main()
