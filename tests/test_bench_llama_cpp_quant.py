"""bench/llama_cpp_quant.py without llama.cpp: the rows it plans, the fallbacks it reads from
llama-quantize's log, resuming from the scratch directory, the frontiers, and the JSON; and
bench/llama_cpp_tools.sh's build-time record, with a stand-in cmake."""

import json
import os
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import load_bench_script

ROOT = Path(__file__).resolve().parents[1]

QUANTIZE_LOG = """main: quantizing 'x-F16.gguf' to 'x-Q4_K_M.gguf' as Q4_K_M
[   1/ 272]                    output_norm.weight - [  448,     1,     1,     1], type =    f32, size =    0.002 MB
[   2/ 272]                blk.0.attn_q.weight - [  448,   576,     1,     1], type =    f16,

llama_tensor_get_type : tensor cols 448 x 576 are not divisible by 256, required for q4_K - using fallback quantization q5_0
converting to q5_0 .. size =     0.49 MiB ->     0.17 MiB
[   3/ 272]                blk.0.ffn_down.weight - [ 1536,   448,     1,     1], type =    f16, converting to q6_K .. size =     1.31 MiB ->     0.54 MiB
[   4/ 272]                  blk.0.ffn_up.weight - [  448,  1536,     1,     1], type =    f16,

llama_tensor_get_type : tensor cols 448 x 1536 are not divisible by 256, required for q4_K - using fallback quantization q5_0
converting to q5_0 .. size =     1.31 MiB ->     0.45 MiB
[   5/ 272]                blk.0.attn_v.weight - [  448,   192,     1,     1], type =    f16,

llama_tensor_get_type : tensor cols 448 x 192 are not divisible by 256, required for q6_K - using fallback quantization q8_0
converting to q8_0 .. size =     0.16 MiB ->     0.09 MiB
llama_model_quantize_impl: model size  =   243.31 MB
llama_model_quantize_impl: quant size  =    93.02 MB
llama_model_quantize_impl: WARNING: 3 of 4 tensor(s) required fallback quantization
"""

BENCH_JSON = json.dumps([
    {"model_type": "llama ?B F16", "n_prompt": 512, "n_gen": 0, "avg_ts": 812.5, "stddev_ts": 4.1},
    {"model_type": "llama ?B F16", "n_prompt": 0, "n_gen": 128, "avg_ts": 61.25, "stddev_ts": 0.7},
])


@pytest.fixture(scope="module")
def lq():
    return load_bench_script("llama_cpp_quant")


def test_rows_planned_one_per_model_rotation_type_importance_corpus(lq):
    jobs = lq.matrix(["dense", "25%"], {"25%"}, ["none", "auto"], ["F16", "Q4_0", "Q4_K_M"],
                     ["none", "llama", "slicegpt"], ["wikitext2", "lambada"])
    keys = [lq.row_key(j) for j in jobs]
    assert len(keys) == len(set(keys))
    ppl = [j for j in jobs if j["corpus"] != lq.BENCH]
    # dense: no second rotation, no slicegpt importance; F16 once, without importance.
    assert {(j["rotate"], j["imatrix"]) for j in ppl if j["model"] == "dense"} == {("none", "none"), ("none", "llama")}
    assert len([j for j in ppl if j["model"] == "dense"]) == (1 + 2 * 2) * 2
    assert len([j for j in ppl if j["model"] == "25%"]) == 2 * (1 + 2 * 3) * 2
    assert not [j for j in jobs if j["type"] == "F16" and j["imatrix"] != "none"]
    # llama-bench: F16 and Q4_0, once per export, after the file's perplexities.
    speed = [(j["model"], j["rotate"], j["type"]) for j in jobs if j["corpus"] == lq.BENCH]
    assert speed == [("dense", "none", "F16"), ("dense", "none", "Q4_0"), ("25%", "none", "F16"),
                     ("25%", "none", "Q4_0"), ("25%", "auto", "F16"), ("25%", "auto", "Q4_0")]
    assert not lq.matrix(["dense"], set(), ["none"], ["F16"], ["none"], ["wikitext2"], speed=False)[-1]["corpus"] \
        == lq.BENCH
    names = {lq.slug(j, {"wikitext2": 8, "lambada": 4}) for j in jobs}
    assert len(names) == len(jobs) and "25-rotauto-Q4_K_M-slicegpt-lambada-c4" in names


