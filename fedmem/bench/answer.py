"""``fedmem bench answer``: knowledge in the weights vs in the prompt, on the same questions.

Arms (every one answers the same questions over the same corpora, greedy, batch 1):

- ``closed``: the base model with nothing in its prompt (the floor);
- ``memory_merged``: the memory adapter merged into the base weights (W += B·A);
- ``memory_unmerged``: the same adapter applied on the fly by PEFT;
- ``rag``: corpora cut into chunks, embedded with all-MiniLM-L6-v2, top-k chunks in the prompt;
- ``full_context``: every corpus in the prompt, up to the model's window.

Context (retrieved chunks or whole documents) goes into the *user* message before the
question (``fedmem.bench.context``). Arms are interleaved question by question (the
order rotates) so load from other processes on a shared machine falls on every arm alike.

Two sweeps follow: full-context accuracy and speed as the corpus grows toward the
window (the question's own owner's notes, then every corpus, then seeded fictional
distractor documents), and time to first token / decode rate against prompt length.

This module runs the measurements and summarises them; ``fedmem.bench.answer_report``
turns the summary into the table and plots, ``fedmem.bench.timing`` times one
generation. ``fedmem.bench.cli`` is the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fedmem.log import progress

from .answer_report import table_markdown, write_outputs
from .context import ContextBuilder, filler_documents, owner_documents, prompt_text
from .timing import Generation, peak_rss_mib, timed_generate

log = logging.getLogger(__name__)

ARMS = ("closed", "memory_merged", "memory_unmerged", "rag", "full_context")
ARM_LABELS = {
    "closed": "base model, closed book",
    "memory_merged": "memory adapter, merged",
    "memory_unmerged": "memory adapter, unmerged (PEFT)",
    "rag": "RAG top-k chunks",
    "full_context": "full context (all corpora)",
}
# What the serving machine must hold for each arm: the privacy side of the comparison.
ARM_NEEDS = {
    "closed": "base weights only",
    "memory_merged": "base + memory weights; no document text",
    "memory_unmerged": "base + memory weights; no document text",
    "rag": "every owner's document text + its embeddings",
    "full_context": "every owner's document text, sent in every prompt",
}
DEMO_DIR = Path(__file__).resolve().parents[1] / "demo"


@dataclass
class BenchConfig:
    memory: Path
    data: Path = DEMO_DIR / "corpora"
    questions: Path = DEMO_DIR / "questions.jsonl"
    base: str | None = None
    device: str = "cpu"
    # Defaults sized to finish in about 10 minutes on a busy 2-core CPU; --full asks everything.
    questions_per_owner: int | None = 2  # None: every question
    top_k: int = 3
    chunk_words: int = 80
    max_new_tokens: int = 32
    sweep_sizes: tuple = ("owner", "all", "window")
    sweep_questions: int = 1  # questions asked at the costly sizes (beyond "all"); 0: all selected
    # The window point of the sweep (~8k tokens) already times a full-window prompt;
    # --full adds 8192 here too.
    curve_lengths: tuple = (256, 1024, 2048)
    curve_new_tokens: int = 16
    batch_size: int = 16  # throughput phase: questions answered together, left-padded
    peak_memory: bool = True
    threads: int | None = None
    seed: int = 0


# ---------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """Everything validated before any model loads or any file is written."""

    corpora: list  # list[Corpus]
    questions: list  # list[Question]
    owners: list[str]  # owning corpus name per question


def _owner_of(q, corpora) -> str | None:
    from fedmem.answer import is_correct

    names = {c.name for c in corpora}
    if q.client in names:
        return q.client
    for c in corpora:
        if any(is_correct(d.text, q.answer) for d in c.documents) or any(is_correct(r.answer, q.answer) for r in c.qa):
            return c.name
    return None


def select_questions(questions, owners, per_owner: int | None):
    """A fixed, stratified subset: the first ``per_owner`` of each owner, alternating
    sources (qa, prose) so both kinds of fact are asked about."""
    if per_owner is None:
        return list(questions), list(owners)
    chosen: list[int] = []
    for owner in dict.fromkeys(owners):
        idx = [i for i, o in enumerate(owners) if o == owner]
        by_source: dict[str, list[int]] = {}
        for i in idx:
            by_source.setdefault(questions[i].source, []).append(i)
        queues = list(by_source.values())
        picked: list[int] = []
        while len(picked) < per_owner and any(queues):
            for queue in queues:
                if queue and len(picked) < per_owner:
                    picked.append(queue.pop(0))
        chosen.extend(sorted(picked))
    return [questions[i] for i in chosen], [owners[i] for i in chosen]


def load_inputs(config: BenchConfig) -> Inputs:
    """Read and check the memory, corpora and questions; raise with the file at fault."""
    from fedmem.answer import load_questions
    from fedmem.corpus import load_corpus
    from fedmem.memory import MemoryFormatError, read_manifest

    memory = Path(config.memory)
    if not memory.is_dir():
        raise MemoryFormatError(f"--memory {memory}: no such directory (make one with `fedmem simulate --out DIR`)")
    read_manifest(memory)
    data = Path(config.data)
    if not data.is_dir():
        raise ValueError(f"--data {data}: not a directory of corpora")
    dirs = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise ValueError(f"--data {data}: no corpus subdirectories (one per data owner)")
    corpora = [load_corpus(d) for d in dirs]
    questions = load_questions(config.questions)
    owners = []
    for n, q in enumerate(questions, 1):
        owner = _owner_of(q, corpora)
        if owner is None:
            raise ValueError(f"{config.questions}: question {n}: field 'client' ({q.client!r}) names no corpus "
                             f"in {data}, and no corpus contains its answer {q.answer!r}")
        owners.append(owner)
    for name in ("top_k", "chunk_words", "max_new_tokens", "curve_new_tokens", "batch_size"):
        if getattr(config, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}")
    if config.questions_per_owner is not None and config.questions_per_owner < 1:
        raise ValueError(f"--questions-per-owner must be >= 1 (or 0 for all), got {config.questions_per_owner}")
    from .retrieval import embedding_model_dir

    embedding_model_dir()  # the RAG arm's encoder: fail now, not after the models load
    questions, owners = select_questions(questions, owners, config.questions_per_owner)
    return Inputs(corpora, questions, owners)



# ---------------------------------------------------------------- models


@dataclass
class Models:
    tokenizer: object
    base: object
    merged: object
    unmerged: object
    base_dir: str
    window: int


def load_models(config: BenchConfig) -> Models:
    from fedmem.answer import load_with_memory
    from fedmem.base_model import load_model
    from fedmem.lora import merge_factors, read_peft_adapter

    # load_with_memory verifies the memory's checksum and base fingerprint first.
    unmerged, tokenizer, base_dir = load_with_memory(config.memory, config.base, config.device)
    merged = load_model(base_dir, config.device)
    merge_factors(merged, read_peft_adapter(config.memory))
    base = load_model(base_dir, config.device)
    for m in (merged, base, unmerged):
        m.eval()
    tokenizer.padding_side = "left"
    return Models(tokenizer, base, merged, unmerged, base_dir, int(base.config.max_position_embeddings))


# ---------------------------------------------------------------- the run


@dataclass
class Call:
    arm: str
    question: int  # index into the selected questions
    correct: bool
    gen: Generation
    size: str = ""  # sweep size label
    dropped: int = 0  # documents that did not fit the window


@dataclass
class Bench:
    config: BenchConfig
    inputs: Inputs
    models: Models
    builder: ContextBuilder
    index: object
    calls: list[Call] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    peak_rss_mib: dict = field(default_factory=dict)
    batched: dict = field(default_factory=dict)

    def arm_prompt(self, arm: str, qi: int) -> tuple[str, int]:
        """(prompt, documents dropped) for one arm and question; retrieval runs here,
        inside the timed span, because a RAG server does it per question."""
        q = self.inputs.questions[qi].question
        tok = self.models.tokenizer
        if arm in ("closed", "memory_merged", "memory_unmerged"):
            return prompt_text(tok, q, None), 0
        if arm == "rag":
            hits = self.index.search(q, self.config.top_k)
            context, dropped = self.builder.fit(q, [c.text for c, _ in hits], [], self.models.window)
            return prompt_text(tok, q, context), dropped
        if arm == "full_context":
            return self.sized_prompt(qi, "all")
        raise ValueError(f"unknown arm {arm!r}")

    def sized_prompt(self, qi: int, size) -> tuple[str, int]:
        q = self.inputs.questions[qi].question
        owner = self.inputs.owners[qi]
        own = next(c for c in self.inputs.corpora if c.name == owner)
        everything = [d for c in self.inputs.corpora for d in owner_documents(c)]
        window = self.models.window
        if size == "owner":
            context, dropped = self.builder.fit(q, owner_documents(own), [], window)
        elif size == "all":
            context, dropped = self.builder.fit(q, everything, [], window)
        else:
            target = window if size == "window" else int(size)
            others = [d for c in self.inputs.corpora if c.name != owner for d in owner_documents(c)]
            context, dropped = self.builder.fit(q, owner_documents(own), others + self.filler, target,
                                                rng=random.Random(self.config.seed * 1000 + qi))
        return prompt_text(self.models.tokenizer, q, context), dropped

    @property
    def filler(self) -> list[str]:
        if not hasattr(self, "_filler"):
            # Enough distractors to fill the window several times over; cheap to make.
            n = max(8, self.models.window // 60)
            self._filler = filler_documents(n, self.config.seed, [q.answer for q in self.inputs.questions])
        return self._filler

    def model_for(self, arm: str):
        return {"memory_merged": self.models.merged, "memory_unmerged": self.models.unmerged}.get(arm, self.models.base)

    def ask(self, arm: str, qi: int, size: str = "", prompt: tuple[str, int] | None = None) -> Call:
        from fedmem.answer import is_correct

        # The clock starts before the prompt is built: for RAG that includes retrieval.
        # Sweep prompts come prebuilt (their assembly is bench bookkeeping, not serving).
        started = time.perf_counter()
        text, dropped = prompt if prompt is not None else self.arm_prompt(arm, qi)
        gen = timed_generate(self.model_for(arm), self.models.tokenizer, text, self.config.max_new_tokens, started)
        call = Call(arm, qi, is_correct(gen.reply, self.inputs.questions[qi].answer), gen, size, dropped)
        self.calls.append(call)
        return call

    def run_arms(self) -> None:
        n = len(self.inputs.questions)
        for qi in progress(range(n), total=n, desc="arms", unit="q"):
            order = ARMS[qi % len(ARMS):] + ARMS[:qi % len(ARMS)]
            marks = []
            for arm in order:
                call = self.ask(arm, qi)
                marks.append(f"{arm}={'ok' if call.correct else '--'} {call.gen.wall_s:.1f}s")
            log.debug("question %d/%d: %s", qi + 1, n, ", ".join(marks))
        for arm in ARMS:
            calls = [c for c in self.calls if c.arm == arm and not c.size]
            log.info("  %s: %d/%d correct, %.1fs per question", arm, sum(c.correct for c in calls), len(calls),
                     sum(c.gen.wall_s for c in calls) / max(1, len(calls)))

    def run_throughput(self) -> None:
        """Questions/s when questions arrive together: each arm answers every question in
        left-padded batches, greedy, as a server batching requests would. The batch-1
        loop above measures latency; this measures what the hardware can serve. One pass,
        arms in turn (the costliest, full context, is ~10x the others, so a second pass
        would double the phase)."""
        import torch

        from fedmem.answer import is_correct

        tok = self.models.tokenizer
        n = len(self.inputs.questions)
        for arm in progress(ARMS, total=len(ARMS), desc="throughput", unit="arm"):
            started = time.perf_counter()
            prompts = [self.arm_prompt(arm, qi)[0] for qi in range(n)]  # RAG retrieval is timed
            model = self.model_for(arm)
            correct = 0
            for start in range(0, n, self.config.batch_size):
                batch = prompts[start:start + self.config.batch_size]
                enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(self.config.device)
                with torch.no_grad():
                    out = model.generate(**enc, max_new_tokens=self.config.max_new_tokens, do_sample=False,
                                         temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id)
                for j, row in enumerate(out[:, enc["input_ids"].shape[1]:]):
                    reply = tok.decode(row, skip_special_tokens=True)
                    correct += is_correct(reply, self.inputs.questions[start + j].answer)
            wall = time.perf_counter() - started
            self.batched[arm] = {"questions_per_s": n / wall, "accuracy": correct / n}
            log.info("  %s: %d questions in %.1fs (%.3f questions/s), %d/%d correct", arm, n, wall, n / wall,
                     correct, n)

    def sweep_sizes(self) -> list:
        window = self.models.window
        out = []
        for size in self.config.sweep_sizes:
            if isinstance(size, int) and size >= window - self.config.max_new_tokens:
                continue  # a fixed size past the window is the window point
            out.append(size)
        return out

    def run_sweep(self) -> None:
        """Full-context accuracy vs corpus size. "all" is the main table's full-context arm
        (reused, not re-run). At costlier sizes a subset of questions is asked, each
        right after the merged memory answers it, so their speed ratio is measured under
        the same momentary load."""
        n = len(self.inputs.questions)
        subset = self.sweep_subset()
        asks = [(size, qi) for size in self.sweep_sizes() if size != "all"
                for qi in (range(n) if size == "owner" else subset)]
        for size, qi in progress(asks, total=len(asks), desc="context sweep", unit="q"):
            if size != "owner":
                self.ask("memory_merged", qi, size=str(size))
            call = self.ask("full_context", qi, size=str(size), prompt=self.sized_prompt(qi, size))
            log.debug("context %s: question %d: %d prompt tokens, %s, %.1fs", size, qi + 1, call.gen.prompt_tokens,
                      "ok" if call.correct else "--", call.gen.wall_s)
        for size in dict.fromkeys(size for size, _ in asks):
            calls = [c for c in self.calls if c.arm == "full_context" and c.size == str(size)]
            log.info("  context %s: %d questions, %.0f prompt tokens (mean), %d correct", size, len(calls),
                     statistics.mean(c.gen.prompt_tokens for c in calls), sum(c.correct for c in calls))

    def sweep_subset(self) -> list[int]:
        n = len(self.inputs.questions)
        k = self.config.sweep_questions
        if k <= 0 or k >= n:
            return list(range(n))
        # Spread over owners: round-robin through them in question order.
        by_owner: dict[str, list[int]] = {}
        for i, o in enumerate(self.inputs.owners):
            by_owner.setdefault(o, []).append(i)
        picked: list[int] = []
        queues = list(by_owner.values())
        while len(picked) < k:
            for queue in queues:
                if queue and len(picked) < k:
                    picked.append(queue.pop(0))
        return sorted(picked)

    def run_curve(self) -> None:
        """TTFT and decode rate against prompt length, with a fixed number of new tokens
        so every point decodes the same amount."""
        tok = self.models.tokenizer
        window = self.models.window
        lengths = sorted({min(int(n), window - self.config.curve_new_tokens) for n in self.config.curve_lengths})
        q = "What is the colour of the signal lamp?"
        body = "\n\n".join(self.filler)
        while self.builder.tokens(body) < window:
            body = body + "\n\n" + body
        ids = tok(body, add_special_tokens=False)["input_ids"]
        overhead = self.builder.prompt_tokens(q, "x")
        for n in progress(lengths, total=len(lengths), desc="speed curve", unit="length"):
            context = tok.decode(ids[:max(1, n - overhead)])
            prompt = prompt_text(tok, q, context)
            # Decoding text back can re-tokenise a little longer; trim until it fits.
            while self.builder.prompt_tokens(q, context) > n and len(context) > 1:
                context = context[: int(len(context) * 0.99)]
                prompt = prompt_text(tok, q, context)
            gen = timed_generate(self.models.base, tok, prompt, self.config.curve_new_tokens, time.perf_counter(),
                                 exact_new_tokens=True)
            self.curve.append({"prompt_tokens": gen.prompt_tokens, "ttft_s": gen.ttft_s, "decode_tps": gen.decode_tps,
                               "new_tokens": gen.new_tokens})
            log.info("  %d prompt tokens: first token %.2fs, decode %.1f tok/s", gen.prompt_tokens, gen.ttft_s,
                     gen.decode_tps)

    def run_peak_memory(self) -> None:
        """CPU: each arm in a fresh process, reporting its own RSS high-water mark
        (ru_maxrss), because torch allocations are invisible to tracemalloc and one
        process's high-water mark cannot be reset between arms. The worker loads what
        the arm needs and answers the first question with the arm's own prompt."""
        if self.models.base.device.type == "cuda":
            for arm in ARMS:
                peaks = [c.gen.peak_mib for c in self.calls if c.arm == arm and not c.size]
                self.peak_rss_mib[arm] = max(peaks) if peaks else None
            return
        q0 = 0
        for arm in progress(ARMS, total=len(ARMS), desc="peak memory", unit="arm"):
            spec = {"arm": arm, "base_dir": self.models.base_dir, "memory": str(self.config.memory),
                    "prompt": self.arm_prompt(arm, q0)[0] if arm != "rag" else None,
                    "question": self.inputs.questions[q0].question, "data": str(self.config.data),
                    "top_k": self.config.top_k, "chunk_words": self.config.chunk_words,
                    "max_new_tokens": self.config.max_new_tokens, "threads": self.config.threads}
            with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
                json.dump(spec, fh)
            try:
                proc = subprocess.run([sys.executable, "-m", "fedmem.bench.answer", "--peak-memory-worker", fh.name],
                                      capture_output=True, text=True, timeout=3600)
            finally:
                os.unlink(fh.name)
            if proc.returncode != 0:
                raise RuntimeError(f"peak-memory worker for {arm} failed:\n{proc.stderr[-2000:]}")
            self.peak_rss_mib[arm] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mib"]
            log.info("  %s: %.0f MiB RSS", arm, self.peak_rss_mib[arm])


