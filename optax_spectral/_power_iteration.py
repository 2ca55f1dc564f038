"""Block power iteration for σ1 of many matrices at once, with no solver calls.

Accelerators pay per kernel launch, not per flop, for the small matrices
here. So the iteration is written for groups of same-shaped matrices: the
products run once per matrix (they are the only work that grows with the
matrices' size), and everything else — Gram matrices, orthonormalisation,
σ — runs once per group or once for all groups together, on ``k × k``
Grams, in plain ``jnp`` arithmetic. No ``qr``, ``eigh`` or ``cholesky``
custom call (LAPACK, cuSOLVER) is emitted: those loop per matrix on GPUs.

Layout: each matrix is iterated from its *longer* side. A block ``X`` of
``k`` orthonormal rows, shape ``(k, L)`` with ``L = max(m, n)``, is the warm
start; one iteration computes ``Y = A X`` (``(k, S)``, ``S = min(m, n)``) and
``Z = Aᵀ Y`` (``(k, L)``), where ``A`` is the matrix or its transpose, so that
``X`` is the longer side. Blocks are stored with vectors as rows: both
products then contract the matrix in its own layout, with no transposed copy.
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_spectral import _layout

# Products with the matrices run at full float32 precision: GPUs default to
# TF32 for float32 matmuls, which leaves σ1 off by ~3e-4 relative. The
# products are memory-bound (k ≤ 8 columns), so this costs no time.
PRECISION = jax.lax.Precision.HIGHEST
# Relative shift of the Cholesky factorisations of k×k Grams (times the
# Gram's trace): keeps them finite when a step has rank < k, and keeps the
# orthonormalised block's norm ≤ 1, so that Ritz values stay lower bounds.
_SHIFT = 1e-6
# Fraction of the previous block mixed into the next one before it is
# orthonormalised (relative to the new block's RMS row norm): a step of rank
# < k (a zero row, a low-rank gradient) then cannot collapse the block for
# the steps that follow. Shifts the iteration by ~1% of σ̄², which slows
# convergence negligibly.
_MIX = 1e-2
# Squarings of the k×k Gram when estimating its top eigenvalue: the estimate
# weights eigenvalue λ_i by (λ_i/λ_1)^(2^7): a lower bound within 1e-5 of λ_1
# when the top two singular values differ by 3% (σ ratio 0.97; 0.94 in λ),
# and, whatever the gaps, within 0.8% of λ_1 (0.4% of σ) for k = 8.
_SQUARINGS = 7


class PowerIterationResult(NamedTuple):
  """Estimate of the top singular value of each matrix in a batch.

  Attributes:
    sigma: σ_max of the last product, shape ``batch``. A lower bound on
      σ1(M) that converges to it.
    sigma_half: σ_max of the last iteration's first product, a cruder lower
      bound (``sigma_half <= sigma``); their ratio measures how far the
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


def _product(block: jax.Array, matrix: jax.Array, *, contract_rows: bool,
             acc) -> jax.Array:
  """``block (…, k, m) · matrix (…, m, n) → (…, k, n)`` if ``contract_rows``,
  else ``block (…, k, n) · matrix(…, m, n)ᵀ → (…, k, m)``.

  Each device multiplies its own shard of the matrix. Under Explicit axes
  the block is first laid out along the matrix's contracted axis (an
  all-gather of vectors where it is stored more finely), and the result
  keeps the matrix's sharding on its other axis: a contraction over a
  sharded axis is then a reduce-scatter of ``k`` vectors, never a gathered
  matrix. Under Auto axes (or none) XLA finds the same plan.
  """
  spec = '...km,...mn->...kn' if contract_rows else '...kn,...mn->...km'
  kwargs = dict(precision=PRECISION, preferred_element_type=acc)
  mspec = _layout.matrix_spec(matrix)
  contracted, kept = (-2, -1) if contract_rows else (-1, -2)
  block = _layout.along(block, matrix, contracted).astype(matrix.dtype)
  if mspec is None:
    return jnp.einsum(spec, block, matrix, **kwargs)
  out = jax.sharding.NamedSharding(
      _layout.explicit_mesh(matrix),
      jax.sharding.PartitionSpec(*mspec[:-2], None, mspec[kept]))
  return jnp.einsum(spec, block, matrix, out_sharding=out, **kwargs)


