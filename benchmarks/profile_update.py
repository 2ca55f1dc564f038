"""Where an accelerator spends the optimizer's time: kernels per step, busy
time, idle gaps and the costliest HLO ops, from ``jax.profiler`` traces.

    python benchmarks/profile_update.py               # GPT-2 small trees
    python benchmarks/profile_update.py --quick       # tiny tree (smoke)

Prints one summary per (tree, optimizer) and writes them to
``benchmarks/results/<device>-profile.json``. Kernels are read from the
device's stream lines of the trace (CUPTI on GPUs); on a CPU there are none,
and only wall times are reported.
"""

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np
import optax

import optax_spectral

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead  # pylint: disable=g-import-not-at-top,wrong-import-position

GEMM = re.compile(r'gemm|cutlass|sm90|xmma|cublas|nvjet|matmul', re.I)


def device_kernels(trace_dir: str) -> tuple[list, list]:
  """``[(name, hlo_op, start_ns, duration_ns)]`` of the device's streams, and
  the names of the lines they came from."""
  path = glob.glob(os.path.join(trace_dir, '**', '*.xplane.pb'),
                   recursive=True)
  if not path:
    return [], []
  data = jax.profiler.ProfileData.from_file(path[0])
  kernels, lines = [], []
  for plane in data.planes:
    if not plane.name.startswith('/device:'):
      continue
    streams = [l for l in plane.lines if l.name.startswith('Stream')]
    for line in streams or [l for l in plane.lines if not l.name.startswith(
        ('XLA', 'Steps', 'Framework'))]:
      lines.append(line.name)
      for e in line.events:
        stats = dict(e.stats)
        op = stats.get('hlo_op') or stats.get('tf_op') or e.name
        kernels.append((e.name, str(op), e.start_ns, e.duration_ns))
  kernels.sort(key=lambda k: k[2])
  return kernels, sorted(set(lines))


def summarize(kernels, steps: int, top: int = 12) -> dict:
  """Per-step kernel count, busy and idle time, and the costliest ops."""
  if not kernels:
    return {}
  busy = sum(k[3] for k in kernels)
  by_op = collections.defaultdict(lambda: [0, 0.0])
  by_name = collections.defaultdict(lambda: [0, 0.0])
  category = collections.defaultdict(lambda: [0, 0.0])
  for name, op, _, dur in kernels:
    by_op[op][0] += 1
    by_op[op][1] += dur
    by_name[name][0] += 1
    by_name[name][1] += dur
    kind = ('product' if GEMM.search(name) or GEMM.search(op) else
            'copy' if 'memcpy' in name.lower() or op.startswith('copy') else
            'reduce' if 'reduc' in name.lower() or 'reduc' in op else
            'other')
    category[kind][0] += 1
    category[kind][1] += dur
  # Idle gaps between consecutive kernels (within steps: steps are apart by
  # the host's block_until_ready, so gaps over 1 ms are not counted).
  gaps = [b[2] - (a[2] + a[3]) for a, b in zip(kernels, kernels[1:])]
  idle = sum(g for g in gaps if 0 < g < 1e6)
  longest = sorted(gaps)[-6:]
  costly = sorted(by_op.items(), key=lambda kv: -kv[1][1])[:top]
  kernels_by_time = sorted(by_name.items(), key=lambda kv: -kv[1][1])
  return {
      'kernels_per_step': len(kernels) / steps,
      'busy_us_per_step': busy / steps / 1e3,
      'idle_us_per_step': idle / steps / 1e3,
      'longest_gaps_us': [g / 1e3 for g in longest],
      'categories': {k: {'kernels': v[0] / steps, 'us': v[1] / steps / 1e3}
                     for k, v in sorted(category.items())},
      'top_ops': [{'op': op, 'kernels': n / steps, 'us': t / steps / 1e3}
                  for op, (n, t) in costly],
      'kernels': [{'name': k, 'count': n / steps, 'us': t / steps / 1e3}
                  for k, (n, t) in kernels_by_time],
  }


def profile(fn, steps: int) -> dict:
  """Wall time and device summary of ``steps`` calls of ``fn`` (warm)."""
  for _ in range(3):
    fn()
  times = []
  for _ in range(10):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      for _ in range(steps):
        fn()
    kernels, lines = device_kernels(trace_dir)
  return {'wall_ms': 1e3 * float(np.median(times)), 'streams': lines,
          **summarize(kernels, steps)}