def _peak_memory_worker(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    import torch

    from fedmem.base_model import load_model, load_tokenizer
    from fedmem.log import setup_logging

    setup_logging(-1)  # stdout carries the result; warnings and errors go to stderr
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    tok = load_tokenizer(spec["base_dir"])
    arm = spec["arm"]
    if arm == "memory_unmerged":
        from peft import PeftModel

        model = PeftModel.from_pretrained(load_model(spec["base_dir"]), spec["memory"])
    else:
        model = load_model(spec["base_dir"])
        if arm == "memory_merged":
            from fedmem.lora import merge_factors, read_peft_adapter

            merge_factors(model, read_peft_adapter(spec["memory"]))
    prompt = spec["prompt"]
    if arm == "rag":
        # A RAG server holds the encoder and the whole index as well as the model.
        from fedmem.corpus import load_corpus

        from .retrieval import Embedder, Index, chunk_corpus

        data = Path(spec["data"])
        chunks = [c for d in sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
                  for c in chunk_corpus(load_corpus(d), spec["chunk_words"])]
        index = Index(chunks, Embedder())
        hits = index.search(spec["question"], spec["top_k"])
        prompt = prompt_text(tok, spec["question"], "\n\n".join(c.text for c, _ in hits))
    model.eval()
    timed_generate(model, tok, prompt, spec["max_new_tokens"], time.perf_counter())
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}))


