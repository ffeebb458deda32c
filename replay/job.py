"""What a replay build is asked to do: the job `python -m replay.build JOB.json` reads.

Owns the job's fields, their JSON form, and which of them decide the passages and vectors (a
change of those means a rebuild). Kept apart from the build so that writing a job needs neither
FAISS nor torch. Knows nothing of how the job is carried out.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from replay.embed import DEFAULT_EMBEDDER
from replay.synth import GeneratorSpec


@dataclass
class BuildJob:
    folder: Path  # the replay folder (`<state>/replay`)
    corpus: list[Path] = field(default_factory=list)  # empty = synthesize from the base model
    embedder: str = DEFAULT_EMBEDDER
    passage_tokens: int = 200
    held_out_fraction: float = 0.05
    text_field: str = "text"
    model_id: str = ""  # the base model: the synthetic corpus and rehearsal pairs are its own
    generator: GeneratorSpec | None = None  # where the base model answers (None: nowhere)
    synthetic_documents: int = 400
    synthetic_temperature: float = 0.9
    rehearsal_prompts: int = 120
    rehearsal_held_out: int = 20
    seed: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), default=str, indent=2)

    @classmethod
    def from_json(cls, text: str) -> BuildJob:
        data = json.loads(text)
        data["folder"] = Path(data["folder"])
        data["corpus"] = [Path(path) for path in data["corpus"]]
        if generator := data["generator"]:
            data["generator"] = GeneratorSpec(**generator | {"stop": tuple(generator.get("stop", ()))})
        return cls(**data)

    @property
    def cut_settings(self) -> dict[str, Any]:
        """The settings that decide the passages and their vectors (a change means a rebuild)."""
        return {"embedder": self.embedder, "passage_tokens": self.passage_tokens,
                "held_out_fraction": self.held_out_fraction, "text_field": self.text_field}
