"""The README.md model card of a sliced checkpoint, written from its report.

Every number in the card comes from the report (slicing_report.json) next to it, so the
two cannot disagree. The YAML front matter is what the hub reads (base_model, tags).
"""

from __future__ import annotations

import yaml

from slicegpt.tasks import paper_metric


def fmt_ppl(value: float) -> str:
    return f"{value:.3f}"


def fmt_acc(value: float) -> str:
    return f"{100 * value:.2f}"


def front_matter(report: dict) -> str:
    config = report.get("config", {})
    meta = {}
    if config.get("base_model"):
        meta["base_model"] = config["base_model"]
    meta["library_name"] = "transformers"
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["slicegpt", "sliced", "structured-pruning", "compression"]
    if report.get("finetune"):
        meta["tags"] += ["lora", "recovery-fine-tuning"]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines + [""]


def configuration_section(report: dict) -> list[str]:
    config = report.get("config", {})
    keys = ["sparsity", "target_params", "target_ratio", "rotations", "pca", "widths", "refit", "round_to", "cal_data",
            "cal_samples", "cal_seqlen", "cal_batch_size", "seed", "dtype"]
    rows = [[f"`{k}`", f"`{config[k]}`"] for k in keys if config.get(k) is not None]
    return ["## Configuration", "", *_table(["setting", "value"], rows)]


def parameters_section(report: dict) -> list[str]:
    params, widths = report.get("params"), report.get("widths", {})
    if not params:
        return []
    rows = [
        ["dense model", f"{params['dense']:,}"],
        ["sliced model", f"{params['sliced']:,} ({params['sliced'] / params['dense']:.3f}x dense)"],
    ]
    added = "the output side is"
    if params.get("shortcuts"):
        rows.append(["of which shortcut matrices", f"{params['shortcuts']:,}"])
        added = "the shortcut matrices and the output side are"
    rows.append(["of which output side beyond the embeddings (untied head or final map)", f"{params['head']:,}"])
    lines = ["## Parameters", "", f"Counted on the model, tied tensors once; {added} what slicing adds.", "",
             *_table(["", "parameters"], rows)]
    if widths:
        layer_widths = sorted({layer[key] for layer in widths.get("layers", []) for key in ("in", "mid", "out")
                               if key in layer})
        lines += [f"Residual width: embedding {widths.get('embedding')}, layers "
                  f"{', '.join(map(str, layer_widths))}, head input {widths.get('head_in')}.", ""]
    return lines


def ppl_section(ppl: dict, config: dict, title: str = "Perplexity") -> list[str]:
    if not ppl:
        return []
    rows = [[name, fmt_ppl(value)] for name, value in ppl.items()]
    where = f"{config.get('ppl_data', 'wikitext2')}, chunks of {config.get('ppl_seqlen', 2048)} tokens"
    if config.get("ppl_chunks"):
        where += f", first {config['ppl_chunks']} chunks"
    return [f"### {title}", "", f"On {where}.", "", *_table(["model", "perplexity"], rows)]


def zeroshot_section(zeroshot: dict, title: str = "Zero-shot accuracy") -> list[str]:
    columns = {name: result for name, result in (zeroshot or {}).items() if result}
    if not columns:
        return []
    first = next(iter(columns.values()))
    tasks = list(first["tasks"])
    header = ["task", "metric", *columns]
    rows = []
    for task in tasks:
        for metric in ("acc", "acc_norm"):
            if metric in first["tasks"][task]:
                mark = " (averaged)" if metric == paper_metric(task) else ""
                rows.append([task, metric + mark, *(fmt_acc(c["tasks"][task][metric]) for c in columns.values())])
    rows.append(["**average**", "paper's choice", *(fmt_acc(c["average"]) for c in columns.values())])
    limit = first.get("limit")
    sample_note = f"the first {limit} examples of each task" if limit else "each task's full evaluation split"
    return [f"### {title}", "", f"lm-evaluation-harness, 0-shot, {sample_note}; accuracy in %. The average is "
            "the paper's: acc_norm, except acc for WinoGrande and LAMBADA.", "", *_table(header, rows)]


def finetune_section(finetune: dict) -> list[str]:
    if not finetune:
        return []
    config = finetune["config"]
    lora = config.get("lora")
    if lora:
        trained = (f"LoRA (rank {lora['r']}, alpha {lora['alpha']}, dropout {lora['dropout']}) on the attention and "
                   f"MLP linears ({', '.join(lora['targets'])}), merged back into the weights.")
    else:
        trained = "Every weight of the decoder layers trained (embeddings and head frozen)."
    objective = finetune.get("objective", "next-token loss")
    if config.get("distill"):
        objective += f", distilled from `{config['teacher']}`"
    data = finetune.get("data")
    text = (f" The training text: {data['source']}, {data['tokens']:,} tokens, sha256 `{data['sha256'][:16]}`."
            if data else "")
    lines = ["## Recovery fine-tuning", "",
             f"{trained} Loss: {objective}. {config['steps']} steps of "
             f"{config['batch_size']} x {config['seqlen']} tokens from `{config['data']}`, learning rate "
             f"{config['lr']}.{text} Loss {finetune['loss_first']:.4f} at the first step, "
             f"{finetune['loss_last']:.4f} (mean of the last steps) at the end.", ""]
    lines += ppl_section(finetune.get("ppl", {}), finetune.get("ppl_config", {}), "Perplexity before and after")
    lines += zeroshot_section(finetune.get("zeroshot", {}), "Zero-shot accuracy before and after")
    return lines


