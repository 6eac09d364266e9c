"""Modeling code for sliced checkpoints.

This file is copied next to every sliced checkpoint, so it must import nothing but
torch and transformers. A sliced model is the original transformers class with three
changes, all described by `config.slicing`:
  * every norm is a bare RMSNorm that still divides by the dense width,
  * weights that read or write the residual stream are narrower,
  * a residual path carries a shortcut matrix (a change of basis) where the blocks on
    either side use different bases; with one basis for the whole model there are none
    (and with only the embeddings sliced, one: the first layer's, into dense coordinates).
The family-specific module names travel in `config.slicing["family"]`, so the block
forward below is written once per block shape (sequential, parallel).

Orientation of a stream weight (the one convention everything here relies on): a weight
that *reads* the stream has the stream on its last axis (nn.Linear (out, in), embedding
tables, MoE routers, fused expert tensors (experts, out, in)); a weight that *writes*
the stream has it on its second-to-last axis, and its bias on its last axis.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and getattr(compiler, "is_compiling", lambda: False)())


class SlicedRMSNorm(nn.Module):
    """RMSNorm without a scale that divides by the RMS over the *dense* width.

    The sliced-away coordinates carry almost no energy, so the sum of squares over the
    kept coordinates stands in for the full one, but the mean must use the dense width.
    Over a kept width d of a dense width D that is torch's rms_norm with eps * D / d and a
    constant gain sqrt(D / d), which runs as one fused kernel where torch has one.

    With `skip_first` (LayerNorm models whose head stays tied) coordinate 0 of the stream is
    the mean direction ones / sqrt(D): a LayerNorm reads only what is orthogonal to it, so
    the norm outputs 0 there and takes its statistic over the other coordinates (still
    dividing by D, as the LayerNorm's variance does).
    """

    def __init__(self, dense_width: int, eps: float, skip_first: bool = False):
        super().__init__()
        self.dense_width = dense_width
        self.eps = eps
        self.skip_first = skip_first
        self._gains: dict = {}  # (width, dtype, device) -> gain vector; derived, never saved

    def _gain(self, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if _compiling():  # torch.compile would guard on the cache and recompile for every new entry
            return torch.full((width,), (self.dense_width / width) ** 0.5, dtype=dtype, device=device)
        key = (width, dtype, device)
        gain = self._gains.get(key)
        if gain is None:
            gain = self._gains[key] = torch.full((width,), (self.dense_width / width) ** 0.5, dtype=dtype,
                                                 device=device)
        return gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # At least float32 for the statistic, as transformers' own norms do; float64 stays float64.
        compute = torch.promote_types(x.dtype, torch.float32)
        if self.skip_first:
            return F.pad(self._normed(x[..., 1:], compute), (1, 0)).to(x.dtype)
        return self._normed(x, compute).to(x.dtype)

    def _normed(self, x: torch.Tensor, compute: torch.dtype) -> torch.Tensor:
        width = x.shape[-1]
        return F.rms_norm(x.to(compute), (width,), self._gain(width, compute, x.device),
                          self.eps * self.dense_width / width)

    def extra_repr(self) -> str:
        return f"dense_width={self.dense_width}, eps={self.eps}" + (", skip_first=True" if self.skip_first else "")


class NormThenMap(nn.Module):
    """The final norm of a model whose head stays tied to its embeddings.

    The stream's last basis differs from the embedding's, and the final norm's scale
    cannot be folded into a shared head, so one small map (last width -> embedding
    width) follows the norm instead of a second vocabulary-sized matrix. In a LayerNorm
    model (`skip_first`) the norm ignores the mean coordinate 0, and the map (with the
    LayerNorm's shift as its bias) writes coordinate 0 too: it carries what the head
    needs from the embeddings' mean direction.
    """

    def __init__(self, dense_width: int, eps: float, in_width: int, out_width: int, bias: bool = False,
                 device=None, dtype=None, skip_first: bool = False):
        super().__init__()
        self.norm = SlicedRMSNorm(dense_width, eps, skip_first)
        self.map = nn.Linear(in_width, out_width, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.map(self.norm(x))


class NormThenScale(nn.Module):
    """A branch's post-norm where the stream keeps its dense coordinates (only the embeddings
    sliced): the bare norm, then its scale as a vector, not as a dense-width map."""

    def __init__(self, dense_width: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.norm = SlicedRMSNorm(dense_width, eps)
        self.weight = nn.Parameter(torch.ones(dense_width, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x) * self.weight


class StreamWeight:
    """A weight (and its bias, if any) that touches the residual stream, wherever it lives.

    A path names either a module with a `weight` (nn.Linear, nn.Embedding, a router) or a
    bare parameter (a fused expert tensor such as `mlp.experts.gate_up_proj`, whose bias,
    where there is one, is `<name>_bias` by transformers' convention). Fused expert tensors
    stored (experts, in, out) (their module says `is_transposed`, as gpt-oss's does) are seen
    through a transposed view, so `weight` always follows the orientation rule above.
    """

    def __init__(self, owner: nn.Module, name: str, bias_name: str | None, transposed: bool = False):
        self.owner, self.name, self.bias_name, self.transposed = owner, name, bias_name, transposed

    @property
    def weight(self) -> torch.Tensor:
        weight = getattr(self.owner, self.name)
        return weight.transpose(-1, -2) if self.transposed else weight

    @property
    def bias(self) -> nn.Parameter | None:
        return getattr(self.owner, self.bias_name) if self.bias_name else None

    def replace(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Swap in new tensors (of any width) and keep the owner's width attributes true."""
        old = self.weight
        if self.transposed:
            weight = weight.transpose(-1, -2)
        setattr(self.owner, self.name, nn.Parameter(weight.to(old.dtype).contiguous(), requires_grad=old.requires_grad))
        if bias is not None:
            if self.bias_name is None:
                if not isinstance(self.owner, nn.Linear):
                    raise ValueError(f"cannot add a bias to {type(self.owner).__name__}.{self.name}")
                self.bias_name = "bias"
                dtype, grad = old.dtype, old.requires_grad
            else:
                dtype, grad = self.bias.dtype, self.bias.requires_grad
            setattr(self.owner, self.bias_name, nn.Parameter(bias.to(dtype).contiguous(), requires_grad=grad))
        if self.name == "weight" and isinstance(self.owner, nn.Linear):
            self.owner.out_features, self.owner.in_features = self.weight.shape
        if self.name == "weight" and isinstance(self.owner, nn.Embedding):
            self.owner.embedding_dim = self.weight.shape[1]


def stream_weight(root: nn.Module, path: str) -> StreamWeight:
    """The StreamWeight at `path` below `root`; AttributeError names the path if it is missing."""
    try:
        module = root.get_submodule(path)
    except AttributeError:
        module = None
    if module is not None:
        if not isinstance(getattr(module, "weight", None), nn.Parameter):
            raise AttributeError(f"module '{path}' has no weight parameter")
        return StreamWeight(module, "weight", "bias" if getattr(module, "bias", None) is not None else None)
    parent, _, name = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    if not isinstance(getattr(owner, name, None), nn.Parameter):
        raise AttributeError(f"'{path}' is neither a module nor a parameter")
    bias = f"{name}_bias"
    return StreamWeight(owner, name, bias if isinstance(getattr(owner, bias, None), nn.Parameter) else None,
                        transposed=getattr(owner, "is_transposed", False) is True)


def conv1d_as_linear(module: nn.Module) -> nn.Linear:
    """transformers' Conv1D (GPT-2) stores its weight as (in, out); nn.Linear holds the transpose."""
    weight = module.weight
    linear = nn.Linear(weight.shape[0], weight.shape[1], bias=module.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.T)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def branch_writers(family: dict, part: str) -> tuple[str, ...]:
    """The weights that write branch `part` ("attn" or "mlp") into the stream once fused:
    its output projections, or the map after its post-norm where it has one."""
    post = family.get(f"{part}_post_norm")
    return (f"{post}.map",) if post else tuple(family[f"{part}_outputs"])


def stream_linear_paths(family: dict) -> list[str]:
    return [*family["attn_inputs"], *family["attn_outputs"], *family["mlp_inputs"], *family["mlp_outputs"]]


def linearise_conv1d(layer: nn.Module, family: dict) -> None:
    """Replace the layer's Conv1D stream linears by nn.Linear, for families that use them."""
    if not family["conv1d"]:
        return
    for path in stream_linear_paths(family):
        module = layer.get_submodule(path)
        if type(module).__name__ == "Conv1D":
            _set(layer, path, conv1d_as_linear(module))


def set_width_attrs(layer: nn.Module, paths, width: int) -> None:
    """Integer attributes that must follow the stream width (MoE routers reshape by them)."""
    for path in paths:
        parent, _, name = path.rpartition(".")
        setattr(layer.get_submodule(parent) if parent else layer, name, width)


def first_output(output):
    """A module's main result, where it returns a tuple (attention weights, router scores, ...)."""
    return output[0] if isinstance(output, tuple) else output


class SlicedDecoderLayer(nn.Module):
    """A decoder layer whose residual paths carry shortcut matrices.

    The attention, MLP and norm modules keep the names the family gives them, so the
    checkpoint's keys match the original architecture's, plus the shortcuts.
    A shortcut that is None is the identity (fused but not yet rotated).
    """

    def __init__(self, modules: dict[str, nn.Module], family: dict, attention_type: str | None = None):
        super().__init__()
        self.names = {key: family[key] for key in ("attn", "attn_norm", "mlp_norm")}
        # Norms on the branch outputs (NormThenMap once fused); absent in older checkpoints.
        self.names.update({key: family.get(key) for key in ("attn_post_norm", "mlp_post_norm")})
        # The MLP is one module, or (OPT) a chain of the layer's own children applied in order.
        self.mlp_names = [family["mlp"]] if family["mlp"] else list(family["mlp_chain"])
        self.parallel = bool(family["parallel"])
        self.positional = tuple(family["layer_args"])
        self.returns_tuple = bool(family.get("layer_returns_tuple", False))  # the model reads outputs[0]
        for name, module in modules.items():
            self.add_module(name, module)
        self.attn_shortcut: nn.Linear | None = None
        self.mlp_shortcut: nn.Linear | None = None
        if attention_type is not None:
            self.attention_type = attention_type  # read by models that mix sliding and full attention

    def _part(self, key: str) -> nn.Module:
        return getattr(self, self.names[key])

    def _post(self, key: str, out: torch.Tensor) -> torch.Tensor:
        return out if self.names[key] is None else self._part(key)(out)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.mlp_names:
            x = first_output(getattr(self, name)(x))
        return x

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
        if type(shortcut) is not nn.Linear or shortcut.bias is not None or shortcut._forward_hooks \
                or shortcut._forward_pre_hooks or out.dtype != x.dtype:
            return shortcut(x) + out
        weight = shortcut.weight
        if x.is_cuda:
            fused = torch.addmm(out.reshape(-1, out.shape[-1]), x.reshape(-1, x.shape[-1]), weight.t())
            return fused.view(*x.shape[:-1], weight.shape[0])
        return F.linear(x, weight).add_(out)

    def attention_half(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        out = first_output(self._part("attn")(hidden_states=self._part("attn_norm")(x), **kwargs))
        return self._residual(self.attn_shortcut, x, self._post("attn_post_norm", out))

    def mlp_half(self, x: torch.Tensor) -> torch.Tensor:
        out = self._post("mlp_post_norm", self._mlp(self._part("mlp_norm")(x)))
        return self._residual(self.mlp_shortcut, x, out)

    def parallel_block(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        attn_in = self._part("attn_norm")(x)
        mlp_in = attn_in if self.names["mlp_norm"] is None else self._part("mlp_norm")(x)
        attn_out = first_output(self._part("attn")(hidden_states=attn_in, **kwargs))
        return self._residual(self.attn_shortcut, x, attn_out + self._mlp(mlp_in))

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if len(args) > len(self.positional):
            raise TypeError(f"SlicedDecoderLayer got {len(args)} positional arguments after hidden_states; "
                            f"the family names {len(self.positional)}")
        kwargs.update(zip(self.positional, args))  # GPT-2 passes cache and mask positionally
        if self.parallel:
            out = self.parallel_block(hidden_states, **kwargs)
        else:
            out = self.mlp_half(self.attention_half(hidden_states, **kwargs))
        return (out, None) if self.returns_tuple else out


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def wrap_layer(layer: nn.Module, family: dict) -> SlicedDecoderLayer:
    """Turn an original decoder layer into a SlicedDecoderLayer holding the same modules."""
    names = [family["attn"], family["attn_norm"], family["mlp_norm"], family["mlp"], *family["mlp_chain"],
             family.get("attn_post_norm"), family.get("mlp_post_norm")]
    modules = {name: layer.get_submodule(name) for name in names if name}
    return SlicedDecoderLayer(modules, family, getattr(layer, "attention_type", None))


def _narrow(root: nn.Module, path: str, width: int, reads: bool) -> None:
    """Give a stream weight `width` along its stream axis; its values come from the checkpoint."""
    target = stream_weight(root, path)
    weight, bias = target.weight, target.bias
    shape = list(weight.shape)
    shape[-1 if reads else -2] = width
    new_bias = None
    if bias is not None and not reads:
        new_bias = torch.empty(*bias.shape[:-1], width, device=bias.device, dtype=bias.dtype)
    target.replace(torch.empty(shape, device=weight.device, dtype=weight.dtype), new_bias)


# Fields added in format 2, with the values that format-1 checkpoints (Llama-style) imply.
_FORMAT_2_DEFAULTS = {"mlp_chain": (), "mlp_width_attrs": (), "mlp_keeps_width": False, "conv1d": False,
                      "layer_args": (), "attn_post_norm": None, "mlp_post_norm": None,
                      "pre_norms": True}


def family_fields(family: dict) -> dict:
    """The family dict in the current format (format-1 checkpoints named one output each)."""
    family = {**_FORMAT_2_DEFAULTS, **family}
    for key in ("attn", "mlp"):
        if f"{key}_output" in family:
            family[f"{key}_outputs"] = (family.pop(f"{key}_output"),)
    return family


def layer_family(family: dict, index: int) -> dict:
    """The description of decoder layer `index`: leading layers may be built another way
    (`leading_layers`: DeepSeek-V3's dense MLPs before its MoE layers)."""
    if index < family.get("leading_count", 0):
        return {**family, **dict(family["leading_layers"][1])}
    return family


def apply_sliced_structure(model: nn.Module, slicing: dict) -> None:
    """Reshape a freshly built dense model into the sliced shape that `slicing` records."""
    family = family_fields(slicing["family"])
    dense, eps = slicing["dense_hidden_size"], slicing["norm_eps"]
    skip_first = bool(slicing.get("mean_axis", False))  # absent before tied LayerNorm heads stayed tied
    parameter = next(model.parameters())
    shortcut_kw = dict(bias=False, device=parameter.device, dtype=parameter.dtype)

    for path in family["embeddings"]:
        _narrow(model, path, slicing["embedding_width"], reads=True)

    layers = model.get_submodule(family["layers"])
    for index, widths in enumerate(slicing["layers"]):
        layer, described = layers[index], layer_family(family, index)
        linearise_conv1d(layer, described)
        w_in, w_out = widths["in"], widths["out"]
        w_mid = w_in if described["parallel"] else widths["mid"]  # the width the MLP reads
        for path in described["attn_inputs"]:
            _narrow(layer, path, w_in, reads=True)
        attn_to = w_out if described["parallel"] else w_mid
        for path in described["mlp_inputs"]:
            _narrow(layer, path, w_mid, reads=True)
        for part, width in (("attn", attn_to), ("mlp", w_out)):
            post = described.get(f"{part}_post_norm")
            if post and part in widths.get("post_norm_scales", ()):  # the stream is in dense coordinates
                _set(layer, post, NormThenScale(dense, eps, device=parameter.device, dtype=parameter.dtype))
            elif post:  # the branch's projections stay dense; the post-norm's map writes the stream
                _set(layer, post, NormThenMap(dense, eps, dense, width, device=parameter.device,
                                              dtype=parameter.dtype))
            for path in () if post else described[f"{part}_outputs"]:
                _narrow(layer, path, width, reads=False)
        set_width_attrs(layer, described["mlp_width_attrs"], w_mid)
        for key in ("attn_norm", "mlp_norm"):
            if described[key]:  # identities where the branches read the stream without a norm
                _set(layer, described[key],
                     SlicedRMSNorm(dense, eps, skip_first) if described["pre_norms"] else nn.Identity())
        wrapped = wrap_layer(layer, described)
        absent = widths.get("no_shortcut", [])
        if "attn" not in absent:
            wrapped.attn_shortcut = nn.Linear(w_in, w_out if described["parallel"] else w_mid, **shortcut_kw)
        if not described["parallel"] and "mlp" not in absent:
            wrapped.mlp_shortcut = nn.Linear(w_mid, w_out, **shortcut_kw)
        layers[index] = wrapped

    if slicing.get("tied_head"):
        _set(model, family["final_norm"], NormThenMap(dense, eps, slicing["head_in"], slicing["embedding_width"],
                                                      bias=slicing.get("final_map_bias", False),
                                                      device=parameter.device, dtype=parameter.dtype,
                                                      skip_first=skip_first))
        head = model.get_submodule(family["head"])
        head.weight = model.get_submodule(family["embeddings"][0]).weight
        head.in_features = slicing["embedding_width"]
    else:
        _set(model, family["final_norm"], SlicedRMSNorm(dense, eps))
        _narrow(model, family["head"], slicing["head_in"], reads=True)
    for path in slicing.get("added_biases", ()):  # LayerNorm shifts folded into bias-free linears
        linear = model.get_submodule(path)
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.empty(linear.out_features, device=linear.weight.device,
                                                   dtype=linear.weight.dtype))


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
