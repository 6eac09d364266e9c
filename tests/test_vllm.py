"""vLLM gives transformers' greedy tokens: a dense model, a plain export of a one-basis slice,
and sliced checkpoints with shortcut matrices (a basis per block) through slicegpt's plugin.

Runs only where vLLM is importable (bench/vllm_env.sh makes such an environment; the
project's own environment and CI have none). Each engine runs in a process of its own, this
file's `__main__` below, as vLLM's engine starts processes and keeps global state.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

pytest.importorskip("vllm", reason="vLLM is not installed (bench/vllm_env.sh makes an environment with it)")

from slicegpt import SliceConfig, save_sliced, slice_model  # noqa: E402
from slicegpt.architectures.families import family_for  # noqa: E402
from slicegpt.architectures.plain import to_plain_model  # noqa: E402

from conftest import _randomise, random_batches  # noqa: E402

NEW_TOKENS = 12
MARK = "greedy tokens: "  # vLLM logs on stdout too
PROMPTS = [[5, 17, 33, 8, 61, 2, 40], [90, 3, 3, 71, 12], [44, 9, 27, 58, 80, 14, 6, 31, 77]]


def peaked(model):
    """A random model's logits are nearly flat, so float rounding could flip a greedy choice;
    a larger output matrix spreads them without changing what is computed."""
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(8.0)
    return model


@torch.no_grad()
def transformers_tokens(model) -> list[list[int]]:
    out = []
    for prompt in PROMPTS:
        ids = torch.tensor([prompt])
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                   min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        out.append(generated[0, len(prompt):].tolist())
    return out


def vllm_tokens(directory) -> list[list[int]]:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="WARNING")
    result = subprocess.run([sys.executable, __file__, str(directory), json.dumps(PROMPTS), str(NEW_TOKENS)],
                            capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith(MARK)]
    assert lines, result.stdout[-4000:]
    return json.loads(lines[-1][len(MARK):])


# vLLM's CPU attention runs head sizes from 32 up, so these are wider than conftest's tiny models.
_SHAPE = dict(vocab_size=96, hidden_size=128, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
CONFIGS = {
    "LlamaForCausalLM": lambda tied: transformers.LlamaConfig(**_SHAPE, tie_word_embeddings=tied),
    "Qwen2ForCausalLM": lambda tied: transformers.Qwen2Config(**_SHAPE, tie_word_embeddings=tied),
    "MistralForCausalLM": lambda tied: transformers.MistralConfig(**_SHAPE, tie_word_embeddings=tied),
}


def tiny(arch: str, tied: bool):
    torch.manual_seed(0)
    config = CONFIGS[arch](tied)
    config._attn_implementation = "eager"
    model = peaked(_randomise(getattr(transformers, arch)(config)).eval())
    model.generation_config.eos_token_id = None  # every prompt runs its full length
    return model


@pytest.mark.parametrize("tied", [True, False])
def test_dense_model(tmp_path, tied):
    model = tiny("LlamaForCausalLM", tied)
    model.save_pretrained(tmp_path / "dense")
    assert vllm_tokens(tmp_path / "dense") == transformers_tokens(model)


def test_plain_export_of_a_one_basis_slice(tmp_path):
    model = tiny("LlamaForCausalLM", tied=True)
    family = family_for(model)
    slice_model(model, None, SliceConfig(sparsity=0.25, rotations="model"), random_batches(96, seqlen=32), progress=False)
    plain = to_plain_model(model, family)
    plain.save_pretrained(tmp_path / "plain")
    assert vllm_tokens(tmp_path / "plain") == transformers_tokens(model)


@pytest.mark.parametrize("arch,tied,rotations", [
    ("LlamaForCausalLM", True, "block"),
    ("LlamaForCausalLM", False, "block"),
    ("Qwen2ForCausalLM", True, "layer"),
    ("MistralForCausalLM", False, "block"),
    ("LlamaForCausalLM", True, "model"),  # no shortcuts: the plugin serves a sliced directory too
])
def test_sliced_checkpoint_through_the_plugin(tmp_path, arch, tied, rotations):
    model = tiny(arch, tied)
    slice_model(model, None, SliceConfig(sparsity=0.25, rotations=rotations), random_batches(96, seqlen=32), progress=False)
    save_sliced(model, None, tmp_path / "sliced")
    config = json.loads((tmp_path / "sliced" / "config.json").read_text())
    assert config["architectures"] == [f"Sliced{arch}"]
    assert vllm_tokens(tmp_path / "sliced") == transformers_tokens(model)


def main(directory: str, prompts: str, new_tokens: str) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=directory, dtype="float32", skip_tokenizer_init=True, max_model_len=64, enforce_eager=True,
              seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=int(new_tokens), ignore_eos=True, detokenize=False)
    outputs = llm.generate([{"prompt_token_ids": p} for p in json.loads(prompts)], params, use_tqdm=False)
    print(MARK + json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
