"""Selection strategies on a small corpus with known neighbours; the budget; held-out never selected."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

import numpy as np
import pytest

from replay import build, select
from replay.buffer import RehearsalPair, ReplayBuffer
from replay.corpus import digest
from replay.job import BuildJob
from replay.select import Pool, ReplayPlan, select_replay
from tests.replay_helpers import (
    TOPICS,
    BagOfWords,
    topic_text,
    use_embedder,
    write_topic_corpus,
)


@pytest.fixture(scope="module")
def buffer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReplayBuffer]:
    """120 passages, 20 per topic, a quarter held out."""
    corpus_dir, folder = tmp_path_factory.mktemp("corpus"), tmp_path_factory.mktemp("replay")
    write_topic_corpus(corpus_dir, per_topic=20)
    embedder = use_embedder(BagOfWords())
    build.run(BuildJob(folder=folder, corpus=[corpus_dir], embedder=embedder.name, passage_tokens=24,
                       held_out_fraction=0.25))
    opened = ReplayBuffer.open(folder, embedder)
    yield opened
    opened.close()


def topic_of(text: str) -> str:
    return next(topic for topic in TOPICS if text.startswith(topic))


def new_document(topic: str, seed: int = 1) -> str:
    return topic_text(topic, random.Random(seed), words=40)


def pool(buffer: ReplayBuffer, *texts: str, seed: int = 0) -> Pool:
    return Pool(buffer, buffer.embed(list(texts)), np.random.default_rng(seed))


def test_nearest_finds_the_new_documents_topic_first(buffer: ReplayBuffer) -> None:
    picked = buffer.passages(select.nearest(pool(buffer, new_document("ships")), budget_tokens=200))
    assert len(picked) >= 5
    assert {topic_of(p.text) for p in picked[:8]} == {"ships"}


def test_nearest_takes_turns_between_new_documents(buffer: ReplayBuffer) -> None:
    picked = buffer.passages(select.nearest(pool(buffer, new_document("ships"), new_document("chess")), 100))
    assert {topic_of(p.text) for p in picked[:2]} == {"ships", "chess"}


def test_random_spreads_over_topics_and_follows_the_seed(buffer: ReplayBuffer) -> None:
    first = select.random_sample(pool(buffer, seed=3), 400)
    assert first == select.random_sample(pool(buffer, seed=3), 400)
    assert first != select.random_sample(pool(buffer, seed=4), 400)
    assert len({topic_of(p.text) for p in buffer.passages(first)}) >= 4


def test_diverse_avoids_near_duplicates() -> None:
    # Rows 0-2 are (almost) the same vector and the most relevant; row 3 is different and less so.
    vectors = np.array([[1, 0, 0], [1, 0.01, 0], [1, 0, 0.01], [0, 1, 0]], dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    order = select.mmr(vectors, relevance=np.array([1.0, 0.99, 0.98, 0.5]), count=2)
    assert order == [0, 3]


def test_diverse_stays_near_the_new_documents_but_spreads(buffer: ReplayBuffer) -> None:
    chosen = buffer.passages(select.diverse(pool(buffer, new_document("cats")), 240))
    topics = [topic_of(p.text) for p in chosen]
    assert topics[0] == "cats" and "cats" in topics[:3]
    assert len(set(topics)) >= 2


def test_mix_fills_the_budget_without_duplicates(buffer: ReplayBuffer) -> None:
    picked = buffer.passages(select.mix(pool(buffer, new_document("rain")), 600))
    assert len(picked) == len({p.id for p in picked})
    tokens = sum(p.tokens for p in picked)
    assert 600 - 3 * 24 <= tokens <= 600 + 3 * 24  # each share overshoots by at most one passage
    assert topic_of(picked[0].text) == "rain"


@pytest.mark.parametrize("strategy", ["nearest", "random", "diverse", "mix"])
def test_held_out_passages_are_never_selected(buffer: ReplayBuffer, strategy: str) -> None:
    held = set(buffer.store.ids(held_out=True).tolist())
    assert len(held) >= 15
    # New documents that are the held-out passages themselves: their exact match must not come back.
    held_texts = [p.text for p in buffer.passages(sorted(held))[:6]]
    for seed in range(5):
        chosen = select.get_strategy(strategy)(pool(buffer, *held_texts, seed=seed), 10_000)
        assert chosen and not held.intersection(chosen)


def test_unknown_strategy_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="'closest'.*diverse, mix, nearest, random"):
        select.get_strategy("closest")
    with pytest.raises(ValueError, match="mix"):
        select.check_mix({"mix": 1.0})


def test_a_cycle_gets_ratio_times_new_tokens_knowledge_and_rehearsal(buffer: ReplayBuffer) -> None:
    new = [new_document("bread", seed) for seed in range(3)]  # 120 tokens
    learned = [new_document("chess", 10 + i) for i in range(10)] + [new[0], new_document("chess", 10)]
    pairs = [RehearsalPair(f"q{i}", f"a{i}") for i in range(30)]
    plan = ReplayPlan(strategy="mix", mix=dict(select.DEFAULT_MIX), ratio=2.0, knowledge_share=0.25, rehearsal_pairs=20,
                      knowledge_floor=0.0, knowledge_cap=0.0, knowledge_forms=0.5, corpus_floor=0.0)
    chosen = select_replay(buffer, new, learned, pairs, plan, seed=0)
    assert chosen.new_tokens == 120
    # 25 % of 240 tokens = 60: chunks of 40 tokens are taken until that is reached.
    assert len(chosen.knowledge) == 2 and new[0] not in chosen.knowledge
    assert len(set(chosen.knowledge)) == 2
    assert 240 - 24 <= chosen.replay_tokens <= 240 + 3 * 24
    assert len(chosen.rehearsal) == 20 and len(set(chosen.rehearsal)) == 20
    records = chosen.records()
    assert {r["kind"] for r in records} == {"corpus", "knowledge", "rehearsal"}
    assert records[-1]["messages"][1]["role"] == "assistant"
    assert select_replay(buffer, new, learned, pairs, plan, seed=0) == chosen


def test_a_knowledge_floor_replays_a_share_of_everything_learned_up_to_its_cap(buffer: ReplayBuffer) -> None:
    new = [new_document("bread", seed) for seed in range(3)]  # 120 tokens
    learned = [new_document("chess", 10 + i) for i in range(30)] + [new[0]]  # 30 × 40 tokens + a new chunk
    plain = ReplayPlan(strategy="mix", mix=dict(select.DEFAULT_MIX), ratio=2.0, knowledge_share=0.25,
                       rehearsal_pairs=0, knowledge_floor=0.0, knowledge_cap=0.0, knowledge_forms=0.5, corpus_floor=0.0)
    before = select_replay(buffer, new, learned, [], plain, seed=0)
    floor = select_replay(buffer, new, learned, [], dataclasses.replace(plain, knowledge_floor=0.5, knowledge_cap=100), seed=0)
    # the floor: half of the 1,200 learned tokens (the new chunk not counted) instead of 25 % of 240
    assert len(before.knowledge) == 2 and len(floor.knowledge) == 15 and new[0] not in floor.knowledge
    # the corpus keeps its own share of the budget (180 tokens), not what knowledge leaves (nothing)
    corpus = sum(p.tokens for p in floor.corpus)
    assert 180 - 40 <= corpus <= 180 + 60 and floor.replay_tokens == corpus + 15 * 40
    capped = select_replay(buffer, new, learned, [], dataclasses.replace(plain, knowledge_floor=0.5, knowledge_cap=2), seed=0)
    assert len(capped.knowledge) == 6  # 2 × 120 new tokens
    below = select_replay(buffer, new, learned[:2], [], dataclasses.replace(plain, knowledge_floor=0.5, knowledge_cap=100),
                          seed=0)
    assert below == select_replay(buffer, new, learned[:2], [], plain, seed=0)  # under the share: as without a floor


def test_a_corpus_floor_keeps_the_base_texts_share_of_everything_trained(buffer: ReplayBuffer) -> None:
    """The ratio counts new chunks only: a document trained with forms four times its chunks, with
    earlier documents and rehearsal beside it, leaves the corpus a small share; the floor tops it up."""
    new = [new_document("bread", seed) for seed in range(3)]  # 120 tokens
    learned = [new_document("chess", 10 + i) for i in range(10)]  # 10 × 40 tokens
    pairs = [RehearsalPair(f"q{i} " * 5, f"a{i} " * 15) for i in range(30)]
    plain = ReplayPlan(strategy="mix", mix=dict(select.DEFAULT_MIX), ratio=2.0, knowledge_share=0.25,
                       rehearsal_pairs=10, knowledge_floor=0.0, knowledge_cap=0.0, knowledge_forms=0.5, corpus_floor=0.0)
    before = select_replay(buffer, new, learned, pairs, plain, seed=0, form_tokens=480)
    floor = select_replay(buffer, new, learned, pairs, dataclasses.replace(plain, corpus_floor=0.4), seed=0,
                          form_tokens=480)
    assert before == select_replay(buffer, new, learned, pairs, plain, seed=0), "form tokens alone change nothing"
    assert floor.knowledge == before.knowledge and len(floor.rehearsal) == len(before.rehearsal) == 10
    pair_tokens = sum(buffer.count_tokens(f"{p.prompt}\n{p.answer}") for p in floor.rehearsal)
    knowledge = sum(buffer.count_tokens(text) for text in floor.knowledge)
    others = 120 + 480 + knowledge * 1.5 + pair_tokens  # chunks, forms, knowledge with its forms, rehearsal

    def share(chosen):
        corpus = sum(p.tokens for p in chosen.corpus)
        return corpus / (corpus + others)

    assert share(before) < 0.3 and 0.37 <= share(floor) <= 0.45, (share(before), share(floor))


def test_no_new_tokens_means_no_corpus_replay(buffer: ReplayBuffer) -> None:
    chosen = select_replay(buffer, [], ["x y z"], [], ReplayPlan("random", dict(select.DEFAULT_MIX), ratio=8.0, knowledge_share=0.5,
                                                                 rehearsal_pairs=0, knowledge_floor=0.5, knowledge_cap=12.0,
                                                                 knowledge_forms=0.5, corpus_floor=0.4), seed=0)
    assert chosen.corpus == [] and chosen.knowledge == [] and chosen.replay_tokens == 0


def test_held_out_passages_for_the_probes(buffer: ReplayBuffer) -> None:
    chosen = buffer.held_out_passages(10, near=[new_document("stars")])
    assert len(chosen) == 10 and all(p.held_out for p in chosen)
    assert topic_of(chosen[0].text) == "stars"



def test_knowledge_sample_is_distinct_and_leaves_out_the_new_texts() -> None:
    texts = ["a b c"] * 5 + ["d e f", "the new one"]
    chosen = select.sample_texts(texts, 100, lambda text: len(text.split()), np.random.default_rng(0),
                                 exclude={digest("the new one")})
    assert sorted(chosen) == ["a b c", "d e f"]
