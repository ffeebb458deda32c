"""What a document is trained as, and how it is kept: its forms.

A document is learned as its raw chunks (the journal's) and as the forms `[augment]` makes of it —
the deterministic ones (`augment`: shuffled, titled, notes, quiz, questions) and the teacher's
(`teacher`: pairs and rephrasings). They are made once, the first time a cycle trains the document,
and stored with it (`forms/<content hash>.json`), so every later cycle replays the very records it
was trained on (knowledge replay) and a rebuilt journal keeps them (the file is named by content,
not by journal id). Beside them the document's held-out questions are stored: the same facts asked
in a phrasing never trained, with the passage each comes from — the gate's answering probe.

A document not yet learned is made again when `[augment]` changed since (its forms are what the
settings of the cycle that learns it say); one learned keeps its forms for life.

Owns making (once), storing and reading a document's forms, the teacher's turn (`teach`), and how
many of earlier documents' forms a cycle replays. Knows nothing of replay selection, training,
probing or serving.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

from daemon.config import AugmentSection, ProbesSection
from daemon.engine import vllm
from daemon.ingestion.chunking import record_text
from daemon.learning import augment, teacher
from daemon.learning.probes import QA, Question
from replay.durable import atomic_write_text

log = logging.getLogger(__name__)
Record = dict[str, Any]
FORMAT = 1  # of the stored file; a file of another format is made again


@dataclass
class Forms:
    """One document's forms: what is trained (and replayed later), what is held out, and what was
    made (for meta.json)."""

    records: list[Record] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    made_with: str = ""

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "made_with": self.made_with, "records": self.records,
                           "questions": [asdict(q) for q in self.questions], "report": self.report}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "Forms":
        data = json.loads(text)
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, not {FORMAT}")
        return cls(data["records"], [Question(**q) for q in data["questions"]], data["report"], data["made_with"])


class Library:
    """Every document's forms, kept in `folder` (one file per content hash); the teacher's
    writing in `teacher_folder`."""

    def __init__(self, augmenting: AugmentSection, probing: ProbesSection, folder: Path, teacher_folder: Path,
                 text_of: Callable[[dict[str, Any]], Optional[str]]):
        self.augmenting, self.probing = augmenting, probing
        self.folder, self.teacher_folder = folder, teacher_folder
        self.text_of = text_of  # a document's whole text (None for instruction or chat data)

    # ---- a cycle's documents ----------------------------------------------------------------

    async def prepare(self, documents: list[dict[str, Any]], sampler: Any, base_name: str) -> dict[str, Forms]:
        """The forms of a cycle's new documents by content hash: the teacher (`sampler` serving
        `base_name`, or `augment.teacher_url`) writes first what it has not written yet, when
        `augment.teacher_*` asks for it; then each document's forms are read, or made again when
        `[augment]` changed since, and stored."""
        settings = self.augmenting
        if settings.teacher_pairs or settings.teacher_rephrasings:
            await self.teach(documents, sampler, base_name)
        return {doc["hash"]: self.of(doc, keep=False) for doc in documents}

    def of(self, document: dict[str, Any], keep: bool = True) -> Forms:
        """A document's forms: as stored, when it was learned (`keep`) or the settings are the
        same; else made now and stored."""
        stored = self.stored(document)
        wanted = self.fingerprint()
        if stored is not None and (keep or stored.made_with == wanted):
            return stored
        forms = self.make(document)
        forms.made_with = wanted
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.folder / f"{document['hash']}.json", forms.to_json())
        return forms

    def stored(self, document: dict[str, Any]) -> Optional[Forms]:
        path = self.folder / f"{document['hash']}.json"
        try:
            return Forms.from_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("%s is unreadable (%s): the document's forms are made again", path, error)
            return None

    def make(self, document: dict[str, Any]) -> Forms:
        """The forms `[augment]` makes of a document now, its held-out questions and the report."""
        settings, text = self.augmenting, self.text_of(document)
        if text is None:
            return Forms(report={"records": 0})
        source = document.get("source") or ""
        paragraphs, title = augment.split_paragraphs(text), augment.title_of(text, source)
        records = augment.augment(text, source, settings.forms, settings.shuffles, settings.max_notes,
                                  seed=_seed(document["hash"]), max_quiz=settings.max_quiz,
                                  max_questions=settings.max_questions)
        report: dict[str, Any] = {"title": title}
        if (settings.teacher_pairs or settings.teacher_rephrasings) and (taught := self.taught(document)):
            pairs, held_out = teacher.split(taught["pairs"], self.probing.teacher_held_out)
            rephrasings = list(taught.get("rephrasings", []))[:settings.teacher_rephrasings]
            records += teacher.records(pairs if settings.teacher_pairs else [], rephrasings, title)
            report["teacher"] = {"teacher": taught.get("teacher"), "asked": taught.get("asked"),
                                 "kept": len(taught["pairs"]), "trained": len(pairs), "held_out": len(held_out),
                                 "dropped": taught.get("dropped", {})}
            if settings.teacher_rephrasings:
                report["teacher"]["rephrasings"] = {"asked": taught.get("rephrase_asked", 0), "kept": len(rephrasings),
                                                    "dropped": taught.get("rephrase_dropped", {})}
        records = augment.open_book(records, paragraphs, settings.context_distill)
        questions = [Question(q, a, augment.passage(sentence, paragraphs))
                     for q, a, sentence in augment.held_out_questions(paragraphs, title,
                                                                      self.probing.questions_per_document)]
        report |= {"records": len(records), "open_book": sum("open_book" in r for r in records),
                   "held_out_questions": len(questions), "sample": records[:2]}
        return Forms(records, questions, report)

    def fingerprint(self) -> str:
        """What the forms of a document depend on: `[augment]`, the held-out questions' count and
        the generator's format."""
        settings = self.augmenting.model_dump(exclude={"teacher_api_key"})
        wanted = {"augment": settings, "questions": self.probing.questions_per_document,
                  "teacher_held_out": self.probing.teacher_held_out, "format": FORMAT}
        return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]

    # ---- what earlier documents bring --------------------------------------------------------

    def replayed(self, documents: list[dict[str, Any]], budget_tokens: int, count_tokens: Callable[[str], int],
                 seed: int) -> list[Record]:
        """A sample of the stored forms of `documents` (learned earlier) up to `budget_tokens`,
        every document's in turn, so each keeps being asked as it was taught."""
        queues = [list(forms.records) for doc in documents if (forms := self.stored(doc)) and forms.records]
        rng = random.Random(seed)
        for queue in queues:
            rng.shuffle(queue)
        chosen, used = [], 0
        while budget_tokens > 0 and any(queues):
            for queue in queues:
                if queue:
                    record = queue.pop()
                    used += count_tokens(record_text(record))
                    if used > budget_tokens:
                        return chosen
                    chosen.append(record)
        return chosen

    # ---- the teacher -------------------------------------------------------------------------

    def teacher_held_out(self, document: dict[str, Any]) -> list[QA]:
        """The teacher's questions about a document that are never trained on (`probes.teacher_held_out`)."""
        if not self.augmenting.teacher_pairs or not (taught := self.taught(document)):
            return []
        return [QA(pair["question"], pair["answer"]) for pair in teacher.split(taught["pairs"], self.probing.teacher_held_out)[1]]

    def taught(self, document: dict[str, Any]) -> Optional[dict[str, Any]]:
        """What the teacher wrote about a document (None: not asked yet, or its file is unreadable)."""
        path = self.teacher_folder / f"{document['hash']}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            log.warning("%s is unreadable (%s): the teacher is asked again", path, error)
            return None

    async def teach(self, documents: list[dict[str, Any]], sampler: Any, base_name: str) -> None:
        """Have the teacher write what it has not written yet about each document: questions and
        answers (`augment.teacher_pairs`), rephrased passages (`augment.teacher_rephrasings`), kept in
        teacher/<hash>.json. A teacher that fails costs only what it would have written: the cycle
        goes on without it, the next one asks again."""
        settings = self.augmenting
        todo = []
        for doc in documents:
            taught = self.taught(doc) or {}
            pairs = settings.teacher_pairs if not taught.get("asked") else 0  # what it has not written yet
            rephrasings = settings.teacher_rephrasings if not taught.get("rephrase_asked") else 0
            if (pairs or rephrasings) and (text := self.text_of(doc)) is not None:
                todo.append((doc, text, taught, pairs, rephrasings))
        if not todo:
            return
        own = vllm.VLLMClient(settings.teacher_url, key=settings.teacher_api_key) if settings.teacher_url else None
        try:
            model = settings.teacher_model or (await own.base_model() if own else base_name)
            for doc, text, taught, pairs, rephrasings in todo:
                generated = (await teacher.generate(
                    own or sampler, model, augment.split_paragraphs(text), text,
                    augment.title_of(text, doc.get("source") or ""), pairs, settings.teacher_temperature,
                    rephrasings)).to_dict()
                fresh = (teacher.PAIR_KEYS if pairs else ()) + (teacher.REPHRASE_KEYS if rephrasings else ())
                kept = {k: v for k, v in taught.items() if k not in fresh}  # what it wrote in earlier cycles
                self.teacher_folder.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.teacher_folder / f"{doc['hash']}.json", json.dumps({**generated, **kept}, indent=1))
                (self.folder / f"{doc['hash']}.json").unlink(missing_ok=True)  # made again with what it wrote
        except (httpx.HTTPError, RuntimeError, KeyError, ValueError) as error:
            log.warning("the teacher (%s) failed: %s; this cycle trains without its questions (the next one asks "
                        "again)", settings.teacher_url or "the served base model", error)
        finally:
            if own is not None:
                await own.aclose()


def _seed(content_hash: str) -> int:
    """A document's own seed (its shuffles are the same whatever its journal id)."""
    return int(content_hash[:8], 16) if all(c in "0123456789abcdef" for c in content_hash[:8]) else 0