# --- k × k arithmetic, batched over all matrices, elementwise in jnp. ------


def _trace(g: jax.Array) -> jax.Array:
  return jnp.trace(g, axis1=-2, axis2=-1)


def launches_are_cheap() -> bool:
  """Whether the compiled update may spend kernels to save bandwidth.

  On GPUs and TPUs each kernel launch costs microseconds, and a loop or
  branch on device data makes the host wait for the device at every trip:
  there the iteration is unrolled (no control flow in any step: the cold
  start runs in ``init`` and the first step is bounded with ``‖Δ‖_F``), and
  the matrices of one shape are stacked so that each product is one kernel
  per shape (on an H200 in-place products cost more than the copies).
  XLA:CPU runs loops and kernels at no such cost, but has little memory
  bandwidth, and compiles unrolled code several times slower: there the
  iteration loops, and each matrix is multiplied in place (a stacked copy
  is two more passes over every matrix: update + apply 2.8x adamw's instead
  of 1.7x for GPT-2 small on 2 cores). True on CPUs. Tests pin it to True
  on every device (conftest), and patch it to False to check the
  accelerators' structure. Also, XLA:CPU's YNN fusions (jaxlib 0.10)
  miscompute the unrolled k×k chain of several groups (σ1 off by orders of
  magnitude); the loops are exact.
  """
  return jax.default_backend() == 'cpu'


def _steps(n: int, body, carry):
  """``carry = body(j, carry)`` for ``j < n``: the k×k arithmetic, a chain
  of ~25 tiny dependent steps, as a loop or unrolled
  (:func:`launches_are_cheap`).
  """
  if launches_are_cheap():
    return jax.lax.fori_loop(0, n, body, carry)
  for j in range(n):
    carry = body(j, carry)
  return carry


def _unit(j, k: int, dtype) -> jax.Array:
  return (jnp.arange(k) == j).astype(dtype)


def _shifted_cholesky(g: jax.Array) -> jax.Array:
  """Lower ``L`` with ``L Lᵀ = g + shift·I`` (right-looking, k rank-1 steps).

  Pivots are clamped to the shift, so that a singular or slightly indefinite
  Gram (rounding) gives a finite factor rather than NaN. Every step is whole-
  array arithmetic with one-hot masks (no scatter, no dynamic slice), which
  XLA fuses into about one kernel per step.
  """
  k = g.shape[-1]
  shift = (_SHIFT * _trace(g) + jnp.finfo(g.dtype).tiny)[..., None, None]

  def step(j, carry):
    g, low = carry
    e = _unit(j, k, g.dtype)
    col_j = jnp.sum(g * e, axis=-1, keepdims=True)          # (…, k, 1)
    pivot = jnp.sqrt(jnp.maximum(
        jnp.sum(col_j * e[:, None], axis=-2, keepdims=True) + shift, shift))
    below = (jnp.arange(k) > j).astype(g.dtype)[:, None]
    col = col_j / pivot * below
    low = low + (col + pivot * e[:, None]) * e
    return g - col * jnp.swapaxes(col, -1, -2), low

  return _steps(k, step, (g, jnp.zeros_like(g)))[1]


def _lower_inverse(low: jax.Array) -> jax.Array:
  """Inverse of a lower-triangular ``(…, k, k)``: k elementwise sweeps."""
  k = low.shape[-1]

  def step(j, inv):
    # Row j of the inverse is final once divided by the pivot; eliminate it
    # from the rows below.
    e = _unit(j, k, low.dtype)
    col_j = jnp.sum(low * e, axis=-1, keepdims=True)         # (…, k, 1)
    pivot = jnp.sum(col_j * e[:, None], axis=-2, keepdims=True)
    row_j = jnp.sum(inv * e[:, None], axis=-2, keepdims=True)  # (…, 1, k)
    row = row_j / pivot
    below = (jnp.arange(k) > j).astype(low.dtype)[:, None]
    inv = inv + e[:, None] * (row - row_j)
    return inv - col_j * below * row

  eye = jnp.eye(k, dtype=low.dtype)
  return _steps(k, step, jnp.broadcast_to(eye, low.shape))


