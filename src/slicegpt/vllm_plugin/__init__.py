"""vLLM plugin: serve sliced checkpoints, shortcut matrices included, with `vllm serve DIR`.

vLLM loads the plugins named under the `vllm.general_plugins` entry point in every process
it starts (pyproject.toml names `register` below), so installing slicegpt next to vLLM is all
it takes. A plain export (`slicegpt export --format plain`) needs none of this: it is a model
of the original class that vLLM runs as it is. A sliced directory's config.json names the
class slicegpt's remote code builds (`SlicedLlamaForCausalLM`, ...); `register` tells vLLM
that those names are served by model.py, written from vLLM's own layers.

Importing this module imports nothing from vLLM: the model is registered by name and loaded
only when a sliced checkpoint is served.
"""

from __future__ import annotations

# The families slicegpt slices that vLLM also runs, with the same layer shape: pre-norm
# blocks of attention (grouped-query, rotary) and a gated SiLU MLP.
BASE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MODEL_CLASS = "slicegpt.vllm_plugin.model:SlicedForCausalLM"


def sliced_architectures() -> list[str]:
    """The names a sliced checkpoint's config.json gives its architecture, one per family."""
    return [f"Sliced{base}" for base in BASE_ARCHITECTURES]


def register() -> None:
    """vLLM's entry point: map every sliced architecture name onto the plugin's model."""
    from vllm import ModelRegistry

    for name in sliced_architectures():
        ModelRegistry.register_model(name, MODEL_CLASS)
