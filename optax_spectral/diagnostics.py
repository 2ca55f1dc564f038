"""The paper's instruments: spectral energy concentration, attention entropy,
and a per-step summary of where the bound was active."""

import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_spectral import _transform


def spectral_energy_concentration(
    w_q: jax.Array, w_k: jax.Array, s: int = 1, *, num_heads: int = 1
) -> jax.Array:
  r"""SEC index of the attention bilinear form, per head.

  .. math::
    \mathrm{SEC}(s) = \sum_{i \le s} σ_i^2(W_q W_k^T) / \sum_i σ_i^2(W_q W_k^T)

  With kernels in the ``y = x W`` convention (``(d_model, heads·head_dim)``,
  as in ``nnx.Linear``), attention logits are ``x W_q^h W_k^hᵀ xᵀ``; this is
  the paper's ``W_qᵀ W_k``. Near 1: the logits' energy sits in ``s``
  directions, the precursor of attention collapse.

  Args:
    w_q: query kernel ``(d_model, num_heads * head_dim)``.
    w_k: key kernel, same shape.
    s: number of leading singular values.
    num_heads: heads to split the last axis into.

  Returns:
    SEC per head, shape ``(num_heads,)``, float32.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_spectral import diagnostics
    >>> w_q = jnp.diag(jnp.array([2.0, 1.0]))
    >>> sec = diagnostics.spectral_energy_concentration(w_q, jnp.eye(2))
    >>> round(float(sec[0]), 4)
    0.8

  References:
    Qi et al., `Taming Transformer Without Using Learning Rate Warmup
    <https://arxiv.org/abs/2505.21910>`_, ICLR 2025.
  """
  if w_q.shape != w_k.shape or w_q.ndim != 2:
    raise ValueError(f'w_q and w_k must be 2-D and of the same shape, got '
                     f'{w_q.shape} and {w_k.shape}')
  d, hd = w_q.shape
  if hd % num_heads:
    raise ValueError(f'{hd} columns do not split into {num_heads} heads')
  q = w_q.reshape(d, num_heads, hd // num_heads).astype(jnp.float32)
  k = w_k.reshape(d, num_heads, hd // num_heads).astype(jnp.float32)
  # σ(W_q W_kᵀ) without forming the d x d product: the nonzero singular
  # values equal those of R_q R_kᵀ, from thin QRs of each head's kernels.
  r_q = jnp.linalg.qr(jnp.moveaxis(q, 1, 0))[1]
  r_k = jnp.linalg.qr(jnp.moveaxis(k, 1, 0))[1]
  sv = jnp.linalg.svd(r_q @ jnp.swapaxes(r_k, -1, -2), compute_uv=False)
  energy = jnp.square(sv)
  return jnp.sum(energy[:, :s], -1) / jnp.maximum(jnp.sum(energy, -1), 1e-30)


def split_fused_qkv(kernel: jax.Array) -> tuple[jax.Array, jax.Array,
                                                  jax.Array]:
  """Splits a fused ``(d_model, 3·d)`` kernel laid out ``[q | k | v]``."""
  if kernel.ndim != 2 or kernel.shape[1] % 3:
    raise ValueError(f'expected a (d_model, 3*d) kernel, got {kernel.shape}')
  return tuple(jnp.split(kernel, 3, axis=1))


def attention_entropy(attn_weights: jax.Array, axis: int = -1) -> jax.Array:
  """Entropy in nats of attention distributions, ``-Σ p log p`` over keys.

  Args:
    attn_weights: probabilities, summing to 1 along ``axis`` (masked keys
      hold 0).
    axis: the key axis.

  Returns:
    ``attn_weights`` with ``axis`` reduced. Average over queries (and batch)
    for a per-head number; the paper's crash signal is its minimum over heads
    falling towards 0.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_spectral import diagnostics
    >>> p = jnp.array([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    >>> [round(float(e), 4) + 0.0 for e in diagnostics.attention_entropy(p)]
    [0.6931, 0.0]
  """
  p = attn_weights.astype(jnp.float32)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1)), 0),
                  axis=axis)


