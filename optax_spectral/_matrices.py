"""Which leaves are bounded, and how a leaf is viewed as a batch of matrices."""

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class SpectralDimensionNumbers(NamedTuple):
  """Which axes of a leaf form the matrix whose σ1 is bounded.

  Same convention as ``optax.contrib.MuonDimensionNumbers``: for ``y = x W``
  the reduction axis is the input and the output axis the output. Several
  axes may be given for either side; they are flattened into one matrix
  dimension. All other axes are batch axes: each index along them is a
  separate matrix with its own bound (stacked layers from ``nnx.scan``,
  attention heads, convolution taps).

  Examples:
    A fused attention kernel ``(d_model, heads, head_dim)`` bounded as one
    ``d_model × (heads·head_dim)`` matrix, and a stacked ``(layers, d_in,
    d_out)`` kernel bounded per layer:

    >>> from optax_spectral import SpectralDimensionNumbers as D
    >>> qkv = D(reduction_axis=0, output_axis=(1, 2))
    >>> stacked = D(reduction_axis=1, output_axis=2)
  """
  reduction_axis: Sequence[int] | int = 0
  output_axis: Sequence[int] | int = 1


DimensionNumbersOrFn = (
    SpectralDimensionNumbers | Any | Callable[[Any], Any] | None)

# The default for leaves with more than two dimensions (other than biases,
# norm scales and Flax's attention kernels, read by name): the last two axes
# are the matrix, leading axes are batch axes. Right for stacked layers
# (``nnx.scan``/``nnx.vmap``: ``(layers, d_in, d_out)``); for multi-head
# kernels such as ``(d_model, heads, head_dim)`` it is not, and ``init``
# says so once (resolve_views). optax.contrib.muon leaves such leaves to
# Adam instead; here that would silently drop the bound from every scanned
# model.
_DEFAULT_ND = SpectralDimensionNumbers(reduction_axis=-2, output_axis=-1)
# 1-D leaves, when bounded, are ``1 × n`` matrices: σ1 is their L2 norm.
_VECTOR = SpectralDimensionNumbers(reduction_axis=(), output_axis=0)


class MatrixView(NamedTuple):
  """How one leaf maps to a batch of ``rows × cols`` matrices (all static)."""
  batch_axes: tuple[int, ...]
  reduction_axes: tuple[int, ...]
  output_axes: tuple[int, ...]
  batch_shape: tuple[int, ...]
  rows: int
  cols: int
  dtype: Any = None

  def describe(self) -> str:
    matrix = f'{self.rows}x{self.cols}'
    if not self.batch_shape:
      return f'bounded: {matrix} matrix'
    return (f'bounded: batch {self.batch_shape} (axes {self.batch_axes}) '
            f'of {matrix} matrices')

  @property
  def long_axes(self) -> tuple[int, ...]:
    """The leaf's axes that form the matrices' longer side (the side the
    power iteration's vectors live on)."""
    return self.reduction_axes if self.rows > self.cols else self.output_axes

  def to_matrices(self, x: jax.Array) -> jax.Array:
    """``x`` as an array of shape ``batch_shape + (rows, cols)``."""
    perm = self.batch_axes + self.reduction_axes + self.output_axes
    if perm != tuple(range(x.ndim)):
      x = jnp.transpose(x, perm)
    return x.reshape(self.batch_shape + (self.rows, self.cols))

  def broadcastable(self, per_matrix: jax.Array, ndim: int) -> jax.Array:
    """A ``batch_shape`` array reshaped to broadcast against the leaf."""
    shape = [1] * ndim
    for axis, size in zip(self.batch_axes, self.batch_shape):
      shape[axis] = size
    return per_matrix.reshape(shape)


def _axes(axis, ndim: int, path: str) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  for a in axes:
    if not isinstance(a, int) or not -ndim <= a < ndim:
      raise ValueError(
          f'dimension_numbers for {path!r}: axis {a!r} is out of range for '
          f'a leaf with {ndim} dimensions.')
  return tuple(a % ndim for a in axes)


