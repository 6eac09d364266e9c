"""One distillation step in float32 against bfloat16 autocast (`finetune --autocast bf16`).

The step of bench/distill.py's recipe (b): KL(dense ‖ slice) on 4 x 512 tokens, LoRA rank 32
on the protocol-P 25% slice (zeroshot.py's cached `refit-25`), AdamW. Each setting is warmed
up once, then timed over `--repeats` steps, taking turns; the table gives the median
seconds a step and the ratio, and results/autocast_step.json keeps them with the KL of each
step (what the loss sees in each precision).

    python bench/autocast_step.py [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

import harness
import zeroshot  # the cached slice

OUT = harness.RESULTS / "autocast_step.json"
SETTINGS = {"float32": None, "bf16": "bf16"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=harness.THREADS)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model

    from slicegpt import load_model
    from slicegpt.io.data import load_texts
    from slicegpt.recovery import distill
    from slicegpt.recovery.finetune import AUTOCAST, lora_targets

    torch.set_num_threads(args.threads)
    dense = lambda: load_model(harness.MODEL)  # noqa: E731
    teacher, _ = dense()
    student, _ = zeroshot.build_model("refit-25", dense, load_texts(str(harness.CAL_DATA)))[:2]
    lora = LoraConfig(r=32, lora_alpha=10, lora_dropout=0.05, target_modules=lora_targets(student))
    adapted = get_peft_model(student, lora)
    base = adapted.get_base_model()
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=5e-4)
    ids = torch.randint(100, 40000, (4, 512), generator=torch.Generator().manual_seed(0))

    def step(name: str) -> tuple[float, float]:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=AUTOCAST[SETTINGS[name]] or torch.float32,
                            enabled=SETTINGS[name] is not None):
            loss, terms = distill.distill_loss(base, teacher, ids, 0.0, 128)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start, terms["kl"]

    for name in SETTINGS:  # warm-up
        step(name)
    runs = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):
        for name in SETTINGS:
            runs[name].append(step(name))
    medians = {name: statistics.median(s for s, _ in steps) for name, steps in runs.items()}
    result = {"command": "python bench/autocast_step.py " + " ".join(sys.argv[1:]),
              "date": datetime.date.today().isoformat(), "commit": harness.git_commit(), "threads": args.threads,
              "batch": [4, 512], "median_seconds": medians, "ratio": medians["float32"] / medians["bf16"],
              "steps": {name: [{"seconds": s, "kl": kl} for s, kl in steps] for name, steps in runs.items()}}
    harness.write_json(OUT, result)
    print(f"{'setting':<10}{'median s/step':>15}")
    for name, seconds in medians.items():
        print(f"{name:<10}{seconds:>15.1f}")
    print(f"float32 / bf16: {result['ratio']:.2f}x")


if __name__ == "__main__":
    main()
