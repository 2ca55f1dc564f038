"""The accelerator-ready training path of the examples, at CPU sizes: fused
attention, bfloat16 compute, the stdlib corpus, the loader, throughput and
MFU logging, the gpt2-small preset and ``benchmarks/scale.py --quick``."""

import csv
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'examples'))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import gpt  # pylint: disable=g-import-not-at-top,wrong-import-position
import vit  # pylint: disable=g-import-not-at-top,wrong-import-position


def _numpy_attention(q, k, v, causal):
  """Softmax attention and each head's mean entropy, in float64."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  if causal:
    t = q.shape[1]
    logits = np.where(np.tril(np.ones((t, t), bool)), logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  with np.errstate(divide='ignore', invalid='ignore'):
    entropy = -np.where(p > 0, p * np.log(p), 0).sum(-1)
  return np.einsum('bhqk,bkhd->bqhd', p, v), entropy.mean(axis=(0, 2))


@pytest.mark.parametrize('causal', [True, False])
def test_fused_and_probed_attention_match_numpy(causal):
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 7, 3, 8)).astype(np.float32)
             for _ in range(3))
  want, want_entropy = _numpy_attention(q, k, v, causal)
  fused, none = common.attention(q, k, v, causal)
  probed, entropy = common.attention(q, k, v, causal, probe=True)
  assert none is None
  np.testing.assert_allclose(fused, want, atol=1e-5)
  np.testing.assert_allclose(probed, want, atol=1e-5)
  np.testing.assert_allclose(entropy, want_entropy, rtol=1e-5)
  # A causal query q sees q + 1 keys: at most log(q + 1) nats each.
  if causal:
    assert np.all(entropy <= np.mean(np.log(np.arange(1, 8))) + 1e-6)


@pytest.mark.usefixtures('one_device')
@pytest.mark.parametrize('scan', [False, True])
def test_gpt_probe_and_training_forward_agree(scan):
  cfg = gpt.GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2,
                      n_embd=32, scan=scan)
  with jax.set_mesh(common.make_mesh()):
    model = gpt.GPT(cfg, nnx.Rngs(0))
    x = np.random.default_rng(0).integers(0, 50, (4, 16)).astype(np.int32)
    # Compiled (op by op, the model compiles each operation on its own).
    fused, none = nnx.jit(lambda m, x: m(x))(model, x)
    probed, entropy = nnx.jit(lambda m, x: m(x, probe=True))(model, x)
  assert none is None and entropy.shape == (2, 2)
  np.testing.assert_allclose(fused, probed, atol=1e-4)
  assert np.all((entropy > 0) & (entropy < np.log(16)))


@pytest.mark.usefixtures('one_device')
def test_bfloat16_computes_in_bf16_and_keeps_float32_params_and_state():
  """A training step in bf16 (training to a lower loss in bf16 is
  test_examples.test_gpt_trains_in_bf16_over_eight_devices)."""
  cfg = gpt.GPTConfig(**{**gpt.PRESETS['tiny'].__dict__, 'vocab_size': 50,
                         'dtype': 'bfloat16'})
  f32 = {jnp.dtype(jnp.float32)}
  x = np.random.default_rng(0).integers(0, 50, (4, cfg.block_size),
                                        dtype=np.int32)
  with jax.set_mesh(common.make_mesh()):
    model = gpt.GPT(cfg, nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, common.make_optimizer(
        common.OptimizerConfig(name='adamw2', lr=1e-2, steps=2), model),
                              wrt=nnx.Param)
    loss, _ = nnx.jit(gpt.train_step)(model, optimizer, x, np.roll(x, -1))
  # Params and the whole optimizer state stay float32.
  assert {a.dtype for a in jax.tree.leaves(nnx.state(model, nnx.Param))} == (
      f32)
  assert {a.dtype for a in jax.tree.leaves(optimizer.opt_state)
          if jnp.issubdtype(a.dtype, jnp.floating)} == f32
  assert loss.dtype == jnp.float32 and np.isfinite(loss)
  # Activations are bf16 (the blocks' output before the final norm), the
  # logits float32: shapes and dtypes only, nothing to compile.
  def blocks(m, x):
    return m.blocks(m.wte(x) + m.wpe(jnp.arange(cfg.block_size)))[0]
  assert nnx.eval_shape(blocks, model, x).dtype == jnp.bfloat16
  assert nnx.eval_shape(lambda m, x: m(x)[0], model, x).dtype == jnp.float32


def test_stdlib_corpus_is_split_by_file_deterministically():
  train, val = gpt.stdlib_files()
  assert (train, val) == gpt.stdlib_files()
  assert not set(train) & set(val)
  assert not any('site-packages' in f for f in train + val)
  assert all(f.endswith('.py') for f in train + val)
  assert 0.02 < len(val) / (len(train) + len(val)) < 0.08
  data = gpt.stdlib_corpus()
  assert data.vocab_size == 256 and data.train.dtype == np.uint8
  assert len(data.train) > 10_000_000 and len(data.val) > 100_000
  # The validation split begins with the first validation file's bytes.
  import sysconfig  # pylint: disable=g-import-not-at-top
  with open(os.path.join(sysconfig.get_paths()['stdlib'], val[0]), 'rb') as f:
    head = f.read(200)
  assert bytes(data.val[:len(head)]) == head
  assert data.decode(data.encode('def f():\n')) == 'def f():\n'


def test_batches_are_next_token_windows():
  data = gpt.ByteData(np.arange(1000, dtype=np.int64) % 256,
                      np.arange(100) % 256)
  rng = np.random.default_rng(3)
  x, y = data.batch(rng, 5, 12)
  assert x.shape == y.shape == (5, 12) and x.dtype == np.int32
  for row_x, row_y in zip(x, y):
    start = int(row_x[0])
    np.testing.assert_array_equal(row_x, (start + np.arange(12)) % 256)
    np.testing.assert_array_equal(row_y, (start + 1 + np.arange(12)) % 256)


def test_loader_places_each_steps_batch_on_the_mesh_in_order():
  mesh = common.make_mesh()
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(common.AXIS))
  made = []

  def batch_fn(step):
    made.append(step)
    return np.full((8, 3), step, np.int32), np.arange(8) + step

  seen = []
  for step, (x, y) in common.Loader(batch_fn, range(3, 9), sharding,
                                    ahead=2):
    # Two batches ahead: the next ones were made before this one is used.
    assert made[-1] == min(step + 2, 8)
    assert x.sharding == sharding and len(x.sharding.device_set) == 8
    np.testing.assert_array_equal(x, np.full((8, 3), step))
    np.testing.assert_array_equal(y, np.arange(8) + step)
    seen.append(step)
  assert seen == list(range(3, 9)) and made == seen
  with pytest.raises(ValueError, match='ahead'):
    common.Loader(batch_fn, range(3), sharding, ahead=0)


@pytest.mark.usefixtures('one_device')
def test_throughput_and_mfu_are_logged(tmp_path):
  cfg = gpt.PRESETS['tiny']
  data = gpt.CharData(gpt.pydoc_text())
  run = common.RunConfig(out_dir=str(tmp_path), log_every=5,
                         peak_flops=1e9)
  _, history = gpt.train(
      common.OptimizerConfig(name='adamw', lr=1e-2, steps=21), cfg, data,
      batch_size=8, run=run)
  assert [r['step'] for r in history] == [0, 5, 10, 15, 20]
  assert np.isnan(history[0]['tokens_per_s'])  # the compiling step
  flops = (6 * 2 * 12 * 32**2 + 12 * 2 * 32 * 32 + 6 * data.vocab_size * 32)
  assert gpt.flops_per_token(
      gpt.GPTConfig(**{**cfg.__dict__,
                       'vocab_size': data.vocab_size})) == flops
  for r in history[1:]:
    assert r['tokens_per_s'] == pytest.approx(8 * 32 / r['step_s'])
    assert r['mfu'] == pytest.approx(
        r['tokens_per_s'] * flops / (1e9 * jax.device_count()))
  summary = common.throughput(history)
  assert summary['tokens_per_s'] == pytest.approx(
      np.median([r['tokens_per_s'] for r in history[1:]]))
  with open(tmp_path / 'metrics.csv') as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 5 and float(rows[-1]['tokens_per_s']) > 0
  assert 'tokens/s' in common.describe_throughput(history)


def test_gpt2_small_preset_has_gpt2_small_shape():
  cfg = gpt.GPTConfig(**{**gpt.PRESETS['gpt2-small'].__dict__,
                         'vocab_size': 256})
  d, layers = 768, 12
  # Per block: qkv, proj, fc, fc_out kernels and biases, two LayerNorms.
  per_block = 12 * d * d + (3 * d + d + 4 * d + d) + 4 * d
  want = layers * per_block + 256 * d + 1024 * d + 2 * d
  assert gpt.param_count(cfg) == want
  assert want == 86_039_040


@pytest.mark.slow
@pytest.mark.usefixtures('one_device')
def test_vit_trains_in_bf16_and_logs_throughput():
  cfg = vit.ViTConfig(**{**vit.PRESETS['tiny'].__dict__, 'dtype': 'bfloat16'})
  _, history, acc = vit.train(
      common.OptimizerConfig(name='adamw2', lr=1e-2, steps=20), cfg,
      vit.digits(), batch_size=32, run=common.RunConfig(log_every=4))
  assert 0 <= acc <= 1 and np.isfinite(history[-1]['loss'])
  assert history[-1]['tokens_per_s'] > 0
  assert history[-1]['step'] == 19  # the last step is always logged


def test_crash_rule_on_short_runs():
  row = lambda loss: {'loss': loss, 'entropy_min': 1.0}
  assert not common.crashed([row(x) for x in np.linspace(3, 2, 5)])
  healthy = [row(x) for x in np.linspace(3, 1, 20)]
  assert not common.crashed(healthy)
  assert common.crashed(healthy + [row(3.0)] * 10)


def test_scale_reports_each_run_against_adamw(tmp_path, monkeypatch):
  """scale.py's report, with a stand-in for training (the real quick run is
  the slow test below): the three runs in order on the same settings, step
  times over AdamW's, and every file written."""
  import scale  # pylint: disable=g-import-not-at-top
  calls = []

  def fake_run(label, name, warmup, args, cfg, data):
    calls.append((name, warmup, args.lr, args.steps, cfg.dtype))
    assert data.vocab_size == 256  # the stdlib corpus, in bytes
    curve = [{'step': i, 'loss': 5.0 - i / 10, 'entropy_min': 1.0,
              'bound_active': 0.5} for i in range(0, args.steps, 2)]
    return {'run': label, 'optimizer': name, 'warmup_steps': warmup,
            'val_loss': 3.0 + len(calls), 'train_loss': 3.0,
            'min_entropy': 1.0, 'min_entropy_late': 1.0, 'crashed': False,
            'step_s': 0.1 * len(calls), 'tokens_per_s': 100.0 / len(calls),
            'mfu': float('nan'), 'seconds': 1.0, 'curve': curve}

  monkeypatch.setattr(scale, 'run_one', fake_run)
  out = str(tmp_path / 'cpu-scale-quick')
  results = scale.main(['--quick', '--steps', '16', '--lr', '0.01',
                        '--out', out])
  assert calls == [('adamw', 0, 0.01, 16, 'bfloat16'),
                   ('adamw', 10, 0.01, 16, 'bfloat16'),
                   ('adamw2', 0, 0.01, 16, 'bfloat16')]
  assert [r['step_time_ratio'] for r in results] == pytest.approx([1, 2, 3])
  with open(out + '.md') as f:
    report = f.read()
  assert ('| adamw2, no warmup | 6.000 | 1.000 / 1.000 | no | 33 | – | '
          '300.0 | 3.000 |') in report, report
  for ext in ('md', 'json', 'png'):
    assert os.path.getsize(f'{out}.{ext}') > 100
  with pytest.raises(ValueError, match='--warmup'):
    scale.main(['--quick', '--steps', '8', '--warmup', '8', '--out', out])


@pytest.mark.slow
@pytest.mark.usefixtures('one_device')
def test_scale_quick_writes_results(tmp_path):
  import scale  # pylint: disable=g-import-not-at-top
  out = str(tmp_path / 'cpu-scale-quick')
  results = scale.main(['--quick', '--steps', '16', '--out', out])
  assert [r['run'] for r in results] == [
      'adamw, no warmup', 'adamw, 10 warmup steps', 'adamw2, no warmup']
  assert results[0]['step_time_ratio'] == 1.0
  for r in results:
    assert np.isfinite(r['val_loss']) and r['val_loss'] < np.log(256)
    assert r['tokens_per_s'] > 0 and r['min_entropy'] >= 0
  for ext in ('md', 'json', 'png'):
    assert os.path.getsize(f'{out}.{ext}') > 100
