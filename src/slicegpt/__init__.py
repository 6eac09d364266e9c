"""slicegpt: compress causal language models with SliceGPT."""

from .api import calibration_data, slice_model
from .checkpoint import load_sliced, save_sliced
from .config import SliceConfig
from .errors import SliceGPTError
from .families import supported_architectures
from .models import load_model
from .perplexity import perplexity

__all__ = [
    "SliceConfig",
    "SliceGPTError",
    "calibration_data",
    "load_model",
    "load_sliced",
    "perplexity",
    "save_sliced",
    "slice_model",
    "supported_architectures",
]
