"""Does adamw2 remove the need for warmup? The paper's headline in miniature.

    python benchmarks/stability.py            # ~35 minutes on 2 CPU cores
    python benchmarks/stability.py --quick    # ~1 minute, what CI runs

Grid: learning rates from "AdamW is fine" to "AdamW without warmup
collapses" x {adamw, adamw + warmup, adamw2 (default tau), adamw2 at other
taus} x seeds, on the GPT and ViT examples. A run *crashed* if some head's
mean attention entropy fell below 0.1 nats in the second half of training
(attention collapsed onto single tokens), or the loss became non-finite, or
the final loss ended more than 0.5 nats above its best 10-step mean (a loss
spike it did not recover from).
Writes benchmarks/results/stability.{md,json,png}.
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

COLLAPSE_NATS, SPIKE_NATS, crashed = (common.COLLAPSE_NATS,
                                      common.SPIKE_NATS, common.crashed)


def settings(taus, warmup):
  rows = [('adamw', 0, None), ('adamw', warmup, None), ('adamw2', 0, None)]
  return rows + [('adamw2', 0, t) for t in taus]


def label(name, warmup, tau):
  if name == 'adamw':
    return f'adamw + {warmup} warmup' if warmup else 'adamw'
  return 'adamw2' if tau is None else f'adamw2 tau={tau:g}'


def run_one(task, name, warmup, tau, lr, seed, steps, preset, data,
            init_std=None, weight_floor=None, ramp_steps=None, bound=None):
  """One training run: its score (GPT: mean train loss of the last 10% of
  steps; ViT: test accuracy), min late attention entropy, crash flag, and
  the mean fraction of matrices the bound shrank in each third of the run."""
  cfg = common.OptimizerConfig(name=name, lr=lr, warmup_steps=warmup,
                               tau=tau, steps=steps,
                               weight_floor=weight_floor,
                               ramp_steps=ramp_steps, bound=bound)
  if task == 'gpt':
    model_cfg = dataclasses.replace(gpt.PRESETS[preset], init_std=init_std)
    _, history = gpt.train(cfg, model_cfg, data, seed=seed)
    score = float(np.mean([r['loss'] for r in history[-max(steps // 10, 1):]]))
  else:
    model_cfg = dataclasses.replace(vit.PRESETS[preset], init_std=init_std)
    _, history, score = vit.train(cfg, model_cfg, data, seed=seed)
  late = history[len(history) // 2:]
  thirds = np.array_split([r['bound_active'] for r in history], 3)
  return {'task': task, 'setting': label(name, warmup, tau), 'lr': lr,
          'seed': seed, 'score': score,
          'min_entropy': float(min(r['entropy_min'] for r in late)),
          'crashed': crashed(history),
          'bound_active_thirds': [float(np.mean(t)) for t in thirds],
          'held_back': held_back(history)}


# A kind of matrix is released once its mean factor stays at or above this.
RELEASED = 0.9


def held_back(history: list[dict]) -> dict[str, dict[str, float]]:
  """The self-timed warmup of each kind of matrix (common.GROUPS): the step
  from which its mean applied factor stays >= :data:`RELEASED`
  (``released``), and the steps' worth of learning rate it held back,
  ``Σ_t (1 - factor_t)`` (``area``; a linear warmup of ``L`` steps holds
  back ``L / 2``). Empty for plain adamw."""
  out = {}
  for group in common.GROUPS:
    factors = [r.get(f'group_factor/{group}') for r in history]
    if any(f is None for f in factors):
      continue
    steps = [r['step'] for r in history]
    below = [s for s, f in zip(steps, factors) if f < RELEASED]
    out[group] = {'released': float(below[-1] + 1 if below else steps[0]),
                  'area': float(np.sum(1 - np.asarray(factors)))}
  return out


def plot(runs, tasks, lrs, rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5),
                           squeeze=False)
  for ax, task in zip(axes[0], tasks):
    grid = np.full((len(rows), len(lrs)), np.nan)
    notes = [[''] * len(lrs) for _ in rows]
    for i, row in enumerate(rows):
      for j, lr in enumerate(lrs):
        cell = [r for r in runs if r['task'] == task and r['setting'] == row
                and r['lr'] == lr]
        if cell:
          grid[i, j] = np.mean([r['score'] for r in cell])
          notes[i][j] = (f"{grid[i, j]:.3f}\n"
                         f"{sum(r['crashed'] for r in cell)}/{len(cell)} "
                         'crashed')
    cmap = 'viridis_r' if task == 'gpt' else 'viridis'
    im = ax.imshow(grid, cmap=cmap, aspect='auto')
    for i in range(len(rows)):
      for j in range(len(lrs)):
        ax.text(j, i, notes[i][j], ha='center', va='center', fontsize=8,
                color='w')
    ax.set_xticks(range(len(lrs)), [f'{lr:g}' for lr in lrs])
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel('peak learning rate')
    ax.set_title(f'{task}: ' + ('final train loss (lower is better)'
                                if task == 'gpt' else
                                'test accuracy (higher is better)'))
    fig.colorbar(im, ax=ax)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--quick', action='store_true')
  p.add_argument('--tasks', nargs='+', default=['gpt', 'vit'])
  p.add_argument('--lrs', type=float, nargs='+', default=None)
  p.add_argument('--seeds', type=int, nargs='+', default=None)
  p.add_argument('--out', default=os.path.join(HERE, 'results', 'stability'))
  args = p.parse_args(argv)
  if args.quick:
    lrs, seeds, steps, preset, taus, warmup = [3e-3, 3e-2], [0], 40, 'tiny', [
        0.05], 10
  else:
    lrs, seeds, steps, preset, taus, warmup = [1e-3, 3e-3, 1e-2, 3e-2], [
        0, 1, 2], 150, 'small', [0.01, 0.05], 50
  lrs, seeds = args.lrs or lrs, args.seeds or seeds
  data = {'gpt': gpt.CharData(gpt.pydoc_text()), 'vit': vit.digits()}
  rows = [label(*s) for s in settings(taus, warmup)]
  runs, t0 = [], time.time()
  for task in args.tasks:
    for name, w, tau in settings(taus, warmup):
      for lr in lrs:
        for seed in seeds:
          runs.append(run_one(task, name, w, tau, lr, seed, steps, preset,
                              data[task]))
          print(json.dumps(runs[-1]), f'{time.time() - t0:.0f}s', flush=True)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out + '.json', 'w') as f:
    json.dump({'steps': steps, 'preset': preset, 'seeds': seeds,
               'warmup': warmup, 'runs': runs}, f, indent=1)
  lines = [f'# Stability: {steps} steps, preset {preset}, seeds {seeds}, '
           f'no warmup unless stated', '',
           f'Crashed: min attention entropy < {COLLAPSE_NATS} nats in the '
           f'second half, a non-finite loss, or a final loss {SPIKE_NATS} '
           'nats above its best. Cells: mean final train loss (GPT) or test '
           'accuracy (ViT) over seeds, and crashed runs / seeds.', '']
  for task in args.tasks:
    lines += [f'## {task}', '', '| setting | ' + ' | '.join(
        f'lr {lr:g}' for lr in lrs) + ' |', '|---' * (len(lrs) + 1) + '|']
    for row in rows:
      cells = []
      for lr in lrs:
        cell = [r for r in runs if r['task'] == task and r['setting'] == row
                and r['lr'] == lr]
        cells.append(f"{np.mean([r['score'] for r in cell]):.3f} "
                     f"({sum(r['crashed'] for r in cell)}/{len(cell)})")
      lines.append(f'| {row} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  lines.append('![stability](stability.png)')
  with open(args.out + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  plot(runs, args.tasks, lrs, rows, args.out + '.png')
  print('\n'.join(lines))
  return runs


if __name__ == '__main__':
  main()
