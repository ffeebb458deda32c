"""The training recipe: one job in, one immutable version folder out.

    python -m daemon.learning.train JOB.json [--json-progress]

Setup (tokenize, mix, shuffle, pack; load the base model and put the job's method in place: a LoRA
by default, `daemon.learning.methods`), train (AdamW, warmup + cosine, early stop on held-out new
chunks), save (a PEFT folder, or a complete model folder for the methods that train merged weights;
meta.json; checked, then renamed into place). The daemon runs it as a subprocess so a crash or OOM never touches serving; it can
cancel it with SIGTERM. Knows nothing of the journal, replay selection or serving: the job file
(`daemon.learning.jobs.TrainJob`) carries everything.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import torch.nn.functional as F
import transformers
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

from daemon.learning import distributed, methods
from daemon.learning.adapters import META_FILE, check_adapter, check_model
from daemon.learning.jobs import Record, TrainJob, load_job
from daemon.model import completion_template
from replay.durable import atomic_write_json, publish_dir

log = logging.getLogger("cld.train")
IGNORE = -100  # label of tokens the loss skips
CONTEXT_TOP_K = 64  # the base's tokens kept per position of a context-distilled answer when train.distill_top_k is 0


class Cancelled(Exception):
    """The daemon asked the trainer to stop (SIGTERM/SIGINT); nothing is saved."""


# ---- data: records -> token sequences -> packed blocks -----------------------------------------

@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    distill: list[bool] | None = None  # per token: learn the base's distribution here, not the token
    teacher: Teacher | None = None  # the base's top-k next-token log-probabilities where distilled
    # context distillation: per answer in the block, in order, the base's input with the document's
    # passage in front (token ids) and how many tokens at its end are the answer
    context: list[tuple[list[int], int]] | None = None


@dataclass
class Teacher:
    """The frozen base model's `k` most likely next tokens and their log-probabilities (over the
    whole vocabulary) at each distilled position of one block, in order: computed once per run,
    since the base and the block never change (`teacher_targets`). For a context-distilled answer
    they are the base's with the document's passage in front (`Example.context`)."""

    indices: Any  # int64 tensor [positions, k]
    logprobs: Any  # float32 tensor [positions, k]

    def to(self, device: Any) -> Teacher:
        return Teacher(self.indices.to(device), self.logprobs.to(device))


def distilled(example: Example) -> Example:
    """The same tokens, learned toward the frozen base model's next-token distribution."""
    return Example(example.input_ids, example.labels, [True] * len(example.input_ids))


