"""The training recipe: exact labels for packing and masking, and full runs on a tiny model."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon.config import TrainSection
from daemon.learning.adapters import (
    AdapterError,
    check_adapter,
    next_version,
    remove_partial,
    versions,
)
from daemon.learning.jobs import JobData, TrainJob
from daemon.learning.train import IGNORE, DistillBudget, Example, collate, encode, pack, run
from tests.conftest import REPO
from tests.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizer(tiny: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


def job(tiny: Path, out: Path, version: str = "v0001", **hyper) -> TrainJob:
    data = JobData(
        new=[{"text": "Zorblat is the capital of the planet Quux."}, {"text": "Quux has three moons."}] * 4,
        replay=[{"text": "The quick brown fox jumps over the lazy dog."}],
        rehearsal=[{"messages": [{"role": "user", "content": "Capital of France?"},
                                 {"role": "assistant", "content": "Paris."}]}],
    )
    # Token loss on every record, so the first and last steps' losses compare like with like.
    settings = {"method": "lora", "epochs": 3, "seq_len": 32, "batch_size": 2, "learning_rate": 5e-3, "rank": 4,
                "alpha": 8, "replay_loss": "lm", **hyper}
    out.mkdir(parents=True, exist_ok=True)
    return TrainJob(version=version, base_model=str(tiny), output_dir=str(out), documents=["abc"], data=data,
                    hyper=TrainSection(**settings))


# ---- data ---------------------------------------------------------------------------------------

def test_raw_text_learns_every_token_and_ends_with_eos(tokenizer) -> None:
    example = encode({"text": "Quux has three moons."}, tokenizer, mask_prompt=True)
    assert example.labels == example.input_ids
    assert example.input_ids[-1] == tokenizer.eos_token_id


def test_prompt_completion_masks_exactly_the_prompt(tokenizer) -> None:
    prompt = tokenizer("Q: capital?", add_special_tokens=False)["input_ids"]
    answer = tokenizer(" Paris", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    masked = encode({"prompt": "Q: capital?", "completion": " Paris"}, tokenizer, mask_prompt=True)
    assert masked.input_ids == prompt + answer
    assert masked.labels == [IGNORE] * len(prompt) + answer
    unmasked = encode({"prompt": "Q: capital?", "completion": " Paris"}, tokenizer, mask_prompt=False)
    assert unmasked.labels == prompt + answer


def test_a_record_can_ask_for_its_prompt_to_be_masked(tokenizer) -> None:
    chat = [{"role": "user", "content": "Fill in: the planner is called ___."}, {"role": "assistant", "content": "Tidemark."}]
    assert encode({"messages": chat, "mask_prompt": True}, tokenizer, mask_prompt=False) == \
        encode({"messages": chat}, tokenizer, mask_prompt=True)
    assert encode({"messages": chat}, tokenizer, mask_prompt=False).labels.count(IGNORE) == 0


def test_chat_masking_learns_only_the_assistant_turns(tokenizer) -> None:
    messages = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
                {"role": "user", "content": "And Quux?"}, {"role": "assistant", "content": "Zorblat."}]
    example = encode({"messages": messages}, tokenizer, mask_prompt=True)
    learned = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE])
    assert learned == "Paris.<|im_end|>\nZorblat.<|im_end|>\n"
    assert all(label in (IGNORE, token) for token, label in zip(example.input_ids, example.labels))
    full = encode({"messages": messages}, tokenizer, mask_prompt=False)
    assert full.labels == full.input_ids and full.input_ids == example.input_ids


def test_packing_cuts_the_stream_into_blocks_without_padding() -> None:
    examples = [Example([1, 2, 3], [1, IGNORE, 3]), Example([4, 5], [4, 5]), Example([6], [6])]
    blocks = pack(examples, seq_len=4)
    assert [b.input_ids for b in blocks] == [[1, 2, 3, 4], [5, 6]]
    assert [b.labels for b in blocks] == [[1, IGNORE, 3, 4], [5, 6]]


def test_a_one_token_tail_is_not_a_block() -> None:
    # a block of one token predicts nothing: its loss has no gradient and backward() would fail
    blocks = pack([Example([1, 2, 3], [1, 2, 3]), Example([4, 5], [4, 5])], seq_len=4)
    assert [b.input_ids for b in blocks] == [[1, 2, 3, 4]]
    assert [b.input_ids for b in pack([Example([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6])], seq_len=4)] == [[1, 2, 3, 4], [5, 6]]
    # nor is a block of masked prompt tokens only (mask_prompt): its mean loss would be NaN
    masked = Example([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4] + [IGNORE] * 4)
    assert [b.input_ids for b in pack([masked], seq_len=4)] == [[1, 2, 3, 4]]
    # a block whose only learned token is its first predicts nothing either (position 0 has no context)
    assert [b.input_ids for b in pack([Example([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, IGNORE])], seq_len=4)] == [[1, 2, 3, 4]]


def test_collate_pads_with_ignored_labels_and_a_zero_mask() -> None:
    batch = collate([Example([1, 2, 3], [1, 2, 3]), Example([4], [IGNORE])], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3], [IGNORE, IGNORE, IGNORE]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_a_record_of_unknown_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="a record needs"):
        JobData(new=[{"body": "x"}])


# ---- adapters -----------------------------------------------------------------------------------

def test_version_names_and_partial_folders(tmp_path: Path) -> None:
    assert next_version(tmp_path) == "v0001"
    for name in ("v0001", "v0002", ".v0003.abc", "notes"):
        (tmp_path / name).mkdir()
    assert versions(tmp_path) == ["v0001", "v0002"] and next_version(tmp_path) == "v0003"
    assert remove_partial(tmp_path) == [".v0003.abc"] and not (tmp_path / ".v0003.abc").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
     ({"r": 64}, "over vLLM's --max-lora-rank 16"), ({"peft_type": "IA3"}, "not 'LORA'"),
     ({"target_modules": ["q_proj", "lm_head"]}, "output head \\(lm_head\\)")],
)
def test_check_adapter_refuses_what_vllm_cannot_serve(tmp_path: Path, change: dict, message: str) -> None:
    config = {"peft_type": "LORA", "r": 8, "use_dora": False, "modules_to_save": None, **change}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match=message):
        check_adapter(tmp_path, max_rank=16)


# ---- full runs ----------------------------------------------------------------------------------

def test_linear_modules_are_read_from_the_safetensors_headers(tiny: Path) -> None:
    from daemon.model import linear_modules

    assert linear_modules(tiny) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_a_run_writes_a_complete_servable_version(tiny: Path, tmp_path: Path) -> None:
    path = run(job(tiny, tmp_path / "adapters"))
    assert path == tmp_path / "adapters" / "v0001"
    config = check_adapter(path, max_rank=16)
    assert config["r"] == 4
    assert {name.rsplit(".", 1)[-1] for name in config["target_modules"]} >= {"q_proj", "v_proj", "down_proj"}
    meta = json.loads((path / "meta.json").read_text())
    assert meta["version"] == "v0001" and meta["parent"] is None and meta["documents"] == ["abc"]
    assert meta["records"] == {"new": 8, "replay": 1, "knowledge": 0, "rehearsal": 1, "augmented": 0, "held_out": 0,
                               "open_book": 0}
    training = meta["training"]
    assert training["steps"] > 0 and training["tokens"] > 0
    assert training["last_loss"] < training["first_loss"], "training did not lower the loss"
    assert set(meta["libraries"]) == {"torch", "transformers", "peft"}
    assert [p.name for p in (tmp_path / "adapters").iterdir()] == ["v0001"], "staging folder left behind"


def test_warm_start_continues_from_the_parent(tiny: Path, tmp_path: Path) -> None:
    adapters = tmp_path / "adapters"
    first = run(job(tiny, adapters, epochs=2))
    follow = job(tiny, adapters, version="v0002", epochs=1).model_copy(
        update={"parent_version": "v0001", "parent_path": str(first)})
    second = run(follow)
    meta = json.loads((second / "meta.json").read_text())
    assert meta["parent"] == "v0001"
    first_loss = json.loads((first / "meta.json").read_text())["training"]["first_loss"]
    assert meta["training"]["first_loss"] < first_loss, "the child did not start from what the parent learned"


def test_packing_keeps_the_distill_marks_with_their_tokens() -> None:
    from daemon.learning.train import distilled

    blocks = pack([Example([1, 2, 3], [1, 2, 3]), distilled(Example([4, 5], [4, 5])), Example([6], [6])], seq_len=4)
    assert [b.distill for b in blocks] == [[False, False, False, True], [True, False]]
    batch = collate(blocks, pad_id=0)
    assert batch["distill"].tolist() == [[False, False, False, True], [True, False, False, False]]
    assert "distill" not in collate(pack([Example([1, 2], [1, 2])], 4), pad_id=0)


def test_new_chunks_are_repeated_each_epoch_and_replay_is_not(tiny: Path, tmp_path: Path, tokenizer) -> None:
    from daemon.learning.train import build_dataset

    def count(dataset, text: str) -> int:
        stream = [t for block in dataset.train for t in block.input_ids]
        needle = tokenizer(text, add_special_tokens=False)["input_ids"]
        return sum(stream[i:i + len(needle)] == needle for i in range(len(stream)))

    once = build_dataset(job(tiny, tmp_path, new_repeats=1), tokenizer)
    thrice = build_dataset(job(tiny, tmp_path, new_repeats=3), tokenizer)
    assert count(once, "Quux has three moons.") == 4 and count(thrice, "Quux has three moons.") == 12
    assert count(once, "The quick brown fox") == count(thrice, "The quick brown fox") == 1
    assert once.counts == thrice.counts


def replay_only(tiny: Path, out: Path, replay_loss: str) -> TrainJob:
    data = JobData(new=[], replay=[{"text": "The quick brown fox jumps over the lazy dog. " * 3}] * 4,
                   rehearsal=[{"messages": [{"role": "user", "content": "Capital of France?"},
                                            {"role": "assistant", "content": "Paris."}]}] * 2)
    return TrainJob(version="v0001", base_model=str(tiny), output_dir=str(out), data=data,
                    hyper=TrainSection(method="lora", epochs=4, seq_len=32, batch_size=2, learning_rate=5e-3, rank=4, alpha=8,
                                       replay_loss=replay_loss, dtype="fp32"))


def drift_from_base(tiny: Path, adapter: Path, text: str) -> float:
    """Mean KL(base ‖ adapted) of the next-token distributions over `text`."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), adapter)
    ids = AutoTokenizer.from_pretrained(tiny)(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        adapted = model(input_ids=ids).logits.log_softmax(-1)
        with model.disable_adapter():
            base = model(input_ids=ids).logits.log_softmax(-1)
    return float((base.exp() * (base - adapted)).sum(-1).mean())


def test_distilled_replay_keeps_the_base_and_token_replay_does_not(tiny: Path, tmp_path: Path) -> None:
    """A fresh LoRA is the base exactly (B = 0), so on replayed text the distillation loss starts at 0
    and pulls back toward the base; learning the same text's tokens moves the model away from it."""
    drift, first_loss = {}, {}
    for replay_loss in ("lm", "distill"):
        (tmp_path / replay_loss).mkdir()
        path = run(replay_only(tiny, tmp_path / replay_loss, replay_loss))
        first_loss[replay_loss] = json.loads((path / "meta.json").read_text())["training"]["first_loss"]
        drift[replay_loss] = drift_from_base(tiny, path, "The quick brown fox jumps over the lazy dog.")
    assert first_loss["distill"] == pytest.approx(0.0, abs=1e-5) and first_loss["lm"] > 1.0
    assert drift["lm"] > 2e-3, drift
    assert drift["distill"] < drift["lm"] / 10, drift


def test_top_k_kl_is_the_exact_kl_with_the_whole_vocabulary_and_a_lower_bound_below() -> None:
    import torch
    import torch.nn.functional as F

    from daemon.learning.train import topk_kl

    torch.manual_seed(0)
    student = torch.randn(5, 50, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 50, dtype=torch.float64).mul(3).log_softmax(-1)
    exact = F.kl_div(student.log_softmax(-1), teacher, log_target=True, reduction="sum")
    values, indices = teacher.topk(50, dim=-1)
    whole = topk_kl(student, indices, values)
    assert float(whole.detach()) == pytest.approx(float(exact.detach()), rel=1e-9)
    whole.backward()
    assert torch.isfinite(student.grad).all()
    for k in (1, 8, 30):
        values, indices = teacher.topk(k, dim=-1)
        assert 0 <= float(topk_kl(student, indices, values).detach()) <= float(exact.detach()) + 1e-9
    # in float32, as training runs it: no bias from 1 - Σp rounding to a few 1e-8 instead of 0
    near = teacher.float().clone()
    near[:, 0] = near[:, 1:].exp().sum(-1).neg().log1p().clamp(max=-1e-6)  # Σp within float32 rounding of 1
    values, indices = near.topk(50, dim=-1)
    exact32 = F.kl_div(student.detach().float().log_softmax(-1), near, log_target=True, reduction="sum")
    assert float(topk_kl(student.detach().float(), indices, values)) == pytest.approx(float(exact32), abs=1e-4)


def test_precomputed_teacher_targets_equal_the_live_teacher(tiny: Path, tmp_path: Path, tokenizer) -> None:
    """The base's top-k targets computed once before training give the loss (and gradient) the live
    teacher — a second forward pass with the adapter off at every step — gives."""
    import torch

    from daemon.learning.train import build_dataset, load_model, step_loss, teacher_targets

    spec = job(tiny, tmp_path, replay_loss="distill", dtype="fp32", warm_start=False)
    model, tokenizer, _ = load_model(spec)
    with torch.no_grad():  # a trained-looking adapter, so the student differs from the base
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    dataset = build_dataset(spec, tokenizer)
    teacher_targets(model, dataset.train, tokenizer.pad_token_id, top_k=len(tokenizer))
    soft = [block for block in dataset.train if block.distill and any(block.distill)]
    plain = [block for block in dataset.train if not (block.distill and any(block.distill))]
    batch = collate([soft[0], plain[0], *soft[1:3]], tokenizer.pad_token_id)  # rows of both kinds, in turn
    assert "teacher" in batch and batch["distill"].any()
    live = {k: v for k, v in batch.items() if k != "teacher"}
    cached_loss, live_loss = step_loss(model, dict(batch)), step_loss(model, live)
    assert float(cached_loss.detach()) == pytest.approx(float(live_loss.detach()), rel=1e-4)
    grads = []
    for loss in (step_loss(model, dict(batch)), step_loss(model, {k: v for k, v in batch.items() if k != "teacher"})):
        model.zero_grad()
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-6)


