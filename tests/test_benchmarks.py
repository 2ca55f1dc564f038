"""The benchmarks' rules, and their quick modes (what CI can afford)."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'benchmarks'))
import stability  # pylint: disable=g-import-not-at-top,wrong-import-position


def _history(loss, entropy):
  return [{'loss': l, 'entropy_min': e} for l, e in zip(loss, entropy)]


def test_crash_rule():
  healthy = _history(np.linspace(3, 1, 40), np.full(40, 1.0))
  assert not stability.crashed(healthy)
  collapsed = _history(np.linspace(3, 1, 40), np.r_[np.ones(30), [0.05] * 10])
  assert stability.crashed(collapsed)
  early_dip = _history(np.linspace(3, 1, 40), np.r_[[0.05] * 10, np.ones(30)])
  assert not stability.crashed(early_dip)  # only the second half counts
  spike = _history(np.r_[np.linspace(3, 1, 30), [2.0] * 10], np.ones(40))
  assert stability.crashed(spike)
  assert stability.crashed(_history([1.0, np.nan] * 20, np.ones(40)))


@pytest.mark.slow
@pytest.mark.usefixtures('one_device')
def test_stability_quick_mode_writes_results(tmp_path):
  out = str(tmp_path / 'stability')
  runs = stability.main(['--quick', '--tasks', 'vit', '--out', out])
  assert len(runs) == 4 * 2  # settings x learning rates, one seed
  assert {r['setting'] for r in runs} == {
      'adamw', 'adamw + 10 warmup', 'adamw2', 'adamw2 tau=0.05'}
  assert all(0 <= r['score'] <= 1 for r in runs)
  for ext in ('md', 'json', 'png'):
    assert os.path.getsize(f'{out}.{ext}') > 100


def test_small_init_sweep_resumes_and_reports(tmp_path, monkeypatch):
  """The sweep's bookkeeping, with a stand-in for training (the real quick
  run is the slow test below): each run is appended as it finishes, an
  interrupted sweep runs only what is missing, and the report shows every
  run's score and bound activity."""
  import small_init  # pylint: disable=g-import-not-at-top
  calls = []

  def fake_run(task, name, warmup, tau, lr, seed, steps, preset, data,
               init_std, weight_floor, ramp_steps):
    del tau, data
    calls.append((name, warmup, weight_floor, ramp_steps, init_std, lr, seed))
    if len(calls) == 3:
      raise KeyboardInterrupt  # the sweep is stopped during its third run
    active = 0.0 if name == 'adamw' else 0.5
    return {'task': task, 'setting': stability.label(name, warmup, None),
            'lr': lr, 'seed': seed, 'score': 2 + len(calls) / 100,
            'min_entropy': 1.0, 'crashed': False,
            'bound_active_thirds': [active] * 3, 'steps': steps,
            'preset': preset}

  monkeypatch.setattr(stability, 'run_one', fake_run)
  out = str(tmp_path / 'small_init')
  argv = ['--quick', '--tasks', 'gpt', '--inits', 'std 0.01', '--out', out]
  with pytest.raises(KeyboardInterrupt):
    small_init.main(argv)
  with open(out + '.jsonl') as f:
    assert len(f.read().splitlines()) == 2
  runs = small_init.main(argv)
  # Runs 1 and 2 were kept; 3 was run again, then 4 and 5.
  assert [c[:4] for c in calls] == [
      ('adamw', 0, None, None), ('adamw', 10, None, None),
      ('adamw2', 0, 0.0, 0), ('adamw2', 0, 0.0, 0), ('adamw2', 0, None, 0),
      ('adamw2', 0, None, None)]
  assert all(c[4] == 0.01 and c[6] == 0 for c in calls)
  assert [r['setting'] for r in runs] == [
      'adamw', 'adamw + 10 warmup', 'adamw2 paper rule (weight_floor=0)',
      'adamw2 constant floor (ramp_steps=0)', 'adamw2 (default)']
  assert [r['score'] for r in runs] == [2.01, 2.02, 2.04, 2.05, 2.06]
  with open(out + '.md') as f:
    report = f.read()
  assert '| std 0.01 | adamw2 (default) | 2.060 (0/1) [50%/50%/50%] |' in (
      report), report
  # One learning rate: no higher rate to beat AdamW at (the verdict's last
  # column). Fake scores are losses 2.02 (warmup) and 2.06: 0.04 worse.
  assert '| std 0.01 | adamw2 (default) | 0.03 | -0.040 (worse) | n/a |' in (
      report), report
  for ext in ('md', 'json', 'png', 'jsonl'):
    assert os.path.getsize(f'{out}.{ext}') > 100
  again = small_init.main(argv + ['--report-only'])
  assert len(calls) == 6 and again == runs
  # More seeds of the three rows the verdict needs: only seed 1 runs, and
  # not the ablations.
  fewer = small_init.main(argv + ['--skip-ablations', '--seeds', '0', '1'])
  assert [c[:2] + c[6:] for c in calls[6:]] == [
      ('adamw', 0, 1), ('adamw', 10, 1), ('adamw2', 0, 1)]
  assert [r['setting'] for r in fewer] == [
      'adamw', 'adamw + 10 warmup', 'adamw2 (default)'] * 2
  with open(out + '.md') as f:
    assert 'paper rule' not in f.read()
  # Another length is another run: nothing of the 30-step runs is reused,
  # and the trainer gets the steps asked for.
  steps = []
  monkeypatch.setattr(stability, 'run_one', lambda *a, **k: steps.append(
      a[6]) or fake_run(*a, **k))
  longer = small_init.main(argv + ['--skip-ablations', '--steps', '45'])
  assert steps == [45, 45, 45]
  assert [r['steps'] for r in longer] == [45, 45, 45]
  with open(out + '.md') as f:
    assert f.read().startswith('# Small inits: 45 steps')
  with pytest.raises(SystemExit):  # argparse's error: a message, exit 2
    small_init.main(argv + ['--steps', '0'])
  assert len(steps) == 3


