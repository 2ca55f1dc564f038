"""The demo's bound figure: each kind of matrix's applied factor over
training (examples/common.py: matrix_group, group_factors, plot_bound)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'examples'))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_matrices_are_grouped_by_kind():
  leaves = {'wte/embedding', 'blocks/layers/0/qkv/kernel',
            'blocks/layers/0/proj/kernel', 'blocks/layers/0/fc/kernel',
            'blocks/layers/0/fc_out/kernel', 'head/kernel', 'embed/kernel'}
  want = {'wte/embedding': 'embedding', 'embed/kernel': 'embedding',
          'blocks/layers/0/qkv/kernel': 'attention',
          'blocks/layers/0/proj/kernel': 'attention',
          'blocks/layers/0/fc/kernel': 'MLP',
          'blocks/layers/0/fc_out/kernel': 'MLP', 'head/kernel': 'head'}
  assert {n: common.matrix_group(n, leaves) for n in leaves} == want


def test_group_factors_average_each_kind():
  row = {'step': 3, 'loss': 2.0,
         'factor/blocks/layers/qkv/kernel[0]': 0.2,
         'factor/blocks/layers/qkv/kernel[1]': 0.4,
         'factor/blocks/layers/proj/kernel[0]': 0.6,
         'factor/blocks/layers/fc/kernel[0]': 1.0,
         'factor/wte/embedding': 0.5,
         'bounded_recent/wte/embedding': 1.0}
  got = common.group_factors(row)
  assert got == pytest.approx({'attention': 0.4, 'MLP': 1.0,
                               'embedding': 0.5})


def test_plot_bound_writes_the_figure(tmp_path):
  history = [{'step': s, 'bound_active': 1.0 - s / 10, 'throttled': 0.5,
              'factor/a/query/kernel': min(1.0, 0.1 * (s + 1)),
              'factor/mlp/kernel': 1.0} for s in range(10)]
  path = tmp_path / 'bound.png'
  common.plot_bound({'toy': history}, common.OptimizerConfig(steps=10),
                    str(path), warmup_steps=3)
  assert path.stat().st_size > 10_000
