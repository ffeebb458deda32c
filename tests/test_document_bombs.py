"""A small file must not become a huge document: text is bounded while it is extracted
(ingest.max_document_tokens), PDFs by pages (ingest.max_pdf_pages) and time
(ingest.extract_timeout_s, in a child process); beyond, the file is quarantined with the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.ingestion import journal
from daemon.ingestion.chunking import Chunker, load_tokenizer
from daemon.ingestion.ingest import open_ingester
from daemon.ingestion.readers import ReadLimits, Unreadable, read_pdf
from daemon.layout import StateDir
from tests.ingest_helpers import make_settings, pdf_bytes, pdf_file

WORDS = "Zorblat bridges freeze in May and thaw in June. " * 100  # ~4,900 characters


def shared_stream_pdf(pages: int, text: str) -> bytes:
    """`pages` pages that all draw one content stream: a few KB that extract to pages × text."""
    escaped = text.replace("(", "\\(").replace(")", "\\)")
    stream = f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET"
    kids = " ".join(f"{5 + i} 0 R" for i in range(pages))
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{kids}] /Count {pages} >>",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
               f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream"]
    objects += ["<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                "/Contents 4 0 R >>"] * pages
    return pdf_file(objects)


def ingest_one(tmp_path: Path, name: str, data: bytes, extra: str = "") -> journal.Recorded:
    settings = make_settings(tmp_path, extra)
    settings.watch.inbox.mkdir(parents=True, exist_ok=True)
    (settings.watch.inbox / name).write_bytes(data)
    with open_ingester(settings) as ingester:
        recorded = ingester.ingest(settings.watch.inbox / name)
    assert recorded is not None
    return recorded


def test_a_pdf_repeating_one_stream_on_every_page_is_stopped_early_and_quarantined(tmp_path: Path) -> None:
    bomb = shared_stream_pdf(300, WORDS)  # ~1.5 million characters from a small file
    assert len(bomb) < 60_000
    recorded = ingest_one(tmp_path, "bomb.pdf", bomb, "max_document_tokens = 20000\n")
    assert recorded.outcome == "quarantined"
    assert recorded.reason.startswith("too long: about") and "ingest.max_document_tokens = 20,000" in recorded.reason
    assert StateDir(tmp_path / "state").journal.stat().st_size < 1_000_000, "nothing of it was journaled"


def test_too_many_pages_is_quarantined(tmp_path: Path) -> None:
    recorded = ingest_one(tmp_path, "long.pdf", shared_stream_pdf(60, "page"), "max_pdf_pages = 50\n")
    assert recorded.reason == "too many pages: 60 is over ingest.max_pdf_pages = 50"


def test_plain_text_over_the_limit_is_quarantined(tmp_path: Path) -> None:
    recorded = ingest_one(tmp_path, "big.txt", WORDS.encode() * 50, "max_document_tokens = 10000\n")
    assert recorded.outcome == "quarantined" and recorded.reason.startswith("too long")


def test_an_extraction_over_its_time_limit_is_stopped() -> None:
    with pytest.raises(Unreadable, match=r"took too long: .* 0.01 s \(ingest.extract_timeout_s\)"):
        read_pdf(shared_stream_pdf(300, WORDS), ReadLimits(timeout_s=0.01))


def test_a_normal_pdf_within_the_limits_reads_whole(tmp_path: Path) -> None:
    recorded = ingest_one(tmp_path, "notes.pdf", pdf_bytes("Release 4.2 is out.", "Zorblat got faster."))
    assert recorded.outcome == "document"


# ---- counted as the trainer will see it (issue 35 #5) --------------------------------------------------------

SPACED_RARE = "☃ " * 25_000  # 50,000 characters (12,500 "tokens" at 4 a token), 25,000 tokens: 2 characters each


def test_text_is_bounded_by_its_tokens_not_an_estimate_from_its_characters(tmp_path: Path) -> None:
    recorded = ingest_one(tmp_path, "rare.txt", SPACED_RARE.encode(), "max_document_tokens = 20000\n")
    assert recorded.outcome == "quarantined"
    assert recorded.reason == ("too long: 25,000 tokens (counted by the base model's tokenizer, as training will see "
                               "them) is over ingest.max_document_tokens = 20,000")
    assert ingest_one(tmp_path / "fits", "rare.txt", SPACED_RARE.encode(), "max_document_tokens = 30000\n").outcome \
        == "document"


@pytest.mark.parametrize("name, line, count", [
    ("roles.jsonl", '{"messages": [{"role": "%s", "content": "hi"}]}' % ("x " * 100_000), 1),  # a role of 200 KB
    ("empty.jsonl", '{"messages": [%s]}' % ", ".join(['{"role": "user", "content": ""}'] * 30_000), 1),
    ("many.jsonl", '{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}]}', 10_000),
])
def test_chat_records_count_their_roles_and_each_message(tmp_path: Path, name: str, line: str, count: int) -> None:
    """The trainer renders every message with its role in the chat template: a role of megabytes or
    thousands of empty messages are that many tokens, not the 1 or 0 their contents are."""
    recorded = ingest_one(tmp_path, name, "\n".join([line] * count).encode(), "max_document_tokens = 20000\n")
    assert recorded.outcome == "quarantined" and recorded.reason.startswith("too long")


def test_a_document_taken_before_the_tokenizer_is_set_aside_once_counted_over(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, "max_document_tokens = 20000\n")
    settings.watch.inbox.mkdir(parents=True, exist_ok=True)
    counted: list = []
    with open_ingester(settings, chunker=lambda: counted[0] if counted else None) as ingester:
        (settings.watch.inbox / "rare.txt").write_text(SPACED_RARE)
        recorded = ingester.ingest(settings.watch.inbox / "rare.txt")
        assert recorded.outcome == "document" and ingester.journal.pending() == [recorded.document_id]
        counted.append(Chunker(load_tokenizer(Path(settings.model.base)), 16, 4))
        assert ingester.chunk_pending() == 1
        [aside] = ingester.journal.documents(journal.SET_ASIDE)
        assert aside["id"] == recorded.document_id and aside["set_aside"].startswith("too long: ")
        assert ingester.journal.documents("ready") == [], "it is never trained"