def test_small_init_variants_reach_the_optimizer(tmp_path, monkeypatch):
  """``--variants`` adds adamw2 rows with the options given, labelled by
  them; a bad spec is an argparse error before anything runs."""
  import small_init  # pylint: disable=g-import-not-at-top
  calls = []

  def fake_run(task, name, warmup, tau, lr, seed, steps, preset, data,
               init_std, weight_floor, ramp_steps, bound=None):
    del data, init_std
    calls.append((name, warmup, tau, weight_floor, ramp_steps) + (
        (bound,) if bound else ()))
    return {'task': task, 'setting': 'ignored', 'lr': lr, 'seed': seed,
            'score': 0.5 + seed / 10 + len(calls) / 100, 'min_entropy': 1.0,
            'crashed': False, 'bound_active_thirds': [0.5] * 3,
            'steps': steps, 'preset': preset}

  monkeypatch.setattr(stability, 'run_one', fake_run)
  out = str(tmp_path / 'small_init')
  argv = ['--quick', '--tasks', 'vit', '--inits', 'std 0.02', '--out', out,
          '--skip-ablations', '--seeds', '0', '1']
  runs = small_init.main(argv + ['--variants', 'tau=0.05,ramp_steps=25',
                                 'weight_floor=2', 'bound=attention'])
  assert calls[:6] == [('adamw', 0, None, None, None),
                       ('adamw', 10, None, None, None),
                       ('adamw2', 0, None, None, None),
                       ('adamw2', 0, 0.05, None, 25.0),
                       ('adamw2', 0, None, 2.0, None),
                       ('adamw2', 0, None, None, None, 'attention')]
  assert [r['setting'] for r in runs[:6]] == [
      'adamw', 'adamw + 10 warmup', 'adamw2 (default)',
      'adamw2 tau=0.05,ramp_steps=25', 'adamw2 weight_floor=2',
      'adamw2 bound=attention']
  assert {r['device'] for r in runs} == {'cpu'}
  with open(out + '.md') as f:
    report = f.read()
  assert 'Device: cpu.' in report
  # Paired by seed: each row's score minus the warmup run's on the same
  # seed. Fake scores grow by 0.01 per call, so the weight_floor row (calls
  # 5 and 11) is 0.03 above the warmup row (calls 2 and 8) on both seeds:
  # mean +0.030, standard error 0. Unpaired (seed 0 against seed 1) it
  # would be -0.12.
  assert ('| std 0.02 | adamw2 weight_floor=2 | 0.03 | +0.030 ± 0.000 '
          '(neutral or better) | n/a |') in report, report
  # A row with a seed the warmup row lacks: that seed is left out of the
  # difference, which stays +0.030 (the unpaired difference of means would
  # be (0.55 + 0.71 + 0) / 3 - (0.52 + 0.68) / 2 = -0.180).
  with open(out + '.jsonl', 'a') as f:
    f.write(json.dumps(dict(runs[4], seed=2, score=0.0)) + '\n')
  small_init.main(argv[:-2] + ['0', '1', '2', '--variants', 'weight_floor=2',
                               '--report-only'])
  with open(out + '.md') as f:
    report = f.read()
  assert ('| std 0.02 | adamw2 weight_floor=2 | 0.03 | +0.030 ± 0.000 '
          '(neutral or better) | n/a |') in report, report
  for bad in ['tau=0', 'floor=2', 'weight_floor=two', 'weight_floor',
              'ramp_steps=-1', 'tau=nan', 'bound=mlp']:
    with pytest.raises(SystemExit):
      small_init.main(argv + ['--variants', bad])
  with pytest.raises(SystemExit):
    small_init.main(argv + ['--workers', '0'])
  assert len(calls) == 12  # 6 rows x 2 seeds: nothing ran for the bad specs


