"""``nnx_dimension_numbers``: which axes of each Flax NNX param form a matrix."""

import warnings
from typing import Any

import jax

from optax_spectral._matrices import SpectralDimensionNumbers

# Params of these modules are scales and shifts, never matrices.
_NORMS = ('LayerNorm', 'RMSNorm', 'BatchNorm', 'GroupNorm', 'InstanceNorm')


def _split(ndim: int, n_in: int, n_out: int) -> SpectralDimensionNumbers | None:
  """Leading axes beyond ``n_in + n_out`` are batch axes (e.g. layers stacked
  by ``nnx.vmap``/``nnx.scan``); then the input axes, then the output axes."""
  lead = ndim - n_in - n_out
  if lead < 0:
    return None
  reduction = tuple(range(lead, lead + n_in))
  output = tuple(range(lead + n_in, ndim))
  return SpectralDimensionNumbers(
      reduction if len(reduction) > 1 else reduction[0],
      output if len(output) > 1 else output[0])


def _einsum_spec(einsum_str: str, ndim: int):
  """Kernel axes contracted with the input are the reduction axes, those
  that reach the output the output axes, those in both (heads, experts)
  batch axes."""
  einsum_str = einsum_str.replace(' ', '')
  if '...' in einsum_str or '->' not in einsum_str:
    return None
  inputs, output = einsum_str.split('->')
  operands = inputs.split(',')
  if len(operands) != 2:
    return None
  x, kernel = operands
  lead = ndim - len(kernel)
  if lead < 0:
    return None
  reduction = tuple(lead + i for i, a in enumerate(kernel)
                    if a not in output)
  out = tuple(lead + i for i, a in enumerate(kernel)
              if a in output and a not in x)
  if not reduction or not out:
    return None
  return SpectralDimensionNumbers(
      reduction if len(reduction) > 1 else reduction[0],
      out if len(out) > 1 else out[0])


def layer_spec(kind: str | None, name: str, ndim: int,
               counts: tuple[int, int] = (1, 1), einsum_str=None):
  """The spec of a layer's param ``name`` by the layer's kind, shared by the
  NNX and linen readers: ``'matrix'`` (a ``(…, *in, *out)`` kernel, ``counts
  = (len(in), len(out))``: Linear/Dense, LinearGeneral/DenseGeneral, Conv as
  its patch-to-features map), ``'embed'``, ``'einsum'``, ``'norm'``, or None
  (no rule). ``...`` where no rule covers the param."""
  if ndim < 2 or kind == 'norm' or name in ('bias', 'scale'):
    return None
  if kind == 'matrix' and name == 'kernel':
    return _split(ndim, *counts)
  if kind == 'embed' and name == 'embedding':
    return _split(ndim, 1, 1)
  if kind == 'einsum' and name == 'kernel':
    return _einsum_spec(einsum_str, ndim)
  return ...


def _spec(module, name: str, ndim: int):
  """The spec of an NNX ``module``'s param ``name`` (:func:`layer_spec`)."""
  kind = type(module).__name__
  if kind in _NORMS:
    return layer_spec('norm', name, ndim)
  if kind == 'Linear':
    return layer_spec('matrix', name, ndim)
  if kind == 'LinearGeneral':
    return layer_spec('matrix', name, ndim, (len(module.in_features),
                                             len(module.out_features)))
  if kind in ('Conv', 'ConvTranspose'):
    # (*window, in, out): the convolution as the linear map from a patch of
    # window·in inputs to the out features.
    return layer_spec('matrix', name, ndim, (len(module.kernel_size) + 1, 1))
  if kind == 'Embed':
    return layer_spec('embed', name, ndim)
  if kind == 'Einsum':
    return layer_spec('einsum', name, ndim, einsum_str=module.einsum_str)
  return layer_spec(None, name, ndim)


def nnx_dimension_numbers(model: Any, unknown: str = 'default') -> Any:
  """The ``dimension_numbers`` of a Flax NNX model, read from its modules.

  Returns a pytree shaped like ``nnx.state(model, nnx.Param)`` whose leaves
  say which axes of each param form the matrix that
  :func:`scale_by_spectral_bound` bounds, or ``None`` (not bounded):

  * ``nnx.Linear``, ``nnx.Embed``: the ``(in, out)`` kernel or ``(vocab,
    features)`` table as one matrix.
  * ``nnx.LinearGeneral`` (and so ``nnx.MultiHeadAttention``): the input
    axes against the output axes, so that a query/key/value kernel ``(in,
    heads, head_dim)`` is one ``in × heads·head_dim`` matrix and the output
    kernel ``(heads, head_dim, out)`` one ``heads·head_dim × out`` matrix
    (not a batch of per-head matrices, as the default would make them).
  * ``nnx.Einsum``: kernel axes contracted with the input against those that
    reach the output; axes in the input, kernel and output (heads, experts)
    are batch axes.
  * ``nnx.Conv``/``nnx.ConvTranspose``: the ``(*window, in, out)`` kernel
    as one ``window·in × out`` matrix, the map from a patch to the output
    features.
  * Biases, norm scales and 1-D params: ``None``.
  * Modules stacked by ``nnx.vmap``/``nnx.scan`` have extra leading axes:
    each index along them is a separate matrix (one bound per layer).
  * Other module types (``unknown='default'``): their params with two or
    more dimensions are bounded over their last two axes (the library's
    default), with a warning that names the types; check with
    :func:`bounded_leaves`. With ``unknown='skip'`` they are not bounded, and
    nothing is warned: e.g. a class token or position table held by the
    model itself, which is not the matrix of a linear map.

  Args:
    model: an ``nnx.Module``.
    unknown: ``'default'`` or ``'skip'``: what to do with params of module
      types without a rule.

  Returns:
    A pytree for ``dimension_numbers=`` of :func:`adamw2` or
    :func:`scale_by_spectral_bound`, used with ``nnx.Optimizer(model, tx,
    wrt=nnx.Param)``.

  Examples:
    >>> from flax import nnx
    >>> import optax_spectral
    >>> model = nnx.MultiHeadAttention(num_heads=2, in_features=8,
    ...                                decode=False, rngs=nnx.Rngs(0))
    >>> dims = optax_spectral.nnx_dimension_numbers(model)
    >>> params = nnx.state(model, nnx.Param)
    >>> optax_spectral.bounded_leaves(params, dims)['query/kernel']
    'bounded: 8x8 matrix'
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  if unknown not in ('default', 'skip'):
    raise ValueError(f"unknown must be 'default' or 'skip', got {unknown!r}.")

  modules = {tuple(path): module for path, module in nnx.iter_modules(model)}
  unknown_types = set()

  def spec(path, variable):
    keys = tuple(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))
                 for k in path)
    module = modules.get(keys[:-1])
    ndim = len(variable.shape)
    result = ... if module is None else _spec(module, str(keys[-1]), ndim)
    if result is ...:
      result = None
      if ndim >= 2 and unknown == 'default':
        unknown_types.add(type(module).__name__ if module is not None
                          else '(no module)')
        result = SpectralDimensionNumbers(-2, -1)
    return result

  params = nnx.state(model, nnx.Param)
  specs = jax.tree_util.tree_map_with_path(
      spec, params, is_leaf=lambda x: isinstance(x, nnx.Variable))
  if unknown_types:
    warnings.warn(
        'nnx_dimension_numbers: no rule for module types '
        f'{sorted(unknown_types)}; their params with two or more dimensions are '
        "bounded over their last two axes (see bounded_leaves; "
        "unknown='skip' leaves them out).",
        stacklevel=2)
  return specs

