"""Which parameters need warmup? adamw2 with a warmup on one part only.

    python benchmarks/warmup_parts.py                 # ~6 minutes, 2 CPU cores
    python benchmarks/warmup_parts.py --task gpt --init-std 0.01 --lr 3e-3

A small-init model (ViT at std 0.02, lr 1e-2) trained by adamw2 without
warmup stays at chance for ~100 steps and then its attention collapses,
while AdamW with warmup learns. To find out what the warmup protects, this
trains adamw2 with its ramp off (``ramp_steps=0``, the constant floor) and a
50-step linear warmup multiplied into the steps of one part of the params
only: the bounded matrices, the linear layers' biases, the norm scales and
biases, the ViT's class token and position table, or everything the bound
does not cover. The answer (docs/notes.md, "Small inits") is what ``ramp_steps``
does by default. Writes benchmarks/results/warmup_parts.{md,json}.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'examples'))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import gpt  # pylint: disable=g-import-not-at-top,wrong-import-position
import vit  # pylint: disable=g-import-not-at-top,wrong-import-position

PARTS = ('none', 'matrices', 'biases', 'norms', 'tables', 'uncovered')


def in_part(part: str, name: str, bounded: bool) -> bool:
  """Whether the param called ``name`` (bounded by adamw2 or not) belongs to
  ``part``."""
  norm = 'ln' in name or 'norm' in name
  return {'none': False, 'matrices': bounded, 'uncovered': not bounded,
          'biases': not bounded and 'bias' in name and not norm,
          'norms': not bounded and norm,
          'tables': not bounded and ('cls' in name or 'pos' in name)}[part]


def warmed_up(part: str, warmup: int):
  """``common.make_optimizer`` with a linear warmup over ``warmup`` steps on
  ``part`` of the params only."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import optax_spectral  # pylint: disable=g-import-not-at-top
  make = common.make_optimizer

  def make_optimizer(cfg, model, **options):
    tx = make(cfg, model, ramp_steps=0, **options)
    dims = common.dimension_numbers(model)
    is_leaf = lambda x: x is None or isinstance(
        x, optax_spectral.SpectralDimensionNumbers)
    mask = jax.tree_util.tree_map_with_path(
        lambda path, spec: in_part(part, jax.tree_util.keystr(path),
                                   spec is not None), dims, is_leaf=is_leaf)
    ramp = lambda count: jax.numpy.minimum(1.0, count / warmup)
    return optax.chain(tx, optax.masked(optax.scale_by_schedule(ramp),
                                        lambda params: mask))
  return make_optimizer


def run(task, part, init_std, lr, seed, steps, preset, data, warmup):
  common.make_optimizer, make = warmed_up(part, warmup), common.make_optimizer
  try:
    cfg = common.OptimizerConfig(name='adamw2', lr=lr, steps=steps)
    if task == 'gpt':
      model_cfg = dataclasses.replace(gpt.PRESETS[preset], init_std=init_std)
      _, history = gpt.train(cfg, model_cfg, data, seed=seed)
      score = float(np.mean([r['loss']
                             for r in history[-max(steps // 10, 1):]]))
    else:
      model_cfg = dataclasses.replace(vit.PRESETS[preset], init_std=init_std)
      _, history, score = vit.train(cfg, model_cfg, data, seed=seed)
  finally:
    common.make_optimizer = make
  return {'task': task, 'part': part, 'init_std': init_std, 'lr': lr,
          'seed': seed, 'score': score, 'crashed': common.crashed(history),
          'loss_at': {s: history[s]['loss'] for s in (0, 25, 50, 100)
                      if s < len(history)}}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--task', default='vit', choices=['gpt', 'vit'])
  p.add_argument('--init-std', type=float, default=0.02)
  p.add_argument('--lr', type=float, default=1e-2)
  p.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
  p.add_argument('--parts', nargs='+', default=list(PARTS), choices=PARTS)
  p.add_argument('--steps', type=int, default=150)
  p.add_argument('--preset', default='small')
  p.add_argument('--warmup', type=int, default=50)
  p.add_argument('--out', default=os.path.join(HERE, 'results',
                                               'warmup_parts'))
  args = p.parse_args(argv)
  data = gpt.CharData(gpt.pydoc_text()) if args.task == 'gpt' else (
      vit.digits())
  runs, t0 = [], time.time()
  for part in args.parts:
    for seed in args.seeds:
      runs.append(run(args.task, part, args.init_std, args.lr, seed,
                      args.steps, args.preset, data, args.warmup))
      print(json.dumps(runs[-1]), f'{time.time() - t0:.0f}s', flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + '.json', 'w') as f:
    json.dump({'args': vars(args), 'runs': runs}, f, indent=1)
  metric = 'final train loss' if args.task == 'gpt' else 'test accuracy'
  lines = [f'# Which parameters need warmup: {args.task}, init std '
           f'{args.init_std}, lr {args.lr:g}, {args.steps} steps', '',
           f'adamw2 with `ramp_steps=0` and a {args.warmup}-step linear '
           'warmup on one part of the params only. Cells: mean '
           f'{metric} over seeds {args.seeds} (each seed), crashed runs.',
           '', '| warmup on | ' + metric + ' | crashed |', '|---|---|---|']
  for part in args.parts:
    s = [r['score'] for r in runs if r['part'] == part]
    c = sum(r['crashed'] for r in runs if r['part'] == part)
    lines.append(f'| {part} | {np.mean(s):.3f} ('
                 + ' / '.join(f'{x:.3f}' for x in s) + f') | {c}/{len(s)} |')
  with open(args.out + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  return runs


if __name__ == '__main__':
  main()
