"""The paper's claim at GPT-2-small size, on one GPU.

    python benchmarks/scale.py            # ~4 minutes on one H100/H200
    python benchmarks/scale.py --quick    # ~1 minute on 2 CPU cores (CI)

Trains the GPT example's ``gpt2-small`` preset (12 layers x 768, block 1024,
byte vocabulary) on CPython's standard library source (``--data stdlib``, ~30
MB, offline) in bfloat16 with float32 params, three times on the same batches
and schedule (cosine decay to lr/10): AdamW without warmup, AdamW with
warmup, and AdamW² without warmup, at a peak learning rate meant to be high
enough that AdamW without warmup degrades. Reports per run the validation
loss, the smallest attention entropy over training, the crash flag
(``common.crashed``, the README's rule), tokens/s, MFU and the step time over
AdamW's, and plots the loss and entropy curves.

Writes benchmarks/results/<device>-scale.{md,json,png} (``-scale-quick`` with
``--quick``).
"""

import argparse
import dataclasses
import json
import os
import sys
import textwrap
import time

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'examples'))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import gpt  # pylint: disable=g-import-not-at-top,wrong-import-position

FULL = dict(preset='gpt2-small', steps=1500, warmup=150, batch_size=16,
            lr=3e-3, log_every=10)
QUICK = dict(preset='tiny', steps=40, warmup=10, batch_size=8, lr=3e-2,
             log_every=2)


def device_name() -> str:
  """``nvidia-h200``, ``tpu-v5-lite``, ``cpu``: for file names."""
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return 'cpu'
  return '-'.join(device.device_kind.lower().replace('_', ' ').split())


def runs(warmup: int):
  """(label, optimizer, warmup steps)."""
  return [('adamw, no warmup', 'adamw', 0),
          (f'adamw, {warmup} warmup steps', 'adamw', warmup),
          ('adamw2, no warmup', 'adamw2', 0)]


