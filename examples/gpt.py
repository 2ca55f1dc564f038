"""A character-level GPT (nanoGPT-style) in Flax NNX, trained without warmup.

    python examples/gpt.py --optimizer adamw2 --lr 1e-2
    python examples/gpt.py --optimizer adamw --lr 1e-2 --warmup-steps 100
"""

import argparse
import dataclasses
import time

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


PRESETS = {
    'tiny': GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32),
    'small': GPTConfig(),
    'gpu': GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
}


class Block(nnx.Module):
  """Pre-LN transformer block: causal self-attention and a GELU MLP."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    d = cfg.n_embd
    self.n_head = cfg.n_head
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.qkv = nnx.Linear(d, 3 * d, rngs=rngs)
    self.proj = nnx.Linear(d, d, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.fc = nnx.Linear(d, 4 * d, rngs=rngs)
    self.fc_out = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x):
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, axis=-1)
    heads = lambda z: z.reshape(b, t, self.n_head, d // self.n_head)
    y, entropy = common.causal_attention(heads(q), heads(k), heads(v))
    x = x + self.proj(y.reshape(b, t, d))
    x = x + self.fc_out(nnx.gelu(self.fc(self.ln2(x))))
    return x, entropy


class GPT(nnx.Module):
  """Token and position embeddings, blocks, final LN, tied output head."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, rngs=rngs)
    self.wpe = nnx.Embed(cfg.block_size, cfg.n_embd, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layer)])
    self.ln_f = nnx.LayerNorm(cfg.n_embd, rngs=rngs)

  def __call__(self, idx):
    x = self.wte(idx) + self.wpe(jnp.arange(idx.shape[1]))
    entropies = []
    for block in self.blocks:
      x, entropy = block(x)
      entropies.append(entropy)
    logits = self.wte.attend(self.ln_f(x))
    return logits, jnp.stack(entropies)  # entropies: (layers, heads)


def loss_fn(model, x, y):
  logits, entropy = model(x)
  loss = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), y).mean()
  return loss, entropy


@nnx.jit
def train_step(model, optimizer, x, y):
  (loss, entropy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(
      model, x, y)
  optimizer.update(model, grads)
  return loss, entropy


def train(opt: common.OptimizerConfig, cfg: GPTConfig, data: common.CharData,
          batch_size: int = 32, seed: int = 0, log_every: int = 10,
          desc: str = 'train'):
  """Trains a GPT and returns its history of loss, entropy and bound use."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(cfg, vocab_size=data.vocab_size)
  model = GPT(cfg, nnx.Rngs(seed))
  optimizer = nnx.Optimizer(model, common.make_optimizer(opt), wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  history = []
  bar = tqdm(range(opt.steps), desc=desc, leave=False, mininterval=1)
  for step in bar:
    x, y = data.batch(rng, batch_size, cfg.block_size)
    loss, entropy = train_step(model, optimizer, x, y)
    if step % log_every == 0 or step == opt.steps - 1:
      row = {'step': step, 'loss': float(loss),
             'entropy_min': float(entropy.min()),
             'entropy_mean': float(entropy.mean())}
      row.update(common.bound_summary(optimizer.opt_state))
      history.append(row)
      bar.set_postfix(loss=f"{row['loss']:.3f}", refresh=False)
  return history


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument('--optimizer', default='adamw2', choices=['adamw', 'adamw2'])
  p.add_argument('--lr', type=float, default=1e-2)
  p.add_argument('--warmup-steps', type=int, default=0)
  p.add_argument('--tau', type=float, default=None)
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--batch-size', type=int, default=32)
  p.add_argument('--preset', default='small', choices=sorted(PRESETS))
  p.add_argument('--text', default=None, help='train on this text file')
  args = p.parse_args()
  text = open(args.text).read() if args.text else common.pydoc_text()
  opt = common.OptimizerConfig(name=args.optimizer, lr=args.lr,
                               warmup_steps=args.warmup_steps, tau=args.tau,
                               steps=args.steps)
  t0 = time.time()
  for row in train(opt, PRESETS[args.preset], common.CharData(text),
                   args.batch_size):
    print(row)
  print(f'{time.time() - t0:.1f}s')


if __name__ == '__main__':
  main()
