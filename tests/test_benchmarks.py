"""The benchmarks' rules, and their quick modes (what CI can afford)."""

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
               init_std, weight_floor):
    del tau, data
    calls.append((name, warmup, weight_floor, init_std, lr, seed))
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
  # Runs 1 and 2 were kept; 3 was run again, then 4.
  assert [c[:3] for c in calls] == [
      ('adamw', 0, None), ('adamw', 10, None), ('adamw2', 0, 0.0),
      ('adamw2', 0, 0.0), ('adamw2', 0, None)]
  assert all(c[3] == 0.01 and c[5] == 0 for c in calls)
  assert [r['setting'] for r in runs] == [
      'adamw', 'adamw + 10 warmup', 'adamw2 paper rule (weight_floor=0)',
      'adamw2 (default)']
  assert [r['score'] for r in runs] == [2.01, 2.02, 2.04, 2.05]
  with open(out + '.md') as f:
    report = f.read()
  assert '| std 0.01 | adamw2 (default) | 2.050 (0/1) [50%/50%/50%] |' in (
      report), report
  for ext in ('md', 'json', 'png', 'jsonl'):
    assert os.path.getsize(f'{out}.{ext}') > 100
  again = small_init.main(argv + ['--report-only'])
  assert len(calls) == 5 and again == runs


@pytest.mark.slow
@pytest.mark.usefixtures('one_device')
def test_small_init_quick_mode_writes_results_and_resumes(tmp_path):
  import small_init  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'small_init')
  argv = ['--quick', '--tasks', 'gpt', '--inits', 'std 0.01', '--out', out]
  runs = small_init.main(argv)
  assert [r['setting'] for r in runs] == [
      'adamw', 'adamw + 10 warmup', 'adamw2 paper rule (weight_floor=0)',
      'adamw2 (default)']
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
