"""The training job file: what the daemon hands the trainer (`python -m daemon.learning.train JOB.json`).

Owns the job's schema. A job is self-contained (base model folder, parent adapter, every text
to train on, hyperparameters), so a run can be repeated by hand from its file. Knows nothing of
how the texts were selected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from daemon.config import TrainSection

# A record is {"text": str} (raw text, every token learned), {"prompt": str, "completion": str}
# or {"messages": [{"role": ..., "content": ...}, ...]} (chat; see train.mask_prompt; a record with
# "mask_prompt": true has only its answer learned whatever the setting).
Record = dict[str, Any]


def _check_record(record: Record) -> Record:
    if "text" in record and isinstance(record["text"], str):
        return record
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return record
    messages = record.get("messages")
    if isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        return record
    raise ValueError("a record needs 'text', 'prompt' and 'completion', or a list of chat 'messages'")


class JobData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    new: list[Record] = Field(description="chunks of the new documents")
    replay: list[Record] = Field(default_factory=list, description="passages of the original corpus")
    knowledge: list[Record] = Field(default_factory=list, description="chunks of documents learned earlier")
    rehearsal: list[Record] = Field(default_factory=list, description="(prompt, base answer) chat pairs")
    augmented: list[Record] = Field(default_factory=list, description="other forms of the new documents "
                                    "(daemon.learning.augment), learned once per epoch")

    @field_validator("new", "replay", "knowledge", "rehearsal", "augmented")
    @classmethod
    def _records(cls, records: list[Record]) -> list[Record]:
        return [_check_record(record) for record in records]

    @classmethod
    def mixed(cls, new: list[Record], replayed: list[Record], augmented: list[Record] | None = None) -> JobData:
        """New chunks and replay records tagged by `kind` (corpus, knowledge, rehearsal)."""
        return cls(new=new, replay=[r for r in replayed if r["kind"] == "corpus"],
                   knowledge=[r for r in replayed if r["kind"] == "knowledge"],
                   rehearsal=[r for r in replayed if r["kind"] == "rehearsal"], augmented=augmented or [])


class TrainJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(pattern=r"^v\d{4,}$")
    base_model: str
    output_dir: str
    parent_version: Union[str, None] = None
    parent_path: Union[str, None] = None
    documents: list[str] = Field(default_factory=list, description="content hashes of the new documents")
    relearned: list[str] = Field(default_factory=list, description="content hashes of documents learned before, "
                                 "trained again as new ones (the served version was of another train.method)")
    data: JobData
    hyper: TrainSection = Field(default_factory=TrainSection)
    augmentation: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per new document (content hash): what augmentation made of it (records, "
        "a sample, the teacher's counts), recorded in meta.json")


def load_job(path: Path) -> TrainJob:
    return TrainJob.model_validate_json(path.read_text(encoding="utf-8"))
