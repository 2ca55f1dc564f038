"""How the defaults were chosen: a tau sweep on the GPT example, no warmup.

    python benchmarks/defaults.py            # ~15 minutes on 2 CPU cores

Trains the GPT example ('small' preset) on the embedded pydoc text at
learning rates 3e-3 and 1e-2 without warmup: adamw2 over a tau sweep, against
adamw without and with warmup. Writes benchmarks/results/defaults.{md,json}.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'examples'))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import gpt  # pylint: disable=g-import-not-at-top,wrong-import-position


def summarize(history):
  tail = history[-max(len(history) // 10, 1):]
  return {'final_loss': float(np.mean([r['loss'] for r in tail])),
          'min_entropy_late': float(min(
              r['entropy_min'] for r in history[len(history) // 2:])),
          'bound_active_mean': float(np.mean(
              [r['bound_active'] for r in history]))}


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--lrs', type=float, nargs='+', default=[3e-3, 1e-2])
  p.add_argument('--taus', type=float, nargs='+',
                 default=[0.01, 0.02, 0.05, 0.1])
  p.add_argument('--warmup', type=int, default=100)
  p.add_argument('--out', default=os.path.join(HERE, 'results', 'defaults'))
  args = p.parse_args()
  data = gpt.CharData(gpt.pydoc_text())
  runs = []
  for lr in args.lrs:
    grid = [('adamw', 0, None), ('adamw', args.warmup, None)] + [
        ('adamw2', 0, tau) for tau in args.taus]
    for name, warmup, tau in grid:
      cfg = common.OptimizerConfig(name=name, lr=lr, warmup_steps=warmup,
                                   tau=tau, steps=args.steps)
      t0 = time.time()
      _, history = gpt.train(cfg, gpt.PRESETS['small'], data)
      row = {'optimizer': name, 'lr': lr, 'warmup': warmup, 'tau': tau,
             **summarize(history), 'seconds': time.time() - t0}
      print(json.dumps(row), flush=True)
      runs.append(row)
  with open(args.out + '.json', 'w') as f:
    json.dump(runs, f, indent=1)
  with open(args.out + '.md', 'w') as f:
    f.write(f'# tau sweep: GPT example (small preset), {args.steps} steps, '
            'no warmup unless stated\n\n')
    f.write('| lr | optimizer | warmup | tau | final loss | min attention '
            'entropy (2nd half) | bound active (mean frac.) |\n')
    f.write('|---|---|---|---|---|---|---|\n')
    for r in runs:
      f.write(f"| {r['lr']:g} | {r['optimizer']} | {r['warmup']} | "
              f"{'' if r['tau'] is None else r['tau']} | "
              f"{r['final_loss']:.3f} | {r['min_entropy_late']:.3f} | "
              f"{r['bound_active_mean']:.2f} |\n")


if __name__ == '__main__':
  main()