def test_fallbacks_named_by_llama_quantize_log(lq):
    found = lq.parse_fallbacks(QUANTIZE_LOG)
    assert found["count"] == 3 and found["of"] == 4
    assert found["by_type"] == {"q4_K -> q5_0": 2, "q6_K -> q8_0": 1}
    assert found["tensors"][0] == {"tensor": "blk.0.attn_q.weight", "wanted": "q4_K", "stored_as": "q5_0"}
    assert found["tensors"][2]["tensor"] == "blk.0.attn_v.weight"
    assert lq.parse_fallbacks("[   1/  2] blk.0.attn_q.weight - [ 512, 512], type = f16, converting to q4_0 ..") == \
        {"count": 0, "by_type": {}, "tensors": [], "of": None}


def test_llama_bench_and_perplexity_output(lq):
    speed = lq.parse_llama_bench(BENCH_JSON)
    assert speed["pp_tokens"] == 512 and speed["pp_tokens_per_s"] == 812.5
    assert speed["tg_tokens"] == 128 and speed["tg_tokens_per_s"] == 61.25 and speed["tg_stddev"] == 0.7
    assert lq.parse_perplexity("[1]15.2,[2]16.1,\nFinal estimate: PPL = 16.2352 +/- 0.81234\n") == (16.2352, 0.81234)
    with pytest.raises(RuntimeError):
        lq.parse_perplexity("llama_perplexity: tokenizing the input ..")


def test_frontier_per_model(lq):
    assert lq.frontier([(3, 10.0), (1, 30.0), (2, 20.0), (2.5, 25.0), (4, 10.5)]) == [(1, 30.0), (2, 20.0), (3, 10.0)]
    rows = [{"model": "25%", "rotate": rotate, "corpus": corpus, "bytes": size, "ppl": ppl}
            for rotate, corpus, size, ppl in [("none", "wikitext2", 100, 40.0), ("none", "wikitext2", 50, 60.0),
                                             ("none", "wikitext2", 60, 70.0), ("auto", "wikitext2", 50, 45.0),
                                             ("none", "lambada", 100, 99.0)]]
    assert lq.frontiers(rows, "wikitext2") == {"25%": [(50, 60.0), (100, 40.0)], "25% +rot auto": [(50, 45.0)]}
    assert lq.frontiers(rows, "lambada") == {"25%": [(100, 99.0)]}


def test_rows_of_other_settings_are_not_kept(lq):
    settings = {"chunks": {"wikitext2": 8, "lambada": 4}, "cal_samples": 64}
    row = {"model": "dense", "rotate": "none", "type": "F16", "imatrix": "none", "corpus": "wikitext2", "chunks": 8,
           "cal_samples": 64}
    assert lq.same_settings(row, settings)
    assert not lq.same_settings({**row, "chunks": 16}, settings)
    assert not lq.same_settings({**row, "cal_samples": 8}, settings)
    assert lq.same_settings({**row, "corpus": lq.BENCH, "chunks": None}, settings)
    old = {"model": "dense", "type": "F16", "imatrix": "none", "chunks": 1}  # before rotations and corpora
    assert not lq.same_settings(old, settings)


def test_extra_models_and_the_tools_build_record(lq, tmp_path):
    (tmp_path / "slice").mkdir()
    (tmp_path / "slice" / "config.json").write_text("{}")
    assert lq.parse_extra([f"25%-rft={tmp_path / 'slice'}"]) == {"25%-rft": str(tmp_path / "slice")}
    for bad in ["25%-rft", f"25%={tmp_path / 'slice'}", f"x={tmp_path}"]:
        with pytest.raises(SystemExit):
            lq.parse_extra([bad])
    (tmp_path / "cache" / "build" / "bin").mkdir(parents=True)
    assert lq.tools_build(tmp_path / "cache" / "build" / "bin") is None
    (tmp_path / "cache" / "build_time.json").write_text('{"seconds": 312}')
    assert lq.tools_build(tmp_path / "cache" / "build" / "bin") == {"seconds": 312}
    assert lq.tools_build(tmp_path / "cache" / "bin") == {"seconds": 312}


