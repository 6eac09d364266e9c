"""slicegpt: compress causal language models with SliceGPT."""

from slicegpt.running.in_memory import calibration_data, slice_model
from slicegpt.io.checkpoint import load_sliced, save_sliced
from slicegpt.config import SliceConfig
from slicegpt.errors import SliceGPTError
from slicegpt.architectures.families import supported_architectures
from slicegpt.io.models import load_model
from slicegpt.evaluation.perplexity import perplexity
from slicegpt.running.finetune import FinetuneConfig, finetune
from slicegpt.running.teacher_text import TeacherTextConfig, read_teacher_text, write_teacher_text

__all__ = [
    "FinetuneConfig",
    "SliceConfig",
    "SliceGPTError",
    "TeacherTextConfig",
    "calibration_data",
    "finetune",
    "load_model",
    "load_sliced",
    "perplexity",
    "read_teacher_text",
    "save_sliced",
    "slice_model",
    "supported_architectures",
    "write_teacher_text",
]
