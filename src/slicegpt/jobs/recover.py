"""The recovery job: fine-tune a sliced checkpoint and write the result as a new one.

It loads the slice (and the dense teacher, where the loss or the training text needs one),
has the teacher write its text for data "teacher" (or reuses it), measures perplexity and
zero-shot accuracy before and after where asked, trains (recovery/finetune.py: LoRA merged
back, or every decoder weight; the LM loss or the KL from the teacher), and saves the
checkpoint with the slice's report extended by the run, its loss curve and plots. Training
checkpoints go beside the output, so the same job continues a stopped run. `recover` runs
it from a `RecoverConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from slicegpt.errors import SliceGPTError
from slicegpt.evaluation.perplexity import perplexity
from slicegpt.evaluation.plots import report_plots
from slicegpt.evaluation.zeroshot import check_task_data, evaluate_zeroshot
from slicegpt.io.checkpoint import REPORT_FILE, check_output_dir, save_sliced
from slicegpt.io.data import load_texts
from slicegpt.io.models import is_sliced_dir, load_model
from slicegpt.io.report import versions
from slicegpt.jobs.progress import say, timed
from slicegpt.recovery import teacher_text
from slicegpt.recovery.distill import check_same_tokenizer
from slicegpt.recovery.finetune import FinetuneConfig, check_usable_text, finetune
from slicegpt.sizing.counts import count_parameters


@dataclass
class RecoverConfig:
    """One recovery run: the sliced checkpoint `model`, trained as `training` says, written to `out`.

    With `training.data == "teacher"` the teacher writes the training text as
    `teacher_text_config` says (None: `teacher_text_settings(training)`) into `teacher_text_file`
    (None: beside `out`, named by the teacher and the settings). The training state is saved every
    `checkpoint_every` steps. Perplexity on `ppl_data` (with `eval_ppl`) and zero-shot accuracy on
    `zeroshot_tasks` are measured before and after training."""

    model: str
    out: str
    training: FinetuneConfig = field(default_factory=FinetuneConfig)
    checkpoint_every: int = 50
    teacher_text_config: teacher_text.TeacherTextConfig | None = None
    teacher_text_file: str | None = None
    eval_ppl: bool = False
    ppl_data: str = "wikitext2"
    ppl_seqlen: int = 2048
    ppl_chunks: int | None = None
    ppl_batch_size: int = 1
    zeroshot_tasks: list[str] | None = None
    zeroshot_limit: int | None = None
    zeroshot_batch_size: int = 8
    data_dir: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    overwrite: bool = False


@dataclass
class RecoverResult:
    """What a recovery run wrote: the checkpoint `out`, made from `source`, and its report,
    whose "finetune" entry records this run."""

    source: Path
    out: Path
    report: dict


def teacher_text_settings(training: FinetuneConfig, **given) -> teacher_text.TeacherTextConfig:
    """How the teacher writes for data "teacher": the settings `given`, else as many tokens as the
    training reads once, sampled with the training's seed."""
    tokens = training.steps * training.batch_size * training.seqlen
    return teacher_text.TeacherTextConfig(**{"tokens": tokens, **given}, seed=training.seed)


def source_report(directory: Path) -> dict:
    path = directory / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def teacher_name(teacher: str | None, source: Path) -> str:
    """`teacher`, or the model the slice's report says it was made from."""
    if teacher:
        return teacher
    name = source_report(source).get("config", {}).get("model")
    if not name:
        raise SliceGPTError(f"{source} does not record the model it was made from; name the teacher with --teacher")
    return name


def calibration_source(source: Path) -> str | None:
    """The calibration text the slice was made with, for the openings of teacher prompts."""
    cal = source_report(source).get("config", {}).get("cal_data")
    return cal if cal and cal != "teacher" else "wikitext2"


def teacher_data(config: RecoverConfig, settings: teacher_text.TeacherTextConfig, teacher, tokenizer, name: str,
                 source: Path) -> tuple[list[str], dict]:
    """The teacher's text for data "teacher", written or resumed; (texts, summary)."""
    out = Path(config.out)
    path = Path(config.teacher_text_file) if config.teacher_text_file else \
        teacher_text.default_path(out.parent, name, settings)
    opening_source = calibration_source(source)
    openings = load_texts(opening_source, split="train") if settings.prompts != "bos" and opening_source else None
    say(f"teacher text: {path}")
    summary = teacher_text.write_teacher_text(teacher, tokenizer, path, settings, name, openings)
    return [row["text"] for row in teacher_text.read_teacher_text(path, settings.tokens)], summary


