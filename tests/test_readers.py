"""Document readers: each format's text, instruction roles kept, and each refusal's reason."""

from __future__ import annotations

import io

import pytest

from daemon.ingestion import readers
from daemon.ingestion.readers import Unreadable, UnsupportedType, get_reader
from tests.ingest_helpers import HTML, jsonl, pdf_bytes


def read(suffix: str, data: bytes) -> list[dict]:
    return get_reader(suffix)(data)


def refusal(suffix: str, data: bytes) -> str:
    with pytest.raises(Unreadable) as caught:
        read(suffix, data)
    return caught.value.reason


# the registry --------------------------------------------------------------------------------

def test_every_promised_type_has_a_reader() -> None:
    assert {".txt", ".md", ".html", ".htm", ".pdf", ".jsonl"} <= set(readers.supported())


def test_an_unknown_type_fails_loudly_naming_the_valid_ones() -> None:
    with pytest.raises(UnsupportedType) as caught:
        get_reader(".docx")
    assert "'.docx'" in caught.value.reason
    assert all(suffix in caught.value.reason for suffix in (".txt", ".md", ".html", ".pdf", ".jsonl"))
    with pytest.raises(UnsupportedType, match="no extension"):
        get_reader("")


def test_suffixes_match_whatever_their_case() -> None:
    assert get_reader(".TXT") is get_reader(".txt")


def test_a_suffix_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="already"):
        readers.register(".txt")(readers.read_text)


# plain text and markdown ----------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    "Zorblat – café".encode(),
    b"\xef\xbb\xbf" + "Zorblat – café".encode(),   # UTF-8 with a byte-order mark
    "Zorblat – café".encode("utf-16"),              # UTF-16 with its byte-order mark
])
def test_text_is_utf8_or_utf16_with_a_bom(data: bytes) -> None:
    assert read(".txt", data) == [{"text": "Zorblat – café"}]


def test_markdown_is_kept_as_written() -> None:
    assert read(".md", b"# Title\n\n* item") == [{"text": "# Title\n\n* item"}]


def test_nul_bytes_mean_binary() -> None:
    assert refusal(".txt", b"GIF89a\x00\x01").startswith("binary")


def test_many_control_characters_mean_binary() -> None:
    assert refusal(".md", b"ab\x01\x02\x03\x04cd" * 10).startswith("binary")


def test_other_encodings_are_refused_with_the_offset() -> None:
    reason = refusal(".txt", "naïve".encode("latin-1"))
    assert reason.startswith("undecodable") and "offset 2" in reason and "0xef" in reason


# HTML -----------------------------------------------------------------------------------------

def test_html_gives_the_visible_text_with_blocks_on_their_own_lines() -> None:
    text = read(".html", HTML)[0]["text"]
    assert "The Zorblat engine now runs twice as fast." in text
    assert "first item\nsecond item" in text
    assert "secret" not in text and "color" not in text and "<" not in text


def test_xhtml_with_an_xml_declaration_is_read() -> None:
    page = '<?xml version="1.0" encoding="utf-8"?><html xmlns="http://www.w3.org/1999/xhtml"><body><p>café</p></body></html>'
    assert read(".html", page.encode())[0]["text"] == "café"


def test_htm_is_html_too() -> None:
    assert read(".htm", b"<p>one</p><p>two</p>")[0]["text"].split() == ["one", "two"]


# PDF ------------------------------------------------------------------------------------------

def test_pdf_pages_are_read_in_order() -> None:
    text = read(".pdf", pdf_bytes("First page.", "Second page."))[0]["text"]
    assert text.index("First page.") < text.index("Second page.")


def test_pdf_without_a_text_layer_is_refused() -> None:
    assert refusal(".pdf", pdf_bytes("", "")).startswith("PDF without text")


def test_damaged_pdf_is_refused() -> None:
    assert refusal(".pdf", b"%PDF-1.7\n1 0 obj << /Type /Catalog").startswith("unreadable PDF")


def test_encrypted_pdf_is_refused() -> None:
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(pdf_bytes("Secret."))))
    writer.encrypt("password", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    assert refusal(".pdf", out.getvalue()).startswith("encrypted PDF")


# JSONL ----------------------------------------------------------------------------------------

def test_jsonl_keeps_each_record_shape_and_the_roles() -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                {"role": "assistant", "content": "Hello."}]
    data = jsonl({"text": "plain", "id": 7}, {"prompt": "Q", "completion": "A", "source": "x"},
                 {"messages": messages})
    assert read(".jsonl", b"\n" + data + b"\n\n") == [
        {"text": "plain"}, {"prompt": "Q", "completion": "A"}, {"messages": messages}]


@pytest.mark.parametrize("data, line, words", [
    (jsonl({"text": "ok"}) + b"{not json}\n", 2, "not valid JSON"),
    (jsonl({"text": "ok"}, {"text": "ok"}) + b"\n" + jsonl([1, 2]), 4, "not a record"),
    (jsonl({"text": 5}), 1, "not a record"),
    (jsonl({"prompt": "only a prompt"}), 1, "not a record"),
    (jsonl({"messages": []}), 1, "not a record"),
    (jsonl({"messages": [{"role": "user"}]}), 1, "not a record"),
    (jsonl({"messages": [{"role": "", "content": "x"}]}), 1, "not a record"),
])
def test_malformed_jsonl_names_the_line(data: bytes, line: int, words: str) -> None:
    reason = refusal(".jsonl", data)
    assert reason.startswith(f"malformed JSONL: line {line} ") and words in reason