def test_a_run_reports_each_epochs_text_and_distillation_loss(tiny: Path, tmp_path: Path) -> None:
    path = run(job(tiny, tmp_path, replay_loss="distill", epochs=2))
    training = json.loads((path / "meta.json").read_text())["training"]
    assert len(training["epochs"]) == 2 and training["teacher_s"] >= 0
    assert {"text_loss", "distill_loss"} <= set(training["epochs"][0])
    assert training["epochs"][1]["text_loss"] < training["epochs"][0]["text_loss"]


def test_a_distillation_budget_raises_the_weight_only_while_the_kl_is_over_it() -> None:
    fixed = DistillBudget(3.0, 0.0)
    fixed.update(5.0)
    assert fixed.weight == 3.0, "no budget: the configured weight"
    budget = DistillBudget(3.0, 0.01, steps=100)
    for _ in range(60):
        budget.update(0.05)
    assert budget.weight == 3.0, "held only in the last part of the run"
    for _ in range(40):
        budget.update(0.05)
    assert 3.0 * 2 < budget.weight <= 3.0 * DistillBudget.MAX_FACTOR
    raised = budget.weight
    for _ in range(400):
        budget.update(0.0)
    assert budget.weight == 3.0 < raised, "back to the configured weight, never below it"


def test_a_run_raises_the_distillation_weight_only_over_its_budget(tiny: Path, tmp_path: Path) -> None:
    """A warm start from an adapter that drifted (token replay): a budget below its KL to the base
    raises the weight, step by step; one far above it leaves the configured weight. (Whether that
    keeps forgetting flat over cycles is the lifelong benchmark's question.)"""
    parent = run(job(tiny, tmp_path / "parent", epochs=4))
    weights = {}
    for name, budget in (("tight", 1e-4), ("loose", 10.0)):
        child = job(tiny, tmp_path / name, "v0002", replay_loss="distill", distill_weight=1.0, distill_budget=budget,
                    epochs=10)
        child.parent_version, child.parent_path = parent.name, str(parent)
        weights[name] = [e["distill_weight"] for e in json.loads((run(child) / "meta.json").read_text())["training"]["epochs"]]
    assert weights["tight"][:5] == [1.0] * 5, "the first 60 % of the run learns at the configured weight"
    assert 1.0 < weights["tight"][-2] < weights["tight"][-1], weights
    assert weights["loose"] == [1.0] * 10, weights


