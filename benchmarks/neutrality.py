"""Is adamw2 neutral where AdamW is fine, and still safe where it is not?

    python benchmarks/neutrality.py            # the whole grid (hours on 2
                                               # CPU cores; --workers on a GPU)
    python benchmarks/neutrality.py --quick    # ~2 minutes, what CI runs
    python benchmarks/neutrality.py --seeds 0 1 2 --warmups 0 25 50 \
        --long-seeds 0 1 2  # what benchmarks/results/neutrality.md ran,
                            # with --seeds 0 --variants tau=0.03 on top:
                            # 189 runs, ~35 s per 150 steps, ~3 h on 2 cores

The bound is a warmup that times itself: early on it holds each matrix's
step back until σ1(W) has grown to meet it. Where a program's own rate needs
no warmup, every step held back is cost. Both sides, on the GPT and ViT
examples at two inits (LeCun, std 0.01), paired by seed:

- **The self-timed warmup.** For each kind of matrix (attention, MLP,
  embedding, head), the step from which the bound lets at least 90% of its
  step through (*released*) and the steps' worth of learning rate it held
  back (*area*, ``Σ (1 - factor)``: a linear warmup of L steps holds back
  L / 2), at AdamW's best rate and at 10x and 30x it; beside the warmup
  AdamW needs there (its best of ``--warmups`` at the best rate).
- **Neutral side** (N steps and 4N): at AdamW's best rate, adamw2 without
  warmup against AdamW with its best warmup (targets: within 0.03 nats /
  1 point at N, 0.01 / 0.5 at 4N), and adamw2 with the program's 50-step
  warmup kept (a user who swaps only the optimizer). Beside it, AdamW
  without warmup against the same: it is *fine* where within the target.
  At N also below the best rate (``--gentle``, 0.3x), where AdamW is more
  likely to need no warmup.
- **Safe side** (N steps): each adamw2 rule (``--variants``) at 10x and
  30x without warmup against today's default (target: no worse by more
  than 0.02 nats / 1 point, never crashed).

AdamW's best rate per task and init is that of AdamW + 50 warmup in
``small_init.md`` (150 steps; 1e-2 at LeCun, 3e-3 at std 0.01). Each run is
appended to ``<out>.jsonl`` at once and skipped when the command runs again,
so an interrupted grid resumes. Writes ``<out>.{md,json,png}``.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import small_init  # pylint: disable=g-import-not-at-top,wrong-import-position

GROUPS = small_init.stability.common.GROUPS
# AdamW + 50 warmup's best rate of small_init.md's grid (150 steps).
BEST_LR = {('gpt', 'lecun'): 1e-2, ('gpt', 'std 0.01'): 3e-3,
           ('vit', 'lecun'): 1e-2, ('vit', 'std 0.01'): 3e-3}
# (neutral at N, neutral at 4N, safe side): nats (GPT) / accuracy (ViT).
TARGETS = {'gpt': (0.03, 0.01, 0.02), 'vit': (0.01, 0.005, 0.01)}


def adamw(warmup):
  return (f'adamw + {warmup} warmup' if warmup else 'adamw', 'adamw', warmup,
          {})


def adamw2(options, warmup=0):
  spec = ','.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}'
                  for k, v in options.items())
  name = 'adamw2' + (f' {spec}' if spec else ' (default)')
  return (name + (f' + {warmup} warmup' if warmup else ''), 'adamw2', warmup,
          options)


def jobs_for(args, rules, best_warmup=None):
  """Phase 1 (``best_warmup`` None): every run at N steps. Phase 2: the 4N
  runs at the best rate, AdamW with its best warmup of phase 1."""
  out = []
  for task in args.tasks:
    for init in args.inits:
      lr = BEST_LR[(task, init)]
      if best_warmup is None:
        rows = []
        for g in [1] + args.gentle:
          rows += [(adamw(w), lr * g) for w in args.warmups]
          rows += [(adamw2(options), lr * g) for options in rules]
          rows += [(adamw2(options, args.program_warmup), lr * g)
                   for options in rules]
        for options in rules:
          rows += [(adamw2(options), lr * m) for m in args.multiples]
        steps, seeds = args.steps, args.seeds
      else:
        rows = [(adamw(best_warmup[(task, init)]), lr)]
        for options in rules:
          rows += [(adamw2(options), lr),
                   (adamw2(options, args.program_warmup), lr)]
        steps, seeds = 4 * args.steps, args.long_seeds
      out += [(task, init, row, rate, seed, steps, args.preset)
              for seed in seeds for row, rate in rows]
  return out


def _key(r):
  return (r['task'], r['init'], r['setting'], round(r['lr'], 12), r['seed'],
          r['steps'])


def _mean(runs, **match):
  got = [r for r in runs if all(r.get(k) == v if k != 'lr' else
                                np.isclose(r['lr'], v)
                                for k, v in match.items())]
  return got


def paired(runs, a, b, sign):
  """``sign * (score_a - score_b)`` over the seeds both have: (mean, se,
  n)."""
  theirs = {r['seed']: r['score'] for r in b}
  diffs = [sign * (r['score'] - theirs[r['seed']]) for r in a
           if r['seed'] in theirs]
  if not diffs:
    return np.nan, np.nan, 0
  se = np.std(diffs, ddof=1) / np.sqrt(len(diffs)) if len(diffs) > 1 else (
      np.nan)
  return float(np.mean(diffs)), float(se), len(diffs)


def _fmt(diff, se, n):
  if not n:
    return '–'
  return f'{diff:+.3f}' + (f' ± {se:.3f}' if np.isfinite(se) else '') + (
      f' ({n})')


def best_warmups(runs, args, mult=1):
  """AdamW's best warmup per (task, init) at ``mult`` times its best rate,
  at N steps."""
  out = {}
  for task in args.tasks:
    sign = -1 if task == 'gpt' else 1
    for init in args.inits:
      scores = {}
      for w in args.warmups:
        got = _mean(runs, task=task, init=init, setting=adamw(w)[0],
                    lr=BEST_LR[(task, init)] * mult, steps=args.steps)
        if got:
          scores[w] = sign * np.mean([r['score'] for r in got])
      if scores:
        out[(task, init)] = max(scores, key=scores.get)
  return out


def report(runs, args, rules):
  lines = [
      f'# Neutrality: {args.steps} and {4 * args.steps} steps, preset '
      f'{args.preset}', '',
      f"Device: {', '.join(sorted({r.get('device', '?') for r in runs}))}. "
      f'{len(runs)} runs; seeds '
      f"{sorted({r['seed'] for r in runs if r['steps'] == args.steps})} at "
      f"N, {sorted({r['seed'] for r in runs if r['steps'] != args.steps})} "
      'at 4N (4N only where listed below). '
      'Command: `python benchmarks/neutrality.py' + ''.join(
          f' {a}' if a.isidentifier() or a.startswith('-') or a.replace(
              '.', '').isdigit() else f" '{a}'" for a in args.argv) + '`.',
      '',
      'Scores: GPT final train loss (nats, lower is better), ViT test '
      'accuracy (higher is better). Differences are paired by seed, as '
      '*better (+) or worse (−)* than the reference, ± standard error '
      '(number of seeds).', '']
  lines += ['## The self-timed warmup', '',
            'Per kind of matrix: the step from which the bound lets >= 90% '
            'of its step through / the steps of learning rate it held back '
            '(Σ (1 − factor); a linear warmup of L steps holds back L/2), '
            f'mean over seeds, {args.steps} steps without warmup. '
            "AdamW's best warmup: the best of "
            f'{args.warmups} at the row\'s rate (at N), whose lr it holds '
            'back by L/2.', '',
            '| task | init | rule | rate | ' + ' | '.join(GROUPS)
            + " | AdamW's best warmup (held back) |",
            '|---|---|---|---|' + '---|' * len(GROUPS) + '---|']
  for task in args.tasks:
    for init in args.inits:
      lr = BEST_LR[(task, init)]
      for options in rules:
        for mult in sorted(args.gentle) + [1] + list(args.multiples):
          w = (best_warmups(runs, args, mult).get((task, init))
               if mult <= 1 else None)
          got = _mean(runs, task=task, init=init,
                      setting=adamw2(options)[0], lr=lr * mult,
                      steps=args.steps)
          if not got:
            continue
          cells = []
          for g in GROUPS:
            vals = [r['held_back'][g] for r in got if g in r.get(
                'held_back', {})]
            cells.append('–' if not vals else
                         f"{np.mean([v['released'] for v in vals]):.0f} / "
                         f"{np.mean([v['area'] for v in vals]):.0f}")
          lines.append(
              f'| {task} | {init} | {adamw2(options)[0]} | {mult:g}× '
              f'({lr * mult:g}) | ' + ' | '.join(cells) + ' | '
              + (f'{w} ({w / 2:g})' if w is not None else '')
              + ' |')
  lines += ['', '## Neutral side: at AdamW\'s best rate and below it', '',
            'AdamW without warmup is "fine" where it is within the target '
            'of AdamW with its best warmup: only there does the issue ask '
            'the self-timed warmup to be no longer than the tuned one.', '',
            '| task | init | rate | steps | AdamW + best warmup (score) | '
            'AdamW, no warmup, vs the same | rule | '
            'no warmup vs AdamW + best warmup | with the program\'s '
            f'{args.program_warmup}-step warmup vs the same | target |',
            '|---|---|---|---|---|---|---|---|---|---|']
  for task in args.tasks:
    sign = -1 if task == 'gpt' else 1
    for init in args.inits:
      cells = [(m, args.steps, TARGETS[task][0]) for m in [1] + args.gentle]
      cells.insert(1, (1, 4 * args.steps, TARGETS[task][1]))
      for mult, steps, target in cells:
        lr = BEST_LR[(task, init)] * mult
        w = best_warmups(runs, args, mult).get((task, init))
        if w is None:
          continue
        ref = _mean(runs, task=task, init=init, setting=adamw(w)[0], lr=lr,
                    steps=steps)
        if not ref:
          continue
        bare = paired(runs, _mean(runs, task=task, init=init,
                                  setting=adamw(0)[0], lr=lr, steps=steps),
                      ref, sign)
        for options in rules:
          plain = paired(runs, _mean(runs, task=task, init=init,
                                     setting=adamw2(options)[0], lr=lr,
                                     steps=steps), ref, sign)
          kept = paired(runs, _mean(
              runs, task=task, init=init,
              setting=adamw2(options, args.program_warmup)[0], lr=lr,
              steps=steps), ref, sign)
          if options and not plain[2] and not kept[2]:
            continue  # this rule did not run here
          ok = lambda d: ('–' if not d[2] else 'met' if d[0] >= -target
                          else 'missed')
          fine = ('' if not bare[2] else 'fine' if bare[0] >= -target
                  else 'not fine')
          lines.append(
              f"| {task} | {init} | {mult:g}× ({lr:g}) | {steps} | "
              f"{adamw(w)[0]} "
              f"({np.mean([r['score'] for r in ref]):.3f}) | "
              f'{_fmt(*bare)} {fine} | '
              f'{adamw2(options)[0]} | {_fmt(*plain)} {ok(plain)} | '
              f'{_fmt(*kept)} {ok(kept)} | −{target:g} |')
  lines += ['', '## Safe side: at 10× and 30× AdamW\'s best rate, no warmup',
            '', '| task | init | rate | rule | score (crashed / seeds) | vs '
            'the default | target |', '|---|---|---|---|---|---|---|']
  for task in args.tasks:
    sign = -1 if task == 'gpt' else 1
    for init in args.inits:
      lr = BEST_LR[(task, init)]
      for mult in args.multiples:
        default = _mean(runs, task=task, init=init,
                        setting=adamw2({})[0], lr=lr * mult, steps=args.steps)
        for options in rules:
          got = _mean(runs, task=task, init=init, setting=adamw2(options)[0],
                      lr=lr * mult, steps=args.steps)
          if not got:
            continue
          vs = paired(runs, got, default, sign) if options else (
              np.nan, np.nan, 0)
          crashes = sum(r['crashed'] for r in got)
          verdict = ('' if not options else ' met' if not crashes and (
              vs[0] >= -TARGETS[task][2]) else ' missed')
          lines.append(
              f"| {task} | {init} | {mult:g}× ({lr * mult:g}) | "
              f"{adamw2(options)[0]} | "
              f"{np.mean([r['score'] for r in got]):.3f} "
              f"({crashes}/{len(got)}) | "
              f"{_fmt(*vs)}{verdict} | −{TARGETS[task][2]:g}, none "
              'crashed |')
  name = os.path.basename(args.out)
  lines += ['', f'![neutrality]({name}.png)']
  return '\n'.join(lines) + '\n'


def plot(runs, args, rules, path):
  """Per task and init: the held-back area of each kind of matrix against
  the rate (multiples of AdamW's best), beside AdamW's best warmup's L/2 at
  the rates where it ran."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  cells = [(t, i) for t in args.tasks for i in args.inits]
  ncols = min(len(cells), 2)
  nrows = -(-len(cells) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows),
                           squeeze=False)
  mults = sorted(args.gentle) + [1] + list(args.multiples)
  for ax, (task, init) in zip(axes.flat, cells):
    lr = BEST_LR[(task, init)]
    for k, options in enumerate(rules):
      for color, g in enumerate(GROUPS):
        ys = []
        for m in mults:
          got = _mean(runs, task=task, init=init, setting=adamw2(options)[0],
                      lr=lr * m, steps=args.steps)
          vals = [r['held_back'][g]['area'] for r in got
                  if g in r.get('held_back', {})]
          ys.append(np.mean(vals) if vals else np.nan)
        if np.isnan(ys).all():
          continue  # (the GPT's head is its tied embedding)
        ax.plot(mults, ys, 'o' + ['-', '--', ':', '-.'][k % 4],
                color=f'C{color}', label=f'{g}, {adamw2(options)[0]}')
    tuned = [(m, best_warmups(runs, args, m).get((task, init)))
             for m in mults if m <= 1]
    tuned = [(m, w / 2) for m, w in tuned if w is not None]
    if tuned:
      ax.plot(*zip(*tuned), 'ks:', label="AdamW's best warmup / 2")
    ax.set_xscale('log')
    ax.set_xticks(mults, [f'{m:g}×' for m in mults])
    ax.minorticks_off()
    ax.set_xlabel("rate, multiple of AdamW's best")
    ax.set_ylabel('steps of lr held back')
    ax.set_title(f'{task}, init {init} (best {lr:g})')
  for ax in axes.flat[len(cells):]:
    ax.axis('off')
  axes.flat[min(2, len(cells) - 1)].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--quick', action='store_true',
                 help='a tiny grid (preset tiny, 20 steps, one seed)')
  p.add_argument('--tasks', nargs='+', default=['gpt', 'vit'],
                 choices=['gpt', 'vit'])
  p.add_argument('--inits', nargs='+', default=['lecun', 'std 0.01'],
                 choices=['lecun', 'std 0.01'])
  p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  p.add_argument('--long-seeds', type=int, nargs='*', default=None,
                 help='seeds of the 4N runs (default: --seeds)')
  p.add_argument('--steps', type=int, default=150, help='N')
  p.add_argument('--warmups', type=int, nargs='+',
                 default=[0, 10, 25, 50, 100, 200])
  p.add_argument('--multiples', type=float, nargs='*', default=[10, 30])
  p.add_argument('--gentle', type=float, nargs='*', default=[0.3],
                 help="rates below AdamW's best (multiples of it) where "
                 'AdamW may need no warmup: the neutral side at N runs there '
                 'too')
  p.add_argument('--program-warmup', type=int, default=50,
                 help="the examples' own warmup, kept by a user who swaps "
                 'only the optimizer')
  p.add_argument('--variants', nargs='*', default=[], metavar='SPEC',
                 help="adamw2 rules besides the default, e.g. 'tau=0.05' "
                 f'(options: {", ".join(small_init.VARIANT_OPTIONS)})')
  p.add_argument('--workers', type=int, default=1)
  p.add_argument('--report-only', action='store_true',
                 help='tabulate the runs already in <out>.jsonl, run none')
  p.add_argument('--out', default=os.path.join(HERE, 'results',
                                               'neutrality'))
  args = p.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  args.preset = 'small'
  if args.quick:
    args.preset, args.steps, args.seeds = 'tiny', 20, [0]
    args.warmups, args.multiples, args.program_warmup = [0, 5], [10], 5
    args.gentle = []
    args.tasks, args.inits = args.tasks[:1], ['lecun']
  if args.long_seeds is None:
    args.long_seeds = args.seeds
  if args.steps < 1 or args.workers < 1:
    p.error('--steps and --workers must be at least 1')
  if any(not 0 < g < 1 for g in args.gentle):
    p.error('--gentle multiples must lie between 0 and 1')
  try:
    rules = [{}] + [small_init.variant(v)[3] for v in args.variants]
  except ValueError as e:
    p.error(str(e))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  done = small_init.read_runs(args.out + '.jsonl', _key,
                              lambda r: r.get('preset') == args.preset)
  t0 = time.time()

  def run(jobs):
    todo = [j for j in jobs if (j[0], j[1], j[2][0], round(j[3], 12), j[4],
                                j[5]) not in done]
    for i, r in enumerate(small_init._results(todo, args.workers)):  # pylint: disable=protected-access
      done[_key(r)] = r
      with open(args.out + '.jsonl', 'a') as f:
        f.write(json.dumps(r) + '\n')
      print(f'[{i + 1}/{len(todo)} {time.time() - t0:.0f}s] {r["task"]} '
            f'{r["init"]} {r["setting"]} lr {r["lr"]:g} seed {r["seed"]} '
            f'{r["steps"]} steps: {r["score"]:.3f}'
            + (' crashed' if r['crashed'] else ''), flush=True)

  if not args.report_only:
    run(jobs_for(args, rules))
  best = best_warmups(list(done.values()), args)
  if args.long_seeds and not args.report_only:
    run(jobs_for(args, rules, best))
  runs = list(done.values())
  with open(args.out + '.json', 'w') as f:
    json.dump({'steps': args.steps, 'preset': args.preset,
               'best_lr': {f'{t} {i}': v for (t, i), v in BEST_LR.items()},
               'best_warmup': {f'{t} {i}': v for (t, i), v in best.items()},
               'runs': runs}, f, indent=1)
  text = report(runs, args, rules)
  with open(args.out + '.md', 'w') as f:
    f.write(text)
  plot(runs, args, rules, args.out + '.png')
  print(text)
  return runs


if __name__ == '__main__':
  main()
