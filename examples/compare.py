"""The main demo: AdamW with and without warmup against AdamW² without warmup.

    python examples/compare.py                 # about 3 minutes on 2 CPU cores

Trains the character-level GPT (examples/gpt.py) on the embedded pydoc text at
a high learning rate, prints a table and saves a figure with the loss, the
smallest attention entropy (the paper's crash signal) and how often the
spectral bound was active.
"""

import argparse
import dataclasses
import os
import time

import numpy as np

import common
import gpt

# A run "crashed" when some head's attention entropy collapses below this
# (nats, averaged over queries) in the second half of training, or the loss
# stops being finite.
COLLAPSE_NATS = 0.1


def crashed(history) -> bool:
  late = history[len(history) // 2:]
  return (min(r['entropy_min'] for r in late) < COLLAPSE_NATS or
          not all(np.isfinite(r['loss']) for r in history))


def plot(results, path, title):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for label, history in results.items():
    steps = [r['step'] for r in history]
    loss = np.array([r['loss'] for r in history])
    smooth = np.convolve(loss, np.ones(10) / 10, mode='valid')
    axes[0].plot(steps[9:], smooth, label=label)
    axes[1].plot(steps, [r['entropy_min'] for r in history], label=label)
    axes[2].plot(steps, [r['bound_active'] for r in history], label=label)
  axes[0].set(title='training loss (10-step mean)', xlabel='step',
              ylabel='cross-entropy (nats)')
  axes[1].axhline(COLLAPSE_NATS, color='gray', ls=':', lw=1)
  axes[1].set(title='smallest attention entropy over heads & layers\n'
              '(near 0 = attention collapsed onto one token)',
              xlabel='step', ylabel='nats', ylim=(0, None))
  axes[2].set(title='fraction of weight matrices whose step\n'
              'was shrunk by the spectral bound (adamw: none)', xlabel='step',
              ylim=(-0.02, 1.02))
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--lr', type=float, default=1e-2)
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--warmup-steps', type=int, default=100,
                 help='warmup of the "adamw + warmup" baseline')
  p.add_argument('--tau', type=float, default=None)
  p.add_argument('--preset', default='small', choices=sorted(gpt.PRESETS))
  p.add_argument('--batch-size', type=int, default=32)
  p.add_argument('--out', default='runs/compare')
  args = p.parse_args()
  os.makedirs(args.out, exist_ok=True)
  data = common.CharData(common.pydoc_text())
  base = common.OptimizerConfig(lr=args.lr, steps=args.steps, tau=args.tau)
  runs = {
      'adamw, no warmup': dataclasses.replace(base, name='adamw'),
      f'adamw, {args.warmup_steps} warmup steps': dataclasses.replace(
          base, name='adamw', warmup_steps=args.warmup_steps),
      'adamw2, no warmup': dataclasses.replace(base, name='adamw2'),
  }
  results = {}
  for label, cfg in runs.items():
    t0 = time.time()
    results[label] = gpt.train(cfg, gpt.PRESETS[args.preset], data,
                               batch_size=args.batch_size, log_every=1,
                               desc=label)
    print(f'{label}: {time.time() - t0:.0f}s', flush=True)
  print(f'\nGPT on pydoc text, lr {args.lr:g}, {args.steps} steps. Crashed = '
        f'attention entropy < {COLLAPSE_NATS} nats in the 2nd half.')
  print(f"{'run':<28}{'final loss':>11}{'min entropy':>13}{'crashed':>9}")
  for label, history in results.items():
    tail = history[-len(history) // 10:]
    late = history[len(history) // 2:]
    print(f"{label:<28}{np.mean([r['loss'] for r in tail]):>11.3f}"
          f"{min(r['entropy_min'] for r in late):>13.3f}"
          f"{'yes' if crashed(history) else 'no':>9}")
  path = os.path.join(args.out, 'gpt_compare.png')
  plot(results, path, f'char-level GPT, lr {args.lr:g}, no warmup unless '
       'stated')
  print(f'\nfigure: {path}')


if __name__ == '__main__':
  main()
