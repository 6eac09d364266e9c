"""bench/vllm.py and bench/vllm_serve.py without vLLM: ratios to dense and medians over rounds,
the models it makes, the `vllm serve` lifecycle with a stand-in server and client (stopped on
every path), the burst's bounds, and the `serve` part of the JSON."""

import json
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import load_bench_script


@pytest.fixture(scope="module")
def vb():
    return load_bench_script("vllm")


@pytest.fixture(scope="module")
def vs():
    return load_bench_script("vllm_serve")


def runs(*rates):
    return [{"tokens_per_s": r} for r in rates]


def test_ratios_to_dense_per_round_then_medians(vb):
    models = {"dense": {"batch": {"runs": runs(100, 50, 100)}, "single": {"runs": runs(10, 10, 20)}},
              "slice": {"batch": {"runs": runs(120, 70, 110)}, "single": {"runs": runs(12, 9, 30)}}}
    vb.summarize(models)
    # Round 2 ran under load for both: its ratio (1.4) counts as one round, not as a slow model.
    assert models["slice"]["batch"] == {"runs": runs(120, 70, 110), "tokens_per_s": 110.0, "vs_dense": 1.2}
    assert models["slice"]["single"]["vs_dense"] == 1.2 and models["slice"]["single"]["tokens_per_s"] == 12.0
    assert models["dense"]["batch"]["vs_dense"] == 1.0 and models["dense"]["batch"]["tokens_per_s"] == 100.0
    assert vb.median([1.0, 3.0, 2.0, 10.0]) == 2.5
    models["slice"]["batch"]["runs"].pop()
    with pytest.raises(ValueError):
        vb.summarize(models)


def test_fewer_than_three_rounds_refused(vb, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["vllm.py", "--vllm-python", "python", "--rounds", "2"])
    with pytest.raises(SystemExit, match="at least 3"):
        vb.main()


def test_models_made_as_specified(vb, tmp_path, monkeypatch):
    calls = []

    def cli(*args):
        calls.append(args)
        out = Path(args[args.index("--out") + 1])
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(vb, "cli", cli)
    cal = ["--cal-samples", "64", "--cal-seqlen", "2048"]
    names = [n for n in vb.MODELS if n != "dense"]
    dirs = vb.make_models(tmp_path, cal, names)
    slices = {tuple(c[2:c.index("--cal-data")]) for c in calls if c[0] == "slice"}
    assert slices == {("--sparsity", "0.25"), ("--sparsity", "0.3"), ("--sparsity", "0.25", "--rotations", "block"),
                      ("--sparsity", "0.25", "--rotations", "model", "--round-to", "72")}
    assert all(c[c.index("--cal-samples") + 1] == "64" for c in calls if c[0] == "slice")
    exports = [c for c in calls if c[0] == "export"]
    assert len(exports) == 1 and exports[0][exports[0].index("--format") + 1] == "plain"
    assert dirs["plain 25% (432 wide)"].name.endswith("-plain")
    assert not dirs["default 25% (plugin)"].name.endswith("-plain")
    assert len(set(dirs.values())) == 4
    assert set(vb.SERVED) == {"default 25% (plugin)", "per-block 25% (plugin)"}
    calls.clear()
    assert vb.make_models(tmp_path, cal, names) == dirs and calls == []  # made once


class FakeServer:
    def __init__(self, alive=True):
        self.stopped, self._alive = 0, alive

    def alive(self):
        return self._alive

    def stop(self):
        self.stopped += 1

    def tail(self):
        return "log tail"


class FakeClient:
    def __init__(self, texts, delay=0.0):
        self.texts, self.delay, self.calls = texts, delay, []
        self.lock = threading.Lock()
        self.completions = self

    def create(self, **request):
        with self.lock:
            self.calls.append(request)
        time.sleep(self.delay)
        text = self.texts.get(tuple(request["prompt"]), "burst text")
        return SimpleNamespace(choices=[SimpleNamespace(text=text)],
                               usage=SimpleNamespace(completion_tokens=request["max_tokens"]))


def serve_job(tmp_path, **changes):
    job = {"model": str(tmp_path / "slice"), "dtype": "float32", "max_model_len": 256, "enforce_eager": True,
           "greedy_prompts": [[1, 2, 3], [4, 5]], "greedy_tokens": 8, "offline_texts": [" Paris.", " a theory"],
           "burst": 32, "burst_prompts": [[7] * 128, [8] * 128], "burst_tokens": 16, "ready_timeout_s": 60,
           "burst_timeout_s": 30, "request_timeout_s": 30, "log": str(tmp_path / "serve.log")}
    return {**job, **changes}


def test_serve_compares_text_and_times_a_bounded_burst(vs, tmp_path):
    server, started, probes = FakeServer(), [], iter([False, False, True])
    client = FakeClient({(1, 2, 3): " Paris.", (4, 5): " a theory"})

    def start(job, port):
        started.append((job["model"], port))
        return server

    def make_client(url, timeout):
        assert url == "http://127.0.0.1:8123/v1"
        return client

    result = vs.serve_job(serve_job(tmp_path), start=start, make_client=make_client, probe=lambda url: next(probes),
                          port=8123, sleep=lambda s: None)
    assert started == [(str(tmp_path / "slice"), 8123)] and server.stopped == 1
    assert result["text_equal_offline"] is True and result["requests_per_s"] > 0
    assert result["burst"]["completed"] == 32 and not result["burst"]["timed_out"]
    greedy = client.calls[:2]
    assert [c["prompt"] for c in greedy] == [[1, 2, 3], [4, 5]]
    assert all(c["temperature"] == 0.0 and c["max_tokens"] == 8 and c["extra_body"] == {"ignore_eos": True}
               for c in greedy)
    assert len(client.calls) == 2 + 32 and all(c["max_tokens"] == 16 for c in client.calls[2:])
    assert "texts" not in result

    server = FakeServer()
    other = FakeClient({(1, 2, 3): " Paris.", (4, 5): " another"})
    result = vs.serve_job(serve_job(tmp_path), start=lambda job, port: server, make_client=lambda u, t: other,
                          probe=lambda url: True, port=8124)
    assert result["text_equal_offline"] is False and result["texts"][1] == " another" and server.stopped == 1


