#!/usr/bin/env python3
"""Answer questions from a memory directory with transformers + PEFT alone (no fedmem import).

    python scripts/ask_with_peft_only.py runs/demo/memory "Who runs the archive at the Saltmere Library?"

Shows that a memory adapter is a standard PEFT directory whose base model resolves offline.
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import AutoPeftModelForCausalLM  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

memory, questions = sys.argv[1], sys.argv[2:]
model = AutoPeftModelForCausalLM.from_pretrained(memory)
tokenizer = AutoTokenizer.from_pretrained(model.peft_config["default"].base_model_name_or_path)
for question in questions:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           tokenize=False)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=48, do_sample=False)
    print(f"Q: {question}\nA: {tokenizer.decode(out[0, enc['input_ids'].shape[1]:], skip_special_tokens=True)}")
assert "fedmem" not in sys.modules