class FakeTools:
    """slicegpt's CLI and llama.cpp's tools as they touch the scratch directory, each call recorded;
    `stop_at`: the perplexity call that is interrupted (as a kill would)."""

    def __init__(self, stop_at=None):
        self.calls, self.stop_at, self.perplexities = [], stop_at, 0

    def cli(self, *args):
        self.calls.append(("slicegpt", *args))
        if args[0] == "slice":
            out = Path(args[args.index("--out") + 1])
            out.mkdir(parents=True, exist_ok=True)
            (out / "config.json").write_text("{}")
            (out / "importance.safetensors").write_text("")
            return ""
        source, out = Path(args[1]), Path(args[args.index("--out") + 1])
        out.write_bytes(b"x" * 1000)
        if (source / "importance.safetensors").is_file():
            out.with_name(out.name[: -len(".gguf")] + ".imatrix.gguf").write_text("slicegpt")
        return json.dumps({"hidden_size": 448, "params": 10, "extra_rotation": None})

    def run(self, args):
        tool = Path(args[0]).name
        self.calls.append((tool, *args[1:]))
        out = ""
        if tool == "llama-quantize":
            target, qtype = Path(args[-3]), args[-2]
            target.write_bytes(b"x" * {"Q8_0": 530, "Q4_0": 280, "Q4_K_M": 300}[qtype])
            out = QUANTIZE_LOG if qtype == "Q4_K_M" else ""
        elif tool == "llama-imatrix":
            Path(args[args.index("-o") + 1]).write_text("imatrix")
        elif tool == "llama-perplexity":
            self.perplexities += 1
            if self.perplexities == self.stop_at:
                raise KeyboardInterrupt
            model = Path(args[args.index("-m") + 1]).name
            qtype = next(t for t in ("Q4_K_M", "Q8_0", "Q4_0", "F16") if f"-{t}" in model)
            ppl = 20.0 + {"F16": 0, "Q8_0": 0.2, "Q4_0": 6, "Q4_K_M": 3}[qtype]
            out = f"Final estimate: PPL = {ppl:.4f} +/- 0.5000\n"
        elif tool == "llama-bench":
            out = "usage: llama-bench [options]\n  -r, --repetitions <n>\n" if "--help" in args else BENCH_JSON
        return SimpleNamespace(stdout=out, stderr="")


def fake_bench(lq, tmp_path, fake):
    tools = tmp_path / "tools"
    tools.mkdir(exist_ok=True)
    for name in ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench"):
        (tools / name).write_text("")
    scratch = tmp_path / "scratch"
    scratch.mkdir(exist_ok=True)
    for name in ("cal64.txt", "wikitext2.txt", "lambada.txt"):
        (scratch / name).write_text("text")
    (tmp_path / "dense").mkdir(exist_ok=True)
    args = lq.parser().parse_args(["--scratch", str(scratch), "--tools", str(tools), "--threads", "2"])
    args.slices = str(tmp_path / "slices")

    class Bench(lq.Bench):
        def model_dir(self, model):  # the original weights without the hub cache
            return tmp_path / "dense" if model == "dense" else super().model_dir(model)

    return Bench(args, run=fake.run, cli=fake.cli), args


def test_a_killed_run_resumes_where_it_stopped(lq, tmp_path):
    models, types = ["dense", "25%"], ["F16", "Q4_0", "Q4_K_M"]
    jobs = lq.matrix(models, {"25%"}, lq.ROTATES, types, lq.VARIANTS, list(lq.CORPORA))
    written = []
    fake = FakeTools(stop_at=7)
    bench, args = fake_bench(lq, tmp_path, fake)
    settings = lq.settings_of(args)
    with pytest.raises(KeyboardInterrupt):
        lq.measure_all(bench, jobs, [], settings, models, written.append)
    assert len(written[-1]) == 8  # dense: F16 and Q4_0 on both corpora and in llama-bench, Q4_0 with llama's
    slices = [c for c in fake.calls if c[:2] == ("slicegpt", "slice")]
    assert slices == [] and not any(c[0] == "llama-quantize" and "F16" in c[-2] for c in fake.calls)

    fake = FakeTools()
    bench, _ = fake_bench(lq, tmp_path, fake)
    rows = lq.measure_all(bench, jobs, [], settings, models, written.append)
    assert len(rows) == len(jobs)
    assert fake.perplexities == len([j for j in jobs if j["corpus"] != lq.BENCH]) - 6
    slices = [c for c in fake.calls if c[:2] == ("slicegpt", "slice")]
    assert len(slices) == 1 and slices[0][slices[0].index("--round-for") + 1] == "Q4_0"
    assert slices[0][slices[0].index("--cal-samples") + 1] == "64"
    exports = [c for c in fake.calls if c[:2] == ("slicegpt", "export")]
    assert sorted("--rotate" in c for c in exports) == [False, True]  # 25% as it is and rotated (dense before)
    imatrix = [c for c in fake.calls if c[0] == "llama-imatrix"]
    assert len(imatrix) == 2 and all(c[c.index("-f") + 1].endswith("cal64.txt") for c in imatrix)
    assert all(c[c.index("--chunks") + 1] == "64" for c in imatrix)
    weighed = [c for c in fake.calls if c[0] == "llama-quantize" and "--imatrix" in c]
    assert any(c[c.index("--imatrix") + 1].endswith("25-F16.imatrix.gguf") for c in weighed)

    by_key = {lq.row_key(r): r for r in rows}
    q4km = by_key[("25%", "auto", "Q4_K_M", "slicegpt", "lambada")]
    assert q4km["fallbacks"]["by_type"] == {"q4_K -> q5_0": 2, "q6_K -> q8_0": 1} and q4km["chunks"] == 4
    assert q4km["fallbacks"]["count"] == 3 and q4km["fallbacks"]["first"][0] == "blk.0.attn_q.weight"
    assert by_key[("25%", "none", "Q4_0", "none", "wikitext2")]["fallbacks"]["count"] == 0
    assert by_key[("25%", "none", "Q4_0", "none", "wikitext2")]["ppl_vs_own_f16"] == pytest.approx(26 / 20)
    assert by_key[("dense", "none", "Q4_0", "none", "wikitext2")]["chunks"] == 8
    assert by_key[("dense", "none", "F16", "none", lq.BENCH)]["tg_tokens_per_s"] == 61.25
    assert ("dense", "none", "Q4_0", "slicegpt", "wikitext2") not in by_key
    assert [c for c in fake.calls if c[0] == "llama-bench" and "--help" not in c][0][-2:] == ("-o", "json")

    fake = FakeTools()
    bench, _ = fake_bench(lq, tmp_path, fake)
    assert lq.measure_all(bench, jobs, [], settings, models, written.append) == rows
    assert fake.calls == []


