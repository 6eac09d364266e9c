"""What a model's config.json says, read before its weights: architecture, positions, widths.

Reading the config costs milliseconds; loading the weights can cost minutes, and some
refusals used to come only after calibration (a position table too short for the
sequence length) or after the whole run (a plain class that refuses the sliced width).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from slicegpt.errors import SliceGPTError

# Families with a learned position table, and the config attribute that sizes it: a longer
# sequence indexes past the table. Rotary and ALiBi families have no such table.
LEARNED_POSITIONS = {"gpt2": "n_positions", "opt": "max_position_embeddings"}


def local_source(model: str) -> Path | None:
    """The directory `model` loads from, where it is on this machine (None: a hub id)."""
    from slicegpt.io.models import NAMED_MODELS, resolve

    path = Path(model)
    if model in NAMED_MODELS or path.suffix == ".gguf" or path.exists():
        return Path(resolve(model))  # a GGUF is converted once, as loading would; a directory is checked
    return None


def read_config(model: str) -> dict | None:
    """The config.json of `model` as a dict; None where it is not at hand before loading (a hub
    id that cannot be reached now fails, clearly, when the model loads)."""
    source = local_source(model)
    if source is None:
        try:
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(model).to_dict()
        except Exception:  # noqa: BLE001 - the hub raises many kinds; loading reports it
            return None
    config = source / "config.json"
    try:
        data = json.loads(config.read_text())
    except OSError as error:
        raise SliceGPTError(f"cannot read {config}: {error.strerror}") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise SliceGPTError(f"{config} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise SliceGPTError(f"{config} is not a JSON object")
    if "model_type" not in data and "AutoConfig" not in (data.get("auto_map") or {}):
        raise SliceGPTError(f"{config} has no model_type, so it does not say which kind of model it describes "
                            "(transformers builds none without it)")
    return data


def text_config(config: dict) -> dict:
    return config.get("text_config") or config


def check_known_type(model: str, config: dict) -> None:
    """A model type this transformers knows (else its error lists every config class it has)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type is not None and model_type not in CONFIG_MAPPING:
        from slicegpt.architectures.families import supported_architectures

        raise SliceGPTError(f"{model}: model type {model_type!r} in config.json is unknown to transformers "
                            f"{transformers.__version__}; slicegpt slices {', '.join(supported_architectures())}")


