"""slicegpt bench end to end on tiny models, and the KV-cache decode it times."""

import json

import torch
from transformers import DynamicCache

from slicegpt import SliceConfig, load_sliced, save_sliced, slice_model
from slicegpt.evaluation.benchmark import BenchSettings, prefill_and_decode
from slicegpt.cli import main

from conftest import WIKITEXT_VALIDATION, make_tiny_model, random_batches


def _sliced_dir(tmp_path):
    model = make_tiny_model("LlamaForCausalLM", tied=True)
    slice_model(model, None, SliceConfig(sparsity=0.25), random_batches(96), progress=False)
    save_sliced(model, None, tmp_path / "sliced")
    return tmp_path / "sliced"


def test_cached_decode_matches_full_forward(tmp_path):
    """Sliced layers pass the cache through: step-by-step logits equal one full forward."""
    model = load_sliced(_sliced_dir(tmp_path))
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        cache = DynamicCache(config=model.config)
        steps = [model(input_ids=ids[:, :6], cache=cache, use_cache=True).logits[:, -1]]
        for position in range(6, 10):
            steps.append(model(input_ids=ids[:, position:position + 1], cache=cache, use_cache=True).logits[:, -1])
    assert torch.allclose(torch.stack(steps, 1), full[:, 5:], atol=1e-5)


def test_prefill_and_decode_times_are_positive(tmp_path):
    model = load_sliced(_sliced_dir(tmp_path))
    prefill, decode = prefill_and_decode(model, 2, BenchSettings(prompt_len=4, new_tokens=3))
    assert prefill > 0 and decode > 0


def test_static_cache_decodes_the_same_tokens_as_the_dynamic_one(tmp_path):
    from slicegpt.evaluation.benchmark import Generation

    model = load_sliced(_sliced_dir(tmp_path))
    tokens = {}
    for cache in ("dynamic", "static"):
        run = Generation(model, 2, BenchSettings(prompt_len=5, new_tokens=4, cache=cache))
        run.prefill()
        steps = [run.next_ids]
        for _ in range(3):
            run.step()
            steps.append(run.next_ids)
        tokens[cache] = torch.cat(steps, 1)
    assert torch.equal(tokens["dynamic"], tokens["static"])


def test_bench_command(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "sliced"
    assert main(["slice", str(tiny_model_dir), "--sparsity", "0.25", "--out", str(out), "--cal-data",
                 str(WIKITEXT_VALIDATION), "--cal-samples", "2", "--cal-seqlen", "32"]) == 0
    capsys.readouterr()
    args = ["bench", str(tiny_model_dir), "--compare", str(out), "--repeats", "2", "--warmup", "0",
            "--prompt-len", "8", "--new-tokens", "2", "--batch-sizes", "1,2", "--out", str(tmp_path / "b.json")]
    assert main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == json.loads((tmp_path / "b.json").read_text())
    assert [m["name"] for m in data["models"]] == [str(tiny_model_dir), str(out)]
    for model in data["models"]:
        assert set(model["prefill_tok_s"]) == {"1", "2"} and all(v > 0 for v in model["decode_tok_s"].values())
        assert model["peak_memory_gib"] >= model["weights_gib"] > 0
        assert len(model["samples"]["1"]["decode_s"]) == 2
        assert [len(steps) for steps in model["samples"]["2"]["decode_steps_s"]] == [2, 2]
    ratios = data["vs_first"][str(out)]
    assert set(ratios) == {"prefill", "decode", "peak_memory", "params"}
    assert all(r > 0 for r in ratios["decode"].values())
    assert main(args) == 2  # b.json is there now: replaced only when asked
    assert "exists (use --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert main([*args, "--cache", "static", "--overwrite"]) == 0
    table = capsys.readouterr().out
    assert "decode b1" in table and "ratio" in table


def test_bench_refuses_bad_batch_sizes(tiny_model_dir, capsys):
    assert main(["bench", str(tiny_model_dir), "--batch-sizes", "1,x"]) == 2
    assert "--batch-sizes" in capsys.readouterr().err
