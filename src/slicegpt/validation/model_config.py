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


def read_config(model: str) -> dict | None:
    """The config.json of `model` as a dict; None where it is not at hand before loading (a hub
    id that cannot be reached now fails, clearly, when the model loads)."""
    from slicegpt.io.models import NAMED_MODELS, resolve

    path = Path(model)
    if model in NAMED_MODELS or path.suffix == ".gguf" or path.exists():
        source = Path(resolve(model))  # a GGUF is converted once, as loading would; a directory is checked
    else:
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