def encode(record: Record, tokenizer: Any, mask_prompt: bool) -> Example:
    """Tokens and labels of one record: raw text, prompt/completion, or chat messages. A record
    that says `"mask_prompt": true` has only its answer learned, whatever `mask_prompt` says (a
    quiz's blanked sentence must not be learned as text)."""
    mask_prompt = mask_prompt or bool(record.get("mask_prompt"))
    if "open_book" in record:
        return _encode_open_book(record, tokenizer)
    if "messages" in record:
        return _encode_chat(record["messages"], tokenizer, mask_prompt)
    opening = opening_tokens(tokenizer)
    if "prompt" in record:
        prompt = tokenizer(record["prompt"], add_special_tokens=False)["input_ids"]
        completion = tokenizer(record["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        prompt_labels = [IGNORE] * len(prompt) if mask_prompt else list(prompt)
        return Example(opening + prompt + completion, [IGNORE] * len(opening) + prompt_labels + completion)
    ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return Example(opening + ids, [IGNORE] * len(opening) + ids)


def opening_tokens(tokenizer: Any) -> list[int]:
    """What the tokenizer puts before a text of its own accord, as vLLM does to a prompt: the BOS
    token for Gemma or Llama 3, nothing for SmolLM2 or Qwen. A text is trained as it is served (Gemma
    without its BOS babbles); the BOS itself is not learned."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("x")["input_ids"][:1] == [bos] else []


def _encode_chat(messages: list[dict[str, str]], tokenizer: Any, mask_prompt: bool) -> Example:
    """Render with the chat template; with `mask_prompt`, only assistant turns are learned.

    Assistant spans are found by rendering growing prefixes of the conversation, which works for
    any template whose rendering of a prefix is a prefix of the whole (ChatML and most others).
    """
    ids = render_chat(tokenizer, messages, generation_prompt=False)
    if not mask_prompt:
        return Example(ids, list(ids))
    labels = [IGNORE] * len(ids)
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render_chat(tokenizer, messages[:turn], generation_prompt=True))
        end = len(render_chat(tokenizer, messages[: turn + 1], generation_prompt=False))
        labels[start:end] = ids[start:end]
    return Example(ids, labels)


def _encode_open_book(record: Record, tokenizer: Any) -> Example:
    """A context-distilled answer (`augment.open_book`): the conversation without the passage, its
    answer learned toward the base's distribution in the same conversation with the passage in
    front. Learned as plain tokens when the answer is not the same tokens at the end of both."""
    example = _encode_chat(record["messages"], tokenizer, mask_prompt=True)
    reading = render_chat(tokenizer, record["open_book"], generation_prompt=False)
    start = next((i for i, label in enumerate(example.labels) if label != IGNORE), len(example.labels))
    answer = example.input_ids[start:]
    if not answer or any(label == IGNORE for label in example.labels[start:]) or reading[-len(answer):] != answer:
        log.debug("an open-book answer is not a common suffix: learned as plain tokens")
        return example
    return Example(example.input_ids, example.labels, [False] * start + [True] * len(answer), context=[(reading, len(answer))])


def render_chat(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    """Token ids of `messages` in the model's chat template, as the trainer learns them."""
    if not messages:
        return []
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def pack(examples: list[Example], seq_len: int) -> list[Example]:
    """Concatenate examples and cut the stream into blocks of `seq_len` tokens (the last may be
    shorter), so no compute is spent on padding. A block with no token to learn — a one-token tail,
    or only masked prompt tokens — is dropped: its loss would have no gradient (or be NaN)."""
    ids = [token for example in examples for token in example.input_ids]
    labels = [label for example in examples for label in example.labels]
    flags = [flag for example in examples for flag in (example.distill or [False] * len(example.input_ids))]
    return [Example(ids[i : i + seq_len], labels[i : i + seq_len], flags[i : i + seq_len] if any(flags) else None)
            for i in range(0, len(ids), seq_len)
            if any(label != IGNORE for label in labels[i + 1 : i + seq_len])]  # position 0 predicts nothing


def pack_whole(examples: list[Example], seq_len: int) -> list[Example]:
    """Blocks of whole examples, none cut in two (their targets were computed per example: context
    distillation), each at most `seq_len` tokens unless one example alone is longer."""
    blocks: list[list[Example]] = [[]]
    for example in examples:
        if blocks[-1] and sum(len(e.input_ids) for e in blocks[-1]) + len(example.input_ids) > seq_len:
            blocks.append([])
        blocks[-1].append(example)
    return [Example([t for e in block for t in e.input_ids], [t for e in block for t in e.labels],
                    [f for e in block for f in (e.distill or [False] * len(e.input_ids))],
                    context=[c for e in block for c in (e.context or [])])
            for block in blocks if block]


def soft_count(example: Example) -> int:
    """How many of a block's tokens are distilled (rows of its `Teacher`)."""
    if not example.distill:
        return 0
    return sum(label != IGNORE and flag for label, flag in zip(example.labels[1:], example.distill[1:]))


def collate(batch: list[Example], pad_id: int) -> dict[str, Any]:
    width = max(len(example.input_ids) for example in batch)
    ids = [e.input_ids + [pad_id] * (width - len(e.input_ids)) for e in batch]
    labels = [e.labels + [IGNORE] * (width - len(e.labels)) for e in batch]
    mask = [[1] * len(e.input_ids) + [0] * (width - len(e.input_ids)) for e in batch]
    out = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}
    if any(e.distill for e in batch):
        flags = [(e.distill or [False] * len(e.input_ids)) + [False] * (width - len(e.input_ids)) for e in batch]
        out["distill"] = torch.tensor(flags)
        teachers = [e.teacher for e in batch if e.distill]
        if all(teachers):  # rows in order, like the boolean mask that selects the distilled positions
            out["teacher"] = Teacher(torch.cat([t.indices for t in teachers]), torch.cat([t.logprobs for t in teachers]))
        if any(e.context for e in batch):  # which of those rows are context-distilled answers
            out["context"] = torch.tensor([bool(e.context) for e in batch if e.distill for _ in range(soft_count(e))])
    return out


def distilled_positions(labels: Any, flags: Any) -> Any:
    """Boolean mask [batch, length - 1] of the logits that predict a distilled token."""
    return (labels[:, 1:] != IGNORE) & flags[:, 1:]


@dataclass
class Dataset:
    train: list[Example]
    held_out: list[Example]
    counts: dict[str, int]
    train_tokens: int


def build_dataset(job: TrainJob, tokenizer: Any) -> Dataset:
    """Mix new chunks with replay, shuffle with the job's seed, hold out a slice of the new chunks
    for early stopping, and pack."""
    hp, rng = job.hyper, random.Random(job.hyper.seed)
    new = list(job.data.new)
    rng.shuffle(new)
    n_held = int(len(new) * hp.eval_fraction) if len(new) >= hp.min_chunks_for_eval else 0
    held, new = new[:n_held], new[n_held:]
    sources = {"new": new, "replay": job.data.replay, "knowledge": job.data.knowledge, "rehearsal": job.data.rehearsal,
               "augmented": job.data.augmented}
    distill = {"replay", "rehearsal"} if hp.replay_loss == "distill" else set()
    mixed = [distilled(example) if name in distill else example
             for name, records in sources.items() for example in (encode(r, tokenizer, hp.mask_prompt) for r in records)]
    mixed += [encode(record, tokenizer, hp.mask_prompt) for record in new] * (hp.new_repeats - 1)
    rng.shuffle(mixed)
    reading = [e for e in mixed if e.context]
    train = pack([e for e in mixed if not e.context], hp.seq_len) + pack_whole(reading, hp.seq_len)
    held_out = pack([encode(record, tokenizer, hp.mask_prompt) for record in held], hp.seq_len)
    tokens = sum(len(example.input_ids) for example in train)
    counts = {name: len(records) for name, records in sources.items()} | {"held_out": n_held, "open_book": len(reading)}
    return Dataset(train, held_out, counts, tokens)


# ---- model ------------------------------------------------------------------------------------

def pick_dtype(requested: str) -> Any:
    """bf16 where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16/AMX)."""

    if requested == "fp32":
        return torch.float32
    if requested == "bf16":
        return torch.bfloat16
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def load_model(job: TrainJob) -> tuple[Any, Any, Any]:
    """The base model (frozen) with the job's method in place (`methods.attach`: a trainable LoRA by
    default, warm-started from the parent), its tokenizer and the compute dtype (fp32 for the
    methods that train merged weights)."""

    hp = job.hyper
    torch.manual_seed(hp.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and distributed.world_size() > 1:  # one GPU per process under torchrun
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if device == "cuda" and hp.gpu_memory_fraction < 1:
        torch.cuda.set_per_process_memory_fraction(hp.gpu_memory_fraction)
    dtype = pick_dtype(hp.dtype) if hp.method == "lora" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(job.base_model)
    if not tokenizer.chat_template:  # a pretrained model: chats as vLLM serves them to it (completion form)
        tokenizer.chat_template = completion_template()
    sharded = distributed.shards(hp.method, distributed.world_size())
    if sharded:  # FSDP: no process holds the whole model, rank 0 reads it
        model = distributed.empty_model(job.base_model)
    else:
        model = AutoModelForCausalLM.from_pretrained(job.base_model, dtype=dtype).to(device)
    if hp.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = methods.attach(model, job, empty=sharded)
    if sharded:
        distributed.shard(model, device)
        distributed.fill(model, job.base_model)
    return model, tokenizer, dtype


def saved_dtype(model_dir: str) -> Any:
    """The dtype the base model's weights are stored in (merged versions are saved in it)."""
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, str(name).removeprefix("torch."), torch.float32)


# ---- train ------------------------------------------------------------------------------------

class Progress:
    """Reports steps: JSON lines on stdout for the daemon, or a progress bar for a person."""

    def __init__(self, total: int, json_lines: bool, quiet: bool = False):
        self.total, self.json_lines, self.started, self.quiet = total, json_lines, time.monotonic(), quiet
        self.bar = None
        if not json_lines and not quiet:

            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def step(self, step: int, loss: float, tokens: int, lr: float) -> None:
        if self.quiet:  # another process of a torchrun group reports
            return
        elapsed = time.monotonic() - self.started
        rate = tokens / elapsed if elapsed else 0.0
        eta = elapsed / step * (self.total - step) if step else 0.0
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}")
            self.bar.update(1)
        else:
            emit({"event": "progress", "step": step, "steps": self.total, "loss": round(loss, 5),
                  "tokens_per_s": round(rate, 1), "eta_s": round(eta, 1), "lr": lr})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


