"""Modeling code for sliced checkpoints.

This file is copied next to every sliced checkpoint, so it must import nothing but
torch and transformers. A sliced model is the original transformers class with three
changes, all described by `config.slicing`:
  * every norm is a bare RMSNorm that still divides by the dense width,
  * linears that read or write the residual stream are narrower,
  * each residual path carries a shortcut matrix (a change of basis between blocks).
The family-specific module names travel in `config.slicing["family"]`, so the block
forward below is written once per block shape (sequential, parallel).
"""

from __future__ import annotations

import torch
from torch import nn


class SlicedRMSNorm(nn.Module):
    """RMSNorm without a scale that divides by the RMS over the *dense* width.

    The sliced-away coordinates carry almost no energy, so the sum of squares over the
    kept coordinates stands in for the full one, but the mean must use the dense width.
    """

    def __init__(self, dense_width: int, eps: float):
        super().__init__()
        self.dense_width = dense_width
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At least float32 for the statistic, as transformers' own norms do; float64 stays float64.
        compute = torch.promote_types(x.dtype, torch.float32)
        y = x.to(compute)
        scale = torch.rsqrt(y.pow(2).sum(-1, keepdim=True) / self.dense_width + self.eps)
        return (y * scale).to(x.dtype)

    def extra_repr(self) -> str:
        return f"dense_width={self.dense_width}, eps={self.eps}"


