"""Recovery fine-tuning (RFT): LoRA on a sliced model, merged back into its weights.

The adapters go on the attention and MLP linears of every decoder layer, found by the
names the checkpoint's `config.slicing["family"]` records (q/k/v/o, gate/up/down for the
Llama family; a plain export takes them from the family registry). The shortcut matrices stay frozen: they are the change of basis between
consecutive blocks' principal components, and the linears on either side of them already
receive adapters that can absorb any correction, so adapting them too would add
parameters without adding a direction of change the others lack. The LM head and the
embeddings stay frozen as in the paper.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from slicegpt.architectures.families import family_for
from slicegpt.architectures.modeling_sliced import layer_family
from slicegpt.errors import SliceGPTError
from slicegpt.io.data import tokenize_joined


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

    def __post_init__(self) -> None:
        for name in ("steps", "seqlen", "batch_size", "lora_r"):
            if getattr(self, name) < 1:
                raise SliceGPTError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise SliceGPTError(f"lr must be positive, got {self.lr}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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


def finetune(model: nn.Module, tokenizer, texts: list[str], config: FinetuneConfig,
             progress: bool = True) -> tuple[nn.Module, dict]:
    """LoRA-fine-tune a sliced model on `texts` and merge the adapters; (merged model, training record)."""
    from peft import LoraConfig, get_peft_model

    stream = training_stream(tokenizer, texts, config.seqlen, config.data)
    targets = lora_targets(model)
    torch.manual_seed(config.seed)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets, bias="none")
    peft_model = get_peft_model(model, lora)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(config))
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)

    losses: list[float] = []
    peft_model.train()
    bar = tqdm(range(config.steps), desc="Fine-tuning", unit="step", disable=not progress)
    for _ in bar:
        starts = torch.randint(0, len(stream) - config.seqlen + 1, (config.batch_size,), generator=generator)
        batch = torch.stack([stream[s:s + config.seqlen] for s in starts.tolist()]).to(device)
        loss = peft_model(input_ids=batch, labels=batch, use_cache=False).loss
        if not math.isfinite(loss.item()):
            raise SliceGPTError(f"fine-tuning loss became {loss.item()} at step {len(losses) + 1} (lower --lr)")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")

    merged = peft_model.merge_and_unload()
    merged.eval()
    tail = losses[-max(1, len(losses) // 10):]
    record = {
        "losses": losses,
        "loss_first": losses[0],
        "loss_last": sum(tail) / len(tail),
        "trainable_params": sum(p.numel() for p in params),
        "tokens_seen": config.steps * config.batch_size * config.seqlen,
        "data_tokens": len(stream),
        "lora_targets": layer_linears(merged),
    }
    return merged, record