def matrix_view(
    shape: tuple[int, ...], spec: SpectralDimensionNumbers, path: str = ''
) -> MatrixView:
  """Resolves a spec against a leaf shape. Raises ``ValueError`` if invalid."""
  ndim = len(shape)
  reduction = _axes(spec.reduction_axis, ndim, path)
  output = _axes(spec.output_axis, ndim, path)
  if not output or len(set(reduction + output)) != len(reduction + output):
    raise ValueError(
        f'dimension_numbers for {path!r} (shape {shape}): reduction axes '
        f'{reduction} and output axes {output} must be disjoint, and the '
        'output axes non-empty.')
  batch = tuple(a for a in range(ndim) if a not in reduction + output)
  return MatrixView(
      batch_axes=batch, reduction_axes=reduction, output_axes=output,
      batch_shape=tuple(shape[a] for a in batch),
      rows=math.prod(shape[a] for a in reduction),
      cols=math.prod(shape[a] for a in output))


def path_name(path) -> str:
  """A readable, stable name such as ``'blocks/0/attn/kernel'``."""
  # ``nnx.Optimizer`` hands ``init`` its params wrapped in ``nnx.Variable``s,
  # whose paths end in ``.value``, but ``update`` gets plain arrays. Both
  # must name a leaf the same way.
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and (
      path[-1].name == 'value'):
    path = path[:-1]
  return jax.tree_util.keystr(tuple(path), simple=True, separator='/')