@pytest.mark.slow
@pytest.mark.usefixtures('one_device')
def test_small_init_quick_mode_writes_results_and_resumes(tmp_path,
                                                         monkeypatch):
  import small_init  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'small_init')
  argv = ['--quick', '--tasks', 'gpt', '--inits', 'std 0.01', '--out', out]
  runs = small_init.main(argv)
  assert [r['setting'] for r in runs] == [
      'adamw', 'adamw + 10 warmup', 'adamw2 paper rule (weight_floor=0)',
      'adamw2 constant floor (ramp_steps=0)', 'adamw2 (default)']
  # The paper's rule shrinks a std-0.01 model's steps at least as often as
  # the floored rule, and plain AdamW never.
  thirds = {r['setting']: r['bound_active_thirds'] for r in runs}
  assert thirds['adamw'] == [0.0, 0.0, 0.0]
  assert sum(thirds['adamw2 paper rule (weight_floor=0)']) >= sum(
      thirds['adamw2 (default)']) > 0
  for ext in ('md', 'json', 'png', 'jsonl'):
    assert os.path.getsize(f'{out}.{ext}') > 100
  # A second call finds every run in the .jsonl and trains nothing.
  again = small_init.main(argv + ['--report-only'])
  assert [r['score'] for r in again] == [r['score'] for r in runs]
  # Two worker processes: seed 0's runs are reused, the five missing runs
  # train, and the report lists them in grid order, not finishing order.
  # The workers inherit the environment, not one_device's patch: one
  # simulated device each, as the runs above had.
  monkeypatch.setenv('XLA_FLAGS', ' '.join(
      f for f in os.environ.get('XLA_FLAGS', '').split()
      if 'force_host_platform_device_count' not in f))
  both = small_init.main(argv + ['--skip-ablations', '--seeds', '0', '1',
                                 '--variants', 'weight_floor=2',
                                 '--workers', '2'])
  rows = ['adamw', 'adamw + 10 warmup', 'adamw2 (default)',
          'adamw2 weight_floor=2']
  assert [(r['setting'], r['seed']) for r in both] == [
      (row, seed) for seed in (0, 1) for row in rows]
  assert [r['score'] for r in both[:2]] == [r['score'] for r in runs[:2]]
  assert all(np.isfinite(r['score']) and r['device'] == 'cpu'
             for r in both[3:])
  with open(out + '.jsonl') as f:
    assert len(f.read().splitlines()) == 5 + 5


