"""Distillation from the dense model: the chunked KL, the training loop with it, and the teacher's own text."""

import copy
import functools
import json
import multiprocessing
import re
import time

import pytest
import torch

from slicegpt.cli import main
from slicegpt.errors import SliceGPTError
from slicegpt.io.checkpoint import load_sliced
from slicegpt.io.models import load_model
from slicegpt.recovery import distill, teacher_text

from conftest import TINY_CAL_PPL, WIKITEXT_TEST, WIKITEXT_VALIDATION, full_precision_norms, make_tiny_model

pytest.importorskip("peft")

from slicegpt.recovery import finetune as finetune_module  # noqa: E402


def _ids(vocab: int = 90, shape=(2, 12), seed: int = 3) -> torch.Tensor:
    return torch.randint(3, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_kl_of_a_model_against_itself_is_zero_and_its_gradient_vanishes():
    teacher = make_tiny_model("LlamaForCausalLM", dtype=torch.float64)
    student = full_precision_norms(copy.deepcopy(teacher).train())
    full_precision_norms(teacher)
    kl, _ = distill.distill_terms(student, teacher, _ids(), chunk=5)
    kl.backward()
    assert abs(kl.item()) < 1e-12
    grads = [p.grad.abs().max().item() for p in student.parameters() if p.grad is not None]
    assert grads and max(grads) < 1e-12


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma2ForCausalLM", "GraniteForCausalLM", "CohereForCausalLM"])
def test_chunked_kl_equals_the_unchunked_kl_and_its_gradient(arch):
    """Chunks of 5 positions (the last one short) against the models' own full logits; soft-capping and
    logit scales included."""
    teacher = make_tiny_model(arch, dtype=torch.float64, seed=0)
    student = make_tiny_model(arch, dtype=torch.float64, seed=1)
    ids = _ids()
    chunked, _ = distill.distill_terms(student, teacher, ids, chunk=5)
    chunked.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    whole = distill.kl_unchunked(student, teacher, ids)
    whole.backward()
    assert chunked.item() > 1e-5 and chunked.item() == pytest.approx(whole.item(), rel=1e-10)
    for name, p in student.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[name], p.grad, atol=1e-10), name


def test_the_lm_term_is_the_models_own_loss():
    teacher = make_tiny_model("LlamaForCausalLM", dtype=torch.float64, seed=0)
    student = make_tiny_model("LlamaForCausalLM", dtype=torch.float64, seed=1)
    ids = _ids()
    _, lm = distill.distill_terms(student, teacher, ids, chunk=4)
    assert lm.item() == pytest.approx(student(input_ids=ids, labels=ids).loss.item(), rel=1e-6)  # HF: float32


class _Tokenizer:
    """Whitespace words mod the tiny vocabulary: enough text for training windows, no files."""

    def __call__(self, text, add_special_tokens=False, **_):
        return {"input_ids": [sum(map(ord, word)) % 90 + 1 for word in text.split()]}


TEXTS = [" ".join(f"w{i % 50}" for i in range(3000))]


def _tiny_pair():
    """A dense tiny Llama (the teacher) and a perturbed copy (the student) of the same vocabulary."""
    teacher = make_tiny_model("LlamaForCausalLM", seed=0)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.model.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return student, teacher


def _distill_config(**changes):
    settings = dict(steps=5, seqlen=16, batch_size=2, lr=2e-3, heldout_fraction=0.2, heldout_windows=4,
                    eval_every=5, distill=True, teacher="tiny", data="tiny", lora_r=8, lora_alpha=16)
    return finetune_module.FinetuneConfig(**(settings | changes))


def test_a_few_steps_lower_the_kl():
    student, teacher = _tiny_pair()
    _, record = finetune_module.finetune(student, _Tokenizer(), TEXTS, _distill_config(steps=10, eval_every=10),
                                         progress=False, teacher=teacher)
    first, last = record["heldout_losses"][0], record["heldout_losses"][-1]
    assert last["kl"] < 0.8 * first["kl"]
    assert record["objective"].startswith("KL") and len(record["kl_losses"]) == 10