class NormThenMap(nn.Module):
    """The final norm of a model whose head stays tied to its embeddings.

    The stream's last basis differs from the embedding's, and the final norm's scale
    cannot be folded into a shared head, so one small map (last width -> embedding
    width) follows the norm instead of a second vocabulary-sized matrix.
    """

    def __init__(self, dense_width: int, eps: float, in_width: int, out_width: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.norm = SlicedRMSNorm(dense_width, eps)
        self.map = nn.Linear(in_width, out_width, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.map(self.norm(x))


def _first(output):
    return output[0] if isinstance(output, tuple) else output


class SlicedDecoderLayer(nn.Module):
    """A decoder layer whose residual paths carry shortcut matrices.

    The attention, MLP and norm modules keep the names the family gives them, so the
    checkpoint's keys match the original architecture's, plus the shortcuts.
    A shortcut that is None is the identity (fused but not yet rotated).
    """

    def __init__(self, modules: dict[str, nn.Module], family: dict, attention_type: str | None = None):
        super().__init__()
        self.names = {key: family[key] for key in ("attn", "mlp", "attn_norm", "mlp_norm")}
        self.parallel = bool(family["parallel"])
        for key, name in self.names.items():
            if name is not None:
                self.add_module(name, modules[key])
        self.attn_shortcut: nn.Linear | None = None
        self.mlp_shortcut: nn.Linear | None = None
        if attention_type is not None:
            self.attention_type = attention_type  # read by models that mix sliding and full attention

    def _part(self, key: str) -> nn.Module:
        return getattr(self, self.names[key])

    @staticmethod
    def _skip(shortcut: nn.Linear | None, x: torch.Tensor) -> torch.Tensor:
        return x if shortcut is None else shortcut(x)

    def attention_half(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        out = _first(self._part("attn")(hidden_states=self._part("attn_norm")(x), **kwargs))
        return self._skip(self.attn_shortcut, x) + out

    def mlp_half(self, x: torch.Tensor) -> torch.Tensor:
        out = _first(self._part("mlp")(self._part("mlp_norm")(x)))
        return self._skip(self.mlp_shortcut, x) + out

    def parallel_block(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        attn_in = self._part("attn_norm")(x)
        mlp_in = attn_in if self.names["mlp_norm"] is None else self._part("mlp_norm")(x)
        attn_out = _first(self._part("attn")(hidden_states=attn_in, **kwargs))
        mlp_out = _first(self._part("mlp")(mlp_in))
        return self._skip(self.attn_shortcut, x) + attn_out + mlp_out

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args:
            raise TypeError("SlicedDecoderLayer takes only keyword arguments after hidden_states")
        if self.parallel:
            return self.parallel_block(hidden_states, **kwargs)
        return self.mlp_half(self.attention_half(hidden_states, **kwargs))


def _narrow_linear(linear: nn.Module, in_features: int | None = None, out_features: int | None = None) -> nn.Linear:
    """An empty nn.Linear like `linear` with other widths; its weights come from the checkpoint."""
    new = nn.Linear(
        in_features or linear.in_features,
        out_features or linear.out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    return new


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def wrap_layer(layer: nn.Module, family: dict) -> SlicedDecoderLayer:
    """Turn an original decoder layer into a SlicedDecoderLayer holding the same modules."""
    parts = {key: layer.get_submodule(family[key]) for key in ("attn", "mlp", "attn_norm")}
    parts["mlp_norm"] = layer.get_submodule(family["mlp_norm"]) if family["mlp_norm"] else None
    return SlicedDecoderLayer(parts, family, getattr(layer, "attention_type", None))


def apply_sliced_structure(model: nn.Module, slicing: dict) -> None:
    """Reshape a freshly built dense model into the sliced shape that `slicing` records."""
    family = slicing["family"]
    dense, eps = slicing["dense_hidden_size"], slicing["norm_eps"]
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype

    for path in family["embeddings"]:
        old = model.get_submodule(path)
        _set(model, path, nn.Embedding(old.num_embeddings, slicing["embedding_width"], old.padding_idx,
                                       device=device, dtype=dtype))

    layers = model.get_submodule(family["layers"])
    for index, widths in enumerate(slicing["layers"]):
        layer = layers[index]
        mid = widths["in"] if family["parallel"] else widths["mid"]
        for path in family["attn_inputs"]:
            _set(layer, path, _narrow_linear(layer.get_submodule(path), in_features=widths["in"]))
        attn_out = widths["out"] if family["parallel"] else mid
        _set(layer, family["attn_output"], _narrow_linear(layer.get_submodule(family["attn_output"]),
                                                          out_features=attn_out))
        for path in family["mlp_inputs"]:
            _set(layer, path, _narrow_linear(layer.get_submodule(path), in_features=mid))
        _set(layer, family["mlp_output"], _narrow_linear(layer.get_submodule(family["mlp_output"]),
                                                         out_features=widths["out"]))
        _set(layer, family["attn_norm"], SlicedRMSNorm(dense, eps))
        if family["mlp_norm"]:
            _set(layer, family["mlp_norm"], SlicedRMSNorm(dense, eps))
        wrapped = wrap_layer(layer, family)
        shortcut_kw = dict(bias=False, device=device, dtype=dtype)
        absent = widths.get("no_shortcut", [])
        if "attn" not in absent:
            wrapped.attn_shortcut = nn.Linear(widths["in"], attn_out, **shortcut_kw)
        if not family["parallel"] and "mlp" not in absent:
            wrapped.mlp_shortcut = nn.Linear(mid, widths["out"], **shortcut_kw)
        layers[index] = wrapped

    head = model.get_submodule(family["head"])
    if slicing.get("tied_head"):
        embedding = model.get_submodule(family["embeddings"][0])
        _set(model, family["final_norm"], NormThenMap(dense, eps, slicing["head_in"], slicing["embedding_width"],
                                                      bias=slicing.get("final_map_bias", False),
                                                      device=device, dtype=dtype))
        new_head = _narrow_linear(head, in_features=slicing["embedding_width"])
        new_head.weight = embedding.weight
    else:
        _set(model, family["final_norm"], SlicedRMSNorm(dense, eps))
        new_head = _narrow_linear(head, in_features=slicing["head_in"])
    _set(model, family["head"], new_head)


def sliced_class_for(base: type) -> type:
    """A subclass of a transformers CausalLM class that builds the sliced shape."""

    class SlicedForCausalLM(base):
        def __init__(self, config, *args, **kwargs):
            # Tied only where slicing kept the head tied (via the final map).
            config.tie_word_embeddings = bool(config.slicing.get("tied_head", False))
            super().__init__(config, *args, **kwargs)
            apply_sliced_structure(self, config.slicing)

    SlicedForCausalLM.__name__ = SlicedForCausalLM.__qualname__ = f"Sliced{base.__name__}"
    return SlicedForCausalLM