def _top_eigenvalue(s: jax.Array) -> jax.Array:
  """λ_max of symmetric PSD ``(…, k, k)``: a lower bound, by squaring."""
  if s.shape[-1] == 1:
    return s[..., 0, 0]
  t = _trace(s)
  p = s / jnp.where(t > 0, t, 1)[..., None, None]

  def square(_, p):
    p = jnp.matmul(p, p, precision=PRECISION)
    t = _trace(p)
    return p / jnp.where(t > 0, t, 1)[..., None, None]

  p = _steps(_SQUARINGS, square, p)
  # Σ λ_i^(N+1) / Σ λ_i^N with N = 2^_SQUARINGS.
  return jnp.sum(p * s, axis=(-2, -1))


def _gram(a: jax.Array) -> jax.Array:
  """``a aᵀ`` over the last axis, ``(…, k, k)``; replicated where ``a``'s
  axes are Explicit (it contracts a sharded axis: an all-reduce of ``k × k``
  numbers per matrix)."""
  mesh = _layout.explicit_mesh(a)
  out = {} if mesh is None else {'out_sharding': jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec())}
  return jnp.einsum('...ki,...li->...kl', a, a, precision=PRECISION, **out)


# --- one iteration on groups of same-shaped matrices. -----------------------


def stacks_matrices(matrices: Sequence[jax.Array] = ()) -> bool:
  """Whether a group's plain 2-D matrices are stacked into one copy per step.

  Only on one accelerator: there each product is then one kernel per shape
  instead of one per matrix, which the copies pay for (H200, docs/notes.md,
  "Cost").
  Under a mesh of several devices the copies would cost what they save
  nowhere else: a stacked operand takes one sharding for matrices sharded in
  different ways, so XLA all-gathers whole matrices into it (8B Llama shapes
  over 16 devices: 10 GiB per step and 9x the per-device param bytes of
  scratch memory, benchmarks/scale_out.py); and even where it need not, the
  copies cost another param-sized buffer of scratch memory. There each
  device multiplies its own shards in place, and only vectors travel.
  """
  if launches_are_cheap():
    return False
  mesh = _layout.mesh_of(matrices)
  if mesh is None:
    # No mesh in sight: under ``jit`` params sharded by their shardings or
    # ``in_shardings`` alone (the pjit idiom) look like this on Auto axes.
    # Only one device in the program is proof that nothing is sharded.
    return jax.device_count() == 1
  return _layout.size(mesh) <= 1


def stack_group(matrices: Sequence[jax.Array],
                stack: bool | None = None) -> list[jax.Array]:
  """The operands of a group's products: runs of plain matrices stacked
  where :func:`stacks_matrices`, else every matrix in place.

  A Python list of 12 layers gives 12 two-dimensional leaves of one shape;
  stacked into one ``(12, m, n)`` copy, each product is one batched kernel
  for the whole run rather than one kernel (and a slice and a copy of the
  vectors) per matrix. The copies cost bandwidth, and peak memory while the
  step's products run (docs/notes.md, "Cost"). Leaves that are already
  batches of matrices (e.g. stacked by ``nnx.scan``) are used in place
  everywhere.
  ``stack`` overrides :func:`stacks_matrices`.
  """
  if not (stacks_matrices(matrices) if stack is None else stack):
    return list(matrices)
  # Under an Explicit mesh, only matrices of one sharding can be stacked.
  spec = _layout.matrix_spec
  chunks, run = [], []
  def flush():
    if run:
      chunks.append(jnp.stack(run) if len(run) > 1 else run[0][None])
      run.clear()
  for mat in matrices:
    if mat.ndim != 2:
      flush()
      chunks.append(mat)
      continue
    if run and spec(mat) != spec(run[0]):
      flush()
    run.append(mat)
  flush()
  return chunks