def test_bf16_autocast_computes_the_passes_in_bfloat16_and_keeps_float32_weights(monkeypatch):
    seen = []

    def recording(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return distill.distill_loss(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "distill_loss", recording)
    student, teacher = _tiny_pair()
    tuned, record = finetune_module.finetune(student, _Tokenizer(), TEXTS,
                                             _distill_config(steps=10, eval_every=10, autocast="bf16"),
                                             progress=False, teacher=teacher)
    assert seen == [True] * 10
    first, last = record["heldout_losses"][0], record["heldout_losses"][-1]
    assert last["kl"] < 0.8 * first["kl"]
    assert {p.dtype for p in tuned.parameters()} == {torch.float32}


def test_autocast_takes_only_the_dtypes_it_knows():
    with pytest.raises(SliceGPTError, match="autocast must be one of bf16, got 'fp8'"):
        _distill_config(autocast="fp8")
    assert "autocast" not in _distill_config().to_dict()  # checkpoints from before the setting still resume


def test_full_trains_the_decoder_layers_only():
    student, teacher = _tiny_pair()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    tuned, record = finetune_module.finetune(student, _Tokenizer(), TEXTS, _distill_config(full=True, lr=1e-3),
                                             progress=False, teacher=teacher)
    assert record["trained"] == "full" and "lora_targets" not in record
    after = tuned.state_dict()
    assert after.keys() == before.keys()
    for name in before:
        moved = not torch.equal(before[name], after[name])
        assert moved == name.startswith("model.layers."), name
    assert record["trainable_params"] == sum(p.numel() for n, p in tuned.named_parameters()
                                             if n.startswith("model.layers."))
    assert not any(p.requires_grad for p in tuned.parameters())


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_stopped_distillation_resumes_to_the_same_weights(tmp_path, monkeypatch, full):
    config = _distill_config(full=full, eval_every=2, lm_weight=0.3)
    student, teacher = _tiny_pair()
    whole, record = finetune_module.finetune(copy.deepcopy(student), _Tokenizer(), TEXTS, config, progress=False,
                                             teacher=teacher)

    real_clip, calls = torch.nn.utils.clip_grad_norm_, []

    def stop_at_step_4(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_clip(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", stop_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        finetune_module.finetune(copy.deepcopy(student), _Tokenizer(), TEXTS, config, progress=False,
                                 checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2, teacher=teacher)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", real_clip)
    resumed, again = finetune_module.finetune(copy.deepcopy(student), _Tokenizer(), TEXTS, config, progress=False,
                                              checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2, teacher=teacher)
    assert again["losses"] == pytest.approx(record["losses"], abs=1e-6)
    assert again["kl_losses"] == pytest.approx(record["kl_losses"], abs=1e-6)
    assert [p["kl"] for p in again["heldout_losses"]] == pytest.approx([p["kl"] for p in record["heldout_losses"]])
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_distillation_needs_a_teacher_of_the_same_vocabulary():
    student, _ = _tiny_pair()
    with pytest.raises(SliceGPTError, match="needs the teacher"):
        finetune_module.finetune(student, _Tokenizer(), TEXTS, _distill_config(), progress=False)
    other = make_tiny_model("Qwen2ForCausalLM")
    other.resize_token_embeddings(80)
    with pytest.raises(SliceGPTError, match="vocabulary"):
        finetune_module.finetune(student, _Tokenizer(), TEXTS, _distill_config(), progress=False, teacher=other)


def _word_tokenizer(words: list[str], eos: str = "</s>"):
    """A whole-word tokenizer over `words` (ids in their order) with <unk>, <s> and </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])},
                                         unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token=eos)


def test_a_teacher_with_another_tokenizer_is_refused():
    """Same size is not enough: the KL compares the models id by id, so each id must be the same token."""
    words = [f"w{i}" for i in range(20)]
    student = _word_tokenizer(words)
    assert distill.tokenizer_difference(student, _word_tokenizer(words)) is None
    swapped = _word_tokenizer([words[1], words[0], *words[2:]])
    assert distill.tokenizer_difference(student, swapped) == "token 'w0' is id 4 in the teacher's, 3 in the student's"
    other_end = _word_tokenizer(words, eos="w19")
    assert "eos_token_id is 22 in the teacher's, 2 in the student's" in distill.tokenizer_difference(student, other_end)
    assert "has 21 tokens, the student's 23" in distill.tokenizer_difference(student, _word_tokenizer(words[:-2]))
    model, teacher = _tiny_pair()
    with pytest.raises(SliceGPTError, match="the tokenizer of tiny is not the student's .token 'w0'"):
        finetune_module.finetune(model, student, [" ".join(words * 20)], _distill_config(), progress=False,
                                 teacher=teacher, teacher_tokenizer=swapped)


def test_finetune_refuses_a_teacher_whose_tokenizer_differs(tiny_sliced_dir, tiny_model_dir, tmp_path, monkeypatch,
                                                           capsys):
    """The teacher's tokenizer.json with two ids swapped: the vocabulary is as large, the text is not the same."""
    import shutil

    from slicegpt.jobs import recover as job

    teacher = shutil.copytree(tiny_model_dir, tmp_path / "teacher")
    spec = json.loads((teacher / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    first, second = "the", "and"
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (teacher / "tokenizer.json").write_text(json.dumps(spec))
    monkeypatch.setattr(job, "finetune", lambda *a, **k: pytest.fail("training started"))
    code = main(["finetune", str(tiny_sliced_dir), "--out", str(tmp_path / "out"), "--distill", "--teacher",
                 str(teacher), "--data", str(WIKITEXT_VALIDATION), "--steps", "1", "--seqlen", "32"])
    error = capsys.readouterr().err
    assert code == 2 and f"the tokenizer of {teacher} is not the student's" in error
    assert not (tmp_path / "out").exists()


# --- The teacher's text -----------------------------------------------------------------

SMALL_TEXT = dict(tokens=120, sample_tokens=12, batch_size=2, opening_tokens=4)


@pytest.fixture(scope="module")
def tiny_teacher(tiny_model_dir):
    return load_model(str(tiny_model_dir))


def _write(teacher, path, **changes):
    model, tokenizer = teacher
    config = teacher_text.TeacherTextConfig(**(SMALL_TEXT | changes))
    openings = [" ".join(f"word{i} and more" for i in range(n, n + 6)) for n in range(10)]
    return teacher_text.write_teacher_text(model, tokenizer, path, config, "tiny", openings, progress=False)


def test_teacher_text_is_the_same_for_the_same_seed(tiny_teacher, tmp_path):
    first = _write(tiny_teacher, tmp_path / "a.jsonl")
    again = _write(tiny_teacher, tmp_path / "b.jsonl")
    other = _write(tiny_teacher, tmp_path / "c.jsonl", seed=7)
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert first["sha256"] == again["sha256"] != other["sha256"]
    rows = teacher_text.read_teacher_text(tmp_path / "a.jsonl")
    assert first["tokens"] >= 120 and len(rows) % 2 == 0
    assert {r["prompt"] for r in rows} == {"bos", "openings"}
    assert all(0 <= r["tokens"] <= 12 for r in rows)


def test_teacher_text_resumes_and_extends_to_the_same_file(tiny_teacher, tmp_path):
    whole = tmp_path / "whole.jsonl"
    _write(tiny_teacher, whole)
    part = tmp_path / "part.jsonl"
    _write(tiny_teacher, part, tokens=50)
    assert whole.read_bytes().startswith(part.read_bytes()) and part.stat().st_size < whole.stat().st_size
    with open(part, "a") as handle:  # a kill in the middle of a batch: one row and half of another
        lines = whole.read_text().splitlines(keepends=True)
        handle.write(lines[len(part.read_text().splitlines())] + '{"batch": 9')
    found = _write(tiny_teacher, part)
    assert part.read_bytes() == whole.read_bytes()
    assert found == {**_write(tiny_teacher, whole), "path": str(part)}
    fewer = teacher_text.summary(whole, 30)
    assert fewer["tokens"] >= 30 and fewer["rows"] < found["rows"]
    with pytest.raises(SliceGPTError, match="other settings .*top_p"):
        _write(tiny_teacher, whole, top_p=0.5)


def test_two_runs_on_one_teacher_text_file_leave_one_runs_rows(tiny_teacher, tmp_path, monkeypatch):
    """Two runs start on one file at once (a learning-rate sweep into sibling outputs): the second waits
    for the first and reuses its rows, so the file is the one a run alone writes."""
    alone = tmp_path / "alone.jsonl"
    _write(tiny_teacher, alone)
    real_sample = teacher_text.sample

    def slow_sample(*args, **kwargs):  # both runs are sure to have started before either finishes
        time.sleep(0.05)
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(teacher_text, "sample", slow_sample)
    shared = tmp_path / "shared.jsonl"
    context = multiprocessing.get_context("fork")
    start = context.Barrier(2)

    def run():
        start.wait()
        _write(tiny_teacher, shared)

    runs = [context.Process(target=run) for _ in range(2)]
    for process in runs:
        process.start()
    for process in runs:
        process.join(timeout=300)
    assert [process.exitcode for process in runs] == [0, 0]
    assert shared.read_bytes() == alone.read_bytes()
    assert teacher_text.summary(shared, 120)["sha256"] == teacher_text.summary(alone, 120)["sha256"]


class _IdTokenizer:
    """Token ids as words, and a tiny model's special ids: enough for the teacher to write with."""

    bos_token_id, eos_token_id = 1, 2

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{i}" for i in ids)


def _scripted(model, answers: dict[int, int]):
    """`model` now answers an input token found in `answers` with the token given there (its own choice
    elsewhere)."""

    def answer(module, args, kwargs, output):
        for row, token in enumerate(kwargs["input_ids"][:, -1].tolist()):
            if token in answers:
                output.logits[row, -1] = -1e4
                output.logits[row, -1, answers[token]] = 1e4
        return output

    model.register_forward_hook(answer, with_kwargs=True)
    return model


def _written_rows(model, path, **changes):
    config = teacher_text.TeacherTextConfig(**(SMALL_TEXT | {"prompts": "bos"} | changes))
    teacher_text.write_teacher_text(model, _IdTokenizer(), path, config, "scripted", progress=False)
    return teacher_text.read_teacher_text(path)


def test_a_teacher_that_ends_every_sample_at_once_is_refused(tmp_path, monkeypatch):
    """A model whose first token is always end-of-text writes empty rows: the run stops with an error,
    and the file keeps none of them."""
    model = _scripted(make_tiny_model("LlamaForCausalLM"), {1: 2})
    real_sample, calls = teacher_text.sample, []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 100:
            pytest.fail("the teacher kept sampling empty batches")
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(teacher_text, "sample", counted)
    with pytest.raises(SliceGPTError, match="ended every sample at its first token in 16 batches in a row"):
        _written_rows(model, tmp_path / "empty.jsonl")
    assert len(calls) == 16 and (tmp_path / "empty.jsonl").read_bytes() == b""


def test_samples_end_at_the_generation_configs_stop_tokens(tmp_path):
    """Llama 3 ends a turn with <|eot_id|>, which is in generation_config.eos_token_id and not the tokenizer's
    end-of-text; here 5 is such a token, and every sample is 7 then 5."""
    model = _scripted(make_tiny_model("LlamaForCausalLM"), {1: 7, 7: 5})
    model.generation_config.eos_token_id = [2, 5]
    assert teacher_text.stop_tokens(model, _IdTokenizer()) == [2, 5]
    rows = _written_rows(model, tmp_path / "stops.jsonl", tokens=10)
    assert [(row["tokens"], row["text"]) for row in rows] == [(1, "t7")] * 10
    model.generation_config.eos_token_id = 5  # an int, as most models give it
    assert teacher_text.stop_tokens(model, _IdTokenizer()) == [2, 5]


def test_teacher_text_goes_only_to_a_file_of_its_own(tiny_teacher, tmp_path):
    """An unrelated file, or one whose .json beside it is not our settings, is refused before any sampling."""
    notes = tmp_path / "notes.jsonl"
    notes.write_text('{"text": "my own data"}\n')
    with pytest.raises(SliceGPTError, match="without its settings file notes.json, so it is not a teacher-text"):
        _write(tiny_teacher, notes)
    (tmp_path / "notes.json").write_text('{"name": "something else"}')
    with pytest.raises(SliceGPTError, match="notes.json beside it is not its settings file"):
        _write(tiny_teacher, notes)
    with pytest.raises(SliceGPTError, match="name it .jsonl"):  # its settings would overwrite it
        _write(tiny_teacher, tmp_path / "text.json")
    assert notes.read_text() == '{"text": "my own data"}\n' and not (tmp_path / "text.json").exists()


def test_one_string_is_not_taken_for_a_list_of_texts(tiny_teacher, tmp_path):
    model, tokenizer = tiny_teacher
    with pytest.raises(TypeError, match="opening_texts must be a list of strings, got one str"):
        teacher_text.write_teacher_text(model, tokenizer, tmp_path / "t.jsonl", teacher_text.TeacherTextConfig(
            **SMALL_TEXT), "tiny", "one long calibration text " * 50, progress=False)
    student, teacher = _tiny_pair()
    with pytest.raises(TypeError, match="texts must be a list of strings, got one str"):
        finetune_module.finetune(student, _Tokenizer(), TEXTS[0], _distill_config(), progress=False, teacher=teacher)


@pytest.mark.parametrize("settings,message", [
    (dict(temperature=float("inf")), "teacher temperature must be a positive number, got inf"),
    (dict(temperature=0.0), "teacher temperature must be a positive number, got 0"),
    (dict(seed=2**64), "teacher seed must be a 64-bit integer"),
])
def test_bad_teacher_text_settings_are_refused(settings, message):
    with pytest.raises(SliceGPTError, match=re.escape(message)):
        teacher_text.TeacherTextConfig(**settings)


def test_any_64_bit_seed_writes_teacher_text(tmp_path):
    """The batches' seeds grow from the seed (seed x 1,000,003 + batch); torch reads them modulo 2**64."""
    model = make_tiny_model("LlamaForCausalLM")
    rows = _written_rows(model, tmp_path / "big-seed.jsonl", seed=2**63 - 1, tokens=12)
    assert sum(row["tokens"] for row in rows) >= 12


@pytest.fixture
def short_samples(monkeypatch):
    """The commands' teacher text in samples of 40 tokens (a random tiny model samples slowly: its
    distributions are flat, so every nucleus needs a sort of the whole vocabulary)."""
    monkeypatch.setattr(teacher_text, "TeacherTextConfig",
                        functools.partial(teacher_text.TeacherTextConfig, sample_tokens=40, batch_size=4))


def test_finetune_distills_on_teacher_text_and_reports_it(tiny_sliced_dir, tmp_path, short_samples):
    out = tmp_path / "distilled"
    code = main(["finetune", str(tiny_sliced_dir), "--out", str(out), "--distill", "--data", "teacher",
                 "--teacher-tokens", "400", "--steps", "4", "--seqlen", "32", "--batch-size", "2", "--lr", "1e-3",
                 "--heldout-fraction", "0.2", "--eval-every", "2", "--heldout-data", str(WIKITEXT_TEST),
                 "--kl-chunk", "7"])
    assert code == 0
    rft = json.loads((out / "slicing_report.json").read_text())["finetune"]
    teacher = json.loads((tiny_sliced_dir / "slicing_report.json").read_text())["config"]["model"]
    assert rft["config"]["distill"] and rft["config"]["teacher"] == teacher
    data = rft["data"]
    written = list(tmp_path.glob("teacher-text-*.jsonl"))
    assert len(written) == 1 and data["teacher_text"]["path"] == str(written[0])
    rows = teacher_text.read_teacher_text(written[0], 400)
    assert data["source"] == "teacher" and data["sha256"] == teacher_text.texts_sha256([r["text"] for r in rows])
    assert data["teacher_text"]["tokens"] >= 400 and data["tokens"] > 0
    assert [set(p) for p in rft["heldout_losses"]] == [{"step", "loss", "kl", "second_loss", "second_kl"}] * 3
    curve = json.loads((out / "loss_curve.json").read_text())
    assert len(curve["kl"]) == 4 and curve["objective"] == rft["objective"]
    card = (out / "README.md").read_text()
    assert "distilled from" in card and data["sha256"][:16] in card
    assert (out / "loss_curve.png").read_bytes().startswith(b"\x89PNG")
    # A second recipe on the same teacher text reuses the file (no second one is written).
    again = tmp_path / "again"
    assert main(["finetune", str(tiny_sliced_dir), "--out", str(again), "--data", "teacher", "--teacher-tokens",
                 "400", "--steps", "2", "--seqlen", "32", "--batch-size", "2", "--full", "--lr", "1e-4"]) == 0
    other = json.loads((again / "slicing_report.json").read_text())["finetune"]
    assert other["data"]["sha256"] == data["sha256"] and len(list(tmp_path.glob("teacher-text-*.jsonl"))) == 1
    assert other["trained"] == "full" and not other["config"]["distill"]


def test_slice_calibrates_on_text_the_model_writes(tiny_model_dir, tmp_path, short_samples):
    out = tmp_path / "sliced"
    args = ["slice", str(tiny_model_dir), "--sparsity", "0.25", "--out", str(out), "--no-streaming",
            *TINY_CAL_PPL[2:], "--cal-data", "teacher"]
    assert main(args) == 0
    written = list(tmp_path.glob("teacher-text-*.jsonl"))
    assert len(written) == 1 and teacher_text.summary(written[0])["tokens"] >= 4 * 64
    assert load_sliced(out).config.slicing["config"]["cal_data"] == "teacher"


def test_lm_weight_needs_distill(tiny_sliced_dir, tmp_path, capsys):
    code = main(["finetune", str(tiny_sliced_dir), "--out", str(tmp_path / "out"), "--data",
                 str(WIKITEXT_VALIDATION), "--lm-weight", "0.5"])
    assert code == 2 and "add --distill" in capsys.readouterr().err


def test_bad_teacher_settings_are_refused_before_any_model_loads(tiny_sliced_dir, tmp_path, monkeypatch, capsys):
    from slicegpt.jobs import recover as job

    monkeypatch.setattr(job, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    code = main(["finetune", str(tiny_sliced_dir), "--out", str(tmp_path / "out"), "--data", "teacher",
                 "--teacher-top-p", "0"])
    assert code == 2 and "top-p must be in (0, 1]" in capsys.readouterr().err