def run_one(label, name, warmup, args, cfg, data):
  opt = common.OptimizerConfig(name=name, lr=args.lr, warmup_steps=warmup,
                               steps=args.steps)
  run = common.RunConfig(log_every=args.log_every, desc=label)
  t0 = time.time()
  model, history = gpt.train(opt, cfg, data, args.batch_size, run=run)
  cfg = dataclasses.replace(cfg, vocab_size=data.vocab_size)
  return {'run': label, 'optimizer': name, 'warmup_steps': warmup,
          'val_loss': gpt.validation_loss(model, data, cfg.block_size),
          'train_loss': float(np.mean([r['loss'] for r in history[-5:]])),
          'min_entropy': float(min(r['entropy_min'] for r in history)),
          'min_entropy_late': float(min(
              r['entropy_min'] for r in history[len(history) // 2:])),
          'crashed': common.crashed(history), **common.throughput(history),
          'seconds': time.time() - t0,
          'curve': [{k: r[k] for k in ('step', 'loss', 'entropy_min',
                                       'bound_active')} for r in history]}


def plot(results, path, title):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
  for r in results:
    steps = [c['step'] for c in r['curve']]
    axes[0].plot(steps, [c['loss'] for c in r['curve']], label=r['run'])
    axes[1].plot(steps, [c['entropy_min'] for c in r['curve']],
                 label=r['run'])
  fig.suptitle('\n'.join(textwrap.wrap(title, 110)), fontsize=10)
  axes[0].set(title='training loss', xlabel='step',
              ylabel='cross-entropy (nats per byte)')
  axes[1].axhline(common.COLLAPSE_NATS, color='gray', ls=':', lw=1)
  axes[1].set(title='smallest attention entropy over heads and layers',
              xlabel='step', ylabel='nats', ylim=(0, None))
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout(rect=(0, 0, 1, 0.93))
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--quick', action='store_true',
                 help='a tiny model for a few steps: what CI runs on CPU')
  for key, value in FULL.items():
    p.add_argument('--' + key.replace('_', '-'), type=type(value),
                   default=None, help=f'default {value} ({QUICK[key]} with '
                   '--quick)')
  p.add_argument('--dtype', default='bfloat16',
                 choices=['float32', 'bfloat16'])
  p.add_argument('--out', default=None, help='output path without extension '
                 '(default: benchmarks/results/<device>-scale[-quick])')
  args = p.parse_args(argv)
  for key, value in (QUICK if args.quick else FULL).items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  if not 0 <= args.warmup < args.steps:
    raise ValueError(f'--warmup must be in [0, --steps), got {args.warmup}')
  device = device_name()
  out = args.out or os.path.join(
      HERE, 'results', f"{device}-scale{'-quick' if args.quick else ''}")
  cfg = dataclasses.replace(gpt.PRESETS[args.preset], dtype=args.dtype)
  t0 = time.time()
  data = gpt.stdlib_corpus()
  print(f'stdlib corpus: {len(data.train) / 1e6:.1f}M train bytes, '
        f'{len(data.val) / 1e6:.1f}M validation bytes '
        f'({time.time() - t0:.1f}s)', flush=True)
  results = []
  for label, name, warmup in runs(args.warmup):
    results.append(run_one(label, name, warmup, args, cfg, data))
    r = results[-1]
    print(f"{label}: validation loss {r['val_loss']:.3f}, min entropy "
          f"{r['min_entropy']:.3f}, crashed {r['crashed']}, "
          f"{r['tokens_per_s']:,.0f} tokens/s, {r['seconds']:.0f}s",
          flush=True)
  base = results[0]['step_s']
  for r in results:
    r['step_time_ratio'] = r['step_s'] / base
  params = gpt.param_count(dataclasses.replace(cfg,
                                               vocab_size=data.vocab_size))
  title = (f'{args.preset} ({params:,} params, {args.dtype}) on the '
           f'stdlib corpus, {device}: peak lr {args.lr:g}, {args.steps} '
           f'steps of {args.batch_size} x {cfg.block_size} bytes')
  meta = {'device': device, 'device_kind': jax.devices()[0].device_kind,
          'jax': jax.__version__, 'params': params, 'title': title,
          **{k: getattr(args, k) for k in FULL}, 'dtype': args.dtype,
          'seconds': time.time() - t0}
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + '.json', 'w') as f:
    json.dump({**meta, 'runs': results}, f, indent=1)
  lines = [f'# At scale: {title}', '',
           f"`python benchmarks/scale.py{' --quick' if args.quick else ''}`, "
           f"jax {jax.__version__}, {meta['seconds']:.0f}s in all. "
           f'Crashed: attention entropy < {common.COLLAPSE_NATS} nats in the '
           'second half, a non-finite loss, or a final loss '
           f'{common.SPIKE_NATS} nats above its best. Step time: median over '
           'logged intervals, over AdamW without warmup. MFU against the '
           "device's dense bf16 peak (none on CPU).", '',
           '| run | validation loss | min entropy (all / 2nd half) | crashed '
           '| tokens/s | MFU | step ms | step time ratio |',
           '|---|---|---|---|---|---|---|---|']
  for r in results:
    mfu = f"{r['mfu']:.1%}" if np.isfinite(r['mfu']) else '–'
    lines.append(
        f"| {r['run']} | {r['val_loss']:.3f} | {r['min_entropy']:.3f} / "
        f"{r['min_entropy_late']:.3f} | {'yes' if r['crashed'] else 'no'} | "
        f"{r['tokens_per_s']:,.0f} | {mfu} | {r['step_s'] * 1e3:.1f} | "
        f"{r['step_time_ratio']:.3f} |")
  lines += ['', f'![curves]({os.path.basename(out)}.png)']
  with open(out + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  plot(results, out + '.png', title)
  print('\n'.join(lines))
  return results


if __name__ == '__main__':
  main()
