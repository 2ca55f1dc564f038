"""A character-level GPT (nanoGPT-style) in Flax NNX, trained without warmup.

    python examples/gpt.py                                  # adamw2, lr 1e-2
    python examples/gpt.py --optimizer adamw --warmup-steps 100
    python examples/gpt.py --text my.txt --preset gpu --scan --out runs/gpt

Default data: the English help text in CPython's ``pydoc_data`` (~465K
characters), so it runs offline. Runs on every device JAX sees (data parallel
+ FSDP), and under ``jax.distributed`` when launched as several processes.
"""

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import common


@dataclasses.dataclass
class GPTConfig:
  vocab_size: int = 128
  block_size: int = 64
  n_layer: int = 4
  n_head: int = 4
  n_embd: int = 128
  scan: bool = False   # stack the layers and run them with nnx.scan
  init_std: float | None = None  # None: variance-preserving (LeCun)


PRESETS = {
    'tiny': GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32),
    'small': GPTConfig(),
    'gpu': GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
}


def pydoc_text() -> str:
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  return '\n'.join(topics[k] for k in sorted(topics))


class CharData:
  """A character-level corpus split 90/10 into train and validation."""

  def __init__(self, text: str):
    if len(text) < 100:
      raise ValueError(f'need at least 100 characters of text, got '
                       f'{len(text)}')
    self.chars = sorted(set(text))
    index = {c: i for i, c in enumerate(self.chars)}
    data = np.array([index[c] for c in text], np.int32)
    split = int(0.9 * len(data))
    self.train, self.val = data[:split], data[split:]

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def batch(self, rng: np.random.Generator, batch_size: int, block: int,
            split: str = 'train'):
    data = self.train if split == 'train' else self.val
    if len(data) <= block + 1:
      raise ValueError(f'{split} split has {len(data)} tokens, fewer than '
                       f'block size {block} + 1')
    start = rng.integers(0, len(data) - block - 1, batch_size)
    x = np.stack([data[s:s + block] for s in start])
    y = np.stack([data[s + 1:s + block + 1] for s in start])
    return x, y

  def decode(self, ids) -> str:
    return ''.join(self.chars[int(i)] for i in ids)


class GPT(nnx.Module):
  """Token and position embeddings, causal pre-LN blocks, tied output head."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    embed = common.sharded(nnx.initializers.variance_scaling(
        1.0, 'fan_in', 'normal', out_axis=0) if cfg.init_std is None else
                           nnx.initializers.normal(cfg.init_std),
                           (None, common.AXIS))
    self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=embed,
                         rngs=rngs)
    self.wpe = nnx.Embed(cfg.block_size, cfg.n_embd, embedding_init=embed,
                         rngs=rngs)
    self.blocks = common.Blocks(cfg.n_layer, cfg.n_embd, cfg.n_head,
                                causal=True, scan=cfg.scan, rngs=rngs,
                                init_std=cfg.init_std)
    self.ln_f = nnx.LayerNorm(cfg.n_embd, rngs=rngs)

  def __call__(self, idx):
    x = self.wte(idx) + self.wpe(jnp.arange(idx.shape[1]))
    x, entropy = self.blocks(x)
    return self.wte.attend(self.ln_f(x)), entropy


@nnx.jit
def train_step(model, optimizer, x, y):
  def loss_fn(model):
    logits, entropy = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), y).mean()
    return loss, entropy
  (loss, entropy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, entropy, {}


@nnx.jit
def _next_logits(model, idx):
  return model(idx)[0][:, -1]


def sample(model, data: CharData, cfg: GPTConfig, n: int = 200,
           seed: int = 0) -> str:
  """Samples ``n`` characters, prompted with a newline."""
  rng = np.random.default_rng(seed)
  idx = [data.chars.index('\n')] if '\n' in data.chars else [0]
  for _ in range(n):
    window = np.array(idx[-cfg.block_size:])[None]
    window = np.pad(window, ((0, 0), (cfg.block_size - window.shape[1], 0)))
    logits = np.asarray(_next_logits(model, window)[0], np.float64)
    p = np.exp(logits - logits.max())
    idx.append(int(rng.choice(len(p), p=p / p.sum())))
  return data.decode(idx[1:])


def train(opt: common.OptimizerConfig, cfg: GPTConfig, data: CharData,
          batch_size: int = 32, seed: int = 0, run: common.RunConfig = None):
  """Trains a GPT on ``data``; returns the model and its metrics history."""
  run = run or common.RunConfig()
  cfg = dataclasses.replace(cfg, vocab_size=data.vocab_size)
  mesh = common.make_mesh()
  with jax.set_mesh(mesh):
    model = GPT(cfg, nnx.Rngs(seed))
    batch = lambda step: data.batch(np.random.default_rng([seed, step]),
                                    batch_size, cfg.block_size)
    history = common.fit(model, opt, train_step, batch, run, mesh)
  return model, history


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  common.add_training_args(p, batch_size=32, presets=PRESETS)
  p.add_argument('--text', default=None, help='train on this text file')
  args = p.parse_args()
  main_process = common.init_distributed()
  text = open(args.text, encoding='utf-8').read() if args.text else (
      pydoc_text())
  data = CharData(text)
  cfg = dataclasses.replace(PRESETS[args.preset], scan=args.scan,
                            init_std=args.init_std)
  opt, run = common.configs_from_args(args, 'gpt')
  t0 = time.time()
  model, history = train(opt, cfg, data, args.batch_size, run=run)
  if main_process:
    if args.optimizer == 'adamw2':
      print('bounded leaves:')
      common.print_bounded(model)
      print(common.describe_bound(history[-1]))
    last = history[-1]
    print(f"step {last['step']}: loss {last['loss']:.3f}, min attention "
          f"entropy {last['entropy_min']:.3f}, {time.time() - t0:.0f}s")
    print('sample:\n' + sample(model, data, dataclasses.replace(
        cfg, vocab_size=data.vocab_size)))


if __name__ == '__main__':
  main()
