"""A streaming run killed with SIGKILL resumes with the same command and gives the same weights."""

import json
import os
import subprocess
import sys

import pytest
import torch

from slicegpt import load_sliced
from slicegpt.cli import main
from slicegpt.running.resume import STATE_FILE
from slicegpt.running.streaming import KILL_AFTER_LAYER_ENV, partial_dir

from conftest import WIKITEXT_VALIDATION

CAL = ["--cal-data", str(WIKITEXT_VALIDATION), "--cal-samples", "4", "--cal-seqlen", "32", "--cal-batch-size", "2"]


def slice_args(model, out, *extra):
    return ["slice", str(model), "--sparsity", "0.25", "--out", str(out), *CAL, "--streaming", *extra]


def run_killed(args, after_layer):
    """Run the CLI in a child process that SIGKILLs itself after checkpointing layer `after_layer`."""
    env = {**os.environ, KILL_AFTER_LAYER_ENV: str(after_layer), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "slicegpt.cli", *args], env=env, capture_output=True, text=True)
    assert done.returncode == -9, done.stderr[-3000:]


def assert_same_weights(a, b):
    sa, sb = load_sliced(a).state_dict(), load_sliced(b).state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("options", [["--spill", "never"], ["--spill", "always"], ["--rotations", "model"],
                                     ["--refit", "--rotations", "block", "--spill", "always"],
                                     ["--refit", "--rotations", "model", "--widths", "variance"],
                                     ["--refit", "--rotations", "model", "--refit-share", "0.5"],
                                     ["--widths", "embedding"]])
def test_kill_then_resume_gives_the_same_weights(three_layer_dir, tmp_path, capsys, options):
    assert main(slice_args(three_layer_dir, tmp_path / "reference", *options)) == 0
    out = tmp_path / "out"
    run_killed(slice_args(three_layer_dir, out, *options), after_layer=1)
    assert not out.exists()
    state = json.loads((partial_dir(out) / "resume" / STATE_FILE).read_text())
    assert state["next_layer"] == 2
    assert sorted(p.name for p in partial_dir(out).glob("model-*.safetensors")) == [
        "model-00001-of-00005.safetensors", "model-00002-of-00005.safetensors", "model-00003-of-00005.safetensors"]
    capsys.readouterr()
    assert main(slice_args(three_layer_dir, out, *options)) == 0
    assert "resuming" in capsys.readouterr().err
    assert_same_weights(tmp_path / "reference", out)
    assert not partial_dir(out).exists()


def test_resume_with_other_settings_is_refused(three_layer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    run_killed(slice_args(three_layer_dir, out), after_layer=0)
    changed = slice_args(three_layer_dir, out)
    changed[changed.index("--sparsity") + 1] = "0.3"
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "sparsity=0.25" in err and "sparsity=0.3" in err and "--fresh" in err, err
    other_seed = slice_args(three_layer_dir, out, "--seed", "7")
    assert main(other_seed) == 2
    assert "seed=42" in capsys.readouterr().err
    assert main([*changed, "--fresh"]) == 0  # discards the old checkpoints and starts over
    assert json.loads((out / "config.json").read_text())["slicing"]["config"]["sparsity"] == 0.3
