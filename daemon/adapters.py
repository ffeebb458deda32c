"""Adapter version folders: names, files, and the check that vLLM can serve one.

An adapter version is `<state>/adapters/vNNNN/` holding a PEFT LoRA (`adapter_config.json`,
`adapter_model.safetensors`) and `meta.json` (lineage, data, hyperparameters, losses). Folders
appear by rename only when complete and are never modified after. Knows nothing of training or
probing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
META_FILE = "meta.json"
VERSION_RE = re.compile(r"^v(\d{4,})$")
HEAD_MODULES = frozenset({"lm_head", "embed_tokens", "wte", "embed_out", "output"})


class AdapterError(ValueError):
    """An adapter folder vLLM could not serve; the message says why."""


def versions(adapters_dir: Path) -> list[str]:
    """Complete version folders, oldest first."""
    if not adapters_dir.is_dir():
        return []
    found = [p.name for p in adapters_dir.iterdir() if p.is_dir() and VERSION_RE.match(p.name)]
    return sorted(found, key=lambda name: int(name[1:]))


def next_version(adapters_dir: Path) -> str:
    existing = versions(adapters_dir)
    return f"v{(int(existing[-1][1:]) + 1 if existing else 1):04d}"


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
    return json.loads((folder / META_FILE).read_text(encoding="utf-8"))


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
