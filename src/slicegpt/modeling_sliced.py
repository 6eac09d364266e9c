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
from torch.nn import functional as F


class SlicedRMSNorm(nn.Module):
    """RMSNorm without a scale that divides by the RMS over the *dense* width.

    The sliced-away coordinates carry almost no energy, so the sum of squares over the
    kept coordinates stands in for the full one, but the mean must use the dense width.
    Over a kept width d of a dense width D that is torch's rms_norm with eps * D / d and a
    constant gain sqrt(D / d), which runs as one fused kernel where torch has one.
    """

    def __init__(self, dense_width: int, eps: float):
        super().__init__()
        self.dense_width = dense_width
        self.eps = eps
        self._gains: dict = {}  # (width, dtype, device) -> gain vector; derived, never saved

    def _gain(self, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (width, dtype, device)
        gain = self._gains.get(key)
        if gain is None:
            gain = self._gains[key] = torch.full((width,), (self.dense_width / width) ** 0.5, dtype=dtype,
                                                 device=device)
        return gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At least float32 for the statistic, as transformers' own norms do; float64 stays float64.
        compute = torch.promote_types(x.dtype, torch.float32)
        width = x.shape[-1]
        y = F.rms_norm(x.to(compute), (width,), self._gain(width, compute, x.device),
                       self.eps * self.dense_width / width)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dense_width={self.dense_width}, eps={self.eps}"


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
    def _residual(shortcut: nn.Linear | None, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x S^T + out: the block's output added onto the skip path without a spare tensor.

        On GPUs one addmm (the add rides in the GEMM's epilogue); on CPUs, where addmm
        measured slower than mm, the GEMM's fresh result takes the add in place. The 2-D
        views of contiguous activations and the transposed weight cost no copies. A
        shortcut that something wrapped or hooked (LoRA, quantisation, offloading) runs
        as the module it is.
        """
        if shortcut is None:
            return x + out
        if type(shortcut) is not nn.Linear or shortcut._forward_hooks or shortcut._forward_pre_hooks \
                or out.dtype != x.dtype:
            return shortcut(x) + out
        weight = shortcut.weight
        if x.is_cuda:
            fused = torch.addmm(out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), weight.t())
            return fused.view(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight).add_(out)

    def attention_half(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        out = _first(self._part("attn")(hidden_states=self._part("attn_norm")(x), **kwargs))
        return self._residual(self.attn_shortcut, x, out)

    def mlp_half(self, x: torch.Tensor) -> torch.Tensor:
        out = _first(self._part("mlp")(self._part("mlp_norm")(x)))
        return self._residual(self.mlp_shortcut, x, out)

    def parallel_block(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        attn_in = self._part("attn_norm")(x)
        mlp_in = attn_in if self.names["mlp_norm"] is None else self._part("mlp_norm")(x)
        attn_out = _first(self._part("attn")(hidden_states=attn_in, **kwargs))
        mlp_out = _first(self._part("mlp")(mlp_in))
        return self._residual(self.attn_shortcut, x, attn_out + mlp_out)

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
        if family["parallel"]:
            wrapped.attn_shortcut = nn.Linear(widths["in"], widths["out"], **shortcut_kw)
        else:
            wrapped.attn_shortcut = nn.Linear(widths["in"], mid, **shortcut_kw)
            wrapped.mlp_shortcut = nn.Linear(mid, widths["out"], **shortcut_kw)
        layers[index] = wrapped

    _set(model, family["final_norm"], SlicedRMSNorm(dense, eps))
    head = model.get_submodule(family["head"])
    _set(model, family["head"], _narrow_linear(head, in_features=slicing["head_in"]))


def sliced_class_for(base: type) -> type:
    """A subclass of a transformers CausalLM class that builds the sliced shape."""

    class SlicedForCausalLM(base):
        def __init__(self, config, *args, **kwargs):
            # The sliced head has its own weights even where the dense model tied them.
            config.tie_word_embeddings = False
            super().__init__(config, *args, **kwargs)
            apply_sliced_structure(self, config.slicing)

    SlicedForCausalLM.__name__ = SlicedForCausalLM.__qualname__ = f"Sliced{base.__name__}"
    return SlicedForCausalLM