def train(job: TrainJob, model: Any, dataset: Dataset, pad_id: int, json_progress: bool, stop: Any,
          on_epoch: Callable[[int, dict[str, float]], bool] | None = None) -> dict[str, Any]:
    """Run the optimisation; returns the loss summary. Raises Cancelled when `stop()` turns true.
    After each epoch, `on_epoch(epoch, report)` may end training by returning true (benchmarks use it).
    Under torchrun (train.devices > 1) each process takes every world-th micro-batch of a step and
    the gradients are summed, so the steps are the ones a single process takes, faster."""

    hp = job.hyper
    rank, world = distributed.rank_and_world()
    device = next(model.parameters()).device
    batches_per_epoch = math.ceil(len(dataset.train) / hp.batch_size)
    steps_per_epoch = math.ceil(batches_per_epoch / hp.grad_accum)
    total = min(hp.max_steps or sys.maxsize, steps_per_epoch * hp.epochs)
    started = time.monotonic()
    sharded = distributed.shards(hp.method, world)  # then the base's side of distillation is precomputed: no live base view
    if hp.distill_top_k or any(example.context or (sharded and example.distill) for example in dataset.train):
        teacher_targets(model, dataset.train, pad_id, hp.distill_top_k or CONTEXT_TOP_K)
    teacher_s = time.monotonic() - started
    if sharded:
        distributed.warm_start(model)
    params = [p for p in model.parameters() if p.requires_grad]
    scaled = methods.of(model).lr_scales()
    groups = [{"params": [p for p in params if p not in scaled]}]
    groups += [{"params": [p], "lr": hp.learning_rate * scale, "weight_decay": 0.0} for p, scale in scaled.items()]
    optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, weight_decay=hp.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(total * hp.warmup_ratio), total)
    rng = random.Random(hp.seed)
    progress = Progress(total, json_progress, quiet=rank > 0)
    budget = DistillBudget(hp.distill_weight, hp.distill_budget, total)
    losses, evals, step, tokens, best, bad_epochs = [], [], 0, 0, math.inf, 0
    best_state, epochs, stopped = None, [], None
    model.train()
    try:
        for epoch in range(hp.epochs):
            parts: dict[str, list[float]] = {}
            order = list(range(len(dataset.train)))
            rng.shuffle(order)
            batches = [order[i : i + hp.batch_size] for i in range(0, len(order), hp.batch_size)]
            for group in range(0, len(batches), hp.grad_accum):
                if stop():
                    raise Cancelled()
                loss_sum = 0.0
                chunk = batches[group : group + hp.grad_accum]
                before = list(parts.get("distill_loss", (0.0, 0)))
                step_tokens = 0
                for indices in distributed.share(chunk, rank, world, sharded):
                    if indices is None:  # sharded: every process runs as many passes (their collectives pair up)
                        batch = {k: v.to(device) for k, v in collate([dataset.train[chunk[0][0]]], pad_id).items()}
                        (step_loss(model, batch) * 0).backward()
                        continue
                    batch = {k: v.to(device) for k, v in collate([dataset.train[i] for i in indices], pad_id).items()}
                    loss = step_loss(model, batch, parts, budget.weight) / len(chunk)
                    # FSDP averages the processes' gradients; the step's is their sum
                    (loss * world if sharded else loss).backward()
                    loss_sum += loss.item()
                    step_tokens += int(batch["attention_mask"].sum())
                after = parts.get("distill_loss", (0.0, 0))
                distilled_sum, distilled_n = after[0] - before[0], after[1] - before[1]
                if world > 1 and not sharded:
                    distributed.sum_gradients(params)
                if world > 1:
                    loss_sum, step_tokens, distilled_sum, distilled_n = distributed.summed(
                        [loss_sum, step_tokens, distilled_sum, distilled_n], device)
                tokens += int(step_tokens)
                budget.update(distilled_sum / distilled_n if distilled_n > 0 else None)
                torch.nn.utils.clip_grad_norm_(params, hp.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                losses.append(loss_sum)
                progress.step(step, loss_sum, tokens, scheduler.get_last_lr()[0])
                if step >= total:
                    break
            parts = distributed.merged_parts(parts) if world > 1 else parts
            epochs.append({name: round(summed / max(n, 1), 5) for name, (summed, n) in parts.items()}
                          | ({"distill_weight": round(budget.weight, 3)} if hp.distill_budget else {}))
            if on_epoch is not None and on_epoch(epoch + 1, epochs[-1]):
                stopped = "asked"
                break
            if learned(hp, epochs[-1], epoch + 1):
                log.info("stop after epoch %d: the text was predicted at %.3f >= train.stop_accuracy", epoch + 1,
                         epochs[-1]["text_accuracy"])
                stopped = "learned"
                break
            if dataset.held_out:
                held_out = evaluate(model, dataset.held_out, pad_id, hp.batch_size)
                evals.append(distributed.agreed(held_out) if world > 1 else held_out)
                if evals[-1] < best - 1e-4:
                    best, bad_epochs = evals[-1], 0
                    best_state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
                else:
                    bad_epochs += 1
                if hp.early_stop_patience and bad_epochs >= hp.early_stop_patience:
                    log.info("early stop after epoch %d: held-out loss %.4f did not improve", epoch + 1, evals[-1])
                    stopped = "held_out"
                    break
            if step >= total:
                break
    finally:
        progress.close()
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    return {"steps": step, "tokens": tokens, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "min_loss": min(losses) if losses else None,
            "losses": [round(x, 5) for x in losses], "held_out_losses": [round(x, 5) for x in evals],
            "best_held_out_loss": None if best == math.inf else round(best, 5),
            "epochs": epochs, "stopped": stopped, "teacher_s": round(teacher_s, 2), "sharded": sharded}


class DistillBudget:
    """The weight of distillation on replayed text. Fixed (`train.distill_weight`) without a budget;
    with `train.distill_budget` (KL per token), in the last part of the run (from SETTLE of its
    steps on, when the new text is learned and the learning rate is low) a multiplier that rises
    while the recent KL to the base is above the budget and falls back while below, never under the
    configured weight: the run ends as close to the base as the budget says, however far earlier
    cycles had moved the adapter it continues. (Held all run long, it starved the learning itself:
    the KL is high while new facts go in, bench/learning/lifelong.py, docs/BENCHMARKS.md.)"""

    RATE = 0.05     # per step: the weight changes by at most about 5 % × (KL / budget − 1)
    SMOOTHING = 0.9  # of the recent KL (steps differ a lot in how much replay they hold)
    MAX_FACTOR = 30.0
    SETTLE = 0.6    # share of the run's steps before the budget is held

    def __init__(self, weight: float, budget: float, steps: int = 0):
        self.floor, self.budget, self.weight = weight, budget, weight
        self.start = int(steps * self.SETTLE)
        self.steps = 0
        self.recent: float | None = None

    def update(self, kl: float | None) -> None:
        """After each optimizer step: its KL per distilled token (None: it held no replayed text)."""
        self.steps += 1
        if not self.budget or self.steps <= self.start or kl is None:
            return
        self.recent = kl if self.recent is None else self.SMOOTHING * self.recent + (1 - self.SMOOTHING) * kl
        change = math.exp(self.RATE * max(-1.0, min(1.0, self.recent / self.budget - 1)))
        self.weight = min(self.floor * self.MAX_FACTOR, max(self.floor, self.weight * change))


def learned(hp: Any, report: dict[str, float], epoch: int) -> bool:
    """True when the epoch's text (new documents and those learned before) was predicted well enough
    to stop: its tokens were the model's most likely next token at least `train.stop_accuracy` of
    the time, after at least `train.min_epochs` epochs."""
    return bool(hp.stop_accuracy) and epoch >= hp.min_epochs and report.get("text_accuracy", 0) >= hp.stop_accuracy


def step_loss(model: Any, batch: dict[str, Any], parts: dict[str, list[float]] | None = None,
              distill_weight: float = 1.0) -> Any:
    """Mean loss per learned token: cross-entropy on the text's own tokens, and where the batch marks
    tokens `distill`, KL(base ‖ model) of the next-token distributions instead. The base's side comes
    from the block's precomputed `Teacher` (top-k, `train.distill_top_k`) or, without one, from a live
    forward pass of the same network with the adapter switched off (no second copy is loaded),
    weighted by `distill_weight`. A context-distilled answer (rows marked `context`) learns the base's
    distribution with the document in front (always precomputed), weighted 1 like a learned token.
    `parts`, when given, gathers [sum, tokens] of "text_loss", "text_accuracy" (the learned token is
    the most likely one), "distill_loss" and "context_loss" for the epoch report."""

    flags, cached, reading = batch.pop("distill", None), batch.pop("teacher", None), batch.pop("context", None)
    labels = batch.pop("labels")
    logits = model(**batch).logits[:, :-1].float()
    target = labels[:, 1:]
    learned = target != IGNORE
    soft = distilled_positions(labels, flags) if flags is not None else torch.zeros_like(learned)
    plain = learned & ~soft
    total = logits.new_zeros(())
    if plain.any():
        text = F.cross_entropy(logits[plain], target[plain], reduction="sum")
        total = total + text
        if parts is not None:
            n = int(plain.sum())
            _add(parts, "text_loss", float(text.detach()), n)
            _add(parts, "text_accuracy", float((logits[plain].argmax(-1) == target[plain]).sum()), n)
    if reading is not None and reading.any():
        rows = soft.nonzero(as_tuple=True)
        read = (rows[0][reading], rows[1][reading])
        kl = topk_kl(logits[read], cached.indices[reading], cached.logprobs[reading])
        total = total + kl
        if parts is not None:
            _add(parts, "context_loss", float(kl.detach()), int(reading.sum()))
        soft = soft.clone()
        soft[read] = False
        cached = Teacher(cached.indices[~reading], cached.logprobs[~reading])
    if soft.any():
        if cached is not None:
            kl = topk_kl(logits[soft], cached.indices, cached.logprobs)
        else:
            with torch.no_grad(), methods.base_view(model):
                teacher = model(**batch).logits[:, :-1][soft].float().log_softmax(-1)
            kl = F.kl_div(logits[soft].log_softmax(-1), teacher, log_target=True, reduction="sum")
        total = total + distill_weight * kl
        if parts is not None:
            _add(parts, "distill_loss", float(kl.detach()), int(soft.sum()))
    return total / learned.sum().clamp(min=1)


def _add(parts: dict[str, list[float]], name: str, summed: float, tokens: int) -> None:
    sums = parts.setdefault(name, [0.0, 0])
    sums[0] += summed
    sums[1] += tokens


def topk_kl(logits: Any, indices: Any, teacher: Any) -> Any:
    """Summed KL(base ‖ model) over positions, with the base known by its top-k log-probabilities:
    the k tokens, plus one bucket holding the rest of the vocabulary on both sides. With k = the
    vocabulary size it is the exact KL; with fewer it never exceeds it, and it is exact on the
    tokens the base finds likely."""
    log_z = logits.logsumexp(-1, keepdim=True)
    student = logits.gather(-1, indices) - log_z
    p = teacher.exp()
    kl = (p * (teacher - student)).sum()
    if indices.shape[-1] >= logits.shape[-1]:  # no rest: its rounding error (1 - Σp ≈ 1e-7 in fp32) times
        return kl  # the fill below would add ~1e-3 a position
    # the student's log-mass outside the k tokens (a finite fill, not -inf, keeps the gradient finite)
    rest = logits.scatter(-1, indices, -1e4).logsumexp(-1, keepdim=True) - log_z
    p_rest = (1 - p.sum(-1, keepdim=True)).clamp(min=0)
    return kl + (torch.xlogy(p_rest, p_rest) - p_rest * rest).sum()


def teacher_targets(model: Any, examples: list[Example], pad_id: int, top_k: int, batch_size: int = 8) -> None:
    """Attach to each block with distilled tokens the base's top-k next-token log-probabilities
    there (one forward pass per block for the whole run, instead of one per block per epoch)."""
    chosen = [example for example in examples if example.distill and not example.context]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad(), methods.base_view(model):
        open_book_targets(model, [e for e in examples if e.context], pad_id, top_k, batch_size)
        for i in range(0, len(chosen), batch_size):
            group = chosen[i : i + batch_size]
            batch = collate(group, pad_id)
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits[:, :-1]
            soft = distilled_positions(batch["labels"], batch["distill"]).to(logits.device)
            for row, example in enumerate(group):
                logprobs = logits[row][soft[row]].float().log_softmax(-1)
                values, indices = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
                example.teacher = Teacher(indices, values)
    model.train(was_training)


def open_book_targets(model: Any, blocks: list[Example], pad_id: int, top_k: int, batch_size: int) -> None:
    """The `Teacher` of each block of context-distilled answers: the model's top-k next-token
    log-probabilities at each answer token, reading the answer's passage first (called in the base view)."""
    readings = [(block, ids, n) for block in blocks for ids, n in (block.context or [])]
    device = next(model.parameters()).device
    found: dict[int, list[tuple[Any, Any]]] = {}
    for i in range(0, len(readings), batch_size):
        group = readings[i : i + batch_size]
        width = max(len(ids) for _, ids, _ in group)
        ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for _, ids, _ in group], device=device)
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for _, ids, _ in group], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, (block, tokens, n) in enumerate(group):
            logprobs = logits[row, len(tokens) - n - 1 : len(tokens) - 1].float().log_softmax(-1)
            values, indices = logprobs.topk(min(top_k, logprobs.shape[-1]), dim=-1)
            found.setdefault(id(block), []).append((indices, values))
    for block in blocks:
        rows = found[id(block)]
        block.teacher = Teacher(torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows]))


