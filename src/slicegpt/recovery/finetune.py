"""Recovery fine-tuning (RFT): LoRA on a sliced model, merged back into its weights, or every decoder weight.

The adapters go on the attention and MLP linears of every decoder layer, found by the
names the checkpoint's `config.slicing["family"]` records (q/k/v/o, gate/up/down for the
Llama family; a plain export takes them from the family registry). The shortcut matrices stay frozen: they are the change of basis between
consecutive blocks' principal components, and the linears on either side of them already
receive adapters that can absorb any correction, so adapting them too would add
parameters without adding a direction of change the others lack. The LM head and the
embeddings stay frozen as in the paper.

The objective is the next-token loss on the training text, or with `distill` the KL from
the dense teacher (recovery/distill.py), optionally mixed with it. `full` trains every
weight of the decoder layers instead of adapters (the embeddings and head stay frozen, as
Minitron's recovery does), so the two can be compared at equal tokens.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from slicegpt.architectures.families import family_for
from slicegpt.architectures.modeling_sliced import layer_family
from slicegpt.errors import SliceGPTError
from slicegpt.io.data import tokenize_joined
from slicegpt.recovery.distill import check_same_tokenizer, distill_loss, distill_terms
from slicegpt.recovery.checkpoint import load_state, save_state
from slicegpt.recovery.teacher_text import texts_sha256
from slicegpt.validation.options import at_least, fraction, positive, seed_range, text_list


@dataclass
class FinetuneConfig:
    """Defaults after the paper's RFT: LoRA rank 32, alpha 10, dropout 0.05."""

    steps: int = 200
    lr: float = 2e-4
    seqlen: int = 1024
    batch_size: int = 4
    lora_r: int = 32
    lora_alpha: float = 10.0
    lora_dropout: float = 0.05
    warmup_fraction: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 42
    data: str = "wikitext2"
    # The last `heldout_fraction` of the token stream is kept out of training; every
    # `eval_every` steps the loss on up to `heldout_windows` of its windows is recorded.
    heldout_fraction: float = 0.0
    heldout_windows: int = 16
    eval_every: int = 0
    # Distillation: KL(teacher ‖ student), mixed as (1 - lm_weight) KL + lm_weight LM loss;
    # the head is applied to `kl_chunk` positions at a time. `teacher` names the teacher.
    distill: bool = False
    lm_weight: float = 0.0
    kl_chunk: int = 128
    teacher: str | None = None
    # Train every weight of the decoder layers instead of LoRA adapters.
    full: bool = False
    # A second held-out corpus (text the training never sees), measured with the held-out windows.
    heldout_data: str | None = None
    # "bf16": the forward and backward passes compute in bfloat16 under torch.autocast (the
    # weights, their gradients and AdamW's state stay float32). About 2x faster steps on a
    # CPU with AVX-512 BF16 (bench/autocast_step.py); None trains in the model's own dtype.
    autocast: str | None = None

    def __post_init__(self) -> None:
        check_settings(self)

    def to_dict(self) -> dict:
        settings = dataclasses.asdict(self)
        if self.autocast is None:  # absent from checkpoints written before the setting existed
            del settings["autocast"]
        return settings


AUTOCAST = {None: None, "bf16": torch.bfloat16}  # FinetuneConfig.autocast: the dtype the passes compute in


