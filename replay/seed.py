"""The replay text the embedded model wrote once, shipped so that a first start need not wait for it.

Without a configured corpus, a replay build has the base model write its own synthetic corpus and
answer the rehearsal prompts: 11 to 70 minutes on 2 cores before anything can be learned. For the
embedded model (SmolLM2-135M-Instruct) that text ships in `seed_text/` with what it was made with
(`made_with.json`); `plant` copies it into a replay folder when the build would ask the same model
the same (model_id, counts, temperature, seed), and never over a file already there. Any other base
model, or other settings, writes its own as before. Knows nothing of embedding or indexes.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from replay import files
from replay.job import BuildJob

log = logging.getLogger(__name__)
SEED_TEXT = Path(__file__).parent / "seed_text"
MADE_WITH_FILE = "made_with.json"
MADE_WITH_KEYS = ("model_id", "synthetic_documents", "synthetic_temperature", "rehearsal_prompts",
                  "rehearsal_held_out", "seed")


def _made_with(seed_text: Path) -> dict:
    return json.loads((seed_text / MADE_WITH_FILE).read_text(encoding="utf-8"))


def matches(job: BuildJob, seed_text: Path = SEED_TEXT, made_with: dict | None = None) -> bool:
    """Whether the build would ask the model what the shipped text answers (so it needs no model server)."""
    made_with = made_with or _made_with(seed_text)
    return all(made_with[key] == getattr(job, key) for key in MADE_WITH_KEYS)


def plant(job: BuildJob, seed_text: Path = SEED_TEXT) -> list[str]:
    """Copy the shipped text into `job.folder` where the build would write the same; the paths copied."""
    made_with = _made_with(seed_text)
    if not matches(job, seed_text, made_with):
        return []
    wanted = [seed_text / files.REHEARSAL_FILE]
    if not job.corpus:  # the synthetic corpus stands in for a corpus only when none is configured
        wanted += sorted((seed_text / files.SYNTHETIC_DIR).iterdir())
    copied = []
    for source in wanted:
        target = job.folder / source.relative_to(seed_text)
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
            copied.append(str(source.relative_to(seed_text)))
    if files.SYNTHETIC_DIR + "/" + files.SYNTHETIC_CORPUS_FILE in copied:  # a synthesis stopped part way is moot
        (job.folder / files.SYNTHETIC_DIR / files.SYNTHETIC_PARTIAL_FILE).unlink(missing_ok=True)
    if copied:
        log.info("took the replay text %s wrote once with these settings (%s): nothing to ask it",
                 made_with["model_id"], ", ".join(copied))
    return copied