def check_sliceable(model: str, config: dict) -> None:
    """The class AutoModelForCausalLM would build is one slicegpt knows (checked again, with the
    module tree, once loaded)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from slicegpt.architectures.families import FAMILIES, UNSUPPORTED, supported_architectures

    if "slicing" in config:
        raise SliceGPTError(f"{model} is a sliced checkpoint already; slice the dense model it came from")
    check_known_type(model, config)
    model_type = config.get("model_type")
    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type) if model_type else None
    if model_type and arch is None:
        raise SliceGPTError(f"{model}: model type {model_type!r} has no causal language model class; "
                            f"slicegpt slices {', '.join(supported_architectures())}")
    if arch in UNSUPPORTED:
        raise SliceGPTError(f"{arch} is not supported: it {UNSUPPORTED[arch]}")
    if arch is not None and arch not in FAMILIES:
        raise SliceGPTError(f"architecture {arch} is not supported; supported: {', '.join(supported_architectures())}")


def check_positions(model: str, config: dict, lengths: dict[str, int]) -> None:
    """Each sequence length (option -> tokens) fits a learned position table, where the model has one;
    past the context of a rotary (or ALiBi) model it still runs, so that is said, not refused."""
    config = text_config(config)
    attribute = LEARNED_POSITIONS.get(config.get("model_type"))
    table = config.get(attribute) if attribute else None
    context = config.get("max_position_embeddings")
    for option, length in lengths.items():
        if length is None:
            continue
        if isinstance(table, int) and length > table:
            raise SliceGPTError(f"{option} is {length} tokens, but {model} has learned positions for {table} "
                                f"({attribute} in config.json); use {table} or fewer")
        if table is None and isinstance(context, int) and length > context:
            print(f"note: {option} is {length} tokens, longer than the {context} positions {model} is made for "
                  "(max_position_embeddings); it runs, but the model has not seen such lengths", file=sys.stderr)


# --- the weights' shapes ---------------------------------------------------------------------------

def tensor_shape(checkpoint, name: str) -> tuple[str, tuple[int, ...]] | None:
    """The stored name and header shape of the module-path tensor `name`, also where the checkpoint
    leaves out a leading prefix (GPT-2's `h.0...` for `transformer.h.0...`); None where absent."""
    from slicegpt.io.shards import open_safetensors

    parts = name.split(".")
    for start in range(len(parts) - 1):
        stored = ".".join(parts[start:])
        if stored in checkpoint:
            with open_safetensors(checkpoint.directory / checkpoint.weight_map[stored]) as f:
                return stored, tuple(f.get_slice(stored).get_shape())
    return None


def check_weight_shapes(model: str, config: dict) -> None:
    """The hidden and vocabulary sizes config.json gives match the weights, read from the safetensors
    headers alone; a config from other weights fails otherwise while loading, with a traceback
    (in memory) or a complaint from accelerate (streamed)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from slicegpt.architectures.families import FAMILIES
    from slicegpt.io.shards import INDEX_FILE, SINGLE_FILE, SafetensorsCheckpoint

    source = local_source(model)
    if source is None or "slicing" in config:  # a sliced checkpoint's widths are its own
        return
    if not ((source / INDEX_FILE).is_file() or (source / SINGLE_FILE).is_file()):
        return  # .bin weights: no header to read without loading them
    arch = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.get("model_type"))
    family = FAMILIES.get(arch) or FAMILIES.get((config.get("architectures") or [None])[0])
    if family is None:
        return
    text = text_config(config)
    aliases = getattr(CONFIG_MAPPING.get(text.get("model_type")), "attribute_map", {})
    checkpoint = SafetensorsCheckpoint(source)
    checks = [("vocab_size", f"{family.embeddings[0]}.weight", 0, "hold {} tokens"),  # the token table's rows
              ("hidden_size", f"{family.layers}.0.{family.attn_norm}.weight", -1, "are {} wide")]  # the first norm
    for attribute, name, axis, saying in checks:
        key = aliases.get(attribute, attribute)
        found = tensor_shape(checkpoint, name)
        if not isinstance(text.get(key), int) or found is None:
            continue
        stored, shape = found
        if shape[axis] != text[key]:
            raise SliceGPTError(f"{model}: config.json gives {key} {text[key]}, but the weights "
                                f"{saying.format(shape[axis])} ({stored} is {list(shape)}); the config does not "
                                "belong to these weights")


# --- plain widths -------------------------------------------------------------------------------

def attention_heads(config: dict) -> int | None:
    config = text_config(config)
    for name in ("num_attention_heads", "n_head", "num_heads"):
        if isinstance(config.get(name), int):
            return config[name]
    return None


def plain_refusal(config: dict, width: int) -> str | None:
    """Why the plain class of `config` would refuse hidden size `width` (None: it accepts it).

    Built as architectures/plain.py builds it: the head size kept from the dense model.
    """
    from transformers import AutoConfig

    fields = {k: v for k, v in text_config(config).items() if k not in ("slicing", "auto_map")}
    model_type = fields.pop("model_type", None)
    if model_type is None:
        return None
    dense = config.get("slicing", {}).get("dense_hidden_size", fields.get("hidden_size"))
    heads = attention_heads(config)
    if "head_dim" in fields or heads:
        fields["head_dim"] = fields.get("head_dim") or (dense // heads if heads else None)
    fields["hidden_size"] = width
    try:
        AutoConfig.for_model(model_type, **fields)
    except Exception as error:  # noqa: BLE001 - transformers' validators raise several kinds
        return str(error).strip().splitlines()[-1].strip()
    return None


def plain_step(config: dict, round_to: int) -> int | None:
    """The smallest multiple of `round_to` whose multiples a plain class accepts as widths
    (a multiple of the attention heads too); None where no such step is found."""
    heads = attention_heads(config) or 1
    step = round_to * heads // math.gcd(round_to, heads)
    dense = text_config(config).get("hidden_size") or step
    widest = max(step, dense - dense % step)
    if plain_refusal(config, step) is None and plain_refusal(config, widest) is None:
        return step
    return None


def plain_width_message(config: dict, width: int, round_to: int) -> str | None:
    """None when a plain class takes `width`; else why not, with the widths and --round-to that work."""
    why = plain_refusal(config, width)
    if why is None:
        return None
    arch = config.get("slicing", {}).get("base_architecture") or (config.get("architectures") or ["the model"])[0]
    heads = attention_heads(config)
    step = plain_step(config, round_to)
    text = f"a plain {arch} cannot be {width} wide ({why})"
    if step is None:
        return text
    below, above = width - width % step, width - width % step + step
    near = " or ".join(str(w) for w in (below, above) if w > 0)
    return (f"{text}: widths that work near it are {near}, multiples of {step} "
            f"(--round-to {round_to} and the {heads} attention heads); slice again with --round-to {step}")
