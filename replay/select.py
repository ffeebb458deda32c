"""What is replayed in a cycle: selection strategies over the replay buffer, mixed to a token budget.

Owns the strategy registry (a name maps to a function: `nearest`, `random`, `diverse`, `mix`; a
bad name fails listing the valid ones), the budget (replay tokens = ratio × new tokens, the
corpus raised to its floor's share of all the cycle trains when one is set), deduplication, knowledge replay (a sample of earlier learned documents' chunks) and behaviour
rehearsal (a sample of the base model's own chat answers). Strategies only ever see the training
index, so held-out passages and pairs are never selected. Knows nothing of the journal or the
trainer: earlier chunks arrive as plain texts, and the result is plain training records.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from replay.corpus import digest
from replay.registry import Registry

if TYPE_CHECKING:
    from replay.buffer import RehearsalPair, ReplayBuffer
    from replay.store import StoredPassage

DEFAULT_MIX = {"nearest": 0.5, "random": 0.3, "diverse": 0.2}
MAX_NEIGHBOURS_PER_QUERY = 256
MMR_LAMBDA = 0.5  # relevance vs novelty in `diverse`
CANDIDATE_SLACK = 1.5  # ask strategies for this many more passages than the budget needs


@dataclass
class Pool:
    """What a strategy draws from: the buffer, the new documents' vectors, a seeded generator."""

    buffer: ReplayBuffer
    queries: np.ndarray
    rng: np.random.Generator
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))

    def wanted(self, budget_tokens: int) -> int:
        """How many candidates cover a token budget, with slack."""
        return math.ceil(budget_tokens / max(1.0, self.buffer.mean_tokens) * CANDIDATE_SLACK) + 2


# A strategy returns training-passage ids, best first, enough to fill `budget_tokens`.
Strategy = Callable[[Pool, int], list[int]]
STRATEGIES: Registry[Strategy] = Registry("replay strategy")
register_strategy = STRATEGIES.register
get_strategy = STRATEGIES.get


@register_strategy("nearest")
def nearest(pool: Pool, budget_tokens: int) -> list[int]:
    """The passages nearest to the new documents (most at risk of interference), each document in turn."""
    if len(pool.queries) == 0:
        return []
    per_query = min(MAX_NEIGHBOURS_PER_QUERY, math.ceil(pool.wanted(budget_tokens) / len(pool.queries)) + 1)
    _, ids = pool.buffer.nearest(pool.queries, per_query)
    return _unique(int(i) for i in ids.T.ravel() if i >= 0)  # rank 1 of every query, then rank 2, ...


@register_strategy("random")
def random_sample(pool: Pool, budget_tokens: int) -> list[int]:
    """A uniform sample of the training passages, for breadth."""
    ids = pool.buffer.train_ids
    return [int(i) for i in pool.rng.choice(ids, min(len(ids), pool.wanted(budget_tokens)), replace=False)]


@register_strategy("diverse")
def diverse(pool: Pool, budget_tokens: int) -> list[int]:
    """Relevant but mutually different passages: maximal marginal relevance over near and random ones."""
    near_and_far = nearest(pool, 3 * budget_tokens) + random_sample(pool, budget_tokens)
    candidates = np.array(_unique(near_and_far), dtype=np.int64)
    if len(candidates) == 0:
        return []
    vectors = pool.buffer.vectors(candidates)
    relevance = (vectors @ pool.queries.T).max(axis=1) if len(pool.queries) else np.zeros(len(candidates))
    return [int(candidates[i]) for i in mmr(vectors, relevance, pool.wanted(budget_tokens))]


@register_strategy("mix")
def mix(pool: Pool, budget_tokens: int) -> list[int]:
    """Each strategy of `pool.mix` fills its share of the budget; later ones skip what earlier ones took."""
    total = sum(pool.mix.values())
    taken: dict[int, None] = {}
    for name, weight in pool.mix.items():
        share = int(budget_tokens * weight / total)
        picked = fill(pool.buffer.passages(get_strategy(name)(pool, share)), share, taken)
        taken.update(dict.fromkeys(p.id for p in picked))
    return list(taken)


def check_mix(weights: dict[str, float]) -> None:
    """Raise ValueError unless `weights` maps strategies other than `mix` to non-negative weights."""
    for name, weight in weights.items():
        get_strategy(name)
        if name == "mix" or weight < 0:
            raise ValueError(f"replay mix: {name} = {weight} is not a strategy with a non-negative weight")
    if sum(weights.values()) <= 0:
        raise ValueError("replay mix: the weights add up to zero")


def mmr(vectors: np.ndarray, relevance: np.ndarray, count: int) -> list[int]:
    """Greedy maximal marginal relevance: row indices of `vectors`, in the order picked."""
    chosen: list[int] = []
    closest = np.full(len(vectors), -np.inf)  # similarity to the nearest chosen row
    for _ in range(min(count, len(vectors))):
        score = MMR_LAMBDA * relevance - (1 - MMR_LAMBDA) * np.where(np.isinf(closest), 0, closest)
        score[chosen] = -np.inf
        best = int(np.argmax(score))
        chosen.append(best)
        closest = np.maximum(closest, vectors @ vectors[best])
    return chosen


def fill(passages: list[StoredPassage], budget_tokens: int,
         taken: dict[int, None] | None = None) -> list[StoredPassage]:
    """The passages, in order, that fit the budget; those already taken are skipped."""
    out, used = [], 0
    for passage in passages:
        if taken is not None and passage.id in taken:
            continue
        if used >= budget_tokens:
            break
        out.append(passage)
        used += passage.tokens
    return out