def check_settings(values, name=str) -> None:
    """The ranges of the fine-tuning settings, read from a FinetuneConfig or from the parsed command line
    (the same names); `name` is what a refusal calls a setting (the CLI: its flag)."""
    for field in ("steps", "batch_size", "lora_r", "heldout_windows", "kl_chunk"):
        at_least(values, field, 1, name(field))
    at_least(values, "seqlen", 2, name("seqlen"))  # one token predicts nothing: the loss would be NaN
    at_least(values, "eval_every", 0, name("eval_every"))
    for field in ("lr", "lora_alpha", "max_grad_norm"):
        positive(values, field, name(field))
    for field in ("lora_dropout", "heldout_fraction"):
        fraction(values, field, low_open=False, high_open=True, option=name(field))
    for field in ("lm_weight", "warmup_fraction"):
        fraction(values, field, low_open=False, high_open=False, option=name(field))
    seed_range(values, "seed", name("seed"))
    if getattr(values, "autocast", None) not in AUTOCAST:
        raise SliceGPTError(f"{name('autocast')} must be one of {', '.join(k for k in AUTOCAST if k)}, "
                            f"got {values.autocast!r}")
    heldout = [field for field in ("heldout_fraction", "heldout_data") if getattr(values, field, None)]
    if heldout and getattr(values, "eval_every", 1) < 1:
        raise SliceGPTError(f"{name('eval_every')} must be at least 1, got {values.eval_every}, to measure the "
                            f"held-out text that {name(heldout[0])} asks for")


def check_usable_text(texts: list[str], source: str) -> None:
    """Fail before any model work when the fine-tuning data holds no text at all."""
    if not any(text.strip() for text in texts):
        raise SliceGPTError(f"fine-tuning data {source} has no usable text ({len(texts)} rows, all empty)")


def training_stream(tokenizer, texts: list[str], seqlen: int, source: str = "the data") -> torch.Tensor:
    """The token stream training windows are cut from; long enough for at least one window."""
    check_usable_text(texts, source)
    stream = tokenize_joined(tokenizer, [t for t in texts if t.strip()])
    if len(stream) < seqlen:
        raise SliceGPTError(f"fine-tuning data {source} has {len(stream)} tokens, fewer than one sequence of "
                            f"{seqlen} (lower --seqlen or give more text)")
    return stream


def family_description(model: nn.Module) -> dict:
    """The module names of `model`'s family: from config.slicing, or (a plain export) the registry."""
    slicing = getattr(model.config, "slicing", None)
    if slicing is not None:
        return slicing["family"]

    return family_for(model).to_dict()


def layer_linears(model: nn.Module, index: int = 0) -> list[str]:
    """Paths, inside decoder layer `index`, of the attention and MLP linears that read or write the stream.

    Fused expert tensors (MoE) are not linears and get no adapter; the shortcuts are not
    in these lists.
    """
    family = layer_family(family_description(model), index)
    paths = [*family["attn_inputs"], *family["attn_outputs"], *family["mlp_inputs"], *family["mlp_outputs"]]
    layer = model.get_submodule(family["layers"])[index]
    return [path for path in paths if isinstance(_find(layer, path), nn.Linear)]


