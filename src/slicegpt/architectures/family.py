"""The description of one model family: which modules read and write the residual stream.

A `Family` names the modules that read from and write to the stream. The algorithm
(fusion, rotation, slicing) and the sliced modeling code read these names and never
mention a family by itself; families.py holds one entry per supported architecture.

All paths inside a layer are relative to the decoder layer module. A stream "input" or
"output" path names a module with a `weight` (nn.Linear, a MoE router) or a bare
parameter (a fused expert tensor); see `modeling_sliced.StreamWeight`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from slicegpt.architectures.modeling_sliced import branch_writers


@dataclass(frozen=True)
class Family:
    name: str
    # Module paths relative to the model.
    layers: str = "model.layers"
    embeddings: tuple[str, ...] = ("model.embed_tokens",)  # token and learned-position tables
    final_norm: str = "model.norm"
    head: str = "lm_head"
    # Module paths relative to one decoder layer.
    attn: str = "self_attn"
    mlp: str | None = "mlp"
    # Where the MLP is not one module but the layer's own children applied in order (OPT).
    mlp_chain: tuple[str, ...] = ()
    attn_norm: str = "input_layernorm"
    mlp_norm: str | None = "post_attention_layernorm"  # None: one norm feeds both branches
    attn_inputs: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    attn_outputs: tuple[str, ...] = ("self_attn.o_proj",)
    mlp_inputs: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    mlp_outputs: tuple[str, ...] = ("mlp.down_proj",)
    # Norms on a branch's output, before the residual add (Gemma 2/3, OLMo-2). Their scale
    # cannot fold into a rotated weight, so fusion turns each into a bare norm over the
    # dense output followed by a map (dense -> stream width) holding the scale; that map,
    # not the branch's output projections, writes the stream (see `branch_writers`).
    attn_post_norm: str | None = None
    mlp_post_norm: str | None = None
    # False: the branches read the stream with no norm before them (OLMo-2); fusion then puts
    # parameter-free identities at attn_norm / mlp_norm, which mark where each block reads.
    pre_norms: bool = True
    # Integer attributes inside the layer that hold the width the MLP reads (MoE routers
    # reshape their input by it), so they must follow the sliced width.
    mlp_width_attrs: tuple[str, ...] = ()
    # The MLP's output must be as wide as its input (MoE blocks allocate one from the other).
    mlp_keeps_width: bool = False
    # "rms": RMSNorm x / rms(x) * w; "layer": LayerNorm (needs a mean-free stream);
    # "rms_plus_one": RMSNorm scaled by (1 + w), as in Gemma.
    norm_kind: str = "rms"
    # Parallel blocks feed attention and MLP from the same input (Phi-2, GPT-NeoX).
    parallel: bool = False
    # A boolean config attribute that chooses parallel (True) or sequential, where one
    # family has both shapes (GPT-NeoX's use_parallel_residual). Overrides `parallel`.
    parallel_attr: str | None = None
    # The stream linears are transformers Conv1D, weight stored (in, out) (GPT-2). They
    # become nn.Linear before fusion, and the sliced model is rebuilt with nn.Linear.
    conv1d: bool = False
    # Names of the arguments the model passes a decoder layer positionally after
    # hidden_states (GPT-2 passes cache, mask and encoder states that way).
    layer_args: tuple[str, ...] = ()
    # (config attribute, required value, why): configurations the method cannot handle.
    requires: tuple[tuple[str, object, str], ...] = ()
    # (module path, why): modules whose presence means an unsupported variant.
    forbidden: tuple[tuple[str, str], ...] = ()
    # Config-dependent shapes beyond one boolean: (conditions, changes) pairs, each a tuple of
    # (name, value); where every config attribute in `conditions` has its value, the fields in
    # `changes` take theirs. The first match wins (Falcon's three block shapes, StableLM's).
    variants: tuple[tuple[tuple[tuple[str, object], ...], tuple[tuple[str, object], ...]], ...] = ()
    # A scalar attribute of the decoder layer that multiplies each branch's output before the
    # residual add (Granite's residual_multiplier); fusion folds it into the writers.
    branch_scale_attr: str | None = None
    # The model reads a decoder layer's result as `outputs[0]` (Falcon): the sliced layer returns a tuple.
    layer_returns_tuple: bool = False
    # Leading layers built another way (DeepSeek-V3's first_k_dense_replace dense MLPs before the MoE
    # ones): (config attribute holding how many, field changes for them), and that count, which
    # for_config reads from the config. `for_layer` gives one layer's description.
    leading_layers: tuple[str, tuple[tuple[str, object], ...]] | tuple[()] = ()
    leading_count: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def writers(self, part: str) -> tuple[str, ...]:
        """The weights that write branch `part` ("attn" or "mlp") into the stream after fusion."""
        return branch_writers(self.to_dict(), part)

    def for_config(self, config) -> "Family":
        """This description with config-dependent choices (block shape, norm names) made."""
        family = self
        if self.parallel_attr is not None:
            family = dataclasses.replace(family, parallel=bool(getattr(config, self.parallel_attr)))
        if self.leading_layers:
            family = dataclasses.replace(family, leading_count=int(getattr(config, self.leading_layers[0], 0) or 0))
        for conditions, changes in self.variants:
            if all(comparable(getattr(config, attr, None)) == value for attr, value in conditions):
                return dataclasses.replace(family, **dict(changes))
        return family

    def for_layer(self, index: int) -> "Family":
        """The description of decoder layer `index` (see `leading_layers`)."""
        if index < self.leading_count:
            return dataclasses.replace(self, **dict(self.leading_layers[1]))
        return self


def get_module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path)


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def comparable(value):
    """A config value as the family's conditions hold it (JSON lists become tuples)."""
    return tuple(value) if isinstance(value, list) else value
