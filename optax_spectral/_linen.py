"""``linen_dimension_numbers``: the matrices of Flax linen params, by module."""

import warnings
from typing import Any

import jax

from optax_spectral._matrices import SpectralDimensionNumbers
from optax_spectral._nnx import _NORMS
from optax_spectral._nnx import layer_spec


def _count(axes) -> int:
  """How many axes an ``int | Sequence[int]`` attribute names."""
  return 1 if isinstance(axes, int) else len(tuple(axes))


def _spec(module, einsum_str, name: str, ndim: int):
  """The spec of a linen ``module``'s param ``name``
  (:func:`optax_spectral._nnx.layer_spec`)."""
  kind = type(module).__name__
  if kind in _NORMS:
    return layer_spec('norm', name, ndim)
  if kind == 'Dense':
    return layer_spec('matrix', name, ndim)
  if kind == 'DenseGeneral':
    return layer_spec('matrix', name, ndim, (_count(module.axis),
                                             _count(module.features)))
  if kind in ('Conv', 'ConvTranspose'):
    return layer_spec('matrix', name, ndim,
                      (_count(module.kernel_size) + 1, 1))
  if kind == 'Embed':
    return layer_spec('embed', name, ndim)
  if kind == 'Einsum':
    return layer_spec('einsum', name, ndim, einsum_str=einsum_str)
  return layer_spec(None, name, ndim)


def linen_dimension_numbers(module: Any, *init_args: Any,
                            unknown: str = 'default', **init_kwargs: Any
                            ) -> Any:
  """The ``dimension_numbers`` of a Flax linen model, read from its modules.

  Runs ``module.init`` abstractly (``jax.eval_shape``: nothing is allocated)
  and records the module called at each scope path. Returns a pytree shaped
  like the init's ``'params'`` collection whose leaves say which axes of
  each param form the matrix that :func:`scale_by_spectral_bound` bounds, or
  ``None`` (not bounded), by the rules of :func:`nnx_dimension_numbers`:

  * ``nn.Dense``, ``nn.Embed``: the ``(in, out)`` kernel or ``(vocab,
    features)`` table as one matrix.
  * ``nn.DenseGeneral`` (and so ``nn.MultiHeadDotProductAttention``): the
    input axes against the output axes, e.g. a query kernel ``(in, heads,
    head_dim)`` is one ``in × heads·head_dim`` matrix; its ``batch_dims``
    are batch axes.
  * ``nn.Einsum``: kernel axes contracted with the input against those that
    reach the output; axes in the input, kernel and output are batch axes.
  * ``nn.Conv``/``nn.ConvTranspose``: the ``(*window, in, out)`` kernel as
    one ``window·in × out`` matrix.
  * Biases, norm scales and 1-D params: ``None``.
  * Layers stacked by ``nn.scan``/``nn.vmap`` (``variable_axes={'params':
    0}``) have extra leading axes: each index along them is a separate
    matrix.
  * Other module types (``unknown='default'``): their params with two or
    more dimensions are bounded over their last two axes, with one warning
    that names the types; ``unknown='skip'`` leaves them out silently.

  Args:
    module: an ``nn.Module``.
    *init_args: example inputs for ``module.init`` after the PRNG key: arrays
      or ``jax.ShapeDtypeStruct``, traced abstractly.
    unknown: ``'default'`` or ``'skip'``: what to do with params of module
      types without a rule.
    **init_kwargs: further keyword arguments of ``module.init`` (e.g.
      ``train=False`` or ``method=``), passed as they are.

  Returns:
    A pytree for ``dimension_numbers=`` of :func:`adamw2` or
    :func:`scale_by_spectral_bound`, with the structure of
    ``variables['params']``.

  Examples:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> import flax.linen as nn
    >>> import optax_spectral
    >>> model = nn.MultiHeadDotProductAttention(num_heads=2)
    >>> x = jnp.ones((1, 3, 8))
    >>> dims = optax_spectral.linen_dimension_numbers(model, x)
    >>> params = model.init(jax.random.key(0), x)['params']
    >>> optax_spectral.bounded_leaves(params, dims)['query/kernel']
    'bounded: 8x8 matrix'
  """
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  if unknown not in ('default', 'skip'):
    raise ValueError(f"unknown must be 'default' or 'skip', got {unknown!r}.")

  called = {}  # scope path -> [(module, its einsum_str)] in call order

  def record(next_fun, args, kwargs, context):
    module = context.module
    # Classes made by lifted transforms (nn.scan, nn.vmap, nn.remat) wrap the
    # module whose params they hold, which is then called at the same path.
    if module.scope is not None and (
        type(module).__module__ != 'flax.linen.transforms'):
      einsum_str = getattr(module, 'einsum_str', None)
      if isinstance(module, nn.Einsum) and context.method_name == '__call__':
        # nn.Einsum also takes its equation as a call argument.
        at_call = args[1] if len(args) > 1 else kwargs.get('einsum_str')
        einsum_str = at_call or einsum_str
      called.setdefault(tuple(module.scope.path), []).append(
          (module, einsum_str))
    return next_fun(*args, **kwargs)

  def init(*args):
    return module.init(jax.random.key(0), *args, **init_kwargs)

  with nn.intercept_methods(record):
    variables = jax.eval_shape(init, *init_args)
  params = nn.unbox(variables.get('params', {}))
  unknown_types = set()

  def spec(path, leaf):
    keys = tuple(str(getattr(k, 'key', k)) for k in path)
    ndim = len(leaf.shape)
    # Several modules share a path under nn.share_scope: the first with a
    # rule for this param decides.
    owners = called.get(keys[:-1], [])
    for owner, einsum_str in owners:
      result = _spec(owner, einsum_str, keys[-1], ndim)
      if result is not ...:
        return result
    if ndim < 2 or unknown == 'skip':
      return None
    unknown_types.add(type(owners[0][0]).__name__ if owners else '(no module)')
    return SpectralDimensionNumbers(-2, -1)

  specs = jax.tree_util.tree_map_with_path(spec, params)
  if unknown_types:
    warnings.warn(
        'linen_dimension_numbers: no rule for module types '
        f'{sorted(unknown_types)}; their params with two or more dimensions '
        "are bounded over their last two axes (see bounded_leaves; "
        "unknown='skip' leaves them out).",
        stacklevel=2)
  return specs
