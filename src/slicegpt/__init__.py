"""slicegpt: compress causal language models with SliceGPT."""

from slicegpt.running.in_memory import calibration_data, slice_model
from slicegpt.io.checkpoint import load_sliced, save_sliced
from slicegpt.config import SliceConfig
from slicegpt.errors import SliceGPTError
from slicegpt.architectures.families import supported_architectures
from slicegpt.io.models import load_model
from slicegpt.evaluation.perplexity import perplexity

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
