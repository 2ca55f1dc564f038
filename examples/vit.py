"""A Vision Transformer in Flax NNX, trained without warmup.

    python examples/vit.py                                  # digits, adamw2
    python examples/vit.py --optimizer adamw --warmup-steps 100
    python examples/vit.py --data-dir cifar-10-batches-py --preset gpu

Default data: scikit-learn's 8x8 digits (1,797 images, shipped with
scikit-learn, no download), in 2x2 patches. ``--data-dir`` takes CIFAR-10 as
the standard python-pickle batches (``data_batch_1`` ... ``test_batch``).
"""

import argparse
import dataclasses
import os
import pickle
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import common


@dataclasses.dataclass
class ViTConfig:
  image_size: int = 8
  channels: int = 1
  patch: int = 2
  classes: int = 10
  n_layer: int = 4
  n_head: int = 4
  n_embd: int = 64
  scan: bool = False
  init_std: float | None = None  # None: variance-preserving (LeCun)
  dtype: str = 'float32'  # compute dtype; params stay float32


PRESETS = {
    'tiny': ViTConfig(n_layer=2, n_head=2, n_embd=32),
    'small': ViTConfig(),
    'gpu': ViTConfig(n_layer=8, n_head=8, n_embd=384),
}


@dataclasses.dataclass
class ImageData:
  """Images ``(n, h, w, c)`` in [0, 1] with integer labels."""
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray

  def batch(self, rng: np.random.Generator, batch_size: int):
    i = rng.integers(0, len(self.x_train), batch_size)
    return self.x_train[i], self.y_train[i]


