"""The main demo: AdamW with and without warmup against AdamW² without warmup.

    python examples/compare.py      # about 4.5 minutes on 2 CPU cores

Trains the character-level GPT (examples/gpt.py, CPython's help text) and the
ViT (examples/vit.py, scikit-learn's digits) at the same high learning rate,
prints a table and saves two figures: the loss, the smallest attention
entropy (the paper's crash signal) and how often the spectral bound was
active (compare.png); and what the bound did to adamw2's learning rate, per
kind of matrix, beside a linear warmup (bound.png). Attention collapse is a
result here (the table's "crashed" column), not a warning.
Metrics also go to CSV and TensorBoard under --out.
"""

import argparse
import dataclasses
import os
import time

import numpy as np

import common
import gpt
import vit

def plot(tasks, path):
  """One row per task: loss, smallest attention entropy, bound activity."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, rows = plt.subplots(len(tasks), 3, figsize=(15, 4.2 * len(tasks)),
                           squeeze=False)
  for axes, (task, results) in zip(rows, tasks.items()):
    for label, history in results.items():
      steps = [r['step'] for r in history]
      loss = np.array([r['loss'] for r in history])
      smooth = np.convolve(loss, np.ones(10) / 10, mode='valid')
      axes[0].plot(steps[9:], smooth, label=label)
      axes[1].plot(steps, [r['entropy_min'] for r in history], label=label)
      axes[2].plot(steps, [r['bound_active'] for r in history], label=label)
    axes[0].set(title=f'{task}: training loss (mean of 10 logged steps)',
                xlabel='step',
                ylabel='cross-entropy (nats)')
    axes[1].axhline(common.COLLAPSE_NATS, color='gray', ls=':', lw=1)
    axes[1].set(title=f'{task}: smallest attention entropy over heads and '
                'layers\n(near 0 = attention collapsed onto one token)',
                xlabel='step', ylabel='nats', ylim=(0, None))
    axes[2].set(title=f'{task}: fraction of weight matrices whose step\n'
                'was shrunk by the spectral bound (adamw: none)',
                xlabel='step', ylim=(-0.02, 1.02))
    for ax in axes:
      ax.grid(alpha=0.3)
    axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--lr', type=float, default=1e-2)
  p.add_argument('--steps', type=int, default=200)
  p.add_argument('--warmup-steps', type=int, default=50,
                 help='warmup of the "adamw + warmup" baseline')
  p.add_argument('--tau', type=float, default=None)
  p.add_argument('--tasks', nargs='+', default=['gpt', 'vit'],
                 choices=['gpt', 'vit'])
  p.add_argument('--preset', default='small', choices=['tiny', 'small'])
  p.add_argument('--gpt-batch-size', type=int, default=24)
  p.add_argument('--log-every', type=int, default=2,
                 help='metrics and the attention-entropy probe every n steps')
  p.add_argument('--out', default='runs/compare')
  args = p.parse_args()
  main_process = common.init_distributed()
  os.makedirs(args.out, exist_ok=True)
  base = common.OptimizerConfig(lr=args.lr, steps=args.steps, tau=args.tau)
  runs = {
      'adamw, no warmup': dataclasses.replace(base, name='adamw'),
      f'adamw, {args.warmup_steps} warmup steps': dataclasses.replace(
          base, name='adamw', warmup_steps=args.warmup_steps),
      'adamw2, no warmup': dataclasses.replace(base, name='adamw2'),
  }
  tasks, table = {}, []
  for task in args.tasks:
    data = gpt.CharData(gpt.pydoc_text()) if task == 'gpt' else vit.digits()
    tasks[task] = {}
    for label, cfg in runs.items():
      t0 = time.time()
      run = common.RunConfig(out_dir=os.path.join(
          args.out, task, cfg.name + ('_warmup' if cfg.warmup_steps else '')),
                             desc=f'{task}: {label}',
                             log_every=args.log_every,
                             warn_on_collapse=False)
      if task == 'gpt':
        model, history = gpt.train(cfg, gpt.PRESETS[args.preset], data,
                                   args.gpt_batch_size, run=run)
        block = model.wpe.num_embeddings
        score = f'val loss {gpt.validation_loss(model, data, block):.3f}'
      else:
        _, history, acc = vit.train(cfg, vit.PRESETS[args.preset], data,
                                    run=run)
        score = f'test acc {acc:.3f}'
      tasks[task][label] = history
      late = history[len(history) // 2:]
      table.append((task, label, score, min(r['entropy_min'] for r in late),
                    common.crashed(history), time.time() - t0))
  if not main_process:
    return
  print(f'\nlr {args.lr:g}, {args.steps} steps. Crashed = attention entropy '
        f'< {common.COLLAPSE_NATS} nats in the second half, a non-finite '
        f'loss, or a final loss {common.SPIKE_NATS} nats above its best.')
  print(f"{'task':<5}{'run':<26}{'result':>17}{'min entropy':>13}"
        f"{'crashed':>9}{'time':>7}")
  for task, label, score, entropy, bad, seconds in table:
    print(f"{task:<5}{label:<26}{score:>17}{entropy:>13.3f}"
          f"{'yes' if bad else 'no':>9}{seconds:>6.0f}s")
  path = os.path.join(args.out, 'compare.png')
  plot(tasks, path)
  bound_path = os.path.join(args.out, 'bound.png')
  common.plot_bound({task: results['adamw2, no warmup']
                     for task, results in tasks.items()},
                    runs['adamw2, no warmup'], bound_path, args.warmup_steps)
  print(f'\nfigures: {path} (loss, entropy), {bound_path} (what the bound '
        'did to the learning rate)')


if __name__ == '__main__':
  main()
