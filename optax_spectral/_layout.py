"""Where the power iteration's vectors live on a mesh of devices.

A spectral bound needs products with every matrix. On a mesh, each device
multiplies its own shards in place, and only vectors — a block of ``k`` rows
per matrix side, ``k ≤ 8`` — and ``k × k`` Gram matrices cross the network
(benchmarks/scale_out.py: 1B–70B shapes, fsdp and fsdp × tp, Auto and
Explicit axes). Between steps the blocks are stored sharded along their
length over the mesh axes their matrices are sharded along
(:func:`vector_spec`), so that the optimizer state adds each device's share
of a few vectors per matrix, not all of them (1.0006–1.015× adamw's state).

Under Explicit axes JAX needs every sharding named: :func:`matrix_spec`,
:func:`along` and :func:`place` give the products and their operands the
layout of the matrix they multiply. Under Auto axes XLA plans the products
itself; the blocks' storage layout is still set where a mesh is known.
"""

import math
from collections.abc import Iterable
from collections.abc import Sequence

import jax
from jax.sharding import AxisType
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def explicit_mesh(x):
  """The mesh of ``x``'s type if it has Explicit axes (its sharding is then
  part of its type, inside and outside ``jax.set_mesh``), else None."""
  sharding = getattr(jax.typeof(x), 'sharding', None)
  mesh = getattr(sharding, 'mesh', None)
  if mesh is None or mesh.empty or AxisType.Explicit not in mesh.axis_types:
    return None
  return mesh


def context_mesh():
  """The mesh set by ``jax.set_mesh``, else by the legacy ``with mesh:``
  (MaxText's and t5x's idiom), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    return mesh
  # ``with mesh:`` sets only this thread-local, which jax has no public
  # reader for; a jax without it simply gives None (the safe answer).
  try:
    from jax._src import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
    legacy = mesh_lib.thread_resources.env.physical_mesh
  except (ImportError, AttributeError):
    return None
  return None if legacy.empty else legacy


def mesh_of(leaves: Iterable) -> jax.sharding.Mesh | None:
  """The mesh the params live on: that of a concrete leaf's
  ``NamedSharding`` (eager ``init``), else ``jax.set_mesh``'s, else the one
  in an Explicit-typed leaf's type; None if unsharded or unknown (e.g. Auto
  axes under ``jit``'s ``in_shardings`` with no mesh set)."""
  explicit = None
  for x in leaves:
    # (A tracer's ``.sharding`` is slow to fail: read its type only.)
    if isinstance(x, jax.core.Tracer):
      explicit = explicit or explicit_mesh(x)
      continue
    sharding = getattr(x, 'sharding', None)
    if isinstance(sharding, NamedSharding) and not isinstance(
        x, jax.ShapeDtypeStruct):
      return sharding.mesh
    explicit = explicit or explicit_mesh(x)
  return context_mesh() or explicit


def _varying(x):
  """The ``shard_map`` axes along which ``x`` differs between devices (its
  type's varying manual axes), or None where jax does not say."""
  t = jax.typeof(x)
  vma = getattr(t, 'vma', None)  # jax < 0.10
  if vma is None:
    vma = getattr(getattr(t, 'manual_axis_type', None), 'varying', None)
  return None if vma is None else frozenset(vma)


