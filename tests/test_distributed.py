"""Two gloo processes on CPU give the weights of one process; a dead rank stops the other cleanly."""

import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from slicegpt import load_sliced
from slicegpt.cli import main
from slicegpt.running.streaming import KILL_AFTER_LAYER_ENV, KILL_RANK_ENV

from conftest import WIKITEXT_VALIDATION

CAL = ["--cal-data", str(WIKITEXT_VALIDATION), "--cal-samples", "8", "--cal-seqlen", "32", "--cal-batch-size", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def slice_args(model, out, *extra):
    return ["slice", str(model), "--sparsity", "0.25", "--out", str(out), *CAL, *extra]


@pytest.mark.parametrize("mode", ["--no-streaming", "--streaming", "--streaming --rotations model",
                                  "--streaming --rotations block --refit"])
def test_two_ranks_match_one_process(three_layer_dir, tmp_path, mode):
    mode = mode.split()
    assert main(slice_args(three_layer_dir, tmp_path / "single", *mode)) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "slicegpt.cli", *slice_args(three_layer_dir, tmp_path / "multi", *mode, "--dist-timeout", "60")]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    single, multi = load_sliced(tmp_path / "single").state_dict(), load_sliced(tmp_path / "multi").state_dict()
    assert single.keys() == multi.keys()
    for key in single:  # the covariance sums differ only in summation order
        assert torch.allclose(single[key], multi[key], rtol=0, atol=1e-5), key
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi", "single"], "only rank 0 writes, and only the output"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_rank_stops_the_others_with_a_message(three_layer_dir, tmp_path):
    """Rank 1 is SIGKILLed after its first layer; rank 0 must not hang in the next collective."""
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank),
               "LOCAL_RANK": str(rank), KILL_AFTER_LAYER_ENV: "0", KILL_RANK_ENV: "1"}
        args = slice_args(three_layer_dir, tmp_path / "out", "--streaming", "--dist-timeout", "30")
        procs.append(subprocess.Popen([sys.executable, "-m", "slicegpt.cli", *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    start = time.monotonic()
    try:
        _, err0 = procs[0].communicate(timeout=240)
        procs[1].communicate(timeout=60)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert procs[1].returncode == -9
    assert procs[0].returncode == 2, err0[-3000:]
    assert "Traceback" not in err0
    assert "rank 0 of 2: a collective operation failed" in err0 and "--dist-timeout" in err0, err0[-3000:]
    assert time.monotonic() - start < 200
    assert not (tmp_path / "out").exists()
