"""A fast, offline sweep of the training recipe for the learning benchmark — for a GPU machine.

    # here, beside the daemon's state: the texts every run trains and is measured on
    .venv/bin/python bench/learning/sweep.py export var/bench-learning/sweep-data.json --ratios 2 4 8
    # on the GPU machine (torch, transformers, peft; no vLLM): train and measure each recipe
    python bench/learning/sweep.py run sweep-data.json MODEL_DIR grid.json --out results.json

`export` writes what the daemon's cycles would train on for each benchmark document in turn (its
chunks, the replay the daemon's own selection picks at each replay ratio, earlier documents as
knowledge replay, rehearsal pairs; `--lifelong` for the lifelong benchmark's twenty in order,
`--knowledge-floor` as `replay.knowledge_floor`) and the benchmark's held-out measures (held-out passages,
behaviour pairs, drift prompts). `export-run` takes the same from a lifelong run instead
(`bench/learning/lifelong.py`): the jobs its daemon trained, cycle by cycle, under the ratio "run",
so a recipe is measured on exactly the data the daemon's cycles had:

    .venv/bin/python bench/learning/sweep.py export-run var/bench-learning/lifelong/RUN run-data.json --cycles 6
    python bench/learning/sweep.py run run-data.json MODEL_DIR grid.json   # grid: {"ratio": "run", ...}
    .venv/bin/python bench/learning/sweep.py teach run-data.json var/model taught.json   # + teacher's QA
    .venv/bin/python bench/learning/sweep.py report sweep-results.json [more.json ...] --plot methods.png

`run` trains each recipe of the grid — a JSON list of {"name", "ratio", "cycles", "documents",
train settings..., "augment": {augment settings}}, `"method"` among them — with the daemon's own trainer
(`daemon.learning.train`, in process, adapters warm-started from cycle to cycle as the daemon does) and
measures it with `measure`'s scoring, computing greedy answers and NLLs with transformers instead
of through vLLM. Its numbers rank recipes; the recorded results come from `bench/learning`, which
runs the real daemon.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent.parent), str(HERE)]
os.environ.setdefault("TQDM_DISABLE", "1")  # the trainer's progress bar, once per step

import measure  # noqa: E402

from daemon.config import AugmentSection, TrainSection  # noqa: E402
from daemon.learning import probes  # noqa: E402
from daemon.learning.jobs import JobData, TrainJob  # noqa: E402

DRIFT_PROMPTS = HERE.parent.parent / "daemon" / "learning" / "data" / "drift_prompts.txt"


# ---- export (here, with the daemon's state) ---------------------------------------------------------

def export_run(run: Path, out: Path, cycles: int, held_out: int) -> None:
    """The first `cycles` jobs a lifelong run's daemon trained, each with one new document, and the
    lifelong benchmark's held-out measures from the run's replay buffer."""
    from replay.buffer import ReplayBuffer, load_rehearsal

    steps = json.loads((run / "results.json").read_text())["steps"][:cycles]
    state = run / "state"
    jobs, names = [], []
    for step in steps:
        job = json.loads((state / "jobs" / f"v{step['cycle']:04d}.json").read_text())
        if len(job["documents"]) != 1:
            sys.exit(f"cycle {step['cycle']} trained {len(job['documents'])} documents (refused ones retried): "
                     "export fewer cycles")
        jobs.append(job["data"])
        names.append(step["document"])
    _, behaviour = load_rehearsal(state / "replay")
    buffer = ReplayBuffer.open(state / "replay")
    try:
        passages = [p.text for p in buffer.held_out_passages(held_out, seed=0)]
    finally:
        buffer.close()
    drift = [line.strip() for line in DRIFT_PROMPTS.read_text().splitlines() if line.strip()]
    out.write_text(json.dumps({"documents": names, "jobs": {"run": jobs}, "held_out": passages,
                               "behaviour": [[p.prompt, p.answer] for p in behaviour], "drift": drift}))
    print(f"{out}: {len(jobs)} cycles of {run.name}, {len(passages)} held-out passages, {len(behaviour)} behaviour pairs")


def known_documents() -> dict[str, measure.Document]:
    """Every benchmark document by name: the invented ones and the real READMEs."""
    invented, _ = measure.load_documents()
    real, _ = measure.load_documents(HERE / "real_documents.json")
    return {doc.name: doc for doc in invented + real}


def export(state: Path, model_dir: Path, out: Path, ratios: list[float], knowledge_share: float,
           held_out: int, order: list[str] | None = None, knowledge_floor: float = 0.0, knowledge_cap: float = 12.0) -> None:
    """Each document in turn (`order`: names; default the learning benchmark's six) as the daemon's
    cycle would train it, every earlier one learned, at each replay ratio."""
    import dataclasses

    from daemon.config import Settings
    from daemon.ingestion.chunking import Chunker, load_tokenizer
    from daemon.learning import replay_plan
    from replay.buffer import ReplayBuffer, load_rehearsal
    from replay.select import select_replay

    settings = Settings()
    documents = [known_documents()[name] for name in order] if order else measure.load_documents()[0]
    chunker = Chunker(load_tokenizer(model_dir), settings.ingest.chunk_tokens, settings.ingest.chunk_overlap_tokens)
    chunks = [[record for _, record in chunker.chunks([{"text": doc.text}])] for doc in documents]
    rehearsal, behaviour = load_rehearsal(state / "replay")
    buffer = ReplayBuffer.open(state / "replay")
    try:
        jobs: dict[str, list[dict[str, Any]]] = {}
        for ratio in ratios:
            plan = dataclasses.replace(replay_plan.plan(settings), ratio=ratio, knowledge_share=knowledge_share,
                                       knowledge_floor=knowledge_floor, knowledge_cap=knowledge_cap)
            jobs[str(ratio)] = []
            for k, new in enumerate(chunks):
                learned = [r["text"] for earlier in chunks[:k] for r in earlier]
                chosen = select_replay(buffer, [r["text"] for r in new], learned, rehearsal, plan, seed=k + 1)
                jobs[str(ratio)].append(JobData.mixed(new, chosen.records()).model_dump())
        passages = [p.text for p in buffer.held_out_passages(held_out, seed=0)]
    finally:
        buffer.close()
    drift = [line.strip() for line in DRIFT_PROMPTS.read_text().splitlines() if line.strip()]
    out.write_text(json.dumps({"documents": [d.name for d in documents], "jobs": jobs, "held_out": passages,
                               "behaviour": [[p.prompt, p.answer] for p in behaviour], "drift": drift}))
    print(f"{out}: {len(documents)} documents, ratios {ratios}, {len(passages)} held-out passages, "
          f"{len(behaviour)} behaviour pairs")


# ---- measuring with transformers (the GPU machine) -------------------------------------------------

class Scorer:
    """`measure.evaluate`'s measures on an in-memory model: greedy answers and NLLs, batched."""

    def __init__(self, model: Any, tokenizer: Any, batch: int = 64):
        self.model, self.tok, self.batch = model, tokenizer, batch
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _chat(self, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
        from daemon.learning.train import render_chat

        return render_chat(self.tok, messages, generation_prompt)  # as the trainer renders chats

    def generate(self, prompts: list[list[int]], max_tokens: list[int]) -> list[str]:
        import torch

        device = next(self.model.parameters()).device
        out: list[str] = []
        self.model.eval()
        for i in range(0, len(prompts), self.batch):
            group, limits = prompts[i:i + self.batch], max_tokens[i:i + self.batch]
            width = max(map(len, group))
            ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in group], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group], device=device)
            with torch.no_grad():
                generated = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(limits),
                                                do_sample=False, pad_token_id=self.pad)
            for row, limit in zip(generated[:, width:].tolist(), limits):
                row = row[:limit]
                if self.tok.eos_token_id in row:
                    row = row[:row.index(self.tok.eos_token_id)]
                out.append(self.tok.decode(row, skip_special_tokens=True))
        return out

    def chat(self, questions: list[str], max_tokens: int) -> list[str]:
        prompts = [self._chat([{"role": "user", "content": q}], True) for q in questions]
        return self.generate(prompts, [max_tokens] * len(prompts))

    def complete(self, prompts: list[str], max_tokens: list[int]) -> list[str]:
        texts = self.generate([self.tok(p)["input_ids"] for p in prompts], max_tokens)
        return [text.split("\n", 1)[0] for text in texts]  # vLLM's stop=["\n"]

    def token_nll(self, sequences: list[list[int]]) -> list[list[float]]:
        """NLL of each token given those before it (from the second token), as vLLM's prompt logprobs."""
        import torch
        import torch.nn.functional as F

        device = next(self.model.parameters()).device
        out: list[list[float]] = []
        self.model.eval()
        for i in range(0, len(sequences), self.batch):
            group = sequences[i:i + self.batch]
            width = max(map(len, group))
            ids = torch.tensor([s + [self.pad] * (width - len(s)) for s in group], device=device)
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in group], device=device)
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                nll = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            out += [row[:len(s) - 1] for row, s in zip(nll.tolist(), group)]
        return out

    def mean_nll(self, texts: list[str]) -> float:
        values = self.token_nll([self.tok(t)["input_ids"] for t in texts])
        return statistics.fmean(v for row in values for v in row)

    def answer_nll(self, pairs: list[list[str]]) -> float:
        heads = [self._chat([{"role": "user", "content": p}], True) for p, _ in pairs]
        fulls = [self._chat([{"role": "user", "content": p}, {"role": "assistant", "content": a}], False)
                 for p, a in pairs]
        values = self.token_nll(fulls)
        return statistics.fmean(v for head, row in zip(heads, values) for v in row[len(head) - 1:])


