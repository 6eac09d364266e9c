"""Zero-shot accuracy through lm-evaluation-harness, run on the in-memory model.

The tasks are lm-eval's own definitions: prompts, choices, metrics and document
processing all come from lm-eval. Where a local copy of a task's data exists, the small
YAML file for that task in `evaluation/tasks/` `include`s lm-eval's task file and swaps
only the data source (`dataset_path: json` plus `data_files`); without one, lm-eval loads
the hub dataset exactly as it always does.

The data directory is `$SLICEGPT_DATA_DIR`, else `../shared/data` next to a source
checkout of this repository, else none (the hub).
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import tempfile
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import yaml

from slicegpt.errors import SliceGPTError
from slicegpt.tasks import paper_metric
from slicegpt.checks import check_zeroshot_values

TASK_DIR = Path(__file__).parent / "tasks"
DATA_DIR_ENV = "SLICEGPT_DATA_DIR"
# Closed-form stderrs serve acc and acc_norm; only LAMBADA's perplexity is bootstrapped.
BOOTSTRAP_ITERS = 1000


def available_tasks() -> list[str]:
    return sorted(path.stem for path in TASK_DIR.glob("*.yaml"))


def parse_tasks(spec: str | list[str]) -> list[str]:
    """Task names from "piqa,arc_easy" or a list, checked before any model work."""
    names = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else [t.strip() for t in spec]
    names = [t for t in names if t]
    if not names:
        raise SliceGPTError(f"no zero-shot tasks given; available: {', '.join(available_tasks())}")
    unknown = [t for t in names if t not in available_tasks()]
    if unknown:
        raise SliceGPTError(f"unknown zero-shot task(s) {', '.join(unknown)}; available: "
                            f"{', '.join(available_tasks())}")
    return list(dict.fromkeys(names))


def repository_data_dir() -> Path | None:
    """`../shared/data` relative to the repository, when slicegpt runs from a source checkout."""
    src = Path(__file__).resolve().parents[2]
    if src.name != "src":
        return None
    return src.parent.parent / "shared" / "data"


def find_data_dir(explicit: str | Path | None = None) -> Path | None:
    """Where local task data lives, or None for the hub."""
    if explicit is not None or os.environ.get(DATA_DIR_ENV):
        path = Path(explicit if explicit is not None else os.environ[DATA_DIR_ENV])
        if not path.is_dir():
            origin = "--data-dir" if explicit is not None else f"${DATA_DIR_ENV}"
            raise SliceGPTError(f"data directory not found: {path} (from {origin})")
        return path
    repo = repository_data_dir()
    return repo if repo is not None and repo.is_dir() else None


LM_EVAL_MISSING = "zero-shot evaluation needs lm-evaluation-harness: pip install 'slicegpt[eval]'"


def lm_eval_tasks_dir() -> Path:
    try:
        import lm_eval.tasks
    except ImportError:
        raise SliceGPTError(LM_EVAL_MISSING) from None
    return Path(lm_eval.tasks.__file__).parent


def local_task_config(task: str, data_dir: Path) -> dict:
    """Our YAML for `task` with `include` and data files made absolute; the files must exist."""
    config = yaml.safe_load((TASK_DIR / f"{task}.yaml").read_text())
    config["include"] = str(lm_eval_tasks_dir() / config["include"])
    files = config["dataset_kwargs"]["data_files"]
    for split, relative in files.items():
        path = (data_dir / relative).resolve()
        if not path.is_file():
            raise SliceGPTError(f"data file for task {task} not found: {path} "
                                f"(looked in data directory {data_dir}; set ${DATA_DIR_ENV} to change it)")
        files[split] = str(path)
    return config


def check_task_data(tasks: list[str], data_dir: str | Path | None = None) -> Path | None:
    """Fail early, naming the path, if a task's local data file is missing; the data directory or None."""
    local = find_data_dir(data_dir)
    if local is not None:
        for task in tasks:
            local_task_config(task, local)
    return local