def size_sentence(config: dict) -> str:
    if config.get("target_ratio") is not None:
        return f"Sized to {config['target_ratio']} x the dense model's parameters."
    if config.get("target_params") is not None:
        return f"Sized to a budget of {config['target_params']:,} parameters."
    if config.get("widths") == "variance":
        return (f"Per-point widths keep an equal share of each point's variance, at the real size of removing "
                f"{config.get('sparsity', 0.0):.0%} of the residual width.")
    if config.get("widths") == "embedding":
        return f"{config.get('sparsity', 0.0):.0%} of the embedding width was removed."
    return f"{config.get('sparsity', 0.0):.0%} of the residual width was removed."


LAYOUTS = {
    "model": "One basis serves the whole residual stream",
    "block": "Every attention and MLP block reads the stream in a basis of its own",
    "layer": "Each layer reads the stream in a basis of its own",
}


def layout_sentence(config: dict, params: dict) -> str:
    if config.get("widths") == "embedding":
        return ("Only the embeddings were sliced: the embedding table (and the head tied to it) is narrower, one "
                "map brings the embeddings into the first layer's stream, and every layer keeps its width and "
                "weights (norm scales folded into the weights that read them).")
    rotations = str(config.get("rotations", ""))
    layout = LAYOUTS.get(rotations)
    if layout is None and rotations.startswith("group:"):
        layout = f"Each group of {rotations.split(':', 1)[1]} consecutive layers shares one basis"
    shortcuts = params.get("shortcuts")
    if shortcuts:
        tail = (f"a shortcut matrix on the residual path changes basis where the basis changes "
                f"({shortcuts:,} parameters in all)")
    elif shortcuts == 0:
        tail = "the model carries no shortcut matrices"
    else:
        tail = None
    parts = [p for p in (layout, tail) if p]
    if not parts:
        return ""
    sentence = "; ".join(parts)
    return sentence[0].upper() + sentence[1:] + "."


def method_section(report: dict) -> list[str]:
    """What was done to this model, sentence by sentence from the report: size, layout, PCA, refit, RFT."""
    config = report.get("config", {})
    sentences = [size_sentence(config), layout_sentence(config, report.get("params") or {})]
    if config.get("pca") == "normalized":
        sentences.append("The PCA weighs every token equally (each token's activation scaled to unit root mean square, "
                         "as the RMS norms that read the stream see it).")
    elif config.get("pca") == "raw":
        sentences.append("The PCA is of the raw activations, as in the paper.")
    if config.get("refit"):
        sentences.append("After slicing, each layer's output projections were refit by least squares so that "
                         "the sliced model follows the dense one on the calibration text.")
    finetune = report.get("finetune")
    if finetune:
        how = "of every decoder weight" if finetune["config"].get("full") else "(LoRA, merged back into the weights)"
        what = "Recovery by distillation from the dense model" if finetune["config"].get("distill") else \
            "Recovery fine-tuning"
        sentences.append(f"{what} {how} followed; see below.")
    return [" ".join(s for s in sentences if s), ""]


def usage_section() -> list[str]:
    return ["## Usage", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)',
            'tokenizer = AutoTokenizer.from_pretrained("PATH")',
            "# or, with slicegpt installed and no remote code: slicegpt.load_sliced(\"PATH\")",
            "```", ""]


def model_card(report: dict) -> str:
    config = report.get("config", {})
    name = config.get("base_model") or config.get("model", "Model")
    lines = [f"# {name}, sliced with SliceGPT", "",
             "[SliceGPT](https://arxiv.org/abs/2401.15024) (Ashkboos et al., ICLR 2024) folds every norm into "
             "the neighbouring weights, rotates the residual stream into the principal components of "
             "calibration activations, and removes the least-variance directions; the model stays dense.", "",
             *method_section(report)]
    if config.get("model"):
        lines += [f"Sliced from `{config['model']}`.", ""]
    lines += configuration_section(report)
    lines += parameters_section(report)
    results = ppl_section(report.get("ppl", {}), config) + zeroshot_section(report.get("zeroshot", {}))
    if results:
        lines += ["## Results", "", *results]
    lines += finetune_section(report.get("finetune"))
    lines += usage_section()
    versions = report.get("versions", {})
    if versions:
        lines += ["Made with " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", ""]
    return front_matter(report) + "\n" + "\n".join(lines)