def named_leaves(tree) -> dict[str, Any]:
  """``{path_name: leaf}`` of a pytree's leaves."""
  return {path_name(p): x
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _is_spec(x) -> bool:
  return x is None or isinstance(x, SpectralDimensionNumbers)


def _leaf_shape(x) -> tuple[int, ...] | None:
  shape = getattr(x, 'shape', None)
  return None if shape is None else tuple(shape)


def _named_leaves(params, dimension_numbers):
  """Yields ``(name, leaf, spec)`` for every array leaf of ``params``."""
  if dimension_numbers is None or isinstance(dimension_numbers,
                                             SpectralDimensionNumbers):
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      yield path_name(path), leaf, dimension_numbers
    return
  spec_leaves, spec_def = jax.tree_util.tree_flatten_with_path(
      dimension_numbers, is_leaf=_is_spec)
  if isinstance(dimension_numbers, (tuple, list)) and all(
      isinstance(a, int) for a in dimension_numbers):
    raise ValueError(
        f'dimension_numbers={dimension_numbers!r}: write '
        f'SpectralDimensionNumbers{tuple(dimension_numbers)!r} for one spec '
        'of every leaf with two or more dimensions.')
  try:
    # ``up_to``: params may nest below a spec leaf (``nnx.Variable``) or hold
    # an empty ``optax.MaskedNode`` there when wrapped in ``optax.masked``.
    subtrees = spec_def.flatten_up_to(params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        'dimension_numbers must be a SpectralDimensionNumbers, a callable '
        'returning a pytree, or a pytree with the structure of params whose '
        'leaves are SpectralDimensionNumbers or None (not bounded). It does '
        f'not match params: {_short(e)}') from None
  for (spec_path, spec), subtree in zip(spec_leaves, subtrees):
    if not _is_spec(spec):
      raise ValueError(
          'dimension_numbers leaves must be SpectralDimensionNumbers or None, '
          f'got {spec!r} at {path_name(spec_path)!r}.')
    for path, leaf in jax.tree_util.tree_flatten_with_path(subtree)[0]:
      yield path_name(tuple(spec_path) + tuple(path)), leaf, spec


def _short(error: Exception, limit: int = 300) -> str:
  """An error's message cut to ``limit`` characters: pytree errors repr whole
  trees, tens of thousands of characters for a real model."""
  text = str(error)
  return text if len(text) <= limit else text[:limit] + ' [...]'


# Names of attention projections in Flax's own layers and in common
# hand-written attention (nanoGPT, Hugging Face, Llama, Gemma). A module
# named like a query, key or value projection is attention wherever it is;
# one named like an output projection is attention when a sibling is a
# query, key or value projection (an MLP's ``c_proj`` or ``out`` is not);
# everything under a module named like an attention block is attention.
_QKV = frozenset({
    'query', 'key', 'value', 'q', 'k', 'v', 'wq', 'wk', 'wv', 'wqkv', 'wkv',
    'q_proj', 'k_proj', 'v_proj', 'qkv', 'qkv_proj', 'kv', 'kv_proj',
    'c_attn', 'in_proj', 'q_einsum', 'kv_einsum', 'qkv_einsum'})
_ATTENTION_OUT = frozenset({
    'out', 'o', 'wo', 'o_proj', 'out_proj', 'c_proj', 'proj', 'dense',
    'attn_vec_einsum'})
_PARAM_NAMES = frozenset({'kernel', 'w', 'weight', 'embedding', 'bias',
                          'scale'})
_ATTENTION_BLOCKS = frozenset({
    'attn', 'attention', 'self_attn', 'self_attention', 'mha', 'cross_attn',
    'cross_attention', 'multi_head_attention'})


def is_attention(name: str, names: set[str] | frozenset[str] = frozenset()
                 ) -> bool:
  """Whether the param ``name`` (``'blocks/0/attn/query/kernel'``) is an
  attention projection, by the names of its modules; ``names`` are all the
  tree's leaf names (to find an output projection's siblings)."""
  parts = [p.lower() for p in name.split('/')]
  # The projection's own name: its module's (``attn/query/kernel``), or the
  # leaf's where params are plain dicts (``layers/0/wq``).
  at = len(parts) - 2 if len(parts) > 1 and parts[-1] in _PARAM_NAMES else (
      len(parts) - 1)
  if any(p in _ATTENTION_BLOCKS for p in parts[:at]):
    return True
  module = parts[at]
  if module in _QKV:
    return True
  if module in _ATTENTION_OUT:
    prefix = ''.join(p + '/' for p in parts[:at])
    return any(other.lower().startswith(prefix) and other.lower()[
        len(prefix):].split('/')[0] in _QKV for other in names)
  return False


BOUND_CHOICES = ('all', 'attention')


def bound_rule(bound):
  """``bound`` as a predicate ``(name, names) -> bool``."""
  if bound is None or bound == 'all':
    return lambda name, names: True
  if bound == 'attention':
    return is_attention
  if callable(bound):
    return lambda name, names: bool(bound(name))
  raise ValueError(
      f'bound must be one of {BOUND_CHOICES} or a callable from a param\'s '
      f"name (e.g. 'blocks/0/attn/query/kernel') to bool, got {bound!r}.")


# The prefix of the reason given for matrices that ``bound`` leaves out:
# their steps are plain AdamW's (no ramp), unlike other pass-through leaves.
NOT_CHOSEN = 'not bounded'


# Leaves with these names are biases and norm scales: shifts and scales,
# never matrices, whatever their rank (a (heads, head_dim) bias, a scanned
# (layers, d) scale).
_NOT_MATRICES = frozenset({'bias', 'scale'})


def _flax_attention_spec(name: str, ndim: int, names) -> (
    SpectralDimensionNumbers | None):
  """Flax's ``MultiHeadAttention``/``LinearGeneral`` projections by name:
  ``query``/``key``/``value`` kernels ``(…, in, heads, head_dim)`` are one
  ``in × heads·head_dim`` matrix, the ``out`` kernel ``(…, heads, head_dim,
  out)`` one ``heads·head_dim × out`` matrix; leading axes (``nnx.scan``)
  are batch axes."""
  parts = name.lower().split('/')
  if ndim < 3 or len(parts) < 2 or parts[-1] != 'kernel':
    return None
  if parts[-2] in ('query', 'key', 'value'):
    return SpectralDimensionNumbers(ndim - 3, (ndim - 2, ndim - 1))
  if parts[-2] == 'out' and is_attention(name, names):
    return SpectralDimensionNumbers((ndim - 3, ndim - 2), ndim - 1)
  return None


def resolve_views(
    params: Any,
    dimension_numbers: DimensionNumbersOrFn = None,
    bound_vectors: bool = False,
    bound: Any = 'all',
    warn: bool = False,
) -> dict[str, MatrixView | str]:
  """Maps every leaf name to its :class:`MatrixView`, or a pass-through reason.

  Shared by ``init``, ``update`` and :func:`bounded_leaves`, so what is shown
  is exactly what is bounded. With ``warn`` (``init``), leaves of three or
  more dimensions that the default rule read as batches of matrices are
  named in one warning, with the fix.
  """
  chosen = bound_rule(bound)
  if callable(dimension_numbers) and not isinstance(
      dimension_numbers, SpectralDimensionNumbers):
    dimension_numbers = dimension_numbers(params)
  # A pytree of specs says exactly what is bounded; a single spec (or None)
  # only replaces the default for leaves with two or more dimensions.
  per_leaf = dimension_numbers is not None and not isinstance(
      dimension_numbers, SpectralDimensionNumbers)
  leaves = list(_named_leaves(params, dimension_numbers))
  names = {name for name, _, _ in leaves}
  views, guessed = {}, []
  for name, leaf, spec in leaves:
    if name in views:
      raise ValueError(
          f'Two leaves of params are both named {name!r} (e.g. a key '
          "'a/b' and a nested {'a': {'b': ...}}): rename one, the optimizer "
          'state is keyed by these names.')
    shape = _leaf_shape(leaf)
    if shape is None:
      raise ValueError(f'Leaf {name!r} is not an array: {type(leaf)}.')
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      views[name] = f'passed through: dtype {leaf.dtype}'
      continue
    if per_leaf:
      if spec is None:
        views[name] = 'passed through: its dimension_numbers is None'
        continue
    elif name.split('/')[-1].lower() in _NOT_MATRICES and not (
        len(shape) == 1 and bound_vectors):
      views[name] = 'passed through: a bias or norm scale'
      continue
    elif len(shape) >= 2:
      if spec is None and len(shape) > 2:
        spec = _flax_attention_spec(name, len(shape), names)
        if spec is None:
          spec = _DEFAULT_ND
          guessed.append(name)
      elif spec is None:
        spec = SpectralDimensionNumbers()
    elif len(shape) == 1 and bound_vectors:
      spec = _VECTOR
    else:
      views[name] = f'passed through: {len(shape)}-D'
      continue
    views[name] = matrix_view(shape, spec, name)._replace(dtype=leaf.dtype)
  for name, view in views.items():
    if not isinstance(view, str) and not chosen(name, names):
      views[name] = (f'{NOT_CHOSEN}: left out by bound={bound!r} '
                     '(a plain AdamW step)' if isinstance(bound, str) else
                     f'{NOT_CHOSEN}: left out by bound (a plain AdamW step)')
  guessed = [n for n in guessed if not isinstance(views[n], str)]
  if warn and guessed:
    shown = '; '.join(f'{n}: {views[n].describe()}' for n in guessed[:4])
    more = f' (and {len(guessed) - 4} more)' if len(guessed) > 4 else ''
    warnings.warn(
        'scale_by_spectral_bound: leaves with three or more dimensions were '
        f'read as batches of matrices over their last two axes: {shown}'
        f'{more}. Right for layers stacked by nnx.scan; wrong for multi-head '
        'or convolution kernels. For a Flax model pass dimension_numbers='
        'optax_spectral.nnx_dimension_numbers(model) (linen: '
        'linen_dimension_numbers(module, *example_inputs)); to accept this '
        'reading and silence this, dimension_numbers='
        'optax_spectral.SpectralDimensionNumbers(-2, -1).', stacklevel=4)
  return views


def bounded_leaves(
    params: Any,
    dimension_numbers: DimensionNumbersOrFn = None,
    *,
    bound_vectors: bool = False,
    bound: Any = 'all',
) -> dict[str, str]:
  """Says, for every leaf of ``params``, whether and how it is bounded.

  Call it with the same ``dimension_numbers`` you give the optimizer; nothing
  is skipped silently.

  Args:
    params: a pytree of arrays or ``jax.ShapeDtypeStruct``.
    dimension_numbers: as for :func:`scale_by_spectral_bound`.
    bound_vectors: as for :func:`scale_by_spectral_bound`.
    bound: as for :func:`scale_by_spectral_bound`.

  Returns:
    ``{leaf name: description}``, e.g. ``'bounded: 64x256 matrix'``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax_spectral
    >>> params = {'w': jnp.zeros((4, 3)), 'b': jnp.zeros(3),
    ...           'stack': jnp.zeros((2, 4, 4))}
    >>> for name, how in optax_spectral.bounded_leaves(params).items():
    ...   print(f'{name}: {how}')
    b: passed through: 1-D
    stack: bounded: batch (2,) (axes (0,)) of 4x4 matrices
    w: bounded: 4x3 matrix
  """
  views = resolve_views(params, dimension_numbers, bound_vectors, bound)
  return {name: view if isinstance(view, str) else view.describe()
          for name, view in views.items()}
