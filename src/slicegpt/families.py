"""What slicegpt needs to know about each model family, as data.

A family description names the modules that read from and write to the residual
stream. The algorithm (fusion, rotation, slicing) and the sliced modeling code read
these names and never mention a family by itself. Adding an architecture means adding
one `Family` entry to `FAMILIES` (see docs/adding-an-architecture.md).

All paths inside a layer are relative to the decoder layer module.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

from .errors import SliceGPTError


@dataclass(frozen=True)
class Family:
    name: str
    # Module paths relative to the model.
    layers: str = "model.layers"
    embeddings: tuple[str, ...] = ("model.embed_tokens",)
    final_norm: str = "model.norm"
    head: str = "lm_head"
    # Module paths relative to one decoder layer.
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_norm: str = "input_layernorm"
    mlp_norm: str | None = "post_attention_layernorm"  # None: one norm feeds both branches
    attn_inputs: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_output: str = "self_attn.o_proj"
    mlp_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_output: str = "mlp.down_proj"
    # "rms": RMSNorm x / rms(x) * w; "layer": LayerNorm (needs a mean-free stream);
    # "rms_plus_one": RMSNorm scaled by (1 + w), as in Gemma.
    norm_kind: str = "rms"
    # Parallel blocks feed attention and MLP from the same input (Phi-2, GPT-NeoX).
    parallel: bool = False
    # The config attribute holding the norm epsilon.
    eps_attr: str = "rms_norm_eps"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


LLAMA = Family(name="llama")

FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": LLAMA,
    "MistralForCausalLM": dataclasses.replace(LLAMA, name="mistral"),
    # Qwen2 adds biases to q/k/v: they read the normalised stream and need no change.
    "Qwen2ForCausalLM": dataclasses.replace(LLAMA, name="qwen2"),
    # Qwen3's q/k norms act per head, inside attention, so the rotation never sees them.
    "Qwen3ForCausalLM": dataclasses.replace(LLAMA, name="qwen3"),
}


def supported_architectures() -> list[str]:
    return sorted(FAMILIES)


def family_for(model: nn.Module) -> Family:
    """The family description for `model`, checked against its module tree."""
    arch = type(model).__name__
    family = FAMILIES.get(arch)
    if family is None:
        raise SliceGPTError(
            f"architecture {arch} is not supported; supported: {', '.join(supported_architectures())}"
        )
    check_structure(model, family)
    return family


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def check_structure(model: nn.Module, family: Family) -> None:
    """Fail before any work if a module the description names is missing."""

    def require(root: nn.Module, path: str, where: str) -> None:
        try:
            root.get_submodule(path)
        except AttributeError:
            raise SliceGPTError(
                f"{type(model).__name__} does not match the '{family.name}' family description: "
                f"module '{path}' not found in {where}"
            ) from None

    for path in (family.layers, *family.embeddings, family.final_norm, family.head):
        require(model, path, "the model")
    for index, layer in enumerate(get_module(model, family.layers)):
        paths = [family.attn, family.mlp, family.attn_norm, *family.attn_inputs, family.attn_output]
        paths += [*family.mlp_inputs, family.mlp_output]
        if family.mlp_norm:
            paths.append(family.mlp_norm)
        for path in paths:
            require(layer, path, f"layer {index}")
