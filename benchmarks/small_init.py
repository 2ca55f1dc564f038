"""Is adamw2 neutral where AdamW is fine, whatever the init scale?

    python benchmarks/small_init.py            # ~90 minutes on 2 CPU cores
    python benchmarks/small_init.py --quick    # ~1 minute, what CI runs
    python benchmarks/small_init.py --tasks vit --inits 'std 0.02' \
        'std 0.01' --seeds 0 1 2 3 4 5 6 7 --skip-ablations \
        --out benchmarks/results/small_init_vit_8seeds   # ~45 minutes
    python benchmarks/small_init.py --tasks vit --inits 'std 0.01' \
        --lrs 0.003 --steps 300 --seeds 0 1 2 3 4 5 6 7 --skip-ablations \
        --out benchmarks/results/small_init_vit_300steps  # ~20 minutes
    python benchmarks/small_init.py --tasks gpt vit --inits lecun \
        'std 0.01' --lrs 0.003 0.03 --seeds 0 1 --skip-ablations \
        --variants bound=attention 'bound=attention,ramp_steps=0' \
        --out benchmarks/results/bound_choice   # ~25 minutes: which matrices
    OUT=benchmarks/results bash benchmarks/small_init_gpu.sh  # one GPU, 8 min:
        # ~90 seeds of the std-0.01 ViT cells, nproc - 2 runs at once

A bound relative to σ1(W) throttles a matrix that starts small: with
``tau=0.02`` it may grow by 2% of its small self per step. Grid: init scale
(variance-preserving LeCun normal, std 0.02 as in GPT-2/ViT, std 0.01) x
peak learning rate x {adamw, adamw + warmup, adamw2 with the paper's rule
(``weight_floor=0, ramp_steps=0``), adamw2 with a constant floor
(``ramp_steps=0``, the default before the ramp), adamw2 default (floor and
ramp)} x seeds, on the GPT and ViT examples. Each finished run is appended
to ``<out>.jsonl`` at once and skipped when the command is run again, so an
interrupted sweep resumes.
Writes benchmarks/results/small_init.{md,json,png}.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from optax_spectral import _matrices

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import stability  # pylint: disable=g-import-not-at-top,wrong-import-position

gpt, vit = stability.gpt, stability.vit

INITS = {'lecun': None, 'std 0.02': 0.02, 'std 0.01': 0.01}


def settings(warmup):
  """(label, optimizer, warmup steps, adamw2 options)."""
  return [('adamw', 'adamw', 0, {}),
          (f'adamw + {warmup} warmup', 'adamw', warmup, {}),
          ('adamw2 paper rule (weight_floor=0)', 'adamw2', 0,
           {'weight_floor': 0.0, 'ramp_steps': 0}),
          ('adamw2 constant floor (ramp_steps=0)', 'adamw2', 0,
           {'ramp_steps': 0}),
          ('adamw2 (default)', 'adamw2', 0, {})]


VARIANT_OPTIONS = ('tau', 'weight_floor', 'ramp_steps', 'bound')
BOUND_CHOICES = _matrices.BOUND_CHOICES


def variant(spec: str):
  """``'weight_floor=2,ramp_steps=25'`` or ``'bound=attention'`` -> a
  settings row of adamw2 with those options; ValueError on anything else."""
  options = {}
  for part in spec.split(','):
    name, eq, value = part.partition('=')
    name = name.strip()
    if not eq or name not in VARIANT_OPTIONS:
      raise ValueError(f'{spec!r}: expected comma-separated OPTION=VALUE '
                       f'with OPTION one of {", ".join(VARIANT_OPTIONS)}')
    if name == 'bound':
      if value.strip() not in BOUND_CHOICES:
        raise ValueError(f'{spec!r}: bound must be one of '
                         f'{", ".join(BOUND_CHOICES)}')
      options[name] = value.strip()
      continue
    try:
      number = float(value)
    except ValueError:
      raise ValueError(f'{spec!r}: {value!r} is not a number') from None
    if not np.isfinite(number) or number < 0 or (number == 0 and
                                                 name == 'tau'):
      raise ValueError(f'{spec!r}: {name} must be finite and '
                       f'{"> 0" if name == "tau" else ">= 0"}')
    options[name] = number
  return (f'adamw2 {spec.replace(" ", "")}', 'adamw2', 0, options)


def key(r):
  return (r['task'], r['init'], r['setting'], r['lr'], r['seed'])


def cell(runs, task, init, row, lr):
  """The runs (one per seed) of one grid cell."""
  return [r for r in runs if key(r)[:4] == (task, init, row, lr)]


def table(runs, task, inits, rows, lrs):
  """Markdown: one row per (init, setting), mean score over seeds."""
  lines = ['| init | setting | ' + ' | '.join(f'lr {lr:g}' for lr in lrs)
           + ' |', '|---|---' + '|---' * len(lrs) + '|']
  for init in inits:
    for row in rows:
      cells = []
      for lr in lrs:
        here = cell(runs, task, init, row, lr)
        if not here:
          cells.append('–')
          continue
        active = np.mean([r['bound_active_thirds'] for r in here], axis=0)
        note = ('' if row.startswith('adamw ') or row == 'adamw' else
                ' [' + '/'.join(f'{a:.0%}' for a in active) + ']')
        cells.append(f"{np.mean([r['score'] for r in here]):.3f} "
                     f"({sum(r['crashed'] for r in here)}/{len(here)})"
                     + note)
      lines.append(f'| {init} | {row} | ' + ' | '.join(cells) + ' |')
  return lines


def verdicts(runs, task, inits, rows, lrs, warmup):
  """The issue's test: at the LR where AdamW + warmup does best, adamw2 is
  within ``margin`` of it or better; at the highest LR it beats both AdamW
  runs."""
  margin, sign = (0.01, -1) if task == 'gpt' else (0.005, 1)
  mean = lambda init, row, lr: np.mean(
      [r['score'] for r in cell(runs, task, init, row, lr)] or [np.nan])
  out = []
  for init in inits:
    warm = [mean(init, f'adamw + {warmup} warmup', lr) for lr in lrs]
    if np.all(np.isnan(warm)):
      continue
    best = lrs[int(np.nanargmax(sign * np.array(warm)))]
    for row in rows[2:]:
      # Paired over the seeds both have (seeds differ far more than rules),
      # so the difference and its standard error cover the same runs.
      theirs = {r['seed']: r['score'] for r in cell(
          runs, task, init, f'adamw + {warmup} warmup', best)}
      paired = [sign * (r['score'] - theirs[r['seed']]) for r in cell(
          runs, task, init, row, best) if r['seed'] in theirs]
      diff = np.mean(paired) if paired else np.nan
      se = (f' ± {np.std(paired, ddof=1) / np.sqrt(len(paired)):.3f}'
            if len(paired) > 1 else '')
      high = max(lrs)
      others = [mean(init, other, high) for other in rows[:2]]
      mine = mean(init, row, high)
      # With one learning rate there is no high rate to compare at.
      beats = ('n/a' if len(lrs) < 2 or np.isnan([mine] + others).any() else
               'yes' if all(sign * mine > sign * o for o in others) else 'no')
      verdict = ('n/a' if np.isnan(diff) else 'neutral or better'
                 if diff >= -margin else 'worse')
      out.append(f'| {init} | {row} | {best:g} | {diff:+.3f}{se} '
                 f'({verdict}) | '
                 f'{beats} |')
  return ['| init | setting | best adamw+warmup lr | vs adamw+warmup there '
          f'({"nats, lower" if task == "gpt" else "accuracy, higher"} is '
          'better) | beats both adamw at the highest lr |',
          '|---|---|---|---|---|'] + out + [
              '', 'The difference is the mean over the seeds both rows have, '
              '± its standard error.']


def plot(runs, tasks, inits, rows, lrs, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  wide = 1 if len(lrs) > 1 else 1.8  # room for the rows' labels
  fig, axes = plt.subplots(len(tasks), len(inits),
                           figsize=(4.5 * wide * len(inits),
                                    (3.6 if len(lrs) > 1 else
                                     1 + 0.4 * len(rows)) * len(tasks)),
                           squeeze=False)
  for axrow, task in zip(axes, tasks):
    for ax, init in zip(axrow, inits):
      if len(lrs) == 1:  # one rate: each row's seeds, not a curve over rates
        scores = [[r['score'] for r in cell(runs, task, init, row, lrs[0])]
                  for row in rows]
        ys = range(len(rows))[::-1]
        # ``orientation`` is new in matplotlib 3.10, ``vert`` deprecated.
        sideways = ({'orientation': 'horizontal'} if tuple(
            int(v) for v in matplotlib.__version__.split('.')[:2]) >= (3, 10)
                    else {'vert': False})
        ax.boxplot([s or [np.nan] for s in scores], positions=list(ys),
                   widths=0.6, showmeans=True, **sideways)
        for y, s in zip(ys, scores):
          ax.plot(s, np.full(len(s), y) + np.random.default_rng(y).uniform(
              -0.2, 0.2, len(s)), '.', color='0.5', alpha=0.5, ms=3)
        ax.set_yticks(list(ys), [f'{row} ({len(s)} seeds)'
                                 for row, s in zip(rows, scores)], fontsize=7)
        ax.set_title(f'{task}, init {init}, lr {lrs[0]:g}')
        ax.set_xlabel('final train loss' if task == 'gpt' else
                      'test accuracy')
        continue
      for row in rows:
        xs, ys, lo, hi = [], [], [], []
        for lr in lrs:
          s = [r['score'] for r in cell(runs, task, init, row, lr)]
          if s:
            xs.append(lr)
            ys.append(np.mean(s))
            lo.append(min(s))
            hi.append(max(s))
        if xs:
          line, = ax.plot(xs, ys, 'o-', label=row)
          ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
      ax.set_xscale('log')
      ax.minorticks_off()
      ax.set_xticks(lrs, [f'{lr:g}' for lr in lrs])
      ax.set_title(f'{task}, init {init}')
      ax.set_xlabel('peak learning rate')
      ax.set_ylabel('final train loss' if task == 'gpt' else 'test accuracy')
  if len(lrs) > 1:
    axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def read_runs(path, key_of, keep) -> dict:
  """The runs an earlier sweep appended to ``path`` (jsonl) that ``keep``
  accepts, by ``key_of``: what a resumed sweep skips."""
  done = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        r = json.loads(line)
        if keep(r):
          done[key_of(r)] = r
  return done


_DATA = {}


def run_job(job):
  """One run of the grid, as a jsonl record. Loads each task's data once per
  process."""
  task, init, (label, name, warmup, options), lr, seed, steps, preset = job
  if task not in _DATA:
    _DATA[task] = (gpt.CharData(gpt.pydoc_text()) if task == 'gpt' else
                   vit.digits())
  r = stability.run_one(task, name, warmup, options.get('tau'), lr, seed,
                        steps, preset, _DATA[task], init_std=INITS[init],
                        weight_floor=options.get('weight_floor'),
                        ramp_steps=options.get('ramp_steps'),
                        **({'bound': options['bound']} if 'bound' in options
                           else {}))
  r.update(init=init, setting=label, steps=steps, preset=preset,
           device=stability.common.jax.devices()[0].device_kind)
  return r


def _results(jobs, workers):
  """Runs ``jobs``, yielding each record as it finishes: in order in this
  process, or in ``workers`` fresh processes (spawned: JAX does not survive
  a fork), e.g. to fill a GPU with several small runs."""
  if workers <= 1 or len(jobs) <= 1:
    yield from map(run_job, jobs)
    return
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import multiprocessing  # pylint: disable=g-import-not-at-top
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=multiprocessing.get_context('spawn')) as pool:
    futures = [pool.submit(run_job, job) for job in jobs]
    try:
      for future in concurrent.futures.as_completed(futures):
        yield future.result()
    finally:
      for future in futures:
        future.cancel()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--quick', action='store_true')
  p.add_argument('--tasks', nargs='+', default=['gpt', 'vit'])
  p.add_argument('--inits', nargs='+', default=list(INITS),
                 choices=list(INITS))
  p.add_argument('--lrs', type=float, nargs='+', default=None)
  p.add_argument('--seeds', type=int, nargs='+', default=None)
  p.add_argument('--steps', type=int, default=None,
                 help='training steps per run (default 150; --quick: 30); '
                 'the warmup stays 50 (10) steps')
  p.add_argument('--skip-ablations', action='store_true',
                 help="run only adamw, adamw + warmup and adamw2's default "
                 '(not the paper rule and constant floor rows)')
  p.add_argument('--out', default=os.path.join(HERE, 'results', 'small_init'))
  p.add_argument('--variants', nargs='+', default=[], metavar='SPEC',
                 help='more adamw2 rows, each comma-separated options, e.g. '
                 "'weight_floor=2' 'tau=0.05,ramp_steps=25' 'bound=attention' "
                 "(options: "
                 f'{", ".join(VARIANT_OPTIONS)})')
  p.add_argument('--workers', type=int, default=1,
                 help='runs at once, each in its own process (default 1; '
                 'on a GPU, set XLA_PYTHON_CLIENT_PREALLOCATE=false)')
  p.add_argument('--report-only', action='store_true',
                 help='tabulate the runs already in <out>.jsonl, run none')
  args = p.parse_args(argv)
  if args.steps is not None and args.steps < 1:
    p.error(f'--steps must be at least 1, got {args.steps}')
  if args.workers < 1:
    p.error(f'--workers must be at least 1, got {args.workers}')
  try:
    extra = [variant(spec) for spec in args.variants]
  except ValueError as e:
    p.error(str(e))
  if args.quick:
    lrs, seeds, steps, preset, warmup = [3e-2], [0], 30, 'tiny', 10
  else:
    lrs, seeds, steps, preset, warmup = [3e-3, 1e-2, 3e-2], [0, 1], 150, (
        'small'), 50
  lrs, seeds, steps = args.lrs or lrs, args.seeds or seeds, (
      args.steps or steps)
  rows = settings(warmup)
  if args.skip_ablations:
    rows = rows[:2] + rows[-1:]
  rows += extra
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  done = read_runs(args.out + '.jsonl', key, lambda r: (
      r.get('steps') == steps and r.get('preset') == preset))
  # Seed by seed, so that a stopped sweep has covered the whole grid once.
  todo = [(task, init, row, lr, seed) for seed in seeds
          for task in args.tasks for init in args.inits for row in rows
          for lr in lrs]
  missing = [(task, init, row, lr, seed)
             for task, init, row, lr, seed in todo
             if (task, init, row[0], lr, seed) not in done]
  if args.report_only:
    missing = []
  jobs = [(task, init, row, lr, seed, steps, preset)
          for task, init, row, lr, seed in missing]
  t0 = time.time()
  for i, r in enumerate(_results(jobs, args.workers)):
    done[key(r)] = r
    with open(args.out + '.jsonl', 'a') as f:
      f.write(json.dumps(r) + '\n')
    print(f'[{i + 1}/{len(jobs)} {time.time() - t0:.0f}s]', json.dumps(r),
          flush=True)
  runs = [done[(task, init, row[0], lr, seed)]
          for task, init, row, lr, seed in todo
          if (task, init, row[0], lr, seed) in done]
  labels = [r[0] for r in rows]
  with open(args.out + '.json', 'w') as f:
    json.dump({'steps': steps, 'preset': preset, 'seeds': seeds,
               'warmup': warmup, 'runs': runs}, f, indent=1)
  ran = sorted({r['seed'] for r in runs})
  devices = sorted({r.get('device', 'not recorded') for r in runs})
  lines = [f'# Small inits: {steps} steps, preset {preset}, seeds {ran}, '
           'no warmup unless stated', '', f'Device: {", ".join(devices)}.', '',
           f'{len(runs)} of the {len(todo)} runs of this grid (a cell '
           'without runs shows –).', '',
           'Cells: mean final train loss (GPT, lower is better) or test '
           'accuracy (ViT, higher is better) over seeds, crashed runs / seeds '
           '(rule of benchmarks/stability.py), and for adamw2 the mean '
           'fraction of matrices whose step the bound shrank in the first, '
           'second and last third of training.', '']
  for task in args.tasks:
    lines += [f'## {task}', ''] + table(runs, task, args.inits, labels, lrs)
    lines += ['', ''] + verdicts(runs, task, args.inits, labels, lrs,
                                 warmup) + ['']
  lines.append(f'![small inits]({os.path.basename(args.out)}.png)')
  with open(args.out + '.md', 'w') as f:
    f.write('\n'.join(lines) + '\n')
  plot(runs, args.tasks, args.inits, labels, lrs, args.out + '.png')
  print('\n'.join(lines))
  return runs


if __name__ == '__main__':
  main()