def evaluate(scorer: Scorer, data: dict[str, Any], documents: list[measure.Document],
             general: list[tuple[str, list[str]]], reference: dict[str, Any] | None) -> dict[str, Any]:
    """The measures of `measure.evaluate`, by the same scoring rules."""
    facts = [fact for doc in documents for fact in doc.facts]
    continuations = scorer.complete([f.prompt for f in facts], [4 * len(f.answer.split()) + 8 for f in facts])
    replies = scorer.chat([f.question for f in facts], measure.QA_MAX_TOKENS)
    general_replies = scorer.chat([q for q, _ in general], measure.QA_MAX_TOKENS)
    drift = scorer.chat(data["drift"], measure.DRIFT_TOKENS)
    per_doc = {}
    for doc in documents:
        rows = [(measure.cloze_exact(f.answer, c), measure.contains(f.qa_answer, r))
                for f, c, r in zip(facts, continuations, replies) if f.document == doc.name]
        per_doc[doc.name] = {"cloze": statistics.fmean(r[0] for r in rows), "qa": statistics.fmean(r[1] for r in rows)}
    return {
        "facts": per_doc,
        "general_correct": [i for i, (reply, (_, answers)) in enumerate(zip(general_replies, general))
                            if any(measure.contains(a, reply) for a in answers)],
        "held_out_nll": scorer.mean_nll(data["held_out"]),
        "behaviour_nll": scorer.answer_nll(data["behaviour"]),
        "drift_answers": drift,
        "drift_agreement": probes.agreement(reference["drift_answers"], drift) if reference else 1.0,
    }


