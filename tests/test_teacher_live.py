"""The teacher against a real OpenAI-compatible server: cld's own front, answering with the
embedded base model (what `augment.teacher_url` pointing at another cld, or any vLLM, gets). The
135M model is a poor teacher; what counts here is that sampled replies come back, parse, and that
nothing the document does not support is kept."""

from __future__ import annotations

import pytest

from daemon.engine.vllm import VLLMClient
from daemon.learning import augment, teacher
from tests.conftest import LiveDaemon
from tests.test_cycle_live import FACTS

pytestmark = pytest.mark.integration


@pytest.mark.timeout(600)
async def test_the_served_base_writes_questions_and_only_supported_answers_are_kept(live_daemon: LiveDaemon) -> None:
    client = VLLMClient(live_daemon.url)
    try:
        assert "cld-base" in await client.served()
        paragraphs = augment.split_paragraphs(FACTS)
        found = await teacher.generate(client, "cld-base", paragraphs, FACTS, "Velmora Accord", 6, 0.8)
    finally:
        await client.aclose()
    chunks = teacher.passages(paragraphs)
    assert chunks and found.asked == len(chunks) * min(teacher.MAX_SAMPLES, -(-12 // len(chunks)))
    document_words = set(teacher.words(FACTS))
    for pair in found.pairs:
        assert teacher.why_dropped(pair["question"], pair["answer"], document_words) is None, pair
        # the filter's contract, checked on its own: every name and number of the answer is the
        # document's, and most of its other words (a sampled answer may say "joined" where the
        # document says "became a member")
        names = set(teacher.words(" ".join(w for w in pair["answer"].split()[1:]
                                            if w[:1].isupper() or any(c.isdigit() for c in w))))
        assert names <= document_words, pair
        others = [w for w in teacher.content(pair["answer"]) if w not in teacher.FRAMING and w not in names]
        assert sum(w in document_words for w in others) >= teacher.MIN_SUPPORTED * len(others), pair
    print(found.to_dict())
