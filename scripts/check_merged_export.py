"""Does ``fedmem export --merged`` answer as the adapter does? Greedy replies on every question.

Exports the memory (the real ``fedmem export`` command), loads the result in a separate process
with transformers alone (no fedmem, no peft imported), answers every question there, and compares
with the adapter's own greedy replies (``fedmem.answer``: base model + PEFT adapter, unmerged).

    .venv/bin/python scripts/check_merged_export.py --memory runs/demo/memory --out docs/merged_export_check.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from fedmem.answer import generate_answers, is_correct, load_questions, load_with_memory
from fedmem.demo import demo_dir

STANDALONE = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out, questions = sys.argv[1], json.loads(sys.stdin.read())
tok = AutoTokenizer.from_pretrained(out)
tok.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
end = tok.convert_tokens_to_ids("<|im_end|>")
prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
           for q in questions]
replies = []
for i in range(0, len(prompts), 16):
    enc = tok(prompts[i:i + 16], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        gen = model.generate(**enc, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=[end, tok.eos_token_id])
    replies += [tok.decode(row, skip_special_tokens=True).strip() for row in gen[:, enc["input_ids"].shape[1]:]]
assert "fedmem" not in sys.modules and "peft" not in sys.modules
print(json.dumps(replies))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", type=Path, default=Path("runs/demo/memory"))
    parser.add_argument("--questions", type=Path, default=demo_dir() / "questions.jsonl")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    questions = load_questions(args.questions)
    with tempfile.TemporaryDirectory() as scratch:
        merged = Path(scratch) / "merged"
        subprocess.run([sys.executable, "-m", "fedmem.cli", "export", "--memory", str(args.memory), "--merged",
                        str(merged), "-q"], check=True)
        done = subprocess.run([sys.executable, "-c", STANDALONE, str(merged)], check=True, capture_output=True,
                              text=True, input=json.dumps([q.question for q in questions]))
        standalone = json.loads(done.stdout.splitlines()[-1])
        size = sum(f.stat().st_size for f in merged.iterdir())
    model, tok, _ = load_with_memory(args.memory)
    adapter = generate_answers(model, tok, [q.question for q in questions])
    same = sum(a == b for a, b in zip(adapter, standalone))
    rows = [{"question": q.question, "answer": q.answer, "adapter": a, "merged": b, "same": a == b}
            for q, a, b in zip(questions, adapter, standalone)]
    result = {"memory": str(args.memory), "questions": len(questions), "same_replies": same,
              "adapter_correct": sum(is_correct(a, q.answer) for a, q in zip(adapter, questions)),
              "merged_correct": sum(is_correct(b, q.answer) for b, q in zip(standalone, questions)),
              "merged_bytes": size, "rows": rows}
    for row in rows:
        if not row["same"]:
            print(f"DIFFERENT {row['question']}\n  adapter: {row['adapter']}\n  merged:  {row['merged']}")
    print(f"same greedy replies: {same}/{len(questions)}; correct: adapter {result['adapter_correct']}, "
          f"merged {result['merged_correct']}; merged model {size / 1e6:.0f} MB")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if same == len(questions) else 1


if __name__ == "__main__":
    sys.exit(main())