def test_warmup_parts_split_the_vits_params():
  """Each param of the ViT is in exactly one of matrices, biases, norms and
  tables, and 'uncovered' is everything adamw2 does not bound; the warmup
  is multiplied into that part's steps only."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import optax_spectral  # pylint: disable=g-import-not-at-top
  import warmup_parts  # pylint: disable=g-import-not-at-top
  with jax.set_mesh(warmup_parts.common.make_mesh()):
    model = warmup_parts.vit.ViT(warmup_parts.vit.PRESETS['tiny'],
                                 nnx.Rngs(0))
  dims = warmup_parts.common.dimension_numbers(model)
  is_leaf = lambda x: x is None or isinstance(
      x, optax_spectral.SpectralDimensionNumbers)
  leaves = [(jax.tree_util.keystr(p), s is not None) for p, s in
            jax.tree_util.tree_flatten_with_path(dims, is_leaf=is_leaf)[0]]
  parts = ('matrices', 'biases', 'norms', 'tables')
  for name, bounded in leaves:
    assert sum(warmup_parts.in_part(p, name, bounded) for p in parts) == 1, (
        name)
    assert warmup_parts.in_part('uncovered', name, bounded) == (not bounded)
  assert {p for p in parts for n, b in leaves
          if warmup_parts.in_part(p, n, b)} == set(parts)
  # The biases' steps are 0 on the first step (count 0) and Adam's after.
  cfg = warmup_parts.common.OptimizerConfig(name='adamw2', lr=1e-2,
                                            steps=10**6)  # lr ~constant
  tx = warmup_parts.warmed_up('biases', 2)(cfg, model)
  params = nnx.state(model, nnx.Param)
  state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for step in range(3):
    updates, state = tx.update(grads, state, params)
    flat = {jax.tree_util.keystr(p): x for p, x in
            jax.tree_util.tree_flatten_with_path(updates)[0]}
    bias = [x for n, x in flat.items() if "['fc']['bias']" in n][0]
    norm = [x for n, x in flat.items() if "['ln1']['scale']" in n][0]
    np.testing.assert_allclose(np.abs(bias), 1e-2 * min(1, step / 2),
                               rtol=1e-3)
    np.testing.assert_allclose(np.abs(norm), 1e-2, rtol=1e-3)


def test_profile_summary_by_hand():
  """benchmarks/profile_update.summarize on a hand-made trace of 2 steps:
  (name, hlo op, start ns, duration ns)."""
  import profile_update  # pylint: disable=g-import-not-at-top
  kernels = [('gemm_fusion_dot', 'dot.1', 0, 10_000),
             ('input_reduce_fusion', 'reduce.2', 12_000, 4_000),
             ('loop_add_fusion', 'add.3', 17_000, 2_000),
             # the next step, after a 2 ms host gap (not idle time)
             ('gemm_fusion_dot', 'dot.1', 2_019_000, 10_000),
             ('loop_add_fusion', 'add.3', 2_030_000, 2_000)]
  s = profile_update.summarize(kernels, steps=2)
  assert s['kernels_per_step'] == 2.5
  assert s['busy_us_per_step'] == 14.0       # 28 µs over 2 steps
  assert s['idle_us_per_step'] == 2.0  # gaps of 2, 1 and 1 µs over 2 steps
  assert s['longest_gaps_us'][-1] == 2000.0
  assert s['categories']['product'] == {'kernels': 1.0, 'us': 10.0}
  assert s['categories']['reduce'] == {'kernels': 0.5, 'us': 2.0}
  assert s['kernels'][0] == {'name': 'gemm_fusion_dot', 'count': 1.0,
                             'us': 10.0}
  assert profile_update.summarize([], steps=1) == {}


def test_held_back_measures_the_self_timed_warmup():
  """Per kind of matrix: the step from which the mean factor stays >= 0.9,
  and Σ (1 - factor) (worked out by hand)."""
  factors = [0.2, 0.5, 0.95, 0.8, 1.0, 1.0]
  history = [{'step': t, 'group_factor/attention': f,
              'group_factor/MLP': 1.0} for t, f in enumerate(factors)]
  held = stability.held_back(history)
  assert held['attention'] == {'released': 4.0, 'area': 0.8 + 0.5 + 0.05
                               + 0.2}
  assert held['MLP'] == {'released': 0.0, 'area': 0.0}
  assert stability.held_back([{'step': 0, 'loss': 1.0}]) == {}  # adamw


def _fake_neutrality_run(calls):
  def run_one(task, name, warmup, tau, lr, seed, steps, preset, data,
              init_std=None, weight_floor=None, ramp_steps=None):
    del tau, data, init_std, preset, ramp_steps
    calls.append((name, warmup, lr, seed, steps, weight_floor))
    # AdamW is best with 25 warmup steps at its best rate (0.01) and needs
    # none at 0.3x it; adamw2 trails it by 0.02 + 0.01 * seed nats at N (by a
    # third of that at 4N); a weight_floor=2 rule is 0.1 nats worse than the
    # default at 10x.
    if name == 'adamw':
      score = 2.5 - (0.1 if warmup == 25 or lr < 0.005 else 0.0)
    else:
      score = 2.4 + (0.02 + 0.01 * seed) / (1 if steps == 20 else 3)
      score += 0.1 if weight_floor == 2 and lr > 0.05 else 0.0
    held = {} if name == 'adamw' else {
        'MLP': {'released': 12.0, 'area': 6.0 + seed}}
    return {'task': task, 'setting': stability.label(name, warmup, None),
            'lr': lr, 'seed': seed, 'score': score, 'min_entropy': 1.0,
            'crashed': False, 'bound_active_thirds': [0.5, 0.0, 0.0],
            'held_back': held}
  return run_one


def test_neutrality_grid_pairs_by_seed_and_resumes(tmp_path, monkeypatch):
  """The bookkeeping of benchmarks/neutrality.py with a stand-in for
  training (the real --quick run is the slow test below): AdamW's best
  warmup is found at N and used at 4N, differences are paired by seed, both
  sides are reported, and a second run trains nothing."""
  import neutrality  # pylint: disable=g-import-not-at-top
  calls = []
  monkeypatch.setattr(stability, 'run_one', _fake_neutrality_run(calls))
  out = str(tmp_path / 'neutrality')
  argv = ['--tasks', 'gpt', '--inits', 'lecun', '--seeds', '0', '1',
          '--steps', '20', '--warmups', '0', '25', '--multiples', '10',
          '--variants', 'weight_floor=2', '--out', out]
  neutrality.main(argv)
  # N, at the best rate and at 0.3x it (--gentle's default): 2 AdamW
  # warmups + 2 rules x (no warmup, program warmup); and 2 rules at 10x; 4N:
  # AdamW + 25 warmup and 2 rules x 2; both seeds.
  assert len(calls) == 2 * (2 * (2 + 2 * 2) + 2) + 2 * (1 + 2 * 2)
  assert {c[2] for c in calls if c[0] == 'adamw'} == {0.01, 0.01 * 0.3}
  assert {c[1] for c in calls if c[0] == 'adamw' and c[4] == 80} == {25}
  text = open(out + '.md').read().replace('−', '-')
  # adamw2 vs AdamW + 25 warmup, paired: -(0.02, 0.03) at N, half at 4N;
  # AdamW without warmup 0.1 nats behind at the best rate ("not fine"), level
  # at 0.3x, where its best warmup is none.
  assert ('| gpt | lecun | 1× (0.01) | 20 | adamw + 25 warmup (2.400) | '
          '-0.100 ± 0.000 (2) not fine | adamw2 (default) '
          '| -0.025 ± 0.005 (2) met') in text
  assert ('| gpt | lecun | 0.3× (0.003) | 20 | adamw (2.400) | '
          '+0.000 ± 0.000 (2) fine | adamw2 (default) '
          '| -0.025 ± 0.005 (2) met') in text
  assert '| gpt | lecun | 1× (0.01) | 80 |' in text and (
      '-0.008 ± 0.002 (2) met' in text)
  # The safe side: weight_floor=2 is 0.1 nats worse than the default at 10x.
  assert 'adamw2 weight_floor=2 | 2.525 (0/2) | -0.100 ± 0.000 (2) missed' in (
      text)
  assert "Command: `python benchmarks/neutrality.py --tasks gpt --inits lecun" \
         " --seeds 0 1 --steps 20" in text
  # The self-timed warmup: MLP released at step 12, area 6.5 over the seeds,
  # beside AdamW's best warmup (25: 12.5 held back).
  assert '| 12 / 6 |' in text or '| 12 / 7 |' in text
  assert '25 (12.5)' in text
  assert "| adamw2 (default) | 0.3× (0.003) | – | 12 / 6 |" in text and (
      '| 0 (0) |' in text)
  for ext in ('json', 'png'):
    assert os.path.getsize(f'{out}.{ext}') > 100
  calls.clear()
  neutrality.main(argv)
  assert not calls
  # A report of what ran: more seeds asked for, none trained.
  neutrality.main(argv[:5] + ['0', '1', '2'] + argv[7:] + ['--report-only'])
  assert not calls


@pytest.mark.slow
@pytest.mark.usefixtures('one_device')
def test_neutrality_quick_mode_trains(tmp_path):
  import neutrality  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'neutrality')
  runs = neutrality.main(['--quick', '--out', out])
  assert len(runs) == 2 + 3 + 3  # N: 2 warmups + 3 adamw2; 4N: 3
  assert all(np.isfinite(r['score']) for r in runs)
  assert any(r['held_back'] for r in runs)
  assert os.path.getsize(out + '.png') > 100