def summarize(result: dict[str, Any], base: dict[str, Any], learned: list[str], current: str) -> dict[str, Any]:
    kept = set(base["general_correct"])
    return {
        "first_cloze": result["facts"][learned[0]]["cloze"],
        "this_cloze": result["facts"][current]["cloze"],
        "this_qa": result["facts"][current]["qa"],
        "all_cloze": statistics.fmean(result["facts"][d]["cloze"] for d in learned),
        "all_qa": statistics.fmean(result["facts"][d]["qa"] for d in learned),
        "held_out_delta": measure.relative(result["held_out_nll"], base["held_out_nll"]),
        "behaviour_delta": measure.relative(result["behaviour_nll"], base["behaviour_nll"]),
        "general_kept": len(kept & set(result["general_correct"])), "general_base": len(kept),
        "drift_agreement": result["drift_agreement"],
    }


def library(settings: AugmentSection, documents: list[measure.Document], folder: Path) -> Any:
    """The daemon's keeper of documents' forms (`daemon.learning.forms.Library`) over the benchmark's
    documents, storing them in `folder`."""
    from daemon.config import ProbesSection
    from daemon.learning.forms import Library

    texts = {doc.name: doc.text for doc in documents}
    return Library(settings, ProbesSection(), folder, folder / "teacher", lambda doc: texts.get(doc["source"]))


