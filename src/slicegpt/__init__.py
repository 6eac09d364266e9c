"""slicegpt: compress causal language models with SliceGPT."""

from slicegpt.running.in_memory import calibration_data, slice_model
from slicegpt.io.checkpoint import load_sliced, save_sliced
from slicegpt.config import SliceConfig
from slicegpt.errors import SliceGPTError
from slicegpt.architectures.families import supported_architectures
from slicegpt.io.models import load_model
from slicegpt.evaluation.perplexity import perplexity
from slicegpt.recovery.finetune import FinetuneConfig, finetune
from slicegpt.recovery.teacher_text import TeacherTextConfig, read_teacher_text, write_teacher_text
from slicegpt.jobs.recover import RecoverConfig, RecoverResult, recover
from slicegpt.jobs.export import ExportConfig, export

__all__ = [
    "ExportConfig",
    "FinetuneConfig",
    "RecoverConfig",
    "RecoverResult",
    "SliceConfig",
    "SliceGPTError",
    "TeacherTextConfig",
    "calibration_data",
    "export",
    "finetune",
    "load_model",
    "load_sliced",
    "perplexity",
    "read_teacher_text",
    "recover",
    "save_sliced",
    "slice_model",
    "supported_architectures",
    "write_teacher_text",
]
