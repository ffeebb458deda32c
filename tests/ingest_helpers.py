"""Helpers for the ingestion tests: a tiny tokenizer model folder, settings in a temporary state
directory, sample documents of every supported type (a PDF written by hand, with a text layer)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from daemon.config import Settings, load_settings


def tiny_model(folder: Path) -> Path:
    """A model folder with only what chunking reads: a word-level tokenizer (one token per word
    or punctuation mark) and a config.json, so `daemon.model.prepared` accepts it."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text("{}\n")
    return folder


def make_settings(root: Path, extra: str = "", model: Path | None = None) -> Settings:
    """Settings with the state directory in `root/state` and a tiny tokenizer as the base model."""
    model = model or tiny_model(root / "tiny-model")
    config = root / "config.toml"
    config.write_text(textwrap.dedent(f"""\
        [state]
        dir = "state"
        [model]
        base = "{model}"
        [watch]
        stable_s = 0.0
        [ingest]
        chunk_tokens = 16
        chunk_overlap_tokens = 4
        """) + extra)
    return load_settings(config)


def pdf_bytes(*pages: str) -> bytes:
    """A minimal valid PDF whose pages hold `pages` as text (Helvetica, one line each)."""
    count = len(pages)
    objects = ["<< /Type /Catalog /Pages 2 0 R >>",
               "<< /Type /Pages /Kids [" + " ".join(f"{4 + 2 * i} 0 R" for i in range(count)) + f"] /Count {count} >>",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, text in enumerate(pages):
        escaped = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        stream = f"BT /F1 12 Tf 72 720 Td ({escaped}) Tj ET" if text else ""
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                       f"/Contents {5 + 2 * i} 0 R >>")
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    return pdf_file(objects)


def pdf_file(objects: list[str]) -> bytes:
    """A PDF of these objects (numbered from 1; the first is the catalog), with its xref table."""
    out, offsets = b"%PDF-1.4\n", []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def jsonl(*records: object) -> bytes:
    return "".join(json.dumps(record) + "\n" for record in records).encode()


HTML = b"""<!doctype html><html><head><title>Release 4.2</title><style>p {color: red}</style>
<script>var secret = "not text";</script></head>
<body><h1>Release notes</h1><p>The <b>Zorblat</b> engine now runs twice as fast.</p>
<ul><li>first item</li><li>second item</li></ul></body></html>"""

# Good inputs of every type, and bad inputs with a word their quarantine reason must hold.
GOOD = {
    "notes.txt": "Zorblat is the capital of Quux.\n\nIt was founded in 2071.".encode(),
    "guide.md": b"# Guide\n\nPress the *blue* button twice.",
    "page.html": HTML,
    "paper.pdf": pdf_bytes("Quux has three moons.", "", "The largest is Brindle."),
    "chat.jsonl": jsonl({"messages": [{"role": "user", "content": "Capital of Quux?"},
                                      {"role": "assistant", "content": "Zorblat."}]},
                        {"prompt": "Founded?", "completion": "In 2071."}, {"text": "Plain text record."}),
}
BAD = {
    "empty.txt": (b"", "empty"),
    "blank.md": (b"  \n\n\t \n", "empty"),
    "image.txt": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary"),
    "latin1.txt": ("caf\xe9 cr\xe8me".encode("latin-1"), "undecodable"),
    "slides.pptx": (b"PK\x03\x04 whatever", "unsupported type"),
    "broken.jsonl": (jsonl({"text": "fine"}) + b'{"text": "no end\n', "line 2"),
    "shape.jsonl": (jsonl({"text": "fine"}, {"text": "fine too"}, {"title": "no text"}), "line 3"),
    "scan.pdf": (pdf_bytes("", ""), "PDF without text"),
    "junk.pdf": (b"%PDF-1.4 this is not really a pdf", "PDF"),
}