def check_whole_matrices(named_leaves: dict) -> None:
  """Raises a ValueError where ``update`` runs inside ``jax.shard_map`` on
  params that are per-device shards: σ1 of a shard is not σ1 of the matrix,
  and the bound would silently be the wrong one. Replicated params (data
  parallelism inside ``shard_map``) are whole matrices and pass."""
  mesh = jax.sharding.get_abstract_mesh()
  manual = [] if mesh.empty else [
      n for n, t in zip(mesh.axis_names, mesh.axis_types)
      if t == AxisType.Manual]
  if not manual:
    return
  how = ('Run the optimizer update outside shard_map (jax.jit with sharded '
         'params: each device then multiplies its own shards and only '
         'vectors travel), or pass the params to shard_map replicated '
         '(in_specs P()).')
  probe = _varying(jax.lax.axis_index(manual[0]))
  if not probe:
    raise ValueError(
        'scale_by_spectral_bound.update runs inside shard_map with '
        'check_vma=False, where it cannot tell whole matrices from per-device '
        'shards (σ1 of a shard is not σ1 of the matrix). Use check_vma=True '
        'with replicated params, or: ' + how)
  sharded = [name for name, x in named_leaves.items()
             if _varying(x)]
  if sharded:
    raise ValueError(
        'scale_by_spectral_bound.update runs inside shard_map on params that '
        'differ between devices along manual axes '
        f'{sorted(set().union(*[_varying(named_leaves[n]) for n in sharded]))}'
        f' ({", ".join(sharded[:3])}{", ..." if len(sharded) > 3 else ""}): '
        'each device would bound its shard by the shard\'s own σ1, not the '
        'matrix\'s. ' + how)


def size(mesh) -> int:
  return 1 if mesh is None else mesh.size