def _median(xs):
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else math.nan


def summarise(bench: Bench) -> dict:
    inputs = bench.inputs
    rows = {}
    for arm in ARMS:
        calls = [c for c in bench.calls if c.arm == arm and not c.size]
        if not calls:
            continue
        rows[arm] = {
            "label": ARM_LABELS[arm],
            "questions": len(calls),
            "accuracy": sum(c.correct for c in calls) / len(calls),
            "prompt_tokens": statistics.mean(c.gen.prompt_tokens for c in calls),
            "ttft_s": _median([c.gen.ttft_s for c in calls]),
            "decode_tps": _median([c.gen.decode_tps for c in calls]),
            "new_tokens": statistics.mean(c.gen.new_tokens for c in calls),
            "questions_per_s": len(calls) / sum(c.gen.wall_s for c in calls),
            "questions_per_s_batched": bench.batched.get(arm, {}).get("questions_per_s"),
            "accuracy_batched": bench.batched.get(arm, {}).get("accuracy"),
            "peak_memory_mib": bench.peak_rss_mib.get(arm),
            "documents_dropped": max(c.dropped for c in calls),
            "needs": ARM_NEEDS[arm],
        }
    sweep = []
    full_all = [c for c in bench.calls if c.arm == "full_context" and not c.size]
    for size in bench.sweep_sizes():
        calls = full_all if size == "all" else [c for c in bench.calls
                                                if c.arm == "full_context" and c.size == str(size)]
        if not calls:
            continue
        qs = {c.question for c in calls}
        mem = [c for c in bench.calls if c.arm == "memory_merged" and c.question in qs
               and (c.size == str(size) or (size in ("owner", "all") and not c.size))]
        mem_qps = len(mem) / sum(c.gen.wall_s for c in mem) if mem else math.nan
        qps = len(calls) / sum(c.gen.wall_s for c in calls)
        sweep.append({"size": str(size), "questions": len(calls),
                      "prompt_tokens": statistics.mean(c.gen.prompt_tokens for c in calls),
                      "accuracy": sum(c.correct for c in calls) / len(calls),
                      "ttft_s": _median([c.gen.ttft_s for c in calls]),
                      "decode_tps": _median([c.gen.decode_tps for c in calls]),
                      "questions_per_s": qps, "memory_questions_per_s": mem_qps,
                      "memory_speedup": mem_qps / qps if qps else math.nan,
                      "documents_dropped": max(c.dropped for c in calls)})
    targets = {}
    if {"memory_merged", "rag", "full_context"} <= rows.keys():
        mem = rows["memory_merged"]
        targets["memory_accuracy_ge_rag"] = mem["accuracy"] >= rows["rag"]["accuracy"]
        targets["memory_accuracy_ge_full_context"] = mem["accuracy"] >= rows["full_context"]["accuracy"]
        targets["speedup_vs_rag"] = mem["questions_per_s"] / rows["rag"]["questions_per_s"]
        targets["speedup_vs_rag_ge_3"] = targets["speedup_vs_rag"] >= 3
        if mem["questions_per_s_batched"] and rows["rag"]["questions_per_s_batched"]:
            targets["speedup_vs_rag_batched"] = mem["questions_per_s_batched"] / rows["rag"]["questions_per_s_batched"]
            targets["speedup_vs_rag_batched_ge_3"] = targets["speedup_vs_rag_batched"] >= 3
            targets["speedup_vs_full_context_batched"] = (mem["questions_per_s_batched"]
                                                          / rows["full_context"]["questions_per_s_batched"])
        largest = max(sweep, key=lambda s: s["prompt_tokens"]) if sweep else None
        if largest:
            targets["largest_context"] = largest["size"]
            targets["largest_context_prompt_tokens"] = largest["prompt_tokens"]
            targets["speedup_vs_full_context_at_largest"] = largest["memory_speedup"]
            targets["speedup_vs_full_context_ge_10"] = largest["memory_speedup"] >= 10
    return {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(bench.config).items()},
        "base_model": bench.models.base_dir,
        "window": bench.models.window,
        "device": bench.config.device,
        "threads": _threads(),
        "batch_size": min(bench.config.batch_size, len(inputs.questions)),
        "questions": [{"question": q.question, "answer": q.answer, "owner": o, "source": q.source}
                      for q, o in zip(inputs.questions, inputs.owners)],
        "arms": rows,
        "sweep": sweep,
        "curve": bench.curve,
        "targets": targets,
        "calls": [{"arm": c.arm, "question": c.question, "size": c.size, "correct": c.correct,
                   "dropped": c.dropped, **asdict(c.gen)} for c in bench.calls],
    }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ---------------------------------------------------------------- entry points


