"""Export a model sliced with one rotation for everything as a plain model of its own class.

With no shortcuts left, the only differences from the original architecture are a
smaller hidden size and norms that must still divide by the dense width. A standard
RMSNorm over width w with scale c and epsilon eps*D/w computes
    c * sqrt(w/D) * x / sqrt(sum(x^2)/D + eps),
so c = sqrt(D/w) reproduces the sliced norm exactly. The tied head's final map folds
into an untied head (the plain class has no place for the map). The result loads with
`AutoModelForCausalLM.from_pretrained` and no remote code, in any engine that knows
the architecture.
"""

from __future__ import annotations

import copy
import math

import torch
import transformers
from torch import nn

from slicegpt.errors import SliceGPTError
from slicegpt.architectures.family import Family, get_module


def check_plain_exportable(model: nn.Module, family: Family) -> int:
    """The common width, or a clear error when the model cannot be a plain one."""
    slicing = getattr(model.config, "slicing", None)
    if slicing is None:
        raise SliceGPTError("only a sliced model can be exported as a plain one")
    if family.attn_post_norm or family.mlp_post_norm:
        raise SliceGPTError(f"plain export cannot hold the {family.name} family's post-norm maps")
    if family.norm_kind != "rms":
        raise SliceGPTError(f"plain export needs plain RMSNorm; the {family.name} family's norms differ")
    widths = {slicing["embedding_width"], slicing["head_in"]}
    for layer in slicing["layers"]:
        widths |= {layer["in"], layer.get("mid", layer["in"]), layer["out"]}
        expected = {"attn"} if family.parallel else {"attn", "mlp"}
        if set(layer.get("no_shortcut", [])) != expected:
            raise SliceGPTError("plain export needs a model without shortcuts: slice with --rotations model")
    if len(widths) != 1:
        raise SliceGPTError(f"plain export needs one width everywhere, got {sorted(widths)}")
    if slicing.get("final_map_bias"):
        raise SliceGPTError("plain export cannot fold a final map with a bias into the head")
    return widths.pop()


EPS_ATTRIBUTES = ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps")


def eps_attribute(config, eps: float) -> str:
    """The config attribute that sets the norms' epsilon."""
    for name in EPS_ATTRIBUTES:
        if isinstance(getattr(config, name, None), float) and math.isclose(getattr(config, name), eps):
            return name
    raise SliceGPTError(f"cannot find the norm epsilon ({eps}) in {type(config).__name__}")


@torch.no_grad()
def to_plain_model(model: nn.Module, family: Family) -> nn.Module:
    """A new model of the original class, hidden size = the sliced width, same function."""
    width = check_plain_exportable(model, family)
    slicing = model.config.slicing
    dense, eps = slicing["dense_hidden_size"], slicing["norm_eps"]
    config = copy.deepcopy(model.config)
    for key in ("slicing", "auto_map"):
        if hasattr(config, key):
            delattr(config, key)
    config.head_dim = getattr(config, "head_dim", None) or dense // config.num_attention_heads
    config.hidden_size = width
    setattr(config, eps_attribute(config, eps), eps * dense / width)
    config.tie_word_embeddings = False
    if family.branch_scale_attr:  # folded into the writers; the layer reads the config attribute of that name
        setattr(config, family.branch_scale_attr, 1.0)

    state = {k: v for k, v in model.state_dict().items()}
    final = get_module(model, family.final_norm)
    embedding = get_module(model, family.embeddings[0]).weight
    if hasattr(final, "map"):  # logits = map(norm(x)) E^T = norm(x) (E W_map)^T
        state[f"{family.head}.weight"] = embedding @ final.map.weight
        for key in [k for k in state if k.startswith(f"{family.final_norm}.map.")]:
            del state[key]
    scale = math.sqrt(dense / width)
    norm_paths = [family.final_norm]
    for index in range(len(slicing["layers"])):
        norm_paths += [f"{family.layers}.{index}.{p}" for p in (family.attn_norm, family.mlp_norm) if p]
    for path in norm_paths:
        state[f"{path}.weight"] = torch.full((width,), scale, dtype=embedding.dtype)

    # The original class: a loaded checkpoint's own class (Sliced...) builds the sliced shape.
    plain_class = getattr(transformers, slicing["base_architecture"], None) or type(model)
    plain = plain_class(config).to(embedding.dtype)
    missing, unexpected = plain.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SliceGPTError(f"plain export does not match {type(model).__name__}: "
                            f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return plain.eval()
