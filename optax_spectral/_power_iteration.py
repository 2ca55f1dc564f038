"""Block power iteration for the top singular value of a batch of matrices."""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class PowerIterationResult(NamedTuple):
  """Estimate of the top singular value of each matrix in a batch.

  Attributes:
    sigma: ``σ_max(Mᵀ U)`` after the last iteration, shape ``batch``. A lower
      bound on σ1(M) that converges to it.
    sigma_half: ``σ_max(M V)`` of the last iteration's first half, a cruder
      lower bound (``sigma_half <= sigma``); their ratio measures how far the
      iteration is from converged.
    u: orthonormal left block, ``batch + (m, k)``.
    v: orthonormal right block, ``batch + (n, k)``; the warm start for the
      next call.
  """
  sigma: jax.Array
  sigma_half: jax.Array
  u: jax.Array
  v: jax.Array


def compute_dtype(dtype) -> jnp.dtype:
  """Accumulation dtype: at least float32, so bf16/f16 sums stay accurate."""
  return jnp.promote_types(dtype, jnp.float32)


def _vector_sharding():
  """Replicated products under an Explicit mesh, else left to the compiler.

  Under explicit sharding, a product that contracts a sharded axis must name
  its output sharding. The result is a few vectors, so replicating it costs
  one all-reduce of ``batch × (m or n) × k`` numbers and never gathers ``M``.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
    return None
  return jax.sharding.PartitionSpec()


def orthonormal_matmul(
    matrix: jax.Array, x: jax.Array, fallback: jax.Array, *, transpose: bool
) -> tuple[jax.Array, jax.Array]:
  """Half an iteration: ``Y = M X`` (or ``Mᵀ X``), orthonormalised.

  Args:
    matrix: ``batch + (m, n)``, any float dtype; products accumulate in at
      least float32.
    x: orthonormal block ``batch + (n, k)`` (``batch + (m, k)`` if
      ``transpose``).
    fallback: the block returned where ``Y`` is zero or not finite, so that a
      zero matrix or a non-finite step does not turn the persistent vectors
      into zeros or NaNs.
    transpose: multiply by ``Mᵀ``.

  Returns:
    ``(σ_max(Y), orthonormal basis of Y)``; for ``k = 1`` simply
    ``(|y|, y / |y|)``.
  """
  acc = compute_dtype(matrix.dtype)
  spec = '...ij,...ik->...jk' if transpose else '...ij,...jk->...ik'
  y = jnp.einsum(spec, matrix, x.astype(matrix.dtype),
                 preferred_element_type=acc, out_sharding=_vector_sharding())
  if y.shape[-1] == 1:
    top = jnp.sqrt(jnp.sum(jnp.square(y), axis=(-2, -1)))
    q = y / jnp.where(top > 0, top, 1)[..., None, None]
  else:
    gram = jnp.einsum('...ik,...il->...kl', y, y)
    top = jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(gram)[..., -1], 0))
    q, _ = jnp.linalg.qr(y)
  ok = jnp.isfinite(top) & (top > 0)
  q = jnp.where(ok[..., None, None], q, fallback.astype(acc))
  return top, q


def power_iteration(
    matrix: jax.Array,
    u: jax.Array,
    v: jax.Array,
    num_iterations: int | jax.Array = 1,
) -> PowerIterationResult:
  r"""Estimates σ1 of each matrix in a batch by warm-started power iteration.

  Each iteration computes ``U ← orth(M V)`` and ``V ← orth(Mᵀ U)``, and
  ``σ = σ_max(Mᵀ U)``, which satisfies ``σ_max(M V) ≤ σ ≤ σ1(M)``. With a
  block of ``k > 1`` columns this is subspace iteration: on CPUs and GPUs a
  product with a few columns costs about as much as one, and converges faster
  when the top singular values are close (noise-like matrices).

  This is the only power iteration in the library: every σ1 estimate in
  :func:`optax_spectral.scale_by_spectral_bound` goes through it or its half
  step :func:`orthonormal_matmul`.

  Args:
    matrix: array of shape ``batch + (m, n)``; any float dtype, accumulated in
      at least float32.
    u: warm-start (and fallback) left block, ``batch + (m, k)``, orthonormal.
    v: warm-start right block, ``batch + (n, k)``, orthonormal, ``k <= m``.
    num_iterations: 1 or 2 are unrolled; more, or a traced integer (e.g.
      from ``optax.inject_hyperparams``), run a ``fori_loop``.

  Returns:
    A :class:`PowerIterationResult`, blocks in the accumulation dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_spectral
    >>> m = jnp.diag(jnp.array([3.0, 1.0]))
    >>> start = jnp.ones((2, 1)) / 2**0.5
    >>> r = optax_spectral.power_iteration(m, start, start, num_iterations=20)
    >>> round(float(r.sigma), 4)
    3.0
  """
  acc = compute_dtype(matrix.dtype)
  zeros = jnp.zeros(matrix.shape[:-2], acc)

  def body(_, carry):
    _, _, u, v = carry
    sigma_half, u = orthonormal_matmul(matrix, v, u, transpose=False)
    sigma, v = orthonormal_matmul(matrix, u, v, transpose=True)
    return sigma, sigma_half, u, v

  carry = (zeros, zeros, u.astype(acc), v.astype(acc))
  if isinstance(num_iterations, int) and num_iterations <= 2:
    # Unrolled: a loop of one or two steps costs more than its body on CPU;
    # longer loops stay loops, or the first step's 20 iterations would
    # multiply the compile time.
    for i in range(num_iterations):
      carry = body(i, carry)
  else:
    carry = jax.lax.fori_loop(0, num_iterations, body, carry)
  return PowerIterationResult(*carry)