def run(config: BenchConfig) -> dict:
    """Every phase of the benchmark; the summary ``answer_report`` writes out."""
    import torch

    from fedmem.corpus import CorpusError

    from .retrieval import Embedder, Index, chunk_corpus

    inputs = load_inputs(config)  # every input is checked before anything heavy happens
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    log.info("fedmem bench answer: %d questions, %d corpora, memory %s, %d threads on %s", len(inputs.questions),
             len(inputs.corpora), config.memory, torch.get_num_threads(), config.device)
    models = load_models(config)
    chunks = [c for corpus in inputs.corpora for c in chunk_corpus(corpus, config.chunk_words)]
    if not chunks:
        raise CorpusError(Path(config.data), ["no text to retrieve from"])
    index = Index(chunks, Embedder(device=config.device))
    bench = Bench(config, inputs, models, ContextBuilder(models.tokenizer, models.window, config.max_new_tokens),
                  index)
    log.info("arms, interleaved per question (%d chunks indexed, window %d tokens):", len(chunks), models.window)
    bench.run_arms()
    log.info("throughput, batches of up to %d:", config.batch_size)
    bench.run_throughput()
    log.info("full context vs corpus size:")
    bench.run_sweep()
    log.info("speed vs prompt length:")
    bench.run_curve()
    if config.peak_memory:
        log.info("peak memory per arm:")
        bench.run_peak_memory()
    summary = summarise(bench)
    summary["wall_s"] = time.perf_counter() - started
    return summary


