"""Adapter version folders: names, files, and the check that vLLM can serve one.

An adapter version is `<state>/adapters/vNNNN/` holding a PEFT LoRA (`adapter_config.json`,
`adapter_model.safetensors`) and `meta.json` (lineage, data, hyperparameters, losses); a version of
a method that trains merged weights (`train.method`) holds a complete model folder instead. Folders
appear by rename only when complete and are never modified after, except that `prune_merged` later
deletes an old merged version's weights (`state.keep_merged`: a full model copy each), leaving its
meta.json marked `pruned_at`. Owns version numbering and the view of every version (state, lineage,
probe results) that status and the CLI show. Knows nothing of training or probing.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from daemon.engine.merged import is_merged
from daemon.layout import VERSION_RE
from daemon.learning.records import PROMOTED, REJECTED, CycleStore, adapter_states
from replay.durable import atomic_write_json, read_json

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "meta.json"
HEAD_MODULES = frozenset({"lm_head", "embed_tokens", "wte", "embed_out", "output"})
PRUNED = "pruned_at"  # meta.json key: when the version's weights were deleted (state.keep_merged)


class AdapterError(ValueError):
    """An adapter folder vLLM could not serve; the message says why."""


def versions(adapters_dir: Path) -> list[str]:
    """Complete version folders, oldest first."""
    if not adapters_dir.is_dir():
        return []
    found = [p.name for p in adapters_dir.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
    return sorted(found, key=lambda name: int(name[1:]))


def next_version(adapters_dir: Path, used: Iterable[str] = ()) -> str:
    """The version after every folder in `adapters_dir` and every name in `used` (versions that
    cycles named, whose folders may never have been written)."""
    numbers = [int(name[1:]) for name in [*versions(adapters_dir), *used] if VERSION_RE.match(name)]
    return f"v{max(numbers, default=0) + 1:04d}"


def remove_partial(adapters_dir: Path) -> list[str]:
    """Delete staging folders a killed trainer left behind (hidden `.vNNNN.*` folders)."""
    removed = []
    if adapters_dir.is_dir():
        for path in adapters_dir.iterdir():
            if path.is_dir() and path.name.startswith(".v"):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
    return removed


def read_meta(folder: Path) -> dict[str, Any]:
    """The version's meta.json ({} when the folder or the file is missing)."""
    return read_json(folder / META_FILE, default={})


def version_method(folder: Path) -> str:
    """The train.method a version folder was trained with (versions from before methods were LoRA)."""
    meta = read_meta(folder)
    return meta.get("method") or meta.get("hyperparameters", {}).get("method") or "lora"


def check_adapter(folder: Path, max_rank: int) -> dict[str, Any]:
    """Raise AdapterError unless `folder` is a plain LoRA that vLLM serves with `max_rank`."""
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise AdapterError(f"{folder.name}: {name} is missing")
    config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not 'LORA'")
    if config.get("use_dora"):
        problems.append("DoRA is on (vLLM serves plain LoRA only)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save is set ({config['modules_to_save']}); vLLM cannot serve it")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    head = sorted(t for t in targets if t.rsplit(".", 1)[-1] in HEAD_MODULES)
    if head:
        problems.append(f"it trains the embeddings or output head ({', '.join(head)}); cld serves linear layers only")
    rank = max([config.get("r", 0), *(config.get("rank_pattern") or {}).values()])
    if rank > max_rank:
        problems.append(f"rank {rank} is over vLLM's --max-lora-rank {max_rank}")
    if problems:
        raise AdapterError(f"{folder.name}: " + "; ".join(problems))
    return config


def check_version(folder: Path, max_rank: int) -> dict[str, Any]:
    """`check_adapter` for a LoRA version, `check_model` for a merged-weight one."""
    pruned = read_meta(folder).get(PRUNED)
    if pruned:
        raise AdapterError(f"{folder.name}: its weights were deleted at {pruned} (state.keep_merged keeps the "
                           "newest promoted merged-weight versions); only its meta.json is left")
    return check_model(folder) if is_merged(folder) else check_adapter(folder, max_rank)