def bound_summary(opt_state: Any) -> dict[str, Any]:
  """A few numbers per step from :func:`optax_spectral.spectral_stats`.

  Args:
    opt_state: any optimizer state containing ``scale_by_spectral_bound``.

  Returns:
    ``bound_fraction``: fraction of bounded matrices whose step was shrunk;
    ``min_factor``: the smallest applied factor; ``min_factor_leaf``: where
    (``'<leaf>'`` or ``'<leaf>[i, j]'`` for a batch of matrices);
    ``throttled_fraction``: fraction of matrices whose step was shrunk on
    more than half of the recent steps (about the last 100), i.e. where the
    bound, not the learning rate, sets the pace for long stretches (expected
    early in training, when it replaces warmup; see docs/notes.md, "Small inits");
    ``most_throttled_leaf`` and ``most_throttled``: the matrix bounded on
    the largest fraction of recent steps, and that fraction.

  Examples:
    >>> import jax.numpy as jnp, optax_spectral
    >>> from optax_spectral import diagnostics
    >>> tx = optax_spectral.adamw2(10.0)
    >>> params = {'w': jnp.eye(3)}
    >>> _, state = tx.update({'w': jnp.ones((3, 3))}, tx.init(params), params)
    >>> diagnostics.bound_summary(state)['bound_fraction']
    1.0
  """
  stats = _host_stats(opt_state)
  factors, recent = stats['factor'], stats['bounded_recent']
  flat = np.concatenate([f.ravel() for f in factors.values()])
  flat_recent = np.concatenate([f.ravel() for f in recent.values()])
  return {'bound_fraction': float(np.mean(flat < 1)),
          'min_factor': float(flat.min()),
          'min_factor_leaf': _extreme(factors, np.argmin),
          'throttled_fraction': float(np.mean(flat_recent > 0.5)),
          'most_throttled': float(flat_recent.max()),
          'most_throttled_leaf': _extreme(recent, np.argmax)}


def _host_stats(opt_state: Any) -> dict[str, dict[str, np.ndarray]]:
  """``{field: {leaf: values}}`` on the host, in one transfer."""
  packed = _transform.packed_stats(opt_state, host=True)
  return {field: {leaf: v[..., j] for leaf, v in packed.items()}
          for j, field in enumerate(_transform.STATS)}


def _extreme(values: dict[str, np.ndarray], arg) -> str:
  """Where ``arg`` (``np.argmin``/``np.argmax``) of all values lies, as
  ``'<leaf>'`` or ``'<leaf>[i, j]'``."""
  best = {k: np.unravel_index(arg(v), v.shape) for k, v in values.items()}
  pick = [v[best[k]] for k, v in values.items()]
  leaf = list(values)[int(arg(pick))]
  return _indexed(leaf, best[leaf])


def _indexed(leaf: str, index: tuple) -> str:
  """``'<leaf>'`` for a plain matrix, ``'<leaf>[i, j]'`` in a batch."""
  return f"{leaf}[{', '.join(str(int(i)) for i in index)}]" if index else leaf


def scalars(opt_state: Any) -> dict[str, float]:
  """:func:`optax_spectral.spectral_stats` as Python floats for a metrics
  writer (TensorBoard, CSV, wandb): one scalar per matrix.

  Args:
    opt_state: any optimizer state containing ``scale_by_spectral_bound``.

  Returns:
    ``{'<field>/<leaf>': value}`` for plain matrices and ``'<field>/<leaf>[i,
    j]'`` for each matrix of a batch, ``<field>`` being ``sigma_weight``,
    ``sigma_update``, ``factor`` or ``bounded_recent`` (so a writer groups
    them by field).

  Examples:
    >>> import jax.numpy as jnp, optax_spectral
    >>> from optax_spectral import diagnostics
    >>> tx = optax_spectral.adamw2(1e-3)
    >>> state = tx.init({'w': jnp.eye(2), 'stack': jnp.ones((2, 3, 3))})
    >>> sorted(k for k in diagnostics.scalars(state) if k.startswith('f'))
    ['factor/stack[0]', 'factor/stack[1]', 'factor/w']
  """
  out = {}
  for field, leaves in _host_stats(opt_state).items():
    for leaf, value in leaves.items():
      for i in np.ndindex(value.shape):
        out[f'{field}/{_indexed(leaf, i)}'] = float(value[i])
  return out


def warn_if_attention_collapsed(entropy: jax.Array, step: int | None = None,
                                threshold: float = 0.1) -> bool:
  """Warns (and returns True) if some head's mean entropy is below threshold.

  Args:
    entropy: per-head mean attention entropy in nats, any shape (e.g.
      ``(layers, heads)``).
    step: for the message.
    threshold: nats; the default flags heads attending to about one token.
  """
  entropy = np.asarray(entropy)
  if entropy.size and float(entropy.min()) < threshold:
    where = np.unravel_index(np.argmin(entropy), entropy.shape)
    warnings.warn(
        f'attention entropy collapsed{"" if step is None else f" at step {step}"}'
        f': {float(entropy.min()):.3f} nats (< {threshold}) at index '
        f'{tuple(int(i) for i in where)}; max possible is log(keys), e.g. '
        f'{math.log(64):.2f} for 64 keys.', RuntimeWarning, stacklevel=2)
    return True
  return False