def write_task_files(tasks: list[str], data_dir: Path | None, workdir: Path) -> tuple[list[str], dict]:
    """lm-eval task specs (YAML paths, or plain names for the hub) and where each task's data comes from."""
    specs, sources = [], {}
    for task in tasks:
        if data_dir is None:
            specs.append(task)
            sources[task] = "hub"
            continue
        config = local_task_config(task, data_dir)
        path = workdir / f"{task}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        specs.append(str(path))
        sources[task] = list(config["dataset_kwargs"]["data_files"].values())[0]
    return specs, sources


def build_tasks(manager, specs: list[str], sources: dict) -> list:
    """lm-eval Task objects, their data loaded; a data problem is reported as such, before the model runs."""
    try:
        return list(manager.load(specs)["tasks"].values())
    except Exception as error:  # datasets and the hub raise many kinds; the user needs the message
        where = ", ".join(sorted(set(sources.values())))
        hint = f" (no local data directory: set ${DATA_DIR_ENV} for offline use)" if "hub" in sources.values() else ""
        raise SliceGPTError(f"cannot load zero-shot task data from {where}: {error}{hint}") from None


@contextmanager
def quiet_lm_eval():
    """lm-eval warns that it was handed a model object (what we mean to do), and prints
    progress to stdout; send that to stderr, so stdout stays parseable (`--json`)."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        logger.setLevel(level)


def task_metrics(raw: dict) -> dict:
    """lm-eval's per-task row ("acc,none": ...) as {"acc": ..., "acc_stderr": ...}."""
    metrics = {}
    for key, value in raw.items():
        metric, _, filter_name = key.partition(",")
        if filter_name == "none":
            metrics[metric] = value
    return metrics


def evaluate_zeroshot(model, tokenizer, tasks: str | list[str], limit: int | None = None, batch_size: int = 1,
                      data_dir: str | Path | None = None) -> dict:
    """Zero-shot metrics of `model` on `tasks`, per task as lm-eval names them, plus the paper's average."""
    # The rules `slicegpt eval` checks --limit and --batch-size by; lm-eval's "auto" batch sizes pass.
    check_zeroshot_values(limit, None if isinstance(batch_size, str) else batch_size)
    tasks = parse_tasks(tasks)
    local = find_data_dir(data_dir)
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise SliceGPTError(LM_EVAL_MISSING) from None

    with tempfile.TemporaryDirectory(prefix="slicegpt-tasks-") as workdir:
        specs, sources = write_task_files(tasks, local, Path(workdir))
        # Local tasks load by path, so lm-eval need not index its thousands of built-in tasks.
        manager = TaskManager(include_defaults=local is None)
        with quiet_lm_eval():
            built = build_tasks(manager, specs, sources)
            # HFLM may set a pad token on the tokenizer it gets; keep the caller's untouched.
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=batch_size)
            output = simple_evaluate(model=lm, tasks=built, limit=limit, task_manager=manager, log_samples=False,
                                     bootstrap_iters=BOOTSTRAP_ITERS)
    model.eval()
    results = {}
    for task in tasks:
        metrics = task_metrics(output["results"][task])
        metrics["samples"] = output["n-samples"][task]["effective"]
        metrics["data"] = sources[task]
        results[task] = metrics
    return {
        "tasks": results,
        "average": average(results),
        "average_metric": {task: paper_metric(task) for task in tasks},
        "limit": limit,
        "num_fewshot": 0,
    }


def average(results: dict) -> float:
    """The paper's average: acc_norm per task, plain acc for WinoGrande and LAMBADA."""
    return sum(metrics[paper_metric(task)] for task, metrics in results.items()) / len(results)


def format_table(columns: dict[str, dict]) -> str:
    """A text table of the paper's metric per task, one column per result (e.g. dense, sliced)."""
    names = list(columns)
    tasks = list(next(iter(columns.values()))["tasks"])
    width = max(len(t) + len(paper_metric(t)) + 3 for t in [*tasks, "average"])
    lines = [f"{'task (metric)':<{width}}" + "".join(f"{n:>10}" for n in names)]
    for task in tasks:
        label = f"{task} ({paper_metric(task)})"
        lines.append(f"{label:<{width}}" + "".join(f"{100 * columns[n]['tasks'][task][paper_metric(task)]:>10.2f}"
                                                     for n in names))
    lines.append(f"{'average':<{width}}" + "".join(f"{100 * columns[n]['average']:>10.2f}" for n in names))
    return "\n".join(lines)