@pytest.mark.parametrize("case", ["never ready", "exits", "client fails"])
def test_the_server_is_stopped_on_every_failure(vs, tmp_path, case):
    server = FakeServer(alive=case != "exits")

    class Broken:
        completions = SimpleNamespace(create=lambda **r: (_ for _ in ()).throw(ConnectionError("reset")))

    job = serve_job(tmp_path, ready_timeout_s=-1 if case == "never ready" else 60)
    error = {"never ready": TimeoutError, "exits": RuntimeError, "client fails": ConnectionError}[case]
    with pytest.raises(error):
        vs.serve_job(job, start=lambda job, port: server, make_client=lambda u, t: Broken(),
                     probe=lambda url: case == "client fails", port=8125, sleep=lambda s: None)
    assert server.stopped == 1


def test_burst_is_bounded_in_time(vs):
    release = threading.Event()

    def send(i):
        if i % 2:
            release.wait(10)
        return 5

    timing = vs.burst(send, 8, timeout_s=0.3)
    release.set()
    assert timing["requests"] == 8 and timing["completed"] == 4 and timing["unfinished"] == 4
    assert timing["timed_out"] and timing["seconds"] >= 0.3 and timing["requests_per_s"] == pytest.approx(4 / timing["seconds"], rel=0.01)

    def flaky(i):
        if i == 0:
            raise ConnectionError("refused")
        return 5

    timing = vs.burst(flaky, 4, timeout_s=10)
    assert timing["completed"] == 3 and timing["failed"] == 1 and "refused" in timing["errors"][0]


def test_server_listens_on_loopback_and_stops_its_process_group(vs, tmp_path):
    command = vs.serve_command(serve_job(tmp_path), 8126, "vllm")
    assert command[:3] == ["vllm", "serve", str(tmp_path / "slice")]
    assert command[command.index("--host") + 1] == "127.0.0.1" and "0.0.0.0" not in command
    assert "--enforce-eager" in command and command[command.index("--max-num-seqs") + 1] == "32"
    # A real process group: a shell and a child of its own, both gone after stop().
    server = vs.Server(["bash", "-c", "sleep 60 & sleep 60"], tmp_path / "group.log")
    time.sleep(0.2)
    assert server.alive() and len(running_in_group(server.process.pid)) == 3
    server.stop(grace_s=5)
    assert not server.alive() and running_in_group(server.process.pid) == []


def running_in_group(pgid: int) -> list[int]:
    """Live processes of a process group (zombies left to an init that does not reap are gone)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def test_serve_entries_in_the_json(vb, tmp_path):
    args = vb.parser().parse_args(["--vllm-python", "python", "--scratch", str(tmp_path)])
    job = {"greedy_prompts": [[1, 2]], "greedy_tokens": 32, "new_tokens": 128, "dtype": "float32",
           "max_model_len": 256, "enforce_eager": False, "throughput_prompts": [[3] * 128] * 64}
    models = {name: tmp_path / vb.slug(name) for name in vb.MODELS}
    offline = {name: [f"text of {name}"] for name in vb.MODELS}
    asked = []

    def runner(python, job_file, timeout_s):
        served = json.loads(Path(job_file).read_text())
        asked.append(served)
        if "per-block" in served["model"]:
            raise RuntimeError("vllm serve not ready")
        return {"text_equal_offline": True, "requests_per_s": 2.5, "burst": {"completed": 32}}

    serve = vb.serve_step(models, offline, job, args, runner=runner)
    assert list(serve) == vb.SERVED
    assert all({"text_equal_offline", "requests_per_s"} <= set(entry) for entry in serve.values())
    assert serve["default 25% (plugin)"]["requests_per_s"] == 2.5
    failed = serve["per-block 25% (plugin)"]
    assert failed["text_equal_offline"] is None and failed["requests_per_s"] is None and "not ready" in failed["error"]
    first = asked[0]
    assert first["offline_texts"] == ["text of default 25% (plugin)"] and first["burst"] == 32
    assert len(first["burst_prompts"]) == 32 and first["burst_tokens"] == 128 and first["greedy_tokens"] == 32
    table = vb.table({"models": {}, "serve": serve})
    assert "2.50 requests/s" in table and "not ready" in table


def test_run_serve_reads_the_result_and_bounds_the_child(vb, tmp_path):
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "INFO vllm logs"\necho \'result: {"requests_per_s": 3.0}\'\n')
    fake.chmod(0o755)
    assert vb.run_serve(str(fake), tmp_path / "job.json", timeout_s=30) == {"requests_per_s": 3.0}
    slow = tmp_path / "slow"
    slow.write_text("#!/usr/bin/env bash\nexec sleep 30\n")
    slow.chmod(0o755)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="ran past"):
        vb.run_serve(str(slow), tmp_path / "job.json", timeout_s=0.5)
    assert time.monotonic() - start < 20
