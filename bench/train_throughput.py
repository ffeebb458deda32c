"""Training tokens/s of cld's recipe against a plain peft + transformers loop, side by side.

    .venv/bin/python bench/train_throughput.py [--model var/model] [--records 160] [--rounds 2]

Both train the same LoRA (rank 16, all linear layers) on the same records: varied-length text
passages (stdlib docstrings, real English) and short chat pairs, as a cycle mixes new chunks,
replay passages and rehearsal pairs. The plain loop is what one writes from the peft docs: fp32
model, one record per sequence, batches padded to their longest record. cld's recipe packs
records into full sequences and computes the frozen base in bf16 where the CPU has it.
Each run is one epoch over the same records; runs alternate (plain, cld, cld, plain, ...);
tokens/s counts real (non-padding) tokens over the training loop (model loading excluded). Prints a Markdown row for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import machine  # noqa: E402  (beside this file)

from daemon.config import TrainSection  # noqa: E402
from daemon.learning.jobs import JobData, TrainJob  # noqa: E402
from daemon.learning.train import build_dataset, load_model, train  # noqa: E402


def records(count: int, seed: int = 0) -> list[dict]:
    """Real English text of varied length: standard-library docstrings (read with `ast`, never
    imported), plus short chat pairs."""
    texts = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        except (SyntaxError, UnicodeDecodeError):
            continue
        texts += [p.strip()[:1000] for p in doc.split("\n\n") if len(p.split()) > 12]
    rng = random.Random(seed)
    rng.shuffle(texts)
    chats = [{"messages": [{"role": "user", "content": f"What does paragraph {i} say?"},
                           {"role": "assistant", "content": text[:200]}]} for i, text in enumerate(texts[:count // 4])]
    return [{"text": text} for text in texts[: count - len(chats)]] + chats


def plain_epoch(model_dir: str, data: list[dict], hp: TrainSection) -> float:
    """One epoch of the straightforward loop: fp32, one record per row, batches padded."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=hp.rank, lora_alpha=hp.alpha, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=hp.learning_rate)
    texts = [r["text"] if "text" in r else tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in data]
    model.train()
    tokens, started = 0, time.perf_counter()
    for i in range(0, len(texts), hp.batch_size):
        enc = tokenizer(texts[i : i + hp.batch_size], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        model(**enc, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += int(enc["attention_mask"].sum())
    return tokens / (time.perf_counter() - started)


def cld_epoch(model_dir: str, data: list[dict], hp: TrainSection) -> float:
    """One epoch of cld's recipe (daemon.learning.train) over the same records."""
    job = TrainJob(version="v0001", base_model=model_dir, output_dir="/nonexistent", data=JobData(new=data),
                   hyper=hp.model_copy(update={"eval_fraction": 0.0, "epochs": 1}))
    model, tokenizer, _ = load_model(job)
    dataset = build_dataset(job, tokenizer)
    started = time.perf_counter()
    summary = train(job, model, dataset, tokenizer.eos_token_id, json_progress=True, stop=lambda: False)
    return summary["tokens"] / (time.perf_counter() - started)


def _quiet_progress() -> None:
    from daemon.learning import train as recipe

    recipe.emit = lambda event: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="var/model", help="prepared base model folder (`cld prepare`)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--records", type=int, default=160)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    _quiet_progress()
    data = records(args.records)
    hp = TrainSection(method="lora", rank=16, alpha=32, seq_len=256, batch_size=4, learning_rate=1e-4)
    plain, ours = [], []
    for round_ in range(args.rounds):  # ABBA order
        for name in ("plain", "cld") if round_ % 2 == 0 else ("cld", "plain"):
            if name == "plain":
                plain.append(plain_epoch(args.model, data, hp))
            else:
                ours.append(cld_epoch(args.model, data, hp))
            print(f"round {round_}: {name} {(plain if name == 'plain' else ours)[-1]:.0f} tok/s", flush=True)
    ratio = statistics.mean(ours) / statistics.mean(plain)
    print(json.dumps({"plain_tok_s": plain, "cld_tok_s": ours, "ratio": ratio}, indent=2))
    print(f"\nMachine: {machine.describe()}; torch {torch.__version__}")
    print("| model | plain peft loop (fp32, padded) | cld recipe (packed, bf16 base) | ratio | target |")
    print("|---|---|---|---|---|")
    print(f"| {args.model} | {statistics.mean(plain):.0f} tok/s | {statistics.mean(ours):.0f} tok/s "
          f"| {ratio:.2f}× | ≥ 1.3× |")


if __name__ == "__main__":
    main()