def _unique(ids: Any) -> list[int]:
    return list(dict.fromkeys(ids))


# ---- one cycle's replay ----------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayPlan:
    """The settings of a cycle's replay: the daemon fills every field from `[replay]`, whose
    descriptions are the reference (no defaults here, so the two cannot disagree)."""

    strategy: str
    mix: dict[str, float]
    ratio: float  # replay tokens : new tokens
    knowledge_share: float  # of the replay budget, for earlier learned documents
    rehearsal_pairs: int
    knowledge_floor: float  # least share of all learned tokens replayed (0 = off) ...
    knowledge_cap: float  # ... up to this many knowledge tokens per new token
    knowledge_forms: float  # earlier documents' form tokens replayed per knowledge chunk token
    corpus_floor: float  # least share of the cycle's training tokens that is corpus passages (0 = off)


@dataclass
class Selection:
    corpus: list[StoredPassage]
    knowledge: list[str]
    rehearsal: list[RehearsalPair]
    new_tokens: int
    replay_tokens: int

    def records(self) -> list[dict[str, Any]]:
        """Training records: {"text"} for passages and earlier chunks, {"messages"} for chat pairs."""
        return ([{"kind": "corpus", "text": p.text} for p in self.corpus]
                + [{"kind": "knowledge", "text": text} for text in self.knowledge]
                + [{"kind": "rehearsal", "messages": pair.messages()} for pair in self.rehearsal])


def select_replay(buffer: ReplayBuffer, new_texts: list[str], learned_texts: list[str],
                  rehearsal: list[RehearsalPair], plan: ReplayPlan, seed: int = 0, form_tokens: int = 0) -> Selection:
    """The replay for a cycle that learns `new_texts`; `learned_texts` are earlier documents' chunks;
    `form_tokens`: the new documents' other forms, trained beside their chunks (for the corpus floor)."""
    strategy = get_strategy(plan.strategy)
    check_mix(plan.mix)
    rng = np.random.default_rng(seed)
    new_tokens = sum(buffer.count_tokens(text) for text in new_texts)
    budget = int(plan.ratio * new_tokens)
    new_digests = {digest(text) for text in new_texts}
    shared = int(budget * plan.knowledge_share)
    wanted = knowledge_wanted(learned_texts, new_digests, buffer.count_tokens, plan, new_tokens)
    knowledge = sample_texts(learned_texts, max(shared, wanted), buffer.count_tokens, rng, new_digests)
    used = sum(buffer.count_tokens(text) for text in knowledge)
    # the corpus gets what knowledge leaves of the budget, and never less than its own share
    corpus_budget = budget - used if wanted <= shared else budget - shared
    if plan.corpus_floor > 0 and new_tokens:
        corpus_budget = max(corpus_budget, corpus_floor_tokens(plan, new_tokens + form_tokens, used, rehearsal,
                                                               buffer.count_tokens))
    pool = Pool(buffer, buffer.embed(new_texts), rng, dict(plan.mix))
    seen = new_digests | {digest(text) for text in knowledge}
    passages = [p for p in fill(buffer.passages(strategy(pool, corpus_budget)), corpus_budget)
                if digest(p.text) not in seen]
    pairs = [rehearsal[i] for i in rng.permutation(len(rehearsal))[:plan.rehearsal_pairs]]
    replay_tokens = sum(p.tokens for p in passages) + used
    return Selection(passages, knowledge, pairs, new_tokens, replay_tokens)


def corpus_floor_tokens(plan: ReplayPlan, new_tokens: int, knowledge_tokens: int, rehearsal: list[RehearsalPair],
                        count_tokens: Callable[[str], int]) -> int:
    """The corpus tokens that make `plan.corpus_floor` of the cycle's training tokens: beside the new
    documents (chunks and forms), earlier documents' chunks and their forms (`plan.knowledge_forms`
    per chunk token) and the rehearsal pairs (their mean length, as many as are taken). The ratio
    alone counts only new chunks, so a cycle whose forms and knowledge replay grow gives the base's
    own text an ever smaller share."""
    pairs = min(len(rehearsal), plan.rehearsal_pairs)
    mean_pair = statistics.fmean(count_tokens("\n".join((p.prompt, p.answer))) for p in rehearsal) if pairs else 0.0
    others = new_tokens + knowledge_tokens * (1 + plan.knowledge_forms) + pairs * mean_pair
    return int(plan.corpus_floor / (1 - plan.corpus_floor) * others)


def knowledge_wanted(learned_texts: list[str], exclude: set[str], count_tokens: Callable[[str], int],
                     plan: ReplayPlan, new_tokens: int) -> int:
    """The knowledge tokens `plan.knowledge_floor` asks for: that share of every earlier document's
    text, at most `plan.knowledge_cap` × the new tokens (0 when the floor is off)."""
    if plan.knowledge_floor <= 0:
        return 0
    learned = sum(count_tokens(text) for text in dict.fromkeys(learned_texts) if digest(text) not in exclude)
    return int(min(plan.knowledge_floor * learned, plan.knowledge_cap * new_tokens))


def sample_texts(texts: list[str], budget_tokens: int, count_tokens: Callable[[str], int],
                 rng: np.random.Generator, exclude: set[str]) -> list[str]:
    """A random sample of distinct `texts` (none of `exclude`, by digest) within the budget."""
    out, used, seen = [], 0, set(exclude)
    for i in rng.permutation(len(texts)):
        if used >= budget_tokens:
            break
        key = digest(texts[i])
        if key not in seen:
            seen.add(key)
            out.append(texts[i])
            used += count_tokens(texts[i])
    return out