def frobenius_norms(chunks: Sequence[jax.Array], acc) -> jax.Array:
  """‖M‖_F of each matrix of a group (an upper bound on σ1), in row order:
  one reduction per chunk of :func:`stack_group` (pass the chunks that the
  iteration multiplies, so that the step reads one stacked copy), not one
  per matrix. A product of each matrix with itself, read in its own dtype
  and accumulated in ``acc``: a square of an ``acc`` copy made XLA:CPU keep
  that copy, an f32 step beside the bf16 one (2x the bf16 param bytes)."""
  def norms(c):
    mesh = _layout.explicit_mesh(c)
    out = {} if mesh is None else {'out_sharding': jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec())}
    return jnp.einsum('...mn,...mn->...', c, c, precision=PRECISION,
                      preferred_element_type=acc, **out).reshape(-1)
  return jnp.sqrt(jnp.concatenate([norms(c) for c in chunks]))


class _Products(NamedTuple):
  """One chunk's products, in the layout of its matrix ``batch + (m, n)``."""
  x: jax.Array    # batch + (k, L): the block, along the matrix's long side
  y: jax.Array    # batch + (k, S): Y = A X
  ay: jax.Array   # batch + (k, L): Aᵀ Y


def _products(chunks: Sequence[jax.Array], block: jax.Array):
  """Both products of each matrix of a group with its rows of ``block``.

  ``chunks`` (from :func:`stack_group`) all have shape ``batch_i + (m, n)``;
  ``block`` is ``(B, k, L)``, ``B = Σ|batch_i|``, its rows on the longer
  side. Returns one :class:`_Products` per chunk, each left in its matrix's
  layout: only their ``k × k`` Grams are gathered and concatenated per group
  (a concatenation of vectors would need one layout for matrices sharded in
  different ways).
  """
  m, n = chunks[0].shape[-2:]
  tall = m > n
  out, start = [], 0
  for mat in chunks:
    batch = mat.shape[:-2]
    size = math.prod(batch)
    x = block[start:start + size] if len(chunks) > 1 else block
    # Laid out once along the side it multiplies (a no-op unless Explicit).
    x = _layout.along(x.reshape(batch + block.shape[1:]), mat,
                      -2 if tall else -1)
    start += size
    y = _product(x, mat, contract_rows=tall, acc=block.dtype)
    ay = _product(y, mat, contract_rows=not tall, acc=block.dtype)
    out.append(_Products(x, y, ay))
  if len(out) > 1 and _layout.matrix_spec(chunks[0]) is None:
    # Unless Explicit axes pin each chunk's layout, the group's vectors are
    # concatenated: its k × k work and next block are then one kernel each
    # per group, not per matrix (on CPUs and on one GPU).
    flat = lambda a: a.reshape((-1,) + a.shape[-2:])
    out = [_Products(*[jnp.concatenate([flat(a) for a in arrays])
                       for arrays in zip(*out)])]
  return out


def _chunk_grams(arrays: Sequence[jax.Array]) -> jax.Array:
  """``(B, k, k)`` Grams of a group's per-chunk ``batch_i + (k, len)``
  arrays, replicated (an all-reduce of ``k × k`` numbers per matrix)."""
  grams = [_gram(a).reshape((-1,) + a.shape[-2:-1] * 2) for a in arrays]
  return jnp.concatenate(grams) if len(grams) > 1 else grams[0]


def _over_groups(fn, *per_group):
  """``fn`` applied once to the k×k arrays of all groups, concatenated.

  ``per_group[j][g]`` is ``(B_g, k_g, k_g)``; groups with a smaller k are
  zero-padded to the largest (a zero row and column of a Gram changes
  neither its Cholesky-QR on the other rows nor its top eigenvalue). ``fn``
  maps such arrays to a tuple of ``(B, ...)`` arrays, which are split back
  per group and cropped to its k. This is what makes the small work one set
  of kernels for the whole model, not one per group.
  """
  k = max(a.shape[-1] for a in per_group[0])
  pad = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 2)
                          + [(0, k - a.shape[-2]), (0, k - a.shape[-1])])
  cat = lambda xs: jnp.concatenate(xs) if len(xs) > 1 else xs[0]
  results = fn(*[cat([pad(a) for a in arrays]) for arrays in per_group])
  out, start = [], 0
  for a in per_group[0]:
    size, kg = a.shape[0], a.shape[-1]
    crop = lambda r: r[start:start + size][(...,) + (slice(0, kg),) * (
        r.ndim - 1)]
    out.append(tuple(crop(r) for r in results))
    start += size
  return out


