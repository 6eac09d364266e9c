"""Recovery of SmolLM2-135M's 25% default slice: LM loss against distillation from the dense model.

The slice is protocol P's default (`--sparsity 0.25`, refit on; calibration 64 x 2048
tokens of WikiText-2 (v1) validation, seed 42: zeroshot.py's `refit-25`, built and cached
once). Every recipe trains the same token budget, BUDGET_TOKENS = STEPS x 4 x 512, with
the settings of bench/rft.py's fine-tuning (zeroshot.RFT: LoRA rank 32, alpha 10, lr 5e-4,
batch 4 x 512, a tenth of the text held out, its loss and KL every 25 steps, with the
LAMBADA passages as the second held-out corpus of the curve):

    dense               SmolLM2-135M as shipped (the reference of every ratio)
    slice               the slice, no recovery
    a-lm-wikitext       LM loss on WikiText-2 validation (today's RFT)
    b-kl-wikitext       KL(dense ‖ slice), T = 1, on WikiText-2 validation
    c-kl-teacher        the same KL on text the dense model writes (seed 42, T = 1, top-p 0.95,
                        samples of 512 tokens from the beginning-of-text token and from
                        8-token openings of the calibration rows, by turns)
    best-full           the best of a, b, c (lowest geometric mean of the three perplexity
                        ratios) again with every decoder weight trained (lr 5e-5), not LoRA
    dense-self-kl       the dense model distilled from itself on c's text, at a quarter of the
                        budget: a check of the loss, it must stay within 1% of dense everywhere
    slice-teacher-cal   the slice calibrated on text the dense model writes (64 x 2048
                        tokens from the beginning-of-text token), no recovery

Each is measured on WikiText-2 raw test and the LAMBADA (OpenAI) test passages (protocol
P's perplexity: the first 16 windows of 2048 tokens), on a third corpus neither slicing
nor recovery sees (HellaSwag validation contexts, each followed by its correct ending, one
passage per example, from example 500 on, past the examples zero-shot reads; read from
../shared/data/hellaswag/validation.jsonl), and zero-shot on the six tasks at 500
examples each (zeroshot.py's machinery, lm-eval batch 8). Dense and the slice are the very models
zeroshot.py measured (`dense`, `refit-25`): their zero-shot rows are taken from
results/zeroshot.jsonl, naming its commit, instead of being measured again.

Budget: 409,600 tokens per recipe (STEPS = 200 steps of 4 x 512), today's RFT budget, so
recipe a is bench/rft.py's fine-tune unchanged. Per-token rates on this 2-core CPU, from
runs on record: the LM-loss LoRA step of 4 x 512 took 11 s (slice) to 14 s (dense) beside
another job (bench/README.md, recovery fine-tuning), 150-190 tokens/s; a dense forward
runs at 690 tokens/s (protocol P's baseline, 64 x 2048 tokens in 190 s) and dense decoding
with a KV cache at 90 tokens/s at batch 8 (results/speed_auto.json). A distillation step
adds a teacher forward of the same tokens (about 3 s) and one more head product per chunk
in the backward pass (about 0.5 s): about 15-18 s a step, 50-60 minutes for the budget;
`--full` adds the weight gradients of every decoder linear (about one more forward) and
AdamW over 100M weights: about 19-22 s a step, 65-75 minutes. The teacher's text (410k
tokens at batch 32, 512-token samples, nucleus sampling among the 1024 likeliest tokens)
should write at 120-180 tokens/s: 40-60 minutes, once, shared by c, best-full (when c
wins) and dense-self-kl. Each recipe's evaluation adds about 3 minutes of perplexity and
10-25 minutes of zero-shot. So the longest recipe, c with its text and evaluation, stays
under about 2 hours, and twice the budget would not. The whole run is about 9-10 hours.
`python bench/distill.py --measure` times each step kind and teacher sampling (batch 1 x 512
steps, 16 x 16 sampled tokens) and scales the rates to a quiet machine by a dense forward
timed in the same process (bench/results/distill_throughput.json); on a machine as busy as
this one was when the script was written (load average 13 on 2 cores, another benchmark at
nice -5) it did not finish in 30 minutes, so the figures above are the recorded ones.

Measured since (2026-12-07, commit 950cd88, mostly alone on the CPU): recipe b's 200 KL
steps took 4,453 s (16-20 s a step alone, 22 s on average with other work beside it part
of the time), each corpus's perplexity about 60 s, and the teacher's text wrote a batch of
32 x 512 tokens in 138 s alone (119 tokens/s; about 50 with tests beside it), so c's text
takes about an hour. bf16 autocast halves a training step (bench/autocast_step.py: 9.9 s against 19.8 s)
but the table's recipes train in float32, so their rows stay comparable.

Resumable: each finished (recipe, evaluation) is one JSON line in
bench/results/distill.jsonl, skipped on a rerun; trained models are cached in
out/distill-models/NAME; a training run stopped midway continues from its checkpoint
(out/distill-models/NAME.state, every 25 steps), and the teacher's text from its last
whole batch (out/distill-models/teacher-text-*.jsonl).

    python bench/distill.py                       # every recipe (the order above)
    python bench/distill.py --recipes dense,slice,c-kl-teacher
    python bench/distill.py --no-zeroshot         # perplexities only
    python bench/distill.py --quick               # a smoke run with tiny settings (its own files)
    python bench/distill.py --measure             # the throughput behind the budget
    python bench/distill.py --summary             # the table from the rows so far
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zeroshot  # noqa: E402  (model specs, the slice cache and the row files are shared)

ROOT = zeroshot.ROOT
DATA = ROOT.parent / "shared" / "data"
WIKITEXT_TEST = DATA / "wikitext-2" / "wikitext-2-raw-v1.test.jsonl"
LAMBADA = DATA / "lambada" / "lambada_openai.test.jsonl"
HELLASWAG = DATA / "hellaswag" / "validation.jsonl"
ZEROSHOT_SKIP = 500  # the third corpus starts past the examples zero-shot evaluates
ROWS = ROOT / "bench" / "results" / "distill.jsonl"
THROUGHPUT = ROOT / "bench" / "results" / "distill_throughput.json"
MODELS = ROOT / "out" / "distill-models"
QUIET_FORWARD_TOKENS_PER_S = 64 * 2048 / 190.3  # protocol_p_auto.json: dense body forward, quiet machine

STEPS = 200
FULL = {"steps": STEPS, "train": {**zeroshot.RFT, "steps": STEPS, "kl_chunk": 128}, "full_lr": 5e-5,
        "teacher_text": {"seed": 42, "temperature": 1.0, "top_p": 0.95, "prompts": "mixed", "sample_tokens": 512,
                         "batch_size": 32},
        "ppl": {"chunks": 16, "seqlen": 2048}, "zeroshot_limit": 500, "tasks": zeroshot.TASKS,
        "slice": zeroshot.MODELS["refit-25"]["slice"], "calibration": zeroshot.CALIBRATION}
QUICK = {"steps": 2, "train": {**zeroshot.RFT, "steps": 2, "seqlen": 64, "batch_size": 2, "eval_every": 1,
                               "heldout_windows": 2, "kl_chunk": 32},
         "full_lr": 5e-5,
         "teacher_text": {"seed": 42, "temperature": 1.0, "top_p": 0.95, "prompts": "mixed", "sample_tokens": 32,
                          "batch_size": 4},
         "ppl": {"chunks": 1, "seqlen": 256}, "zeroshot_limit": 4, "tasks": ["arc_easy"],
         "slice": {"sparsity": 0.25}, "calibration": {"cal_samples": 4, "cal_seqlen": 256, "seed": 42}}
BUDGET_TOKENS = STEPS * zeroshot.RFT["batch_size"] * zeroshot.RFT["seqlen"]

RECIPES = {
    "dense": {"student": "dense"},
    "slice": {"student": "slice"},
    "a-lm-wikitext": {"student": "slice", "data": "wikitext", "distill": False},
    "b-kl-wikitext": {"student": "slice", "data": "wikitext", "distill": True},
    "c-kl-teacher": {"student": "slice", "data": "teacher", "distill": True},
    "best-full": {"student": "slice", "full": True, "of": ["a-lm-wikitext", "b-kl-wikitext", "c-kl-teacher"]},
    # A check of the loss, not a recovery: a quarter of the budget shows whether it holds dense in place.
    "dense-self-kl": {"student": "dense", "data": "teacher", "distill": True, "budget_fraction": 0.25},
    "slice-teacher-cal": {"student": "slice", "cal": "teacher"},
}
CORPORA = {"wikitext2": WIKITEXT_TEST, "lambada": LAMBADA, "hellaswag_text": HELLASWAG}
# zeroshot.py measured these very models with the same machinery (lm-eval, 500 examples, batch 8):
# their rows are taken over rather than spending about half an hour a model again.
ZEROSHOT_MODELS = {"dense": "dense", "slice": "refit-25"}


def third_corpus() -> list[str]:
    """HellaSwag validation as passages: each context with its correct ending, past the zero-shot examples."""
    rows = [json.loads(line) for line in HELLASWAG.read_text().splitlines() if line.strip()]
    return [f"{r['ctx']} {r['endings'][int(r['label'])]}" for r in rows[ZEROSHOT_SKIP:]]


def corpus_texts(name: str) -> list[str]:
    from slicegpt.io.data import load_texts

    return third_corpus() if name == "hellaswag_text" else load_texts(str(CORPORA[name]))


class Bench:
    """The settings of one run (full or quick) and the files it keeps."""

    def __init__(self, quick: bool, rows: Path, threads: int):
        self.quick = quick
        self.settings = QUICK if quick else FULL
        self.rows = rows
        self.models = MODELS.parent / "distill-quick" if quick else MODELS
        self.threads = threads
        self._dense = None

    def dense(self):
        from slicegpt import load_model

        return load_model("smollm2-135m")

    def cal_texts(self) -> list[str]:
        from slicegpt.io.data import load_texts

        return load_texts(str(zeroshot.CAL_DATA))

    def spec(self, name: str) -> dict:
        """Everything that decides a recipe's result (a changed setting measures it again)."""
        recipe = dict(RECIPES[name])
        if recipe.get("full"):
            recipe = self.best_full(recipe)
        spec = {"recipe": recipe, "slice": self.settings["slice"], "calibration": self.settings["calibration"]}
        if "data" in recipe:
            train = dict(self.settings["train"])
            if recipe.get("full"):
                train["lr"] = self.settings["full_lr"]
            if "budget_fraction" in recipe:
                train["steps"] = max(1, round(train["steps"] * recipe["budget_fraction"]))
            spec["train"] = train
            if recipe["data"] == "teacher":
                spec["teacher_text"] = self.settings["teacher_text"] | {"tokens": self.budget()}
        if recipe.get("cal") == "teacher":
            spec["cal_text"] = {"seed": 42, "prompts": "bos", "sample_tokens": 512}
        return spec

    def budget(self) -> int:
        train = self.settings["train"]
        return train["steps"] * train["batch_size"] * train["seqlen"]

    def best_full(self, recipe: dict) -> dict:
        """best-full is the LoRA recipe (of a, b, c) with the lowest geometric mean of perplexity ratios."""
        latest = latest_rows(zeroshot.read_rows(self.rows))
        dense = latest.get("dense", {})
        scores = {}
        for name in recipe["of"]:
            rows = latest.get(name, {})
            if all(c in rows for c in CORPORA) and all(c in dense for c in CORPORA):
                scores[name] = sum(math.log(rows[c]["ppl"] / dense[c]["ppl"]) for c in CORPORA) / len(CORPORA)
        if len(scores) < len(recipe["of"]):
            missing = [n for n in recipe["of"] if n not in scores]
            raise SystemExit(f"best-full needs the perplexities of dense and {', '.join(missing)} first")
        best = min(scores, key=scores.get)
        return {**{k: v for k, v in RECIPES[best].items()}, "full": True, "from": best}

    def directory(self, name: str) -> Path:
        return self.models / name

    def teacher_text_path(self) -> Path:
        from slicegpt.recovery.teacher_text import TeacherTextConfig, default_path

        config = TeacherTextConfig(tokens=self.budget(), **self.settings["teacher_text"])
        return default_path(self.models, "smollm2-135m", config)

    def base_slice(self, cal_texts: list[str]):
        """The slice every recipe starts from: zeroshot.py's cached refit-25 (quick: its own, cached here)."""
        if not self.quick:
            model, tokenizer, _ = zeroshot.build_model("refit-25", self.dense, cal_texts, progress=True)
            return model, tokenizer
        return self.cached_slice("quick-slice", cal_texts)

    def cached_slice(self, name: str, cal_texts: list[str]):
        from slicegpt import SliceConfig, load_model, save_sliced, slice_model

        directory = self.directory(name)
        wanted = {"slice": self.settings["slice"], "calibration": self.settings["calibration"], "name": name}
        if (directory / "config.json").exists() and zeroshot._same_spec(directory / zeroshot.SPEC_FILE, wanted):
            return load_model(str(directory))
        model, tokenizer = self.dense()
        config = SliceConfig(**self.settings["slice"], cal_data=str(zeroshot.CAL_DATA), **self.settings["calibration"])
        slice_model(model, tokenizer, config, cal_texts, progress=True)
        save_sliced(model, tokenizer, directory, overwrite=True)
        (directory / zeroshot.SPEC_FILE).write_text(json.dumps(wanted, sort_keys=True) + "\n")
        return model, tokenizer

    def teacher_cal_slice(self):
        """The slice calibrated on text the dense model writes (no recovery)."""
        from slicegpt.recovery.teacher_text import calibration_texts

        calibration = self.settings["calibration"]
        teacher, tokenizer = self.dense()
        texts, _ = calibration_texts(teacher, tokenizer, self.models, "smollm2-135m", calibration["cal_samples"],
                                     calibration["cal_seqlen"], calibration["seed"])
        del teacher
        return self.cached_slice("slice-teacher-cal", texts)

    def build(self, name: str, spec: dict, cal_texts: list[str]):
        """(model, tokenizer, train row or None) for a recipe, from the cache when built before."""
        from slicegpt import load_model, save_sliced

        recipe = spec["recipe"]
        if "data" not in recipe:
            if recipe["student"] == "dense":
                return (*self.dense(), None)
            if recipe.get("cal") == "teacher":
                return (*self.teacher_cal_slice(), None)
            return (*self.base_slice(cal_texts), None)
        directory = self.directory(name)
        record_file = directory / "train_record.json"
        if (directory / "config.json").exists() and zeroshot._same_spec(directory / zeroshot.SPEC_FILE, spec):
            model, tokenizer = load_model(str(directory))
            return model, tokenizer, json.loads(record_file.read_text())
        model, tokenizer = self.dense() if recipe["student"] == "dense" else self.base_slice(cal_texts)
        teacher = self.dense()[0]
        texts, text_info = self.training_text(recipe, teacher, tokenizer, cal_texts)
        from slicegpt import FinetuneConfig, finetune

        config = FinetuneConfig(**spec["train"], distill=recipe["distill"], full=bool(recipe.get("full")),
                                teacher="smollm2-135m", data=text_info["source"], heldout_data=str(LAMBADA))
        state = self.models / f"{name}.state"
        resumed_at = checkpoint_step(state)
        start = time.perf_counter()
        model, record = finetune(model, tokenizer, texts, config, progress=True, checkpoint_dir=str(state),
                                 checkpoint_every=25, teacher=teacher if recipe["distill"] else None,
                                 heldout_texts=corpus_texts("lambada"))
        seconds = time.perf_counter() - start
        per_step = seconds / max(1, config.steps - resumed_at)
        train = {"tokens_trained": record["tokens_seen"], "seconds": round(seconds, 1),
                 "resumed_at_step": resumed_at, "seconds_estimate": round(per_step * config.steps, 1),
                 "data": record["data"] | ({"teacher_text": text_info} if "sha256" in text_info else {}),
                 "record": {k: v for k, v in record.items() if k != "data"}}
        if getattr(model.config, "slicing", None) is not None:
            save_sliced(model, tokenizer, directory, overwrite=True)
        else:
            directory.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
        record_file.write_text(json.dumps(train) + "\n")
        (directory / zeroshot.SPEC_FILE).write_text(json.dumps(spec, sort_keys=True) + "\n")
        return model, tokenizer, train

    def training_text(self, recipe: dict, teacher, tokenizer, cal_texts: list[str]) -> tuple[list[str], dict]:
        if recipe["data"] == "wikitext":
            return cal_texts, {"source": str(zeroshot.CAL_DATA.name)}
        from slicegpt import TeacherTextConfig, read_teacher_text, write_teacher_text

        config = TeacherTextConfig(tokens=self.budget(), **self.settings["teacher_text"])
        path = self.teacher_text_path()
        start = time.perf_counter()
        summary = write_teacher_text(teacher, tokenizer, path, config, "smollm2-135m", cal_texts)
        summary["seconds_this_run"] = round(time.perf_counter() - start, 1)
        return [r["text"] for r in read_teacher_text(path, config.tokens)], {"source": f"teacher_text:{path.name}",
                                                                             **summary}

    def borrowed_zeroshot(self, name: str, task: str) -> dict | None:
        """zeroshot.py's row for the same model and task at the same limit, or None."""
        model = ZEROSHOT_MODELS.get(name)
        if self.quick or model is None:
            return None
        for row in reversed(zeroshot.read_rows(zeroshot.ROWS)):
            if row["model"] == model and row["task"] == task and row["limit"] == self.settings["zeroshot_limit"]:
                return {"metrics": row["metrics"], "limit": row["limit"], "versions": row.get("versions"),
                        "seconds": row["seconds"], "borrowed_from": {"file": zeroshot.ROWS.name, "model": model,
                                                                    "commit": row["commit"],
                                                                    "finished": row["finished"]}}
        return None

    def run(self, names: list[str], zeroshot_on: bool) -> None:
        import torch

        from slicegpt.evaluation.zeroshot import evaluate_zeroshot
        from slicegpt.io.report import versions
        from slicegpt.sizing.counts import count_parameters

        torch.set_num_threads(self.threads)
        cal_texts = self.cal_texts()
        meta = {"threads": self.threads, "commit": zeroshot.git_commit(), "quick": self.quick}
        evals = ["train", *CORPORA] + ([f"zeroshot:{t}" for t in self.settings["tasks"]] if zeroshot_on else [])
        for name in names:
            spec = self.spec(name)
            key = json.dumps(spec, sort_keys=True)
            done = {(r["recipe"], r["eval"]) for r in zeroshot.read_rows(self.rows)
                    if json.dumps(r["spec"], sort_keys=True) == key}
            todo = [e for e in evals if (name, e) not in done and (e != "train" or "data" in spec["recipe"])]
            if not todo:
                print(f"{name}: all measured", file=sys.stderr)
                continue
            model, tokenizer, train = self.build(name, spec, cal_texts)
            model.eval()
            params = count_parameters(model)
            for evaluation in todo:
                start = time.perf_counter()
                row = {"recipe": name, "eval": evaluation, "spec": spec, "params": params, **meta}
                if evaluation == "train":
                    row |= train
                elif evaluation in CORPORA:
                    from slicegpt import perplexity

                    ppl = self.settings["ppl"]
                    row["ppl"] = perplexity(model, tokenizer, corpus_texts(evaluation), chunks=ppl["chunks"],
                                            seqlen=ppl["seqlen"], progress=False)["ppl"]
                    row["ppl_settings"] = ppl
                elif (borrowed := self.borrowed_zeroshot(name, evaluation.split(":", 1)[1])) is not None:
                    row |= borrowed
                else:
                    task = evaluation.split(":", 1)[1]
                    scores = evaluate_zeroshot(model, tokenizer, [task], limit=self.settings["zeroshot_limit"],
                                               batch_size=8)
                    row["metrics"] = scores["tasks"][task]
                    row["limit"] = self.settings["zeroshot_limit"]
                    row["versions"] = versions()
                row["seconds"] = row.get("seconds", round(time.perf_counter() - start, 1))
                row["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
                zeroshot.append_row(self.rows, row)
                shown = row.get("ppl") or row.get("metrics", {}).get(zeroshot.paper_metric(evaluation.split(":")[-1])) \
                    if evaluation != "train" else f"{row['tokens_trained']:,} tokens in {row['seconds']} s"
                print(f"{name} {evaluation}: {shown}", file=sys.stderr)
            del model


def checkpoint_step(directory: Path) -> int:
    """The step a training checkpoint in `directory` holds (0 without one)."""
    from slicegpt.recovery.checkpoint import CHECKPOINT_FILE

    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        return 0
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return int(handle.metadata()["step"])


def latest_rows(rows: list[dict]) -> dict[str, dict[str, dict]]:
    latest: dict[str, dict[str, dict]] = {}
    for row in rows:
        latest.setdefault(row["recipe"], {})[row["eval"]] = row
    return latest


def summary_table(rows: list[dict], tasks: list[str]) -> str:
    """Perplexity (x dense) on the three corpora, zero-shot retention above chance, tokens and time."""
    latest = latest_rows(rows)
    dense = latest.get("dense", {})

    def above_chance(recipe_rows: dict) -> float | None:
        values = [recipe_rows.get(f"zeroshot:{t}") for t in tasks]
        if not all(values):
            return None
        gains = [v["metrics"][zeroshot.paper_metric(t)] - zeroshot.CHANCE[t] for v, t in zip(values, tasks)]
        return sum(gains) / len(tasks)

    dense_chance = above_chance(dense)
    header = f"{'recipe':<19}" + "".join(f"{c:>22}" for c in CORPORA) + f"{'zero-shot retain':>18}" \
        f"{'tokens':>10}{'train s':>9}"
    lines = [header]
    for name, recipe_rows in latest.items():
        cells = []
        for corpus in CORPORA:
            row = recipe_rows.get(corpus)
            if row is None:
                cells.append(f"{'-':>22}")
                continue
            ratio = row["ppl"] / dense[corpus]["ppl"] if corpus in dense else float("nan")
            cells.append(f"{row['ppl']:>13.2f} ({ratio:.2f}x)")
        chance = above_chance(recipe_rows)
        retain = f"{100 * chance / dense_chance:>17.0f}%" if chance is not None and dense_chance else f"{'-':>18}"
        train = recipe_rows.get("train")
        tokens = f"{train['tokens_trained']:>10,}" if train else f"{'-':>10}"
        seconds = f"{train['seconds_estimate']:>9.0f}" if train else f"{'-':>9}"
        label = name + (f" ({train['spec']['recipe'].get('from')})" if train and train["spec"]["recipe"].get("from")
                        else "")
        lines.append(f"{label:<19}" + "".join(cells) + retain + tokens + seconds)
    return "\n".join(lines)


def measure(threads: int, out: Path) -> dict:
    """Per-token throughput of each kind of training step and of teacher sampling, on small settings.

    The rates are also given scaled to a quiet machine: a dense body forward timed here, against
    the same forward in protocol P on the quiet machine."""
    import copy

    import torch

    from slicegpt import FinetuneConfig, load_model
    from slicegpt.recovery import distill
    from slicegpt.recovery.finetune import decoder_parameters, lora_targets
    from slicegpt.recovery.teacher_text import sample

    torch.set_num_threads(threads)
    teacher, tokenizer = load_model("smollm2-135m")
    ids = torch.randint(100, 40000, (1, 512), generator=torch.Generator().manual_seed(0))
    result = {"threads": threads, "batch": list(ids.shape), "commit": zeroshot.git_commit(),
              "date": datetime.date.today().isoformat()}

    def timed(label: str, step, repeats: int = 1) -> float:
        step()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        seconds = (time.perf_counter() - start) / repeats
        print(f"{label}: {seconds:.1f} s", file=sys.stderr)
        return seconds

    with torch.no_grad():
        forward = timed("dense forward, 1 x 2048",
                        lambda: distill.final_hidden(teacher, torch.randint(100, 40000, (1, 2048))))
    result["dense_forward_tokens_per_s"] = 2048 / forward
    from peft import LoraConfig, get_peft_model

    config = FinetuneConfig()
    student = get_peft_model(copy.deepcopy(teacher), LoraConfig(r=32, lora_alpha=10, lora_dropout=0.05,
                                                                 target_modules=lora_targets(teacher)))
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    base = student.get_base_model()

    def step(loss_fn):
        def run():
            loss = loss_fn()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    seconds = {
        "lm_lora_step": timed("LM loss, LoRA",
                              step(lambda: student(input_ids=ids, labels=ids, use_cache=False).loss)),
        "kl_lora_step": timed("KL, LoRA",
                              step(lambda: distill.distill_loss(base, teacher, ids, 0.0, config.kl_chunk)[0])),
    }
    full = copy.deepcopy(teacher)
    for p in full.parameters():
        p.requires_grad_(False)
    weights = list(decoder_parameters(full).values())
    for p in weights:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(weights, lr=1e-5)
    seconds["kl_full_step"] = timed("KL, full", step(lambda: distill.distill_loss(full, teacher, ids, 0.0,
                                                                                   config.kl_chunk)[0]))
    del full, optimizer
    new_tokens, batch = 16, 16
    prompts = torch.full((batch, 1), tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0)
    seconds["generate"] = timed("teacher sampling", lambda: sample(teacher, prompts, new_tokens, 1.0, 0.95,
                                                                   torch.Generator().manual_seed(0), None))
    rates = {k: ids.numel() / v for k, v in seconds.items() if k != "generate"}
    rates["generate"] = batch * new_tokens / seconds["generate"]
    scale = QUIET_FORWARD_TOKENS_PER_S / result["dense_forward_tokens_per_s"]
    result |= {"seconds": seconds, "tokens_per_s": rates, "quiet_scale": scale,
               "quiet_estimate": {"tokens_per_s": {k: v * scale for k, v in rates.items()},
                                  "hours_for_budget": {k: BUDGET_TOKENS / (v * scale) / 3600 for k, v in rates.items()},
                                  "budget_tokens": BUDGET_TOKENS},
               "note": "generate: batch 16, 16 new tokens from the beginning-of-text token, nucleus 0.95, KV cache; "
                       "steps: batch 1 x 512, LoRA r 32 or every decoder weight, AdamW"}
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, from: " + ", ".join(RECIPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    parser.add_argument("--no-zeroshot", action="store_true", help="perplexities and training only")
    parser.add_argument("--rows", default=None, help="JSON-lines file of results (appended to)")
    parser.add_argument("--summary", action="store_true", help="only print the table from the rows so far")
    parser.add_argument("--measure", action="store_true", help="time the steps and sampling behind the budget")
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.threads, THROUGHPUT), indent=2))
        return
    rows = Path(args.rows) if args.rows else ROWS.with_name("distill_quick.jsonl") if args.quick else ROWS
    names = [n for n in args.recipes.split(",") if n]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        sys.exit(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    bench = Bench(args.quick, rows, args.threads)
    if not args.summary:
        bench.run(names, not args.no_zeroshot)
    print(summary_table(zeroshot.read_rows(rows), bench.settings["tasks"]))


if __name__ == "__main__":
    main()
