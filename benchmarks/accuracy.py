"""How accurate are the σ1 estimates? Against numpy.linalg.svd, every step.

    python benchmarks/accuracy.py            # ~6 minutes on 2 CPU cores
    python benchmarks/accuracy.py --quick    # 40 steps, tiny model

Trains the GPT example (no warmup, lr 1e-2) with adamw2 under several
estimator settings and compares, at every step and for every bounded matrix,
the estimates of σ1(W) and σ1(Δ) stored in the optimizer state with exact
SVDs, and the applied step σ1(factor·Δ) with the intended τ σ1(W).
Writes benchmarks/results/accuracy.{md,json,png}.
"""

import argparse
import json
import os
import sys

import jax
import numpy as np
import optax
from flax import nnx

import optax_spectral

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'examples'))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import gpt  # pylint: disable=g-import-not-at-top,wrong-import-position

SETTINGS = {
    'default': {},
    'num_iterations=2': {'num_iterations': 2},
    'no extrapolation': {'max_extrapolation': 0.0},
    'block_size=1, no extrapolation': {'block_size': 1,
                                       'max_extrapolation': 0.0},
}


def kernels(model):
  """``{name: W}`` named as in ``spectral_stats``."""
  flat = jax.tree_util.tree_flatten_with_path(
      nnx.as_pure(nnx.state(model, nnx.Param)))[0]
  return {jax.tree_util.keystr(p, simple=True, separator='/'):
          np.asarray(x, np.float64) for p, x in flat if x.ndim == 2}


def sigma1(x):
  return float(np.linalg.svd(x, compute_uv=False)[0])


def run(setting, steps, preset, lr, tau):
  data = gpt.CharData(gpt.pydoc_text())
  cfg = gpt.PRESETS[preset]
  cfg = type(cfg)(**{**cfg.__dict__, 'vocab_size': data.vocab_size})
  jax.set_mesh(common.make_mesh())  # the model is annotated
  model = gpt.GPT(cfg, nnx.Rngs(0))
  # The examples' adamw2 settings (common.make_optimizer), with the
  # estimator settings under test.
  tx = optax_spectral.adamw2(
      optax.cosine_decay_schedule(lr, steps, alpha=0.1), b2=0.95,
      weight_decay=0.1, tau=tau, **SETTINGS[setting],
      mask=lambda params: jax.tree.map(lambda p: p.ndim >= 2, params),
      dimension_numbers=common.dimension_numbers(model))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rows = []
  for step in range(steps):
    before = kernels(model)
    x, y = data.batch(np.random.default_rng([0, step]), 32, cfg.block_size)
    gpt.train_step(model, optimizer, x, y)
    after = kernels(model)
    stats = optax_spectral.spectral_stats(optimizer.opt_state)
    for name, w in before.items():
      factor = float(stats[f'{name}/factor'])
      applied = after[name] - w
      s_w, s_applied = sigma1(w), sigma1(applied)
      s_d = s_applied / factor  # the unbounded step (factor is a scalar)
      rows.append({
          'step': step, 'matrix': name, 'factor': factor,
          'err_weight': float(stats[f'{name}/sigma_weight']) / s_w - 1,
          'err_update': float(stats[f'{name}/sigma_update']) / s_d - 1,
          'excess': s_applied / (tau * s_w) - 1,
      })
  return rows


def summarize(rows):
  late = [r for r in rows if r['step'] > 5]
  ew = np.array([r['err_weight'] for r in late])
  eu = np.array([r['err_update'] for r in late])
  ex = np.array([r['excess'] for r in late if r['factor'] < 1])
  return {
      'weight_median_abs': float(np.median(np.abs(ew))),
      'weight_worst': float(ew[np.argmax(np.abs(ew))]),
      'update_median_abs': float(np.median(np.abs(eu))),
      'update_worst': float(eu[np.argmax(np.abs(eu))]),
      'bounded_steps': int(len(ex)),
      'frac_exceeding': float(np.mean(ex > 1e-3)) if len(ex) else 0.0,
      'worst_excess': float(ex.max()) if len(ex) else 0.0,
      'first_step_update_err': float(np.min(
          [r['err_update'] for r in rows if r['step'] == 0])),
  }


def plot(all_rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(12, 4))
  for setting, rows in all_rows.items():
    steps = sorted({r['step'] for r in rows})
    for ax, key in zip(axes, ('err_weight', 'err_update')):
      worst = [min(r[key] for r in rows if r['step'] == s) for s in steps]
      med = [np.median([r[key] for r in rows if r['step'] == s])
             for s in steps]
      line, = ax.plot(steps, 100 * np.array(med), label=f'{setting} (median)')
      ax.plot(steps, 100 * np.array(worst), color=line.get_color(), ls=':',
              lw=1, label=f'{setting} (lowest)')
  axes[0].set(title='σ1(W) estimate vs exact SVD', xlabel='step',
              ylabel='relative error (%)')
  axes[1].set(title='σ1(Δ) estimate vs exact SVD', xlabel='step',
              ylabel='relative error (%)')
  for ax in axes:
    ax.axhline(0, color='k', lw=0.5)
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--quick', action='store_true')
  p.add_argument('--steps', type=int, default=None)
  p.add_argument('--lr', type=float, default=1e-2)
  p.add_argument('--tau', type=float, default=0.02)
  p.add_argument('--out', default=os.path.join(HERE, 'results', 'accuracy'))
  p.add_argument('--settings', nargs='+', default=list(SETTINGS),
                 choices=list(SETTINGS), help='estimator settings to run')
  args = p.parse_args()
  steps = args.steps or (40 if args.quick else 300)
  preset = 'tiny' if args.quick else 'small'
  all_rows, summary = {}, {}
  for setting in args.settings:
    all_rows[setting] = run(setting, steps, preset, args.lr, args.tau)
    summary[setting] = summarize(all_rows[setting])
    print(setting, json.dumps(summary[setting]), flush=True)
  with open(args.out + '.json', 'w') as f:
    json.dump({'steps': steps, 'preset': preset, 'lr': args.lr,
               'tau': args.tau, 'summary': summary}, f, indent=1)
  lines = [f'# σ1 estimates against numpy.linalg.svd: GPT example '
           f'({preset}), {steps} steps, lr {args.lr:g}, tau {args.tau:g}, '
           'no warmup', '',
           'Relative errors over every bounded matrix and every step after '
           'the fifth (negative = underestimate). "Excess" is how far the '
           'applied step σ1(factor·Δ) went over τ·σ1(W) on steps where the '
           'bound was active.', '',
           '| setting | σ1(W) median abs | σ1(W) worst | σ1(Δ) median abs | '
           'σ1(Δ) worst | step 0 σ1(Δ) worst | bounded matrix-steps | '
           'frac. exceeding | worst excess |',
           '|---|---|---|---|---|---|---|---|---|']
  for k, s in summary.items():
    lines.append(
        f"| {k} | {100 * s['weight_median_abs']:.2f}% | "
        f"{100 * s['weight_worst']:+.2f}% | "
        f"{100 * s['update_median_abs']:.2f}% | "
        f"{100 * s['update_worst']:+.2f}% | "
        f"{100 * s['first_step_update_err']:+.2f}% | {s['bounded_steps']} | "
        f"{100 * s['frac_exceeding']:.1f}% | {100 * s['worst_excess']:+.2f}% |")
  with open(args.out + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n\n![errors](accuracy.png)\n')
  plot(all_rows, args.out + '.png')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