def _sizes(text: str) -> tuple:
    out = []
    for part in text.split(","):
        part = part.strip()
        if part in ("owner", "all", "window"):
            out.append(part)
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise argparse.ArgumentTypeError(f"bad size {part!r}: use owner, all, window or a token count")
    return tuple(out)


def _lengths(text: str) -> tuple:
    try:
        out = tuple(int(p) for p in text.split(","))
    except ValueError:
        out = ()
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"bad lengths {text!r}: comma-separated positive token counts")
    return out


FULL = {"questions_per_owner": None, "sweep_questions": 0, "sweep_sizes": ("owner", "all", 4096, 6144, "window"),
        "curve_lengths": (256, 512, 1024, 2048, 4096, 8192)}


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = BenchConfig(memory=Path("."))
    p.add_argument("--memory", type=Path, required=True,
                   help="memory adapter directory trained on --data (e.g. made by `fedmem simulate`); required")
    p.add_argument("--data", type=Path, default=d.data, help="corpora, one subdirectory per owner (default: the demo)")
    p.add_argument("--questions", type=Path, default=d.questions, help="held-out questions JSONL (default: the demo's)")
    p.add_argument("--base", default=None, help="base model directory (default: the one the memory names)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", type=Path, default=Path("runs/bench-answer"),
                   help="where results.json, table.md and the PNGs go (default %(default)s)")
    p.add_argument("--questions-per-owner", type=int, default=d.questions_per_owner,
                   help="ask this many questions per owner, alternating qa/prose facts (default %(default)s; 0: all)")
    p.add_argument("--top-k", type=int, default=d.top_k, help="RAG: chunks put in the prompt (default %(default)s)")
    p.add_argument("--chunk-words", type=int, default=d.chunk_words,
                   help="RAG: words per chunk at most (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens,
                   help="answer length cap (default %(default)s)")
    p.add_argument("--sizes", type=_sizes, default=d.sweep_sizes,
                   help="full-context corpus sizes: owner, all, window or prompt-token counts "
                        "(default: owner,all,window)")
    p.add_argument("--sweep-questions", type=int, default=d.sweep_questions,
                   help="questions asked at sizes beyond 'all', spread over owners (default %(default)s; 0: all)")
    p.add_argument("--curve", type=_lengths, default=d.curve_lengths,
                   help="prompt lengths for the speed curve (default 256,1024,2048; clipped to the window)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="throughput phase: questions answered together (default %(default)s)")
    p.add_argument("--no-peak-memory", action="store_true", help="skip the per-arm peak-memory subprocesses")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--full", action="store_true",
                   help="every question at every size, sizes owner,all,4096,6144,window, curve 256..8192 (slow on CPU)")


def config_from_args(args) -> BenchConfig:
    config = BenchConfig(memory=args.memory, data=args.data, questions=args.questions, base=args.base,
                         device=args.device,
                         questions_per_owner=None if args.questions_per_owner == 0 else args.questions_per_owner,
                         top_k=args.top_k,
                         chunk_words=args.chunk_words, max_new_tokens=args.max_new_tokens, sweep_sizes=args.sizes,
                         sweep_questions=args.sweep_questions, curve_lengths=args.curve, batch_size=args.batch_size,
                         peak_memory=not args.no_peak_memory, threads=args.threads)
    if args.full:
        for k, v in FULL.items():
            setattr(config, k, v)
    return config


def run_from_args(args) -> int:
    """``fedmem bench answer``: run, print the table, write the report. Bad input raises
    (ValueError, CorpusError, MemoryFormatError, RetrievalError) before anything is written."""
    summary = run(config_from_args(args))
    sys.stdout.write("\n" + table_markdown(summary))
    written = write_outputs(summary, args.out)
    log.info("%.0fs; wrote %s", summary["wall_s"], ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peak-memory-worker":
        _peak_memory_worker(sys.argv[2])
    else:
        sys.exit("usage: fedmem bench answer --memory DIR (this module's own entry point is internal)")