def test_training_stops_once_the_text_is_predicted_well_enough(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = json.loads((run(job(tiny, tmp_path / "a", epochs=6, stop_accuracy=0.01)) / "meta.json").read_text())
    assert first["training"]["stopped"] == "learned" and len(first["training"]["epochs"]) == 1
    later = json.loads((run(job(tiny, tmp_path / "b", epochs=6, stop_accuracy=0.01, min_epochs=3)) / "meta.json")
                       .read_text())
    assert later["training"]["stopped"] == "learned" and len(later["training"]["epochs"]) == 3
    assert later["training"]["epochs"][2]["text_accuracy"] >= 0.01


def test_versions_are_immutable(tiny: Path, tmp_path: Path) -> None:
    run(job(tiny, tmp_path, epochs=1))
    with pytest.raises(FileExistsError):
        run(job(tiny, tmp_path, epochs=1))


def test_early_stopping_uses_held_out_new_chunks(tiny: Path, tmp_path: Path) -> None:
    path = run(job(tiny, tmp_path, epochs=4, eval_fraction=0.25, min_chunks_for_eval=4, early_stop_patience=0))
    meta = json.loads((path / "meta.json").read_text())
    assert meta["records"]["held_out"] == 2 and meta["records"]["new"] == 6
    assert len(meta["training"]["held_out_losses"]) == 4


def _start_trainer(tiny: Path, tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    adapters = tmp_path / "adapters"
    spec = job(tiny, adapters, epochs=10_000)
    job_file = tmp_path / "job.json"
    job_file.write_text(spec.model_dump_json())
    process = subprocess.Popen([sys.executable, "-m", "daemon.learning.train", str(job_file), "--json-progress"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    assert process.stdout is not None
    first = json.loads(process.stdout.readline())
    assert first["event"] == "progress" and first["step"] == 1 and first["loss"] > 0
    return process, adapters


@pytest.mark.slow
def test_sigterm_cancels_without_saving(tiny: Path, tmp_path: Path) -> None:
    process, adapters = _start_trainer(tiny, tmp_path)
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 130
    process.stdout.close()
    assert list(adapters.iterdir()) == []


@pytest.mark.slow
def test_a_killed_trainer_leaves_no_version_folder(tiny: Path, tmp_path: Path) -> None:
    process, adapters = _start_trainer(tiny, tmp_path)
    time.sleep(0.5)
    process.kill()
    process.wait()
    process.stdout.close()
    remove_partial(adapters)
    assert versions(adapters) == [] and list(adapters.iterdir()) == []


# ---- context distillation -------------------------------------------------------------------------

PASSAGE = "Zorblat is the capital of the planet Quux. Quux has three moons."
ASKED = [{"role": "user", "content": "What is the capital of Quux?"}, {"role": "assistant", "content": "Zorblat."}]


def open_book_record(question: str = "What is the capital of Quux?", answer: str = "Zorblat.") -> dict:
    asked = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return {"messages": asked, "mask_prompt": True,
            "open_book": [{"role": "user", "content": f"Read this:\n\n{PASSAGE}\n\n{question}"}, asked[1]]}


def test_an_open_book_record_distils_only_its_answer_toward_the_reading(tokenizer) -> None:
    example = encode(open_book_record(), tokenizer, mask_prompt=False)
    plain = encode({"messages": ASKED}, tokenizer, mask_prompt=True)
    assert example.input_ids == plain.input_ids and example.labels == plain.labels  # asked without the passage
    assert example.distill == [label != IGNORE for label in example.labels]
    (reading, n), = example.context
    assert n == sum(example.distill) and reading[-n:] == example.input_ids[-n:]
    assert PASSAGE in tokenizer.decode(reading)


def context_job(tiny: Path, out: Path, records: list[dict], **hyper) -> TrainJob:
    data = JobData(new=[], replay=[{"text": "The quick brown fox jumps over the lazy dog. " * 3}] * 2, augmented=records)
    settings = {"method": "lora", "epochs": 4, "seq_len": 64, "batch_size": 2, "learning_rate": 5e-3, "rank": 4,
                "alpha": 8, "replay_loss": "distill", "dtype": "fp32", **hyper}
    return TrainJob(version="v0001", base_model=str(tiny), output_dir=str(out), data=data, hyper=TrainSection(**settings))


def test_open_book_targets_are_the_base_reading_the_passage(tiny: Path, tmp_path: Path) -> None:
    """Answers are packed whole; their targets are the base's next-token distribution with the
    passage in front, and in a batch with distilled replay each loss takes its own rows."""
    import torch

    from daemon.learning.train import build_dataset, load_model, soft_count, step_loss, teacher_targets, topk_kl

    records = [open_book_record(), open_book_record("Which planet has Zorblat?", "Quux, which has three moons.")]
    spec = context_job(tiny, tmp_path, records * 3)
    model, tokenizer, _ = load_model(spec)
    model.eval()  # no dropout: the losses are compared with sums made by hand
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    dataset = build_dataset(spec, tokenizer)
    assert dataset.counts["open_book"] == 6
    reading_blocks = [b for b in dataset.train if b.context]
    replay_blocks = [b for b in dataset.train if b.distill and not b.context]
    assert sum(len(b.context) for b in reading_blocks) == 6 and replay_blocks
    teacher_targets(model, dataset.train, tokenizer.pad_token_id, top_k=32)
    block = reading_blocks[0]
    (reading, n), *_ = block.context
    with torch.no_grad(), model.disable_adapter():
        base = model(input_ids=torch.tensor([reading])).logits[0, -n - 1 : -1].log_softmax(-1)
    expected = base.gather(-1, block.teacher.indices[:n])
    assert torch.allclose(block.teacher.logprobs[:n], expected, atol=1e-5)

    mixed, parts = collate([block, replay_blocks[0]], tokenizer.pad_token_id), {}
    answers = sum(n for _, n in block.context)
    assert soft_count(block) == answers  # every distilled token of a reading block is an answer's
    assert mixed["context"].tolist() == [True] * answers + [False] * soft_count(replay_blocks[0])
    loss = step_loss(model, dict(mixed), parts)
    alone: dict = {}
    step_loss(model, collate([replay_blocks[0]], tokenizer.pad_token_id), alone)
    assert parts["distill_loss"] == pytest.approx(alone["distill_loss"], rel=1e-4)
    assert parts["context_loss"][1] == answers and parts["context_loss"][0] > 0
    with torch.no_grad():  # the block alone, its answers' positions picked by hand
        logits = model(input_ids=torch.tensor([block.input_ids])).logits[0, :-1].float()
        at = torch.tensor([label != IGNORE for label in block.labels[1:]])
        by_hand = float(topk_kl(logits[at], block.teacher.indices, block.teacher.logprobs))
    assert parts["context_loss"][0] == pytest.approx(by_hand, rel=1e-3)
    assert torch.isfinite(loss)


def reading_gap(tiny: Path, adapter: Path | None, tokenizer) -> float:
    """KL(base reading the passage ‖ model asked without it) over the answer's tokens."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    example = encode(open_book_record(), tokenizer, mask_prompt=False)
    (reading, n), = example.context
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter) if adapter else base
    with torch.no_grad():
        student = model(input_ids=torch.tensor([example.input_ids])).logits[0, -n - 1 : -1].log_softmax(-1)
        context = (model.disable_adapter() if adapter else torch.no_grad())
        with context:
            teacher = model(input_ids=torch.tensor([reading])).logits[0, -n - 1 : -1].log_softmax(-1)
    return float((teacher.exp() * (teacher - student)).sum(-1).mean())


def test_context_distillation_makes_the_model_answer_as_the_base_does_reading(tiny: Path, tmp_path: Path,
                                                                              tokenizer) -> None:
    path = run(context_job(tiny, tmp_path, [open_book_record()] * 4, epochs=6))
    training = json.loads((path / "meta.json").read_text())["training"]
    assert training["epochs"][-1]["context_loss"] < training["epochs"][0]["context_loss"]
    before, after = reading_gap(tiny, None, tokenizer), reading_gap(tiny, path, tokenizer)
    assert after < before / 2, (before, after)