def _orthonormalizer(gram: jax.Array) -> jax.Array:
  """``C`` such that ``C Y`` has orthonormal rows, where ``gram = Y Yᵀ``.

  Shifted Cholesky-QR on the equilibrated Gram (rows scaled to unit norm
  first, so that rows of very different lengths — a converged direction and
  the rest — do not make it ill-conditioned): ``C = L⁻¹ D`` with
  ``L Lᵀ = D gram D + shift``, so that ``(C Y)(C Y)ᵀ ≼ I``: rows that ``Y``
  does not span come out short, never long, and Ritz values computed from
  them stay lower bounds.
  """
  diag = jnp.diagonal(gram, axis1=-2, axis2=-1)
  scale = jax.lax.rsqrt(jnp.maximum(diag, jnp.finfo(gram.dtype).tiny))
  gram = gram * scale[..., :, None] * scale[..., None, :]
  return _lower_inverse(_shifted_cholesky(gram)) * scale[..., None, :]


class _Estimate(NamedTuple):
  sigma: jax.Array       # (B,)
  sigma_half: jax.Array  # (B,)
  block: jax.Array       # (B, k, L), orthonormal rows
  ok: jax.Array          # (B,): finite, nonzero products


def _mm(a, b):
  return jnp.matmul(a, b, precision=PRECISION)


def orthonormalize(blocks: Sequence[jax.Array]) -> list[jax.Array]:
  """Blocks ``(B_g, k_g, L_g)`` with orthonormal rows spanning the same
  spaces: two Cholesky-QR passes (orthonormal to the Cholesky shift, ~1e-6),
  batched over all blocks (one set of ``k × k`` kernels, whatever their
  shapes)."""
  blocks = list(blocks)
  for _ in range(2 if blocks else 0):
    coeffs = _over_groups(lambda g: (_orthonormalizer(g),),
                          [_gram(b) for b in blocks])
    blocks = [_mm(c, b) for (c,), b in zip(coeffs, blocks)]
  return blocks


def _iteration(groups, blocks, layouts) -> list[_Estimate]:
  """One block iteration on every group of matrices.

  ``Y = A X``, ``U = orth(Y)``, ``Z = Aᵀ U``, ``X ← orth(Aᵀ Y + μ X)``;
  ``σ_half`` and ``σ`` are the top Ritz values ``σ_max(Y)`` and
  ``σ_max(Z)``. Only ``Y`` and ``Aᵀ Y`` are computed from the matrices (back
  to back), and their Gram matrices per group; everything else follows from
  those ``k × k`` Grams (``Z = C Aᵀ Y`` for ``U = C Y``, so ``Z Zᵀ = C (Aᵀ
  Y)(Aᵀ Y)ᵀ Cᵀ``), in one batch for the whole model: one Cholesky-QR for
  ``U`` and the next ``X``, one top-eigenvalue computation for both Ritz
  values. Per group, one more product with the block (the next ``X``)
  remains.
  """
  products = [_products(g, x) for g, x in zip(groups, blocks)]
  grams_y = [_chunk_grams([p.y for p in chunks]) for chunks in products]
  grams_ay = [_chunk_grams([p.ay for p in chunks]) for chunks in products]

  def small(gram_y, gram_ay):
    # The next block spans Aᵀ Y, plus μ X (μ ~ 1% of Aᵀ Y's rows), which
    # keeps it of full rank when a step is not. Its Gram follows from those
    # at hand: X (Aᵀ Y)ᵀ = Y Yᵀ, X Xᵀ = I.
    k = gram_y.shape[-1]
    mix = _MIX * jnp.sqrt(_trace(gram_ay) / k)[..., None, None]
    mixed = gram_ay + 2 * mix * gram_y + mix**2 * jnp.eye(k, dtype=mix.dtype)
    coeff_u, coeff_x = jnp.split(
        _orthonormalizer(jnp.concatenate([gram_y, mixed])), 2)
    gram_z = _mm(_mm(coeff_u, gram_ay), jnp.swapaxes(coeff_u, -1, -2))
    top = _top_eigenvalue(jnp.concatenate([gram_y, gram_z]))
    half, sigma = jnp.split(jnp.sqrt(jnp.maximum(top, 0)), 2)
    # A zero or non-finite step keeps the previous block.
    ok = (jnp.isfinite(sigma) & (sigma > 0) & jnp.isfinite(half)
          & jnp.all(jnp.isfinite(coeff_x), axis=(-2, -1)))
    return coeff_x, mix[..., 0], sigma, half, ok

  out = []
  for (cx, mix, sigma, half, ok), chunks, x, layout in zip(
      _over_groups(small, grams_y, grams_ay), products, blocks, layouts):
    # The next block, chunk by chunk in its matrix's layout, then stored.
    new, start = [], 0
    for p in chunks:
      batch = p.x.shape[:-2]
      size = math.prod(batch)
      rows = slice(start, start + size)
      start += size
      coeff = _layout.batch_like(cx[rows].reshape(batch + cx.shape[1:]), p.ay)
      mu = _layout.batch_like(mix[rows].reshape(batch + (1, 1)), p.ay)
      nxt = _mm(coeff, p.ay + mu * p.x)
      new.append(_layout.place(_layout.flat_batch(nxt, batch), *layout))
    new = jnp.concatenate(new) if len(new) > 1 else new[0]
    out.append(_Estimate(sigma, half, jnp.where(ok[:, None, None], new, x),
                         ok))
  return out