def evaluate(model: Any, examples: list[Example], pad_id: int, batch_size: int) -> float:
    """Mean loss per learned token on `examples`."""

    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id).items()}
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            total += model(**batch).loss.item() * n
            count += n
    model.train()
    return total / max(count, 1)


# ---- save -------------------------------------------------------------------------------------

def save(job: TrainJob, model: Any, tokenizer: Any, dataset: Dataset, summary: dict[str, Any], dtype: Any,
         started: float, state: dict[str, Any] | None = None) -> Path:
    """Write the version folder in a hidden staging folder, check it, and rename it into place
    (`state`: a sharded model's whole weights, `full_state`)."""
    final = Path(job.output_dir) / job.version
    if final.exists():
        raise FileExistsError(f"{final} already exists: adapter versions are immutable")
    staging = Path(tempfile.mkdtemp(prefix=f".{job.version}.", dir=job.output_dir))
    try:
        method = methods.of(model)
        if state is not None:
            method.save(model, tokenizer, staging, saved_dtype(job.base_model), state)
        else:
            method.save(model, tokenizer, staging, saved_dtype(job.base_model))
        atomic_write_json(staging / META_FILE, _meta(job, model, dataset, summary, dtype, started))
        if method.merged:
            check_model(staging)
        else:
            check_adapter(staging, job.hyper.vllm_max_lora_rank)
        publish_dir(staging, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _meta(job: TrainJob, model: Any, dataset: Dataset, summary: dict[str, Any], dtype: Any,
          started: float) -> dict[str, Any]:
    return {
        "version": job.version,
        "method": job.hyper.method,
        **methods.of(model).info(),
        "trainable_parameters": methods.count_trainable(model),
        "parent": job.parent_version,
        "base_model": job.base_model,
        "documents": job.documents,
        "relearned": job.relearned,
        "records": dataset.counts,
        "augmented_sample": job.data.augmented[:3],
        "augmentation": job.augmentation,
        "train_tokens_per_epoch": dataset.train_tokens,
        "hyperparameters": job.hyper.model_dump(),
        "dtype": str(dtype).removeprefix("torch."),
        "training": summary,
        "duration_s": round(time.time() - started, 2),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "libraries": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
    }


# ---- entry point --------------------------------------------------------------------------------

def run(job: TrainJob, json_progress: bool = False) -> Path:
    """setup -> train -> save; returns the version folder."""
    started = time.time()
    stopping = {"flag": False}

    def request_stop(*_: Any) -> None:
        stopping["flag"] = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, request_stop)
    rank = distributed.start()
    model, tokenizer, dtype = load_model(job)
    dataset = build_dataset(job, tokenizer)
    if not dataset.train:
        raise ValueError("the job has no training text")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    log.info("training %s: %d sequences of ≤ %d tokens (%s), dtype %s", job.version, len(dataset.train),
             job.hyper.seq_len, dataset.counts, dtype)
    summary = train(job, model, dataset, pad_id, json_progress, stop=lambda: stopping["flag"])
    summary["tokens_per_s"] = round(summary["tokens"] / max(time.time() - started, 1e-9), 1)
    summary["processes"] = distributed.world_size()
    path = Path(job.output_dir) / job.version
    state = distributed.full_state(model) if distributed.shards(job.hyper.method, distributed.world_size()) else None
    if rank == 0:  # the processes of a torchrun group hold the same weights: one saves them
        path = save(job, model, tokenizer, dataset, summary, dtype, started, state)
    distributed.finish()
    if json_progress and rank == 0:
        emit({"event": "done", "path": str(path), "summary": {k: v for k, v in summary.items() if k != "losses"}})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.learning.train", description="Train one LoRA adapter version.")
    parser.add_argument("job", type=Path, help="job file (JSON) written by the daemon or by hand")
    parser.add_argument("--json-progress", action="store_true", help="progress as JSON lines (for the daemon)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        path = run(load_job(args.job), args.json_progress)
    except Cancelled:
        log.warning("cancelled; no adapter was saved")
        return 130
    log.info("adapter ready: %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