def digits() -> ImageData:
  """scikit-learn's digits, a fixed 80/20 split."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  x = (d.images / 16.0).astype(np.float32)[..., None]
  y = d.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(x))
  x, y = x[order], y[order]
  n = int(0.8 * len(x))
  return ImageData(x[:n], y[:n], x[n:], y[n:])


def cifar10(data_dir: str) -> ImageData:
  """CIFAR-10 from the python-pickle batches already on disk."""
  def load(name):
    path = os.path.join(data_dir, name)
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} not found: --data-dir must hold '
                              'CIFAR-10 python batches (data_batch_1..5, '
                              'test_batch)')
    with open(path, 'rb') as f:
      d = pickle.load(f, encoding='bytes')
    x = np.asarray(d[b'data'], np.uint8).reshape(-1, 3, 32, 32)
    return (x.transpose(0, 2, 3, 1).astype(np.float32) / 255.0,
            np.asarray(d[b'labels'], np.int32))
  train = [load(f'data_batch_{i}') for i in range(1, 6)
           if os.path.exists(os.path.join(data_dir, f'data_batch_{i}'))]
  if not train:
    load('data_batch_1')  # raises the clear error
  x_test, y_test = load('test_batch')
  return ImageData(np.concatenate([t[0] for t in train]),
                   np.concatenate([t[1] for t in train]), x_test, y_test)


class ViT(nnx.Module):
  """Patch embedding, cls token, learned positions, pre-LN blocks, head."""

  def __init__(self, cfg: ViTConfig, rngs: nnx.Rngs):
    self.patch = cfg.patch
    n = (cfg.image_size // cfg.patch) ** 2
    d = cfg.n_embd
    # Shard the model-width axis: patch size and class count need not
    # divide by the number of devices.
    init = common.kernel_init(cfg.init_std)
    self.embed = nnx.Linear(cfg.patch**2 * cfg.channels, d, rngs=rngs,
                            dtype=cfg.dtype,
                            kernel_init=common.sharded(init,
                                                       (None, common.AXIS)))
    self.cls = nnx.Param(jnp.zeros((1, 1, d)))
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, n + 1,
                                                                  d)))
    self.blocks = common.Blocks(cfg.n_layer, d, cfg.n_head, causal=False,
                                scan=cfg.scan, rngs=rngs,
                                init_std=cfg.init_std, dtype=cfg.dtype)
    self.ln = nnx.LayerNorm(d, dtype=cfg.dtype, rngs=rngs)
    self.head = nnx.Linear(d, cfg.classes, rngs=rngs, dtype=cfg.dtype,
                           kernel_init=common.sharded(init,
                                                      (common.AXIS, None)))

  def __call__(self, images, probe: bool = False):
    """Float32 logits, and with ``probe`` the attention entropy."""
    b, h, w, c = images.shape
    p = self.patch
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    x = self.embed(x.reshape(b, (h // p) * (w // p), p * p * c))
    x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (b, 1, x.shape[-1])),
                         x], axis=1) + self.pos[...]
    x, entropy = self.blocks(x.astype(self.embed.dtype), probe)
    return self.head(self.ln(x[:, 0])).astype(jnp.float32), entropy


def tokens_per_image(cfg: ViTConfig) -> int:
  """Patches and the class token."""
  return (cfg.image_size // cfg.patch) ** 2 + 1


def flops_per_token(cfg: ViTConfig) -> float:
  """Model FLOPs per token (patch or class token), forward and backward:
  the patch embedding and the blocks (the head sees one token)."""
  return (common.matmul_flops_per_token(cfg.n_layer, cfg.n_embd,
                                        tokens_per_image(cfg)) +
          6.0 * cfg.patch**2 * cfg.channels * cfg.n_embd)


@nnx.jit
def train_step(model, optimizer, x, y):
  def loss_fn(model):
    logits, _ = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)
  (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  optimizer.update(model, grads)
  return loss, {'train_acc': acc}


@nnx.jit
def probe(model, x, y):
  del y
  return model(x[:common.PROBE_BATCH], probe=True)[1]


@nnx.jit
def _predict(model, x):
  return jnp.argmax(model(x)[0], -1)


def accuracy(model, x, y, batch_size: int = 500) -> float:
  hits = sum(int(np.sum(np.asarray(_predict(model, x[i:i + batch_size]))
                        == y[i:i + batch_size]))
             for i in range(0, len(x), batch_size))
  return hits / len(x)


def train(opt: common.OptimizerConfig, cfg: ViTConfig, data: ImageData,
          batch_size: int = 64, seed: int = 0, run: common.RunConfig = None):
  """Trains a ViT; returns the model, its history and the test accuracy."""
  run = run or common.RunConfig()
  h, w, c = data.x_train.shape[1:]
  cfg = dataclasses.replace(cfg, image_size=h, channels=c)
  if h != w or h % cfg.patch:
    raise ValueError(f'images must be square with a side divisible by the '
                     f'patch size {cfg.patch}, got {h}x{w}')
  mesh = common.make_mesh()
  with jax.set_mesh(mesh):
    model = ViT(cfg, nnx.Rngs(seed))
    batch = lambda step: data.batch(np.random.default_rng([seed, step]),
                                    batch_size)
    workload = common.Workload(batch_size * tokens_per_image(cfg),
                               flops_per_token(cfg))
    history = common.fit(model, opt, train_step, probe, batch, run, mesh,
                         workload)
    acc = accuracy(model, data.x_test, data.y_test)
  return model, history, acc


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  common.add_training_args(p, batch_size=64, presets=PRESETS)
  p.add_argument('--data-dir', default=None, help='CIFAR-10 python batches')
  args = p.parse_args()
  main_process = common.init_distributed()
  data = cifar10(args.data_dir) if args.data_dir else digits()
  cfg = dataclasses.replace(PRESETS[args.preset], scan=args.scan,
                            patch=4 if args.data_dir else 2,
                            init_std=args.init_std, dtype=args.dtype)
  opt, run = common.configs_from_args(args, 'vit')
  t0 = time.time()
  model, history, acc = train(opt, cfg, data, args.batch_size, run=run)
  if main_process:
    if args.optimizer == 'adamw2':
      print('bounded leaves:')
      common.print_bounded(model)
      print(common.describe_bound(history[-1]))
      if run.out_dir:
        path = os.path.join(run.out_dir, 'bound.png')
        common.plot_bound({'vit': history}, opt, path)
        print(f'what the bound did to the learning rate: {path}')
    last = history[-1]
    print(f"step {last['step']}: loss {last['loss']:.3f}, test accuracy "
          f"{acc:.3f}, min attention entropy {last['entropy_min']:.3f}, "
          f'{time.time() - t0:.0f}s')
    print(common.describe_throughput(history))


if __name__ == '__main__':
  main()