def iterate_groups(
    groups: Sequence[Sequence[jax.Array]],
    blocks: Sequence[jax.Array],
    num_iterations: Sequence[int | jax.Array],
    stack: bool | None = None,
) -> list[_Estimate]:
  """Warm-started block power iteration on several groups of matrices.

  Args:
    groups: ``groups[g]`` is a list of arrays ``batch_i + (m_g, n_g)`` of one
      shape and dtype.
    blocks: ``blocks[g]`` is ``(Σ_i |batch_i|, k_g, max(m_g, n_g))`` with
      orthonormal rows, in at least float32.
    num_iterations: per group. Python ints are unrolled, with no control
      flow: on GPUs every loop or branch on device data makes the host wait
      for the device. Traced counts (e.g. injected hyperparameters) run one
      ``fori_loop`` over the largest, each group keeping its own result.
    stack: whether to stack each group's plain matrices (see
      :func:`stack_group`; ``None``: :func:`stacks_matrices`).

  Returns:
    One :class:`_Estimate` per group. Where a matrix's products are zero or
    not finite, its block is returned unchanged and ``ok`` is False.
  """
  if not blocks:
    return []
  # Stacked once per step (not per iteration): XLA then holds fewer copies.
  # Groups a caller stacked already pass through unchanged.
  groups = [stack_group(g, stack) for g in groups]
  # The blocks stay in their storage layout between iterations and steps.
  layouts = []
  for g, b in zip(groups, blocks):
    mesh = _layout.mesh_of(g)
    layouts.append((mesh, _layout.vector_spec(
        mesh, b.shape[-1], [_layout.chunk_axes(c) for c in g])))
  zeros = [jnp.zeros(b.shape[:1], b.dtype) for b in blocks]
  carry = ([_layout.place(jnp.asarray(b), *layout)
            for b, layout in zip(blocks, layouts)], zeros, zeros,
           [jnp.zeros(b.shape[:1], bool) for b in blocks])

  def body(i, carry, counts=None):
    """One iteration; groups whose count is reached keep their carry."""
    estimates = _iteration(groups, carry[0], layouts)
    new = [(e.block, e.sigma, e.sigma_half, e.ok) for e in estimates]
    if counts is None:
      return tuple(list(x) for x in zip(*new))
    keep = lambda n, a, b: (a if isinstance(n, int) and i < n else
                            b if isinstance(n, int) else
                            jnp.where(i < n, a, b))
    return tuple(
        [keep(n, a, b) for n, a, b in zip(counts, field_new, field_old)]
        for field_new, field_old in zip(zip(*new), carry))

  if all(isinstance(n, int) for n in num_iterations):
    for i in range(max(num_iterations)):
      carry = body(i, carry, num_iterations)
  else:
    counts = [jnp.asarray(n, jnp.int32) for n in num_iterations]
    trips = counts[0]
    for n in counts[1:]:
      trips = jnp.maximum(trips, n)
    # One count for all groups (the same object): no group stops early, so
    # none needs its carry selected at every trip.
    same = all(n is num_iterations[0] for n in num_iterations)
    carry = jax.lax.fori_loop(
        0, trips, lambda i, c: body(i, c, None if same else counts), carry)
  blocks, sigmas, halves, oks = carry
  return [_Estimate(*e) for e in zip(sigmas, halves, blocks, oks)]