def as_journaled(document: measure.Document) -> dict[str, Any]:
    """A benchmark document as the journal lists it (what the forms keeper reads)."""
    import hashlib

    return {"id": 0, "hash": hashlib.sha256(document.text.encode()).hexdigest(), "source": document.name}


def parse_recipe(recipe: dict[str, Any]) -> tuple[str, str, int, list[int], AugmentSection, TrainSection, dict[str, Any]]:
    """One recipe of a grid: its name, replay ratio, cycles, first documents, the daemon's [augment]
    and [train] settings made from it (a misspelt setting is an error, not ignored), and the train
    settings as given."""
    recipe = dict(recipe)
    name, ratio = recipe.pop("name"), recipe.pop("ratio", 4.0)
    recipe.pop("replay_forms", None)
    ratio = ratio if ratio == "run" else str(float(ratio))
    cycles, order = int(recipe.pop("cycles", 1)), recipe.pop("documents", [0])
    forms = AugmentSection(**recipe.pop("augment", {}))
    return name, ratio, cycles, order, forms, TrainSection(**recipe), recipe


def run(data_file: Path, model_dir: Path, grid_file: Path, out: Path) -> None:
    import torch

    from daemon.learning import methods, train

    data = json.loads(data_file.read_text())
    _, general = measure.load_documents()
    by_name = known_documents()
    documents = [by_name[name] for name in data["documents"]]
    grid = json.loads(grid_file.read_text())
    results: list[dict[str, Any]] = []
    base_eval: dict[str, Any] | None = None
    workdir = Path(tempfile.mkdtemp(prefix="cld-sweep-"))
    for entry, (name, ratio, cycles, order, forms, hyper, recipe) in zip(grid, map(parse_recipe, grid)):
        replay_forms = float(entry.get("replay_forms", 0.5))  # as replay.knowledge_forms
        for first in order:
            started, steps = time.monotonic(), []
            model = tokenizer = None
            learned: list[str] = []
            for k in range(cycles):
                index = (first + k) % len(documents)
                job_data = dict(data["jobs"][ratio][index])
                if k == 0:
                    job_data["knowledge"] = []  # a first cycle has learned nothing before
                if forms.forms:
                    kept = library(forms, documents, workdir / name.replace("/", "-") / "forms")
                    job_data["augmented"] = kept.of(as_journaled(documents[index]), keep=False).records
                    if k and job_data.get("knowledge") and replay_forms:
                        earlier = [as_journaled(by_name[n]) for n in learned]
                        count = (lambda text: len(tokenizer(text)["input_ids"])) if tokenizer else (lambda t: len(t) // 4)
                        budget = int(replay_forms * sum(count(r["text"]) for r in job_data["knowledge"] if "text" in r))
                        job_data["knowledge"] = job_data["knowledge"] + kept.replayed(earlier, budget, count, seed=k)
                job = TrainJob(version=f"v{k + 1:04d}", base_model=str(model_dir), output_dir=str(workdir),
                               data=JobData(**job_data), hyper=hyper)
                if model is None:
                    model, tokenizer, _ = train.load_model(job)
                    tokenizer.padding_side = "left"
                    if base_eval is None:
                        with methods.base_view(model):
                            base_eval = evaluate(Scorer(model, tokenizer), data, documents, general, None)
                dataset = train.build_dataset(job, tokenizer)
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
                tick = time.monotonic()
                summary = train.train(job, model, dataset, pad, json_progress=False, stop=lambda: False)
                train_s = time.monotonic() - tick
                learned.append(documents[index].name)
                result = evaluate(Scorer(model, tokenizer), data, [by_name[n] for n in learned], general, base_eval)
                steps.append({"cycle": k + 1, "document": learned[-1], "steps": summary["steps"],
                              "tokens": summary["tokens"], "train_s": round(train_s, 1),
                              **summarize(result, base_eval, learned, learned[-1])})
                print(json.dumps({"recipe": name, "first": first, **steps[-1]}), flush=True)
                if k == 0:
                    results.append({"recipe": name, "ratio": ratio, "first_document": first,
                                    "hyper": recipe, "trainable_parameters": methods.count_trainable(model),
                                    "steps": steps})
                results[-1]["wall_s"] = round(time.monotonic() - started, 1)
                out.write_text(json.dumps({"base": {m: base_eval[m] for m in ("held_out_nll", "behaviour_nll")},
                                           "general_base": len(base_eval["general_correct"]),
                                           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                                           "results": results}, indent=1))
            del model
            torch.cuda.empty_cache() if torch.cuda.is_available() else None


def teach(data_file: Path, model_dir: Path, out: Path, pairs: int, temperature: float, rephrasings: int = 0) -> None:
    """The sweep's data with the teacher's questions and answers and rephrasings (`daemon.learning.teacher`,
    as `augment.teacher_pairs` and `teacher_rephrasings` make them in the daemon) added to each cycle's
    job, the teacher being the base model at `model_dir` sampled with transformers."""
    import asyncio

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from daemon.learning import augment, teacher

    data = json.loads(data_file.read_text())
    by_name = known_documents()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    scorer = Scorer(model, tokenizer)
    torch.manual_seed(0)

    class Sampler:
        async def sample(self, name: str, messages: list[dict[str, str]], max_tokens: int, temp: float,
                         n: int) -> list[str]:
            prompt = scorer._chat(messages, True)
            with torch.no_grad():
                sampling = {"do_sample": True, "temperature": temp, "top_p": 1.0} if temp > 0 else {"do_sample": False}
                rows = model.generate(torch.tensor([prompt]), **sampling, max_new_tokens=max_tokens,
                                      num_return_sequences=n, pad_token_id=scorer.pad)
            return [tokenizer.decode(row[len(prompt):], skip_special_tokens=True) for row in rows.tolist()]

    taught = {}
    for ratio, jobs in data["jobs"].items():
        for index, job in enumerate(jobs):
            name = data["documents"][index % len(data["documents"])]
            if name not in taught:
                text = by_name[name].text
                taught[name] = asyncio.run(teacher.generate(
                    Sampler(), "base", augment.split_paragraphs(text), text, augment.title_of(text, name), pairs,
                    temperature, rephrasings)).to_dict()
                print(json.dumps({"document": name, "kept": len(taught[name]["pairs"]), "asked": taught[name]["asked"],
                                  "dropped": taught[name]["dropped"], "sample": taught[name]["pairs"][:3],
                                  "rephrasings": len(taught[name]["rephrasings"]),
                                  "rephrase_asked": taught[name]["rephrase_asked"],
                                  "rephrase_dropped": taught[name]["rephrase_dropped"],
                                  "rephrased": taught[name]["rephrasings"][:2]}), flush=True)
            job["augmented"] = job.get("augmented", []) + teacher.records(
                taught[name]["pairs"], taught[name]["rephrasings"], augment.title_of(by_name[name].text, name))
    data["teacher"] = taught
    out.write_text(json.dumps(data))


def report(results_files: list[Path], plot_to: Path | None) -> str:
    """A markdown table of each recipe's cycles (and a plot of them, one colour per recipe), from one or
    more runs' results."""
    results = {"results": [r for f in results_files for r in json.loads(f.read_text())["results"]]}
    rows = ["| recipe | cycle | trainable | cloze this / all / first | QA all | held-out Δ | behaviour Δ | general | "
            "train s |", "|---|---|---|---|---|---|---|---|---|"]
    for result in results["results"]:
        for step in result["steps"]:
            rows.append(f"| {result['recipe']} | {step['cycle']} | {result['trainable_parameters'] / 1e6:.2f} M | "
                        f"{pct(step['this_cloze'])} / {pct(step['all_cloze'])} / {pct(step['first_cloze'])} | "
                        f"{pct(step['all_qa'])} | {pct(step['held_out_delta'], '+.2f')} | "
                        f"{pct(step['behaviour_delta'], '+.1f')} | "
                        f"{step['general_kept']}/{step['general_base']} | {step['train_s']:.0f} |")
    if plot_to:
        plot(results["results"], plot_to)
    return "\n".join(rows)


def pct(share: float, form: str = ".0f") -> str:
    return f"{100 * share:{form}} %"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Left: all facts learned so far (exact cloze) per cycle; right: held-out and behaviour NLL against
    the base, with the default gate's limits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (recall, held_out, behaviour) = plt.subplots(1, 3, figsize=(14, 4.2))
    for result, colour in zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4):
        cycles = [s["cycle"] for s in result["steps"]]
        recall.plot(cycles, [s["all_cloze"] for s in result["steps"]], "o-", color=colour, label=result["recipe"])
        recall.plot(cycles, [s["all_qa"] for s in result["steps"]], "x:", color=colour)
        held_out.plot(cycles, [100 * s["held_out_delta"] for s in result["steps"]], "o-", color=colour)
        behaviour.plot(cycles, [100 * s["behaviour_delta"] for s in result["steps"]], "o-", color=colour)
    from matplotlib.ticker import MaxNLocator

    for axis in (recall, held_out, behaviour):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    held_out.set_ylim(bottom=min(0.0, held_out.get_ylim()[0]), top=max(2.5, held_out.get_ylim()[1]))
    behaviour.set_ylim(bottom=min(0.0, behaviour.get_ylim()[0]), top=max(17.0, behaviour.get_ylim()[1]))
    recall.set_ylim(0, 1.05)
    recall.set(title="all facts so far: cloze (o), QA (x)", xlabel="cycle", ylabel="recall")
    held_out.axhline(2.0, color="#b2182b", ls=":", lw=1)
    held_out.set(title="held-out NLL vs base (%); gate +2 %", xlabel="cycle")
    behaviour.axhline(15.0, color="#b2182b", ls=":", lw=1)
    behaviour.set(title="behaviour NLL vs base (%); gate +15 %", xlabel="cycle")
    recall.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export", help="write the sweep's data from the benchmark's state (here)")
    ex.add_argument("out", type=Path)
    ex.add_argument("--state", type=Path, default=HERE.parent.parent / "var" / "bench-learning" / "state")
    ex.add_argument("--model", type=Path, default=HERE.parent.parent / "var" / "model")
    ex.add_argument("--ratios", type=float, nargs="+", default=[4.0])
    ex.add_argument("--knowledge-share", type=float, default=0.5)
    ex.add_argument("--held-out", type=int, default=64)
    ex.add_argument("--lifelong", action="store_true", help="the lifelong benchmark's 20 documents, in its order")
    ex.add_argument("--knowledge-floor", type=float, default=0.0, help="as replay.knowledge_floor")
    ex.add_argument("--knowledge-cap", type=float, default=12.0, help="as replay.knowledge_cap")
    er = sub.add_parser("export-run", help="write the sweep's data from a lifelong run's jobs (here)")
    er.add_argument("run", type=Path, help="a run folder of bench/learning/lifelong.py")
    er.add_argument("out", type=Path)
    er.add_argument("--cycles", type=int, default=6)
    er.add_argument("--held-out", type=int, default=32, help="passages (the lifelong benchmark scores 32)")
    go = sub.add_parser("run", help="train and measure each recipe of a grid (GPU machine)")
    go.add_argument("data", type=Path)
    go.add_argument("model", type=Path)
    go.add_argument("grid", type=Path)
    go.add_argument("--out", type=Path, default=Path("sweep-results.json"))
    te = sub.add_parser("teach", help="add the base model's questions and answers to each job (augment.teacher_pairs)")
    te.add_argument("data", type=Path)
    te.add_argument("model", type=Path)
    te.add_argument("out", type=Path)
    te.add_argument("--pairs", type=int, default=24)
    te.add_argument("--temperature", type=float, default=0.8)
    te.add_argument("--rephrasings", type=int, default=0, help="rephrased passages per document (0 = none)")
    rp = sub.add_parser("report", help="print a run's results as a markdown table, optionally plot them")
    rp.add_argument("results", type=Path, nargs="+")
    rp.add_argument("--plot", type=Path)
    args = parser.parse_args()
    if args.command == "export":
        order = json.loads((HERE / "lifelong.json").read_text())["order"] if args.lifelong else None
        export(args.state, args.model, args.out, args.ratios, args.knowledge_share, args.held_out, order,
               args.knowledge_floor, args.knowledge_cap)
    elif args.command == "export-run":
        export_run(args.run, args.out, args.cycles, args.held_out)
    elif args.command == "teach":
        teach(args.data, args.model, args.out, args.pairs, args.temperature, args.rephrasings)
    elif args.command == "report":
        print(report(args.results, args.plot))
    else:
        run(args.data, args.model, args.grid, args.out)


if __name__ == "__main__":
    main()
