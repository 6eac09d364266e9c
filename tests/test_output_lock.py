"""One output takes one run at a time: a second run is refused naming the first; a killed run frees it."""

import errno
import os
import subprocess
import sys
import time

import pytest

from slicegpt import load_sliced
from slicegpt.cli import main
from slicegpt.io.output_lock import lock_path, output_lock
from slicegpt.running.streamed_store import STOP_AFTER_LAYER_ENV
from slicegpt.running.streaming import partial_dir

from conftest import WIKITEXT_VALIDATION

CAL = ["--cal-data", str(WIKITEXT_VALIDATION), "--cal-samples", "4", "--cal-seqlen", "32", "--cal-batch-size", "2"]


def slice_args(model, out, *extra):
    return ["slice", str(model), "--sparsity", "0.25", "--out", str(out), *CAL, *extra]


def refused_by(capsys, code, pid):
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "another slicegpt run" in err and f"pid {pid}" in err, err


def wait_for(condition, process, seconds=120.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def hold(out):
    """A process that holds `out`'s lock until killed (returns once it holds it)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom slicegpt.io.output_lock import output_lock\n"
         "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n", str(out)],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def kill(process):
    process.kill()  # SIGKILL: no clean-up runs, only the kernel lets go of the lock
    process.wait()


def test_a_held_output_refuses_a_second_run_until_its_holder_is_killed(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    holder = hold(out)
    try:
        for argv in (slice_args(tiny_model_dir, out), slice_args(tiny_model_dir, out, "--streaming"),
                     ["eval", "zeroshot", str(tiny_model_dir), "--tasks", "piqa", "--limit", "1", "--out", str(out)]):
            refused_by(capsys, main(argv), holder.pid)
        assert not out.exists() and not partial_dir(out).exists()
    finally:
        kill(holder)
    assert main(slice_args(tiny_model_dir, out)) == 0
    assert (out / "config.json").is_file()
    assert not lock_path(out).exists()  # released and removed when the run ends
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_run_frozen_mid_way_holds_its_output_and_resumes_once_killed(three_layer_dir, tmp_path, capsys):
    out = tmp_path / "out"
    env = {**os.environ, STOP_AFTER_LAYER_ENV: "0", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "slicegpt.cli", *slice_args(three_layer_dir, out, "--streaming")],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: (partial_dir(out) / "resume" / "state.json").is_file(), first)
        wait_for(lambda: open(f"/proc/{first.pid}/stat").read().split(")")[-1].split()[0] == "T", first)
        # Another setting than the first run's: before the lock it would have mixed two widths in one output.
        refused_by(capsys, main(slice_args(three_layer_dir, out, "--streaming", "--round-to", "16")), first.pid)
        refused_by(capsys, main(slice_args(three_layer_dir, out, "--no-streaming")), first.pid)
    finally:
        kill(first)
    assert main(slice_args(three_layer_dir, out, "--streaming")) == 0
    assert "resuming" in capsys.readouterr().err
    model = load_sliced(out)  # one width throughout (test_resume.py checks the weights equal an unbroken run's)
    width = model.config.slicing["embedding_width"]
    assert {layer["in"] for layer in model.config.slicing["layers"]} == {width}
    assert not partial_dir(out).exists() and not lock_path(out).exists()


def test_the_lock_removes_the_folders_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with output_lock(out):
        assert lock_path(out).is_file() and f"pid {os.getpid()}" in lock_path(out).read_text()
    assert not (tmp_path / "a").exists()


BENCH = ["--batch-sizes", "1", "--prompt-len", "8", "--new-tokens", "2", "--repeats", "1", "--warmup", "0"]


def commands(model, out):
    return {
        "bench": ["bench", str(model), *BENCH, "--out", str(out)],
        "sweep": ["sweep", str(model), "--sparsities", "0.25", "--out", str(out), *CAL],
        "slice": slice_args(model, out),
    }


@pytest.mark.parametrize("name,env", [
    ("bench", {"RANK": "1"}),
    ("bench", {"RANK": "1", "WORLD_SIZE": "2"}),  # bench does not share its work out: each process writes
    ("sweep", {"RANK": "1", "WORLD_SIZE": "2"}),
    ("slice", {"RANK": "1"}),  # RANK without a world of several: the only writer
    ("slice", {"RANK": "1", "WORLD_SIZE": "1"}),
])
def test_every_process_that_writes_takes_the_lock(tiny_model_dir, tmp_path, monkeypatch, name, env):
    from slicegpt.cli import build_parser
    from slicegpt.commands.validate import validate

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    assert validate(build_parser().parse_args(commands(tiny_model_dir, out)[name])) == [out]


def test_a_process_of_rank_one_is_refused_by_a_held_output(tiny_model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "bench.json"
    holder = hold(out)
    try:
        monkeypatch.setenv("RANK", "1")
        refused_by(capsys, main(commands(tiny_model_dir, out)["bench"]), holder.pid)
        assert not out.exists()
    finally:
        kill(holder)


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.ENOSYS])
def test_a_filesystem_without_locks_runs_unlocked_after_one_warning(tiny_model_dir, tmp_path, capsys, monkeypatch,
                                                                     code):
    """NFSv3 without its lock daemon answers flock with ENOLCK, some FUSE mounts with ENOSYS."""
    import fcntl
    from types import SimpleNamespace

    import slicegpt.io.output_lock as output_lock_module

    def no_locks(fd, operation):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(output_lock_module, "fcntl", SimpleNamespace(flock=no_locks, LOCK_EX=fcntl.LOCK_EX,
                                                                      LOCK_NB=fcntl.LOCK_NB))
    out = tmp_path / "bench.json"
    lock_path(out).write_text("pid 1: another run's lock file\n")  # never held here, so never removed
    assert main(commands(tiny_model_dir, out)["bench"]) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("slicegpt: warning: cannot lock")]
    assert len(warnings) == 1 and os.strerror(code) in warnings[0] and "Traceback" not in err, err
    assert out.is_file() and lock_path(out).read_text() == "pid 1: another run's lock file\n"
    with output_lock(tmp_path / "other"):
        assert lock_path(tmp_path / "other").exists()
    assert lock_path(tmp_path / "other").exists()  # the run made it but never held it: it stays