def test_results_json_and_plot(lq, tmp_path):
    fake = FakeTools()
    bench, args = fake_bench(lq, tmp_path, fake)
    models = ["dense", "25%"]
    jobs = lq.matrix(models, {"25%"}, lq.ROTATES, ["F16", "Q4_0"], lq.VARIANTS, list(lq.CORPORA))
    settings = lq.settings_of(args)
    out = tmp_path / "results" / "llama_cpp_quant.json"
    rows = lq.measure_all(bench, jobs, [], settings, models,
                          lambda rows: lq.write_results(rows, settings, {"seconds": 3}, out, with_plot=False))
    assert not out.with_suffix(".png").exists()
    lq.write_results(rows, settings, {"seconds": 3}, out)
    data = json.loads(out.read_text())
    assert data["command"].startswith("python bench/llama_cpp_quant.py") and data["date"] and "commit" in data
    assert data["settings"]["chunks"] == {"wikitext2": 8, "lambada": 4} and data["tools_build"] == {"seconds": 3}
    assert data["rows"] == rows
    assert set(data["frontiers"]) == {"wikitext2", "lambada"}
    assert set(data["frontiers"]["lambada"]) == {"dense", "25%", "25% +rot auto"}
    assert out.with_suffix(".png").stat().st_size > 0
    table = lq.markdown_table(rows)
    assert "wikitext2:" in table and "lambada:" in table and "llama-bench:" in table
    # Rows of the last run with other settings leave the table; rows of these settings stay.
    kept = lq.measure_all(bench, [], rows + [{**rows[0], "chunks": 16}], settings, models, lambda rows: None)
    assert kept == rows


def test_tools_script_records_its_build_time(tmp_path):
    cache = tmp_path / "cache"
    source = tmp_path / "llama_cpp_python-0.3.36"
    (source / "vendor" / "llama.cpp").mkdir(parents=True)
    (cache / "src").mkdir(parents=True)
    with tarfile.open(cache / "src" / "llama_cpp_python-0.3.36.tar.gz", "w:gz") as tar:
        tar.add(source, arcname=source.name)
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir()
    cmake = fake_bin / "cmake"  # configure: nothing; --build: the tools appear
    cmake.write_text('#!/usr/bin/env bash\nif [ "$1" = --build ]; then\n  build="$2"; mkdir -p "$build/bin"\n'
                     '  while [ $# -gt 0 ] && [ "$1" != --target ]; do shift; done; shift\n'
                     '  for t in "$@"; do touch "$build/bin/$t"; chmod +x "$build/bin/$t"; done\nfi\n')
    cmake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}")
    result = subprocess.run(["bash", str(ROOT / "bench" / "llama_cpp_tools.sh"), str(cache)], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    record = json.loads((cache / "build_time.json").read_text())
    assert record["seconds"] >= 0 and record["source"] == "llama_cpp_python-0.3.36" and record["cores"] >= 1
    assert "llama-bench" in record["tools"] and (cache / "bin" / "llama-bench").is_file()
