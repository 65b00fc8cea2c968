#!/usr/bin/env python3
"""Check fedmem's GGUF export against real llama.cpp (llama-cpp-python) on held-out questions.

    .venv/bin/python scripts/check_gguf_llamacpp.py --memory RUN/memory --llama-python VENV/bin/python

The fedmem side (export, PEFT's own replies, scoring) runs in this interpreter. The llama.cpp side
runs in ``--llama-python``, a venv with llama-cpp-python (it needs nothing else), as this script
with ``--llama-side JOB.json``; the two exchange JSON. Greedy replies from: fedmem (base + memory
through PEFT), llama.cpp base GGUF + the LoRA GGUF, llama.cpp merged GGUF (F16 and F32), and
llama.cpp base GGUF alone; reported per question with agreement and correct-answer counts.
llama.cpp runs the Q4_1 base with quantised matmuls, so exact agreement with fedmem's float32
replies is not guaranteed: the report says what was measured.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAX_NEW_TOKENS = 48  # as fedmem.answer.generate_answers


# --- llama.cpp side (runs under --llama-python; imports only llama_cpp) -------------------------

def llama_side(job_path: Path) -> None:
    from llama_cpp import Llama

    job = json.loads(job_path.read_text())
    results: dict[str, dict] = {}
    for name, files in job["configs"].items():
        started = time.perf_counter()
        llm = Llama(model_path=files["model"], lora_path=files.get("lora"), n_ctx=1024, n_threads=job["threads"],
                    seed=0, verbose=False)
        loaded = time.perf_counter() - started
        replies = []
        for question in job["questions"]:
            out = llm.create_chat_completion(messages=[{"role": "user", "content": question}], temperature=0.0,
                                             top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                             max_tokens=job["max_tokens"], seed=0)
            replies.append(out["choices"][0]["message"]["content"].strip())
        results[name] = {"replies": replies, "prompt": _rendered_prompt(llm, job["questions"][0]),
                         "load_s": round(loaded, 2), "total_s": round(time.perf_counter() - started, 2)}
        del llm
    Path(job["out"]).write_text(json.dumps(results, indent=1))


def _rendered_prompt(llm, question: str) -> str | None:
    """The prompt text llama-cpp-python renders from the GGUF's chat template (to compare with fedmem's)."""
    try:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llm.metadata["tokenizer.chat_template"]
        eos = llm._model.token_get_text(llm.token_eos())
        bos = llm._model.token_get_text(llm.token_bos())
        return Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)(
            messages=[{"role": "user", "content": question}]).prompt
    except Exception as err:  # a diagnostic only; its API is internal
        return f"(not rendered: {err!r})"


# --- fedmem side ---------------------------------------------------------------------------------

def _export(memory: Path, base_dir: Path, base_gguf: Path, work: Path) -> dict:
    from fedmem import gguf_export

    exports = {}
    started = time.perf_counter()
    exports["lora"] = gguf_export.write_gguf_lora(memory, base_dir, work / "memory.lora.gguf")
    exports["lora"]["seconds"] = round(time.perf_counter() - started, 2)
    default = gguf_export.MERGED_TYPE
    try:
        for kind in ("F16", "F32"):
            gguf_export.MERGED_TYPE = kind  # measured both ways: which one the export uses is decided from this
            started = time.perf_counter()
            exports[f"merged-{kind}"] = gguf_export.write_merged_gguf(memory, base_dir, base_gguf,
                                                                      work / f"merged.{kind.lower()}.gguf")
            exports[f"merged-{kind}"]["seconds"] = round(time.perf_counter() - started, 2)
    finally:
        gguf_export.MERGED_TYPE = default
    return exports


def _peft_replies(memory: Path, base_dir: Path, questions: list[str]) -> tuple[list[str], str, float]:
    from fedmem.answer import generate_answers, load_with_memory
    from fedmem.examples import chat_prompt

    started = time.perf_counter()
    model, tokenizer, _ = load_with_memory(memory, base=str(base_dir))
    replies = generate_answers(model, tokenizer, questions, max_new_tokens=MAX_NEW_TOKENS)
    return replies, chat_prompt(tokenizer, questions[0]), time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama-side", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--memory", type=Path, help="the memory adapter directory")
    parser.add_argument("--llama-python", default="/work/llcpp-venv/bin/python",
                        help="a Python with llama-cpp-python installed")
    parser.add_argument("--base", help="the memory's base model directory (default: the embedded model)")
    parser.add_argument("--base-gguf", type=Path, help="its GGUF (default: the embedded SmolLM2 Q4_1)")
    parser.add_argument("--questions", type=Path, help="questions JSONL (default: the demo's held-out questions)")
    parser.add_argument("--work", type=Path, help="where the GGUF files go (default: a temporary directory)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the full results here")
    args = parser.parse_args()
    if args.llama_side:
        llama_side(args.llama_side)
        return 0
    if args.memory is None:
        parser.error("--memory is required")

    import logging

    import fedmem
    from fedmem import base_model
    from fedmem.answer import is_correct, load_questions
    from fedmem.base_model import resolve_base

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base_dir = resolve_base(args.base)
    embedded_gguf = getattr(base_model, "embedded_gguf", None) or base_model._embedded_gguf  # renamed lately
    base_gguf = args.base_gguf or embedded_gguf()
    questions = load_questions(args.questions or Path(fedmem.__file__).parent / "demo" / "questions.jsonl")
    work = args.work or Path(tempfile.mkdtemp(prefix="fedmem-gguf-check-"))
    work.mkdir(parents=True, exist_ok=True)

    exports = _export(args.memory, base_dir, base_gguf, work)
    texts = [q.question for q in questions]
    peft, peft_prompt, peft_s = _peft_replies(args.memory, base_dir, texts)

    job = {
        "questions": texts, "max_tokens": MAX_NEW_TOKENS, "threads": args.threads, "out": str(work / "llama.json"),
        "configs": {
            "llama base+lora": {"model": str(base_gguf), "lora": exports["lora"]["path"]},
            "llama merged F16": {"model": exports["merged-F16"]["path"]},
            "llama merged F32": {"model": exports["merged-F32"]["path"]},
            "llama base alone": {"model": str(base_gguf)},
        },
    }
    (work / "job.json").write_text(json.dumps(job, indent=1))
    subprocess.run([args.llama_python, str(Path(__file__).resolve()), "--llama-side", str(work / "job.json")],
                   check=True)
    llama = json.loads((work / "llama.json").read_text())

    replies = {"fedmem PEFT": peft, **{name: r["replies"] for name, r in llama.items()}}
    correct = {name: [is_correct(r, q.answer) for r, q in zip(rs, questions)] for name, rs in replies.items()}
    names = list(replies)
    for i, q in enumerate(questions):
        print(f"\n[{i + 1}] {q.question}  (expected: {q.answer})")
        for name in names:
            same = "" if name == "fedmem PEFT" else ("  = PEFT" if replies[name][i] == peft[i] else "  ≠ PEFT")
            print(f"  {'✓' if correct[name][i] else '✗'} {name:17s}{same:8s} {replies[name][i]!r}")
    n = len(questions)
    print("\n== summary ==")
    for name in names:
        agree = sum(a == b for a, b in zip(replies[name], peft))
        extra = f"  {agree}/{n} replies identical to fedmem PEFT's" if name != "fedmem PEFT" else ""
        print(f"{name:17s} correct {sum(correct[name])}/{n}{extra}")
    f16_f32 = sum(a == b for a, b in zip(replies["llama merged F16"], replies["llama merged F32"]))
    lora_merged = sum(a == b for a, b in zip(replies["llama base+lora"], replies["llama merged F16"]))
    print(f"merged F16 vs F32: {f16_f32}/{n} identical; base+lora vs merged F16: {lora_merged}/{n} identical")
    for name, e in exports.items():
        print(f"export {name:11s} {e['bytes'] / 1e6:7.2f} MB in {e['seconds']:.1f} s  ({e['path']})")
    print(f"base GGUF        {base_gguf.stat().st_size / 1e6:7.2f} MB ({base_gguf.name})")
    print(f"fedmem PEFT: {peft_s:.1f} s; " + "; ".join(f"{k}: {v['total_s']:.1f} s" for k, v in llama.items()))
    prompts_same = all(v["prompt"] == peft_prompt for v in llama.values())
    print(f"chat prompt rendered by llama-cpp-python == fedmem's: {prompts_same}")
    if not prompts_same:
        print(f"  fedmem: {peft_prompt!r}\n  llama:  {next(iter(llama.values()))['prompt']!r}")
    if args.json:
        args.json.write_text(json.dumps({"questions": [q.__dict__ for q in questions], "replies": replies,
                                         "correct": correct, "exports": exports, "llama": llama}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