def power_iteration(
    matrix: jax.Array,
    u: jax.Array,
    v: jax.Array,
    num_iterations: int | jax.Array = 1,
) -> PowerIterationResult:
  r"""Estimates σ1 of each matrix in a batch by warm-started power iteration.

  Each iteration multiplies an orthonormal block of ``k`` vectors on the
  matrix's longer side by ``M`` and then by ``Mᵀ`` (or the other way round),
  and re-orthonormalises it; ``σ`` is the largest Ritz value of the second
  product and ``σ_half`` of the first, so ``σ_half ≤ σ ≤ σ1(M)``. With
  ``k > 1`` this is subspace iteration: on CPUs and GPUs a product with a few
  columns costs about as much as one, and converges faster when the top
  singular values are close (noise-like matrices). Orthonormalisation and
  Ritz values come from the ``k × k`` Gram matrices (Cholesky-QR written in
  ``jnp``), so no solver is called.

  This is the only power iteration in the library:
  :func:`optax_spectral.scale_by_spectral_bound` runs the same iteration on
  all its matrices at once.

  Args:
    matrix: array of shape ``batch + (m, n)``; any float dtype, accumulated in
      at least float32.
    u: warm-start left block, ``batch + (m, k)``, orthonormal; used if
      ``m > n`` (and returned unchanged where the products are zero or not
      finite).
    v: warm-start right block, ``batch + (n, k)``, orthonormal; used if
      ``m <= n``. ``k <= min(m, n)``.
    num_iterations: a Python int (1 or 2 are unrolled; more run a
      ``fori_loop``) or a traced integer (e.g. from
      ``optax.inject_hyperparams``).

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
  *batch, m, n = matrix.shape
  tall = m > n
  size = math.prod(batch)
  start = jnp.swapaxes(u if tall else v, -1, -2).astype(acc)
  k = start.shape[-2]
  if isinstance(num_iterations, int) and num_iterations > 2:
    # A loop, not an unrolled graph: many iterations would multiply the
    # compile time (the optimizer's steady state unrolls its one or two).
    num_iterations = jnp.asarray(num_iterations)
  (est,) = iterate_groups([[matrix]], [start.reshape(size, k, max(m, n))],
                          [num_iterations])
  # The persistent block is orthonormalised once per iteration, which is
  # enough for a warm start; callers of this function get both sides
  # orthonormal (two more Cholesky-QR passes, and the shorter side from one
  # more product: the optimizer keeps only the longer).
  short = _product(est.block.reshape(tuple(batch) + (k, max(m, n))), matrix,
                   contract_rows=tall, acc=acc)
  short, long = orthonormalize([short.reshape(size, k, min(m, n)),
                                est.block])
  ok = est.ok & jnp.all(jnp.isfinite(short), axis=(-2, -1))
  fallback = jnp.swapaxes(v if tall else u, -1, -2).astype(acc).reshape(
      size, k, min(m, n))
  short = jnp.where(ok[:, None, None], short, fallback)
  long = jnp.where(ok[:, None, None], long, est.block)
  long_side = jnp.swapaxes(long.reshape(tuple(batch) + (k, max(m, n))),
                           -1, -2)
  short_side = jnp.swapaxes(short.reshape(tuple(batch) + (k, min(m, n))),
                            -1, -2)
  left, right = (long_side, short_side) if tall else (short_side, long_side)
  shape = tuple(batch)
  return PowerIterationResult(est.sigma.reshape(shape),
                              est.sigma_half.reshape(shape), left, right)
