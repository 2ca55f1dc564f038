"""optax_spectral: train Transformers without learning-rate warmup (AdamW²)."""

from optax_spectral._alias import adamw2
from optax_spectral._alias import from_adamw_state
from optax_spectral._linen import linen_dimension_numbers
from optax_spectral._matrices import bounded_leaves
from optax_spectral._matrices import is_attention
from optax_spectral._matrices import SpectralDimensionNumbers
from optax_spectral._nnx import nnx_dimension_numbers
from optax_spectral._power_iteration import power_iteration
from optax_spectral._power_iteration import PowerIterationResult
from optax_spectral._transform import scale_by_spectral_bound
from optax_spectral._transform import ScaleBySpectralBoundState
from optax_spectral._transform import spectral_stats
from optax_spectral._transform import SpectralGroupState
from optax_spectral import diagnostics  # after the names it uses

__version__ = '0.1.0'

__all__ = (
    'adamw2',
    'bounded_leaves',
    'diagnostics',
    'from_adamw_state',
    'is_attention',
    'linen_dimension_numbers',
    'nnx_dimension_numbers',
    'power_iteration',
    'PowerIterationResult',
    'scale_by_spectral_bound',
    'ScaleBySpectralBoundState',
    'spectral_stats',
    'SpectralDimensionNumbers',
    'SpectralGroupState',
)