def prune_merged(adapters_dir: Path, promoted: Iterable[str], protected: Iterable[str], keep: int) -> list[str]:
    """Delete the weights of merged-weight versions (a full model copy each) except those in
    `protected` (the served version) and the newest `keep` merged ones of `promoted`; 0 keeps all. Each
    pruned folder keeps its meta.json, marked `pruned_at` first, so a crash half-way is finished by
    the next call (config.json, which makes a folder a merged version, goes last). Returns the
    versions pruned. LoRA versions (a few MB) are never pruned."""
    if keep <= 0:
        return []
    merged = [v for v in promoted if VERSION_RE.match(v) and is_merged(adapters_dir / v)]
    kept = {*protected, *sorted(merged, key=lambda v: int(v[1:]))[-keep:]}
    pruned = []
    for version in versions(adapters_dir):
        folder = adapters_dir / version
        if version in kept or not is_merged(folder):
            continue
        meta = read_meta(folder)
        if not meta.get(PRUNED):
            atomic_write_json(folder / META_FILE, {**meta, PRUNED: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        for path in sorted(folder.iterdir(), key=lambda p: p.name == "config.json"):
            if path.name != META_FILE:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        pruned.append(version)
    return pruned


def check_model(folder: Path) -> dict[str, Any]:
    """Raise AdapterError unless `folder` is a complete model folder (merged weights) a server can
    load on its own: config, weights, tokenizer."""
    problems = [f"{name} is missing" for name in ("config.json", "tokenizer_config.json") if not (folder / name).is_file()]
    if not any(folder.glob("model*.safetensors")):
        problems.append("it holds no weights (model*.safetensors)")
    if problems:
        raise AdapterError(f"{folder.name}: " + "; ".join(problems))
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))


def adapters_view(adapters_dir: Path, cycles: CycleStore, serving: str | None) -> list[dict[str, Any]]:
    """Every adapter version with lineage, documents, probe results and state (status, CLI)."""
    records = cycles.all()
    states = adapter_states(records, serving)
    by_version = {r.version: r for r in records if r.version}
    out = []
    for version in sorted(set(versions(adapters_dir)) | set(states), key=lambda v: int(v[1:])):
        meta = read_meta(adapters_dir / version)
        record = by_version.get(version)
        out.append({
            "version": version, "state": states.get(version, "candidate"), "method": meta.get("method", "lora"),
            "parent": meta.get("parent", record.parent if record else None),
            "documents": len(meta.get("documents", record.documents if record else [])),
            "relearned": len(meta.get("relearned", record.relearned if record else [])),
            "probes": (record.probes.get("results") or {}) if record else {},
            "reasons": record.reasons if record else [],
            "failed": record.failed if record else [],
            "lost": (record.probes.get("lost") or []) if record else [],  # earlier facts the serving version knew
            "created_at": meta.get("created_at"),
            "pruned_at": meta.get(PRUNED),  # its weights deleted (state.keep_merged): it cannot be served again
            "training": {k: meta.get("training", {}).get(k) for k in ("steps", "tokens", "first_loss", "last_loss")},
            "records": meta.get("records", {}),  # how many of each kind it trained on (new, replay, augmented, ...)
            "augmented_sample": meta.get("augmented_sample", []),
            "augmentation": meta.get("augmentation", {}),  # per new document: records made, a sample, the teacher's counts
        })
    return out


def learned_documents(adapters_dir: Path, cycles: CycleStore) -> list[tuple[str, list[str]]]:
    """(version, content hashes of its new and relearned documents) of every version a cycle
    promoted, oldest first: what the journal must say was learned (a journal rebuild asks)."""
    promoted = [r.version for r in cycles.all() if r.state == PROMOTED and r.version]
    return [(version, [*meta.get("documents", []), *meta.get("relearned", [])])
            for version in promoted for meta in [read_meta(adapters_dir / version)]]


def refused_documents(adapters_dir: Path, cycles: CycleStore) -> list[tuple[str, list[str]]]:
    """(why, content hashes of its new documents) of every cycle whose candidate the gate refused,
    oldest first: what a rebuilt journal counts against them (`schedule.max_attempts`)."""
    refused = [r for r in cycles.all() if r.state == REJECTED and r.version]
    return [(f"cycle {r.id} refused its candidate {r.version}: " + "; ".join(f["reason"] for f in r.failed),
             list(read_meta(adapters_dir / r.version).get("documents", []))) for r in refused]