def _names(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def matrix_axes(spec: tuple, long_axes: Sequence[int]):
  """``(on the long side, anywhere)``: the mesh axes a leaf with
  ``PartitionSpec`` ``spec`` is sharded over along the axes that form its
  matrices' longer side, and along any axis."""
  spec = tuple(spec)
  entry = lambda a: spec[a] if a < len(spec) else None
  return (frozenset(n for a in long_axes for n in _names(entry(a))),
          frozenset(n for e in spec for n in _names(e)))


def vector_spec(mesh, length: int, matrices) -> P:
  """How a group's block ``(matrices, k, length)`` is stored between steps.

  ``matrices`` has ``matrix_axes`` of each of the group's matrices (None if
  unknown, e.g. Auto axes under ``jit``). The block's length is sharded
  over the mesh axes that every matrix of the group is sharded over
  somewhere (in mesh order, as many as divide it): on an fsdp-only mesh a
  ``(d, 4d)`` kernel sharded along ``d`` keeps its vectors along ``4d``
  sharded too. An axis a matrix leaves free is not used: under Auto axes
  XLA would take that as a hint to shard the param along it as well (a
  param whose sharding changes after the first step recompiles the step).
  Unsharded or unknown matrices keep replicated vectors.
  """
  if mesh is None or size(mesh) <= 1 or not matrices or any(
      m is None for m in matrices):
    return P()
  shared = frozenset.intersection(*[used for _, used in matrices])
  axes, product = [], 1
  longs = {long for long, _ in matrices}
  if len(longs) == 1 and next(iter(longs)):
    # First the matrices' own layout of their long side, where they agree,
    # then finer: the vectors a device keeps are then a slice of those its
    # products use, and under Auto axes XLA never finds gathering a matrix
    # cheaper than moving vectors (it did, for a (vocab, d) table sharded
    # (tp, fsdp) whose vectors were stored over (fsdp, tp)).
    (long,) = longs
    own = [n for n in mesh.axis_names if n in long]
    if length % math.prod(mesh.shape[n] for n in own) == 0:
      axes, product = own, math.prod(mesh.shape[n] for n in own)
  for name, n in zip(mesh.axis_names, mesh.axis_sizes):
    if (name in shared and name not in axes and n > 1
        and length % (product * n) == 0):
      axes.append(name)
      product *= n
  if not axes:
    return P()
  return P(None, None, tuple(axes) if len(axes) > 1 else axes[0])


def place(x: jax.Array, mesh, spec: P) -> jax.Array:
  """``x`` laid out as ``spec`` on ``mesh`` (a no-op without a mesh)."""
  if mesh is None:
    return x
  if explicit_mesh(x) is not None:  # even on one device: types must match
    return jax.sharding.reshard(x, NamedSharding(explicit_mesh(x), spec))
  if size(mesh) <= 1 or isinstance(x, jax.core.Tracer) or isinstance(
      mesh, jax.sharding.AbstractMesh):
    # Traced under Auto axes: XLA keeps the layout the state came in with
    # (set by ``init``); a constraint here would also propagate into the
    # params. A concrete array with only an abstract mesh: jit places it.
    return x
  return jax.device_put(x, NamedSharding(mesh, spec))


def leaf_axes(leaf, long_axes: Sequence[int]):
  """:func:`matrix_axes` of a param leaf, from its concrete sharding or its
  Explicit type; None where unknown."""
  if explicit_mesh(leaf) is not None:
    return matrix_axes(jax.typeof(leaf).sharding.spec, long_axes)
  if isinstance(leaf, jax.core.Tracer):
    return None
  sharding = getattr(leaf, 'sharding', None)
  if isinstance(sharding, NamedSharding):
    return matrix_axes(sharding.spec, long_axes)
  return None


def chunk_axes(chunk: jax.Array):
  """:func:`matrix_axes` of a ``batch + (m, n)`` operand of the products
  (known under Explicit axes only)."""
  spec = matrix_spec(chunk)
  if spec is None:
    return None
  m, n = chunk.shape[-2:]
  return matrix_axes(spec, (chunk.ndim - 2,) if m > n else (chunk.ndim - 1,))


def replicated(x: jax.Array) -> jax.Array:
  """``x`` replicated where its axes are Explicit (JAX would otherwise
  refuse to combine differently sharded per-matrix numbers); unchanged
  otherwise."""
  mesh = explicit_mesh(x)
  return x if mesh is None else jax.sharding.reshard(x, NamedSharding(mesh,
                                                                       P()))


def matrix_spec(matrix: jax.Array) -> tuple | None:
  """The Explicit ``PartitionSpec`` of ``matrix`` as a full-rank tuple, or
  None where its axes are not Explicit."""
  if explicit_mesh(matrix) is None:
    return None
  spec = tuple(jax.typeof(matrix).sharding.spec)
  return spec + (None,) * (matrix.ndim - len(spec))


def along(x: jax.Array, matrix: jax.Array, axis: int) -> jax.Array:
  """A block ``batch + (k, len)`` resharded so that its last axis is sharded
  as ``matrix``'s ``axis`` (-2 or -1) and its batch axes as the matrix's:
  the operand layout of a local product. Unchanged unless Explicit."""
  spec = matrix_spec(matrix)
  if spec is None:
    return x
  want = P(*spec[:-2], None, spec[axis])
  if tuple(jax.typeof(x).sharding.spec) + (None,) * (
      x.ndim - len(jax.typeof(x).sharding.spec)) == tuple(want):
    return x
  return jax.sharding.reshard(x, NamedSharding(explicit_mesh(matrix), want))


def flat_batch(x: jax.Array, batch: tuple[int, ...]) -> jax.Array:
  """``batch + (k, len)`` as ``(prod(batch), k, len)``; under Explicit axes
  the batch axes are first gathered (vectors only) so that the reshape is
  legal whatever their sharding."""
  mesh = explicit_mesh(x)
  if mesh is not None and len(batch) != 1:
    spec = tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim
    x = jax.sharding.reshard(x, NamedSharding(
        mesh, P(*([None] * len(batch)), None, spec[x.ndim - 1])))
  return x.reshape((math.prod(batch),) + x.shape[-2:])


def batch_like(small: jax.Array, ref: jax.Array) -> jax.Array:
  """``small`` ``batch + (a, b)`` (replicated per-matrix numbers) with its
  batch axes sharded as ``ref``'s (``batch + (k, len)``), so that the two
  combine. Unchanged unless Explicit."""
  mesh = explicit_mesh(ref)
  if mesh is None or ref.ndim <= 2:
    return small
  spec = tuple(jax.typeof(ref).sharding.spec) + (None,) * ref.ndim
  return jax.sharding.reshard(small, NamedSharding(
      mesh, P(*spec[:ref.ndim - 2], None, None)))
