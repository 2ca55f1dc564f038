"""What the examples share: data, optimizers, attention entropy, the loop.

Kept small on purpose: copy it with an example into your own project.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_spectral
from optax_spectral import diagnostics


# --- data -------------------------------------------------------------------

def pydoc_text() -> str:
  """About 465K characters of English: CPython's own help topics, offline."""
  from pydoc_data.topics import topics  # pylint: disable=g-import-not-at-top
  return '\n'.join(topics[k] for k in sorted(topics))


class CharData:
  """A character-level corpus split 90/10 into train and validation."""

  def __init__(self, text: str):
    if len(text) < 100:
      raise ValueError(f'need at least 100 characters of text, got '
                       f'{len(text)}')
    self.chars = sorted(set(text))
    self.index = {c: i for i, c in enumerate(self.chars)}
    data = np.array([self.index[c] for c in text], np.int32)
    split = int(0.9 * len(data))
    self.train, self.val = data[:split], data[split:]

  @property
  def vocab_size(self) -> int:
    return len(self.chars)

  def batch(self, rng: np.random.Generator, batch_size: int, block: int,
            split: str = 'train') -> tuple[np.ndarray, np.ndarray]:
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


# --- attention ----------------------------------------------------------------

def causal_attention(q, k, v):
  """Causal softmax attention that also returns each head's entropy.

  Args:
    q, k, v: ``(batch, time, heads, head_dim)``.

  Returns:
    ``(out, entropy)``: ``out`` like ``q``; ``entropy`` of shape ``(heads,)``,
    the attention entropy in nats averaged over batch and queries. The paper's
    crash signal is this entropy collapsing towards 0.
  """
  t = q.shape[1]
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
  mask = jnp.tril(jnp.ones((t, t), bool))
  logits = jnp.where(mask, logits.astype(jnp.float32), -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum('bhqk,bkhd->bqhd', probs.astype(v.dtype), v)
  return out, diagnostics.attention_entropy(probs).mean(axis=(0, 2))


# --- optimizers ---------------------------------------------------------------

@dataclasses.dataclass
class OptimizerConfig:
  name: str = 'adamw2'          # adamw | adamw2
  lr: float = 1e-2
  warmup_steps: int = 0
  steps: int = 300
  weight_decay: float = 0.1
  tau: float | None = None     # None: the library default
  b2: float = 0.95


def make_optimizer(cfg: OptimizerConfig, dimension_numbers=None):
  """``adamw`` or ``adamw2`` with warmup (if any) then cosine decay."""
  if cfg.warmup_steps > 0:
    lr = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup_steps, max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * 0.1)
  else:
    lr = optax.cosine_decay_schedule(cfg.lr, max(cfg.steps, 1), alpha=0.1)
  # No weight decay on biases, norm scales and embeddings' 1-D leaves.
  mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  if cfg.name == 'adamw':
    return optax.adamw(lr, b2=cfg.b2, weight_decay=cfg.weight_decay,
                       mask=mask)
  if cfg.name == 'adamw2':
    tau = {} if cfg.tau is None else {'tau': cfg.tau}
    return optax_spectral.adamw2(lr, b2=cfg.b2, weight_decay=cfg.weight_decay,
                                 mask=mask, dimension_numbers=dimension_numbers,
                                 **tau)
  raise ValueError(f'unknown optimizer {cfg.name!r}: use adamw or adamw2')


def bound_summary(opt_state) -> dict[str, float]:
  """Fraction of matrices whose step the bound shrank, and the smallest factor
  (zero and one for plain adamw, which has no bound)."""
  try:
    summary = diagnostics.bound_summary(opt_state)
  except ValueError:  # plain adamw
    return {'bound_active': 0.0, 'min_factor': 1.0}
  return {'bound_active': summary['bound_fraction'],
          'min_factor': summary['min_factor']}
