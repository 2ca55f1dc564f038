"""A byte/character-level GPT (nanoGPT-style) in Flax NNX, trained without
warmup.

    python examples/gpt.py                                  # adamw2, lr 1e-2
    python examples/gpt.py --optimizer adamw --warmup-steps 100
    python examples/gpt.py --data stdlib --preset gpt2-small --dtype bfloat16 \\
        --batch-size 16 --log-every 50 --out runs/gpt2     # on a GPU/TPU
    python examples/gpt.py --text my.txt --preset gpu --scan --out runs/gpt

Data, all offline: ``--data pydoc`` (default) is the English help text in
CPython's ``pydoc_data`` (~465K characters, character vocabulary);
``--data stdlib`` the bytes of CPython's own standard library source (~30 MB,
byte vocabulary, split by file); ``--text FILE`` your own text. Runs on every
device JAX sees (data parallel + FSDP), and under ``jax.distributed`` when
launched as several processes.
"""

import argparse
import dataclasses
import functools
import os
import sysconfig
import time
import zlib

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
  dtype: str = 'float32'  # compute dtype; params stay float32


PRESETS = {
    'tiny': GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32),
    'small': GPTConfig(),
    'gpu': GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384),
    # GPT-2 small's shape. With a byte vocabulary (256) it has 86.0M params,
    # not GPT-2's 124M: 38.6M of those are GPT-2's 50257-token embedding.
    'gpt2-small': GPTConfig(block_size=1024, n_layer=12, n_head=12,
                            n_embd=768),
}


def pydoc_text() -> str:
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  return '\n'.join(topics[k] for k in sorted(topics))


class TokenData:
  """A token corpus split into train and validation arrays."""

  def __init__(self, train: np.ndarray, val: np.ndarray, vocab_size: int):
    self.train, self.val, self.vocab_size = train, val, vocab_size

  def batch(self, rng: np.random.Generator, batch_size: int, block: int,
            split: str = 'train'):
    """``batch_size`` random windows: inputs and next-token targets, int32
    ``(batch_size, block)``, gathered in one indexing operation."""
    data = self.train if split == 'train' else self.val
    if len(data) <= block + 1:
      raise ValueError(f'{split} split has {len(data)} tokens, fewer than '
                       f'block size {block} + 1')
    start = rng.integers(0, len(data) - block - 1, batch_size)
    windows = data[start[:, None] + np.arange(block + 1)].astype(np.int32)
    return windows[:, :-1], windows[:, 1:]

  def encode(self, text: str) -> list[int]:
    raise NotImplementedError

  def decode(self, ids) -> str:
    raise NotImplementedError


class CharData(TokenData):
  """A character-level corpus split 90/10 into train and validation."""

  def __init__(self, text: str):
    if len(text) < 100:
      raise ValueError(f'need at least 100 characters of text, got '
                       f'{len(text)}')
    self.chars = sorted(set(text))
    self._index = {c: i for i, c in enumerate(self.chars)}
    data = np.array(self.encode(text), np.int32)
    split = int(0.9 * len(data))
    super().__init__(data[:split], data[split:], len(self.chars))

  def encode(self, text: str) -> list[int]:
    return [self._index[c] for c in text]

  def decode(self, ids) -> str:
    return ''.join(self.chars[int(i)] for i in ids)


class ByteData(TokenData):
  """Bytes as tokens (vocabulary 256), e.g. :func:`stdlib_corpus`."""

  def __init__(self, train: np.ndarray, val: np.ndarray):
    super().__init__(train, val, 256)

  def encode(self, text: str) -> list[int]:
    return list(text.encode('utf-8'))

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids).decode('utf-8', errors='replace')


def stdlib_files() -> tuple[list[str], list[str]]:
  """The ``*.py`` files of this Python's standard library (site-packages
  excluded), split into train and validation by a hash of each file's
  relative path: about 1 file in 20 is validation, the same files on every
  machine with the same Python."""
  root = sysconfig.get_paths()['stdlib']
  train, val = [], []
  for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in ('site-packages',
                                                  'dist-packages',
                                                  '__pycache__'))
    for name in sorted(files):
      if name.endswith('.py'):
        rel = os.path.relpath(os.path.join(folder, name), root)
        (val if zlib.crc32(rel.encode()) % 20 == 0 else train).append(rel)
  if not train or not val:
    raise FileNotFoundError(f'no standard library sources under {root}')
  return train, val


@functools.lru_cache(maxsize=1)
def stdlib_corpus() -> ByteData:
  """CPython's standard library source as bytes (~30 MB on Python 3.11),
  files joined by blank lines and split by :func:`stdlib_files`."""
  root = sysconfig.get_paths()['stdlib']

  def read(files):
    parts = []
    for rel in files:
      with open(os.path.join(root, rel), 'rb') as f:
        parts.append(f.read())
    return np.frombuffer(b'\n\n'.join(parts), np.uint8)

  train, val = stdlib_files()
  return ByteData(read(train), read(val))


class GPT(nnx.Module):
  """Token and position embeddings, causal pre-LN blocks, tied output head."""

  def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
    embed = common.sharded(nnx.initializers.variance_scaling(
        1.0, 'fan_in', 'normal', out_axis=0) if cfg.init_std is None else
                           nnx.initializers.normal(cfg.init_std),
                           (None, common.AXIS))
    self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=embed,
                         dtype=cfg.dtype, rngs=rngs)
    self.wpe = nnx.Embed(cfg.block_size, cfg.n_embd, embedding_init=embed,
                         dtype=cfg.dtype, rngs=rngs)
    self.blocks = common.Blocks(cfg.n_layer, cfg.n_embd, cfg.n_head,
                                causal=True, scan=cfg.scan, rngs=rngs,
                                init_std=cfg.init_std, dtype=cfg.dtype)
    self.ln_f = nnx.LayerNorm(cfg.n_embd, dtype=cfg.dtype, rngs=rngs)

  def __call__(self, idx, probe: bool = False):
    """Float32 logits, and with ``probe`` the attention entropy."""
    x = self.wte(idx) + self.wpe(jnp.arange(idx.shape[1]))
    x, entropy = self.blocks(x, probe)
    return self.wte.attend(self.ln_f(x)).astype(jnp.float32), entropy