def update_fn(tx, params, hlo_path=None):
  step, counts, _ = overhead.compile_update(tx, params)
  if hlo_path:
    with open(hlo_path, 'w') as f:
      f.write(step.as_text())
  grads = jax.tree.map(lambda p: 1e-2 * jax.random.normal(
      jax.random.key(1), p.shape, p.dtype), params)
  _, state = step(params, tx.init(params), grads)
  return (lambda: jax.block_until_ready(step(params, state, grads))), counts


def print_summary(title: str, s: dict, top: int = 15) -> None:
  print(f"\n## {title}: {s['wall_ms']:.2f} ms wall, {s.get('hlo', {})}")
  if 'kernels_per_step' not in s:
    return
  print(f"kernels/step {s['kernels_per_step']:.0f}, busy "
        f"{s['busy_us_per_step']:.0f} us, idle gaps "
        f"{s['idle_us_per_step']:.0f} us; longest gaps (us) "
        f"{[round(g) for g in s['longest_gaps_us']]}; streams {s['streams']}")
  for k, v in s['categories'].items():
    print(f"  {k:8s} {v['kernels']:6.0f} kernels {v['us']:9.1f} us")
  for t in s['kernels'][:top]:
    print(f"  {t['us']:9.1f} us {t['count']:5.0f}x {t['name'][:100]}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--quick', action='store_true')
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--trees', nargs='*', default=None,
                 help='names from benchmarks/overhead.param_trees')
  p.add_argument('--minimal', action='store_true',
                 help='only optax.adamw and the default adamw2')
  p.add_argument('--hlo', action='store_true',
                 help="save the default adamw2's compiled update per tree")
  p.add_argument('--train-step', action='store_true',
                 help="also the GPT example's train step (list of layers)")
  p.add_argument('--out-dir', default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), 'results'))
  args = p.parse_args(argv)
  os.makedirs(args.out_dir, exist_ok=True)
  lr = 1e-3
  accelerator = jax.devices()[0].platform != 'cpu'
  trees = overhead.param_trees(args.quick, accelerator)
  if not args.quick:
    names = args.trees or ['GPT-2 small (124M)', 'GPT-2 small, scanned']
    trees = {k: trees[k] for k in names}
  result = {'device_kind': jax.devices()[0].device_kind,
            'jax': jax.__version__, 'update': {}}
  for tree, build in trees.items():
    params = build()
    dims = ({'dimension_numbers': overhead.stacked_dimension_numbers}
            if 'scanned' in tree else {})
    variants = {
        'optax.adamw': optax.adamw(lr),
        'adamw2 (default)': optax_spectral.adamw2(lr, **dims),
    }
    if not args.minimal:
      variants['adamw2 block_size=1'] = optax_spectral.adamw2(
          lr, block_size=1, **dims)
    if 'scanned' not in tree and not args.minimal:
      variants['adamw2, matrices not stacked'] = optax_spectral.adamw2(
          lr, stack_matrices=False)
    for name, tx in variants.items():
      hlo = (os.path.join(args.out_dir, re.sub(r'\W+', '_', tree).strip('_')
                          + '.hlo.txt')
             if args.hlo and name == 'adamw2 (default)' else None)
      fn, counts = update_fn(tx, params, hlo)
      s = {**profile(fn, args.steps),
           'hlo': {k: counts[k] for k in ('kernels', 'products')}}
      result['update'][f'{tree} | {name}'] = s
      print_summary(f'{tree} | {name}', s)
      del fn
    del params
    jax.clear_caches()
  if args.train_step:
    base, x, y, label = overhead.train_step_setup(accelerator, args.quick)
    result['train_step'] = {'config': label}
    for name, options in overhead.TRAIN_STEP_VARIANTS.items():
      fn, _ = overhead.train_step_fn(base, False, name.split()[0], options,
                                     x, y)
      s = profile(fn, args.steps)
      result['train_step'][name] = s
      print_summary(f'train step, list | {name}', s)
      del fn
  os.makedirs(args.out_dir, exist_ok=True)
  out = os.path.join(args.out_dir, f'{overhead.device_name()}-profile.json')
  with open(out, 'w') as f:
    json.dump(result, f, indent=1)
  print(f'\nwrote {out}')


if __name__ == '__main__':
  main()