def recover(config: RecoverConfig) -> RecoverResult:
    """Run one recovery: every setting and input is checked before a model is loaded."""
    source, out = Path(config.model), Path(config.out)
    if not source.is_dir() or not (is_sliced_dir(str(source)) or (source / REPORT_FILE).is_file()):
        raise SliceGPTError(f"{config.model} is not a sliced checkpoint directory (slice a model first)")
    check_output_dir(out, config.overwrite)
    if config.checkpoint_every < 1:
        raise SliceGPTError(f"checkpoint-every must be at least 1, got {config.checkpoint_every}")
    if config.zeroshot_tasks:
        check_task_data(config.zeroshot_tasks, config.data_dir)
    training = config.training
    from_teacher = training.data == "teacher"
    texts = None
    if not from_teacher:
        texts = load_texts(training.data, split="train")
        check_usable_text(texts, training.data)
    heldout_texts = load_texts(training.heldout_data, split="test") if training.heldout_data else None
    ppl_texts = load_texts(config.ppl_data, split="test") if config.eval_ppl else None
    needs_teacher = training.distill or from_teacher
    text_settings = (config.teacher_text_config or teacher_text_settings(training)) if from_teacher else None
    training = dataclasses.replace(training, teacher=teacher_name(training.teacher, source) if needs_teacher else None)

    timings: dict[str, float] = {}
    with timed(timings, "load"):
        model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
        teacher = None
        if needs_teacher:
            teacher, teacher_tokenizer = load_model(training.teacher, dtype=config.dtype, device=config.device)
            check_same_tokenizer(tokenizer, teacher_tokenizer, training.teacher)
    text_summary = None
    if from_teacher:
        with timed(timings, "teacher_text"):
            texts, text_summary = teacher_data(config, text_settings, teacher, tokenizer, training.teacher, source)
        check_usable_text(texts, "teacher")
        training = dataclasses.replace(training, data=f"teacher ({text_summary['path']})")
        if not training.distill:
            teacher = None  # the LM loss on the teacher's text needs the teacher no more

    def measure(stage: str) -> None:
        if ppl_texts is not None:
            with timed(timings, f"ppl_{stage}"):
                ppl[stage] = perplexity(model, tokenizer, ppl_texts, seqlen=config.ppl_seqlen,
                                        chunks=config.ppl_chunks, batch_size=config.ppl_batch_size)["ppl"]
            say(f"perplexity {stage} fine-tuning: {ppl[stage]:.3f}")
        if config.zeroshot_tasks:
            with timed(timings, f"zeroshot_{stage}"):
                zeroshot[stage] = evaluate_zeroshot(model, tokenizer, config.zeroshot_tasks,
                                                    limit=config.zeroshot_limit,
                                                    batch_size=config.zeroshot_batch_size, data_dir=config.data_dir)
            say(f"zero-shot average {stage} fine-tuning: {100 * zeroshot[stage]['average']:.2f}")

    ppl, zeroshot = {}, {}
    measure("before")
    partial = out.parent / f".{out.name}.rft-partial"  # training checkpoints; removed once the output is written
    with timed(timings, "finetune"):
        model, record = finetune(model, tokenizer, texts, training, checkpoint_dir=partial,
                                 checkpoint_every=config.checkpoint_every, teacher=teacher,
                                 heldout_texts=heldout_texts)
    if text_summary is not None:
        record["data"] |= {"source": "teacher", "teacher_text": text_summary}
    measure("after")

    losses = record.pop("losses")
    kls = record.pop("kl_losses", None)
    report = source_report(source)
    report.setdefault("config", {"model": config.model, **getattr(model.config, "slicing", {}).get("config", {})})
    report["finetune"] = {
        "source": str(source),
        "config": {**training.to_dict(), **({} if training.full else {"lora": {
            "r": training.lora_r, "alpha": training.lora_alpha, "dropout": training.lora_dropout,
            "targets": record["lora_targets"]}})},
        **record,
        "params_after": count_parameters(model),
        "ppl": ppl,
        "ppl_config": {"ppl_data": config.ppl_data, "ppl_seqlen": config.ppl_seqlen, "ppl_chunks": config.ppl_chunks},
        "zeroshot": zeroshot,
        "loss_curve": "loss_curve.json",
        "timings_s": timings,
        "versions": versions(),
    }
    curve = {"step": list(range(1, len(losses) + 1)), "loss": losses, "objective": record["objective"],
             "heldout": record["heldout_losses"], **({"kl": kls} if kls else {})}
    save_sliced(model, tokenizer, out, report=report, overwrite=config.overwrite,
                extra_files=output_files(source, report, curve, losses))
    shutil.rmtree(partial, ignore_errors=True)
    return RecoverResult(source, out, report)


def output_files(source: Path, report: dict, curve: dict, losses: list[float]) -> dict[str, str | bytes]:
    """The files written beside the weights: the loss curve, the plots, and the slice's spectra."""
    spectra_path = source / "spectra.json"
    spectra = json.loads(spectra_path.read_text()) if spectra_path.is_file() else None
    files = {"loss_curve.json": json.dumps(curve) + "\n", **report_plots(report, spectra, losses)}
    if spectra is not None:
        files["spectra.json"] = spectra_path.read_text()
    return files