def param_count(cfg: GPTConfig) -> int:
  """The model's parameter count, without allocating it."""
  with jax.set_mesh(common.make_mesh()):  # the params are annotated
    model = nnx.eval_shape(lambda: GPT(cfg, nnx.Rngs(0)))
  return sum(int(np.prod(x.shape))
             for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def flops_per_token(cfg: GPTConfig) -> float:
  """Model FLOPs per token, forward and backward: the blocks and the tied
  output head (the embedding lookups are not products)."""
  return (common.matmul_flops_per_token(cfg.n_layer, cfg.n_embd,
                                        cfg.block_size) +
          6.0 * cfg.vocab_size * cfg.n_embd)


def loss_of(model, x, y):
  logits, _ = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_of)(model, x, y)
  optimizer.update(model, grads)
  return loss, {}


@nnx.jit
def probe(model, x, y):
  del y
  return model(x[:common.PROBE_BATCH], probe=True)[1]


_eval_loss = nnx.jit(loss_of)


def validation_loss(model, data: TokenData, block: int, batch_size: int = 8,
                    batches: int = 16, seed: int = 0) -> float:
  """Mean loss on ``batches`` fixed random windows of the validation split."""
  rng = np.random.default_rng([seed, 1 << 20])
  return float(np.mean([float(_eval_loss(model, *data.batch(
      rng, batch_size, block, 'val'))) for _ in range(batches)]))


@nnx.jit
def _next_logits(model, idx):
  return model(idx)[0][:, -1]


def sample(model, data: TokenData, cfg: GPTConfig, n: int = 200,
           seed: int = 0) -> str:
  """Samples ``n`` tokens, prompted with a newline."""
  rng = np.random.default_rng(seed)
  try:
    idx = data.encode('\n')[:1]
  except KeyError:  # a text without newlines
    idx = [0]
  for _ in range(n):
    window = np.array(idx[-cfg.block_size:])[None]
    window = np.pad(window, ((0, 0), (cfg.block_size - window.shape[1], 0)))
    logits = np.asarray(_next_logits(model, window)[0], np.float64)
    p = np.exp(logits - logits.max())
    idx.append(int(rng.choice(len(p), p=p / p.sum())))
  return data.decode(idx[1:])


def train(opt: common.OptimizerConfig, cfg: GPTConfig, data: TokenData,
          batch_size: int = 32, seed: int = 0, run: common.RunConfig = None):
  """Trains a GPT on ``data``; returns the model and its metrics history."""
  run = run or common.RunConfig()
  cfg = dataclasses.replace(cfg, vocab_size=data.vocab_size)
  mesh = common.make_mesh()
  with jax.set_mesh(mesh):
    model = GPT(cfg, nnx.Rngs(seed))
    batch = lambda step: data.batch(np.random.default_rng([seed, step]),
                                    batch_size, cfg.block_size)
    workload = common.Workload(batch_size * cfg.block_size,
                               flops_per_token(cfg))
    history = common.fit(model, opt, train_step, probe, batch, run, mesh,
                         workload)
  return model, history


def load_data(args) -> TokenData:
  if args.text:
    with open(args.text, encoding='utf-8') as f:
      return CharData(f.read())
  return stdlib_corpus() if args.data == 'stdlib' else CharData(pydoc_text())


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  common.add_training_args(p, batch_size=32, presets=PRESETS)
  p.add_argument('--data', default='pydoc', choices=['pydoc', 'stdlib'],
                 help="embedded corpus: CPython's help text (characters) or "
                 'its standard library source (bytes)')
  p.add_argument('--text', default=None,
                 help='train on this text file instead (characters)')
  args = p.parse_args()
  main_process = common.init_distributed()
  data = load_data(args)
  cfg = dataclasses.replace(PRESETS[args.preset], scan=args.scan,
                            init_std=args.init_std, dtype=args.dtype)
  opt, run = common.configs_from_args(args, 'gpt')
  t0 = time.time()
  model, history = train(opt, cfg, data, args.batch_size, run=run)
  if main_process:
    if args.optimizer == 'adamw2':
      print('bounded leaves:')
      common.print_bounded(model)
      print(common.describe_bound(history[-1]))
      if run.out_dir:
        path = os.path.join(run.out_dir, 'bound.png')
        common.plot_bound({'gpt': history}, opt, path)
        print(f'what the bound did to the learning rate: {path}')
    last = history[-1]
    cfg = dataclasses.replace(cfg, vocab_size=data.vocab_size)
    val = (f'{validation_loss(model, data, cfg.block_size):.3f}'
           if len(data.val) > cfg.block_size + 1 else
           'n/a (validation split shorter than a block)')
    print(f"step {last['step']}: loss {last['loss']:.3f}, validation loss "
          f"{val}, min attention entropy {last['entropy_min']:.3f}, "
          f'{time.time() - t0:.0f}s')
    print(common.describe_throughput(history))
    print('sample:\n' + sample(model, data, cfg))


if __name__ == '__main__':
  main()
