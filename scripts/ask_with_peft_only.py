#!/usr/bin/env python3
"""Answer questions from a memory directory with transformers + PEFT alone (no fedmem import).

    python scripts/ask_with_peft_only.py runs/demo/memory "Who runs the archive at the Saltmere Library?"

Shows that a memory adapter is a standard PEFT directory whose base model resolves offline.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("memory", help="memory adapter directory (e.g. runs/demo/memory)")
    parser.add_argument("questions", nargs="+", help="questions to ask")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    model = AutoPeftModelForCausalLM.from_pretrained(args.memory)
    tokenizer = AutoTokenizer.from_pretrained(model.peft_config["default"].base_model_name_or_path)
    for question in args.questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                               tokenize=False)
        enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False)
        reply = tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"Q: {question}\nA: {reply}")
    if "fedmem" in sys.modules:
        raise RuntimeError("fedmem was imported: the memory must load without it")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