def _find(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None  # a bare parameter (fused experts)


def lora_targets(model: nn.Module) -> list[str]:
    """Full module names of every decoder layer's attention and MLP linears (no shortcuts, no head)."""
    family = family_description(model)
    layers = model.get_submodule(family["layers"])
    targets = [f"{family['layers']}.{index}.{path}" for index in range(len(layers))
               for path in layer_linears(model, index)]
    if not targets:
        raise SliceGPTError(f"the {family['name']} family has no linear attention or MLP layers to adapt")
    return targets


def _schedule(config: FinetuneConfig):
    """Linear warm-up, then linear decay to zero."""
    warmup = max(1, int(config.warmup_fraction * config.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (config.steps - step) / max(1, config.steps - warmup))

    return factor


def split_heldout(stream: torch.Tensor, config: FinetuneConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(training stream, held-out windows or None): the held-out part is the stream's tail."""
    if config.heldout_fraction == 0:
        return stream, None
    cut = int(len(stream) * (1 - config.heldout_fraction))
    tail = stream[cut:]
    count = min(config.heldout_windows, len(tail) // config.seqlen)
    if count == 0 or cut < config.seqlen:
        raise SliceGPTError(f"too little text to hold out {config.heldout_fraction} of {len(stream)} tokens in "
                            f"windows of {config.seqlen} and still train")
    return stream[:cut], tail[:count * config.seqlen].view(count, config.seqlen)


@torch.no_grad()
def heldout_loss(model: nn.Module, windows: torch.Tensor, batch_size: int) -> float:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        total += model(input_ids=batch, labels=batch, use_cache=False).loss.item() * len(batch)
    model.train(was_training)
    return total / len(windows)


@torch.no_grad()
def heldout_terms(model: nn.Module, teacher: nn.Module, windows: torch.Tensor, batch_size: int,
                  chunk: int = 128) -> dict:
    """{"loss": next-token loss, "kl": KL from the teacher} on held-out windows."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    kl = lm = 0.0
    for batch in windows.split(batch_size):
        terms = distill_terms(model, teacher, batch.to(device), chunk)
        kl += terms[0].item() * len(batch)
        lm += terms[1].item() * len(batch)
    model.train(was_training)
    return {"loss": lm / len(windows), "kl": kl / len(windows)}


def second_windows(tokenizer, texts: list[str] | None, config: FinetuneConfig) -> torch.Tensor | None:
    """Up to `heldout_windows` windows from the start of a second held-out corpus."""
    if not texts:
        return None
    stream = training_stream(tokenizer, texts, config.seqlen, config.heldout_data or "the second held-out corpus")
    count = min(config.heldout_windows, len(stream) // config.seqlen)
    return stream[:count * config.seqlen].view(count, config.seqlen)


def check_inputs(texts: list[str], heldout_texts: list[str] | None, config: FinetuneConfig) -> None:
    """The texts are lists of strings, and a second held-out corpus is measured at all."""
    text_list(texts, "texts")
    if heldout_texts is not None:
        text_list(heldout_texts, "heldout_texts")
        if config.eval_every < 1:
            raise SliceGPTError("heldout_texts are measured every eval_every steps; set eval_every to at least 1")


def decoder_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter inside the decoder layers (shortcuts included; no embeddings, no head)."""
    prefix = family_description(model)["layers"] + "."
    return {name: p for name, p in model.named_parameters() if name.startswith(prefix)}


def finetune(model: nn.Module, tokenizer, texts: list[str], config: FinetuneConfig, progress: bool = True,
             checkpoint_dir: str | None = None, checkpoint_every: int = 50, teacher: nn.Module | None = None,
             heldout_texts: list[str] | None = None, teacher_tokenizer=None) -> tuple[nn.Module, dict]:
    """Fine-tune a sliced model on `texts`; (fine-tuned model, training record).

    LoRA adapters, merged back at the end, or with `config.full` every decoder weight. With
    `config.distill` the loss is the KL from `teacher` (the dense model, same tokenizer),
    which runs without gradients; a `teacher_tokenizer` given is checked to be the student's.
    `heldout_texts` is a second corpus whose loss joins the held-out curve. With
    `checkpoint_dir`, the trained and optimizer state is saved there every
    `checkpoint_every` steps, and a run finding a checkpoint there continues from it.
    """
    check_inputs(texts, heldout_texts, config)
    if config.distill and teacher is None:
        raise SliceGPTError("distillation needs the teacher model")
    if teacher_tokenizer is not None:
        check_same_tokenizer(tokenizer, teacher_tokenizer, config.teacher or "the teacher")
    stream, heldout = split_heldout(training_stream(tokenizer, texts, config.seqlen, config.data), config)
    second = second_windows(tokenizer, heldout_texts, config)
    if teacher is not None:
        _check_vocabulary(model, teacher)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    torch.manual_seed(config.seed)
    if config.full:
        for p in model.parameters():
            p.requires_grad_(False)
        named = decoder_parameters(model)
        for p in named.values():
            p.requires_grad_(True)
        trained = model
        student = model
    else:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=lora_targets(model), bias="none")
        trained = get_peft_model(model, lora)
        student = trained.get_base_model()  # the adapted model, its own forward (the head apart)
        named = {name: p for name, p in trained.named_parameters() if p.requires_grad}
    params = list(named.values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    data = {"source": config.data, "tokens": len(stream) + (0 if heldout is None else heldout.numel()),
            "sha256": texts_sha256(texts)}
    settings = config.to_dict() | {"data_tokens": len(stream), "data_sha256": data["sha256"]}

    losses: list[float] = []
    kls: list[float] = []
    curve: list[dict] = []
    done = 0
    if checkpoint_dir is not None:
        restored = load_state(Path(checkpoint_dir), named, optimizer, generator, settings)
        if restored is not None:
            done, saved = restored
            losses, curve, kls = saved["losses"], saved["heldout"], saved.get("kl", [])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config), last_epoch=-1)
    with warnings.catch_warnings():  # stepping the schedule alone to catch up warns; it is meant
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(done):  # the schedule is a function of the step alone
            scheduler.step()

    def held(windows: torch.Tensor) -> dict:
        if teacher is not None:
            return heldout_terms(student, teacher, windows, config.batch_size, config.kl_chunk)
        return {"loss": heldout_loss(trained, windows, config.batch_size)}

    def evaluate(step: int) -> None:
        if (heldout is None and second is None) or not config.eval_every:
            return
        if step % config.eval_every == 0 or step == config.steps:
            point = {"step": step}
            if heldout is not None:
                point |= held(heldout)
            if second is not None:
                point |= {f"second_{key}": value for key, value in held(second).items()}
            curve.append(point)

    trained.train()
    if done == 0:
        evaluate(0)
    bar = tqdm(range(done, config.steps), desc="Distilling" if config.distill else "Fine-tuning", unit="step",
               disable=not progress, initial=done, total=config.steps)
    for step in bar:
        starts = torch.randint(0, len(stream) - config.seqlen + 1, (config.batch_size,), generator=generator)
        batch = torch.stack([stream[s:s + config.seqlen] for s in starts.tolist()]).to(device)
        with torch.autocast(device.type, dtype=AUTOCAST[config.autocast] or torch.float32,
                            enabled=config.autocast is not None):
            if config.distill:
                loss, terms = distill_loss(student, teacher, batch, config.lm_weight, config.kl_chunk)
                kls.append(terms["kl"])
            else:
                loss = trained(input_ids=batch, labels=batch, use_cache=False).loss
        if not math.isfinite(loss.item()):
            raise SliceGPTError(f"fine-tuning loss became {loss.item()} at step {len(losses) + 1} (lower --lr)")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        evaluate(step + 1)
        last = curve[-1] if curve else {}
        shown = {"heldout": f"{last.get('kl', last.get('loss', 0.0)):.3f}"} if "kl" in last or "loss" in last else {}
        bar.set_postfix(loss=f"{losses[-1]:.3f}", **shown)
        if checkpoint_dir is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == config.steps):
            save_state(Path(checkpoint_dir), step + 1, named, optimizer, generator,
                       {"losses": losses, "heldout": curve, "kl": kls}, settings)

    if config.full:
        for p in model.parameters():
            p.requires_grad_(False)
        result = model
    else:
        result = trained.merge_and_unload()
    result.eval()
    tail = losses[-max(1, len(losses) // 10):]
    record = {
        "losses": losses,
        "loss_first": losses[0],
        "loss_last": sum(tail) / len(tail),
        "objective": objective(config),
        "heldout_losses": curve,
        "trainable_params": sum(p.numel() for p in params),
        "tokens_seen": config.steps * config.batch_size * config.seqlen,
        "data_tokens": len(stream),
        "data": data,
        "trained": "full" if config.full else "lora",
    }
    if kls:
        record["kl_losses"] = kls
    if not config.full:
        record["lora_targets"] = layer_linears(result)
    return result, record


def objective(config: FinetuneConfig) -> str:
    """The loss in words, for reports."""
    if not config.distill:
        return "next-token loss"
    if config.lm_weight == 0:
        return "KL(teacher || student), T = 1"
    return f"{1 - config.lm_weight:g} x KL(teacher || student) + {config.lm_weight:g} x next-token loss"


def _check_vocabulary(model: nn.Module, teacher: nn.Module) -> None:
    size = model.get_output_embeddings().out_features
    other = teacher.get_output_embeddings().out_features
    if size != other:
        raise SliceGPTError(f"the teacher's vocabulary ({other}) is not the student's ({size}); "
                            "distil from the model the slice was made from")
