"""The examples run on their default (embedded) data and on user data."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), 'examples'))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import gpt  # pylint: disable=g-import-not-at-top,wrong-import-position


def _loss_drops(history):
  first = np.mean([r['loss'] for r in history[:3]])
  last = np.mean([r['loss'] for r in history[-3:]])
  return last < first - 0.3, (first, last)


def test_gpt_trains_on_embedded_text():
  data = common.CharData(common.pydoc_text())
  assert len(data.train) + len(data.val) > 400_000
  history = gpt.train(common.OptimizerConfig(name='adamw2', lr=1e-2,
                                             steps=40),
                      gpt.PRESETS['tiny'], data, batch_size=16, log_every=1)
  ok, losses = _loss_drops(history)
  assert ok, losses
  assert 0 <= history[-1]['bound_active'] <= 1


def test_gpt_trains_on_user_text(tmp_path):
  path = tmp_path / 'mine.txt'
  path.write_text('the quick brown fox jumps over the lazy dog. ' * 200)
  data = common.CharData(path.read_text())
  assert data.vocab_size == len(set(path.read_text()))
  history = gpt.train(common.OptimizerConfig(name='adamw', lr=1e-2, steps=40),
                      gpt.PRESETS['tiny'], data, batch_size=16, log_every=1)
  ok, losses = _loss_drops(history)
  assert ok, losses
