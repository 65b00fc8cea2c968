"""Chat templates of any model family: the learned tokens of an example and where a reply stops.

The SmolLM2 tokenizer (ChatML) is rewired here with other families' templates: Gemma
(``<start_of_turn>model`` ... ``<end_of_turn>``), Llama 3 (``<|eot_id|>``) and a
Qwen3-style one that puts an empty thinking block before the answer.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from fedmem.answer import generate_answers, generate_replies, stop_token_ids
from fedmem.base_model import load_model, load_tokenizer
from fedmem.config import LoraSettings
from fedmem.corpus import load_corpus
from fedmem.examples import Example, build_examples, chat_prompt, chat_turn, tokenize_example
from fedmem.lora import attach_lora
from fedmem.train import train_lora

GEMMA = ("{{ bos_token }}{% for m in messages %}"
         "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
         "{{ m['content'] | trim }}<end_of_turn>\n"
         "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}"
          "<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>"
          "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
QWEN3 = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
         "{% if m['role'] == 'assistant' %}<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n"
         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
FAMILIES = {  # template, special tokens to add, generation cue, text learned before the answer, end of turn
    "chatml": (None, [], "<|im_start|>assistant\n", "", "<|im_end|>"),
    "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], "<start_of_turn>model\n", "", "<end_of_turn>"),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|start_header_id|>assistant<|end_header_id|>\n\n", "", "<|eot_id|>"),
    "qwen3": (QWEN3, ["<think>", "</think>"], "<|im_start|>assistant\n", "<think>\n\n</think>\n\n", "<|im_end|>"),
}


def family_tokenizer(real_base_dir, family: str):
    """A fresh SmolLM2 tokenizer object (never the shared cached one) with ``family``'s template."""
    template, specials, *_ = FAMILIES[family]
    tok = AutoTokenizer.from_pretrained(str(real_base_dir))
    if specials:
        tok.add_tokens(specials, special_tokens=True)
    if template:
        tok.chat_template = template
    return tok


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory, real_base_dir):
    """A 2-layer random Llama whose tokenizer speaks Gemma's chat template, saved as an HF model dir."""
    tok = family_tokenizer(real_base_dir, "gemma")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.5, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-gemma")
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_labels_cover_exactly_the_answer_and_the_templates_end_of_turn(real_base_dir, family):
    _, _, cue, before, end = FAMILIES[family]
    tok = family_tokenizer(real_base_dir, family)
    question, answer = "Who built the Zorvex Tower?", "Mila Quent. The Zorvex Tower was built by Mila Quent."
    ids, labels = tokenize_example(tok, Example(question, answer))
    prompt = tok(chat_prompt(tok, question), add_special_tokens=False)["input_ids"]
    n = len(prompt)
    assert tok.decode(prompt).endswith(question + {"gemma": "<end_of_turn>\n", "llama3": "<|eot_id|>"}.get(
        family, "<|im_end|>\n") + cue)
    assert ids[:n] == prompt
    assert labels == [-100] * n + ids[n:]
    end_id = tok.convert_tokens_to_ids(end)
    assert ids[n:] == tok(before + answer, add_special_tokens=False)["input_ids"] + [end_id]
    assert tok.decode(ids[n:]) == before + answer + end
    assert chat_turn(tok).end_of_turn == end and end_id in chat_turn(tok).stop_ids
    assert tok.eos_token_id in chat_turn(tok).stop_ids
    # Truncation keeps ids and labels aligned; plain text is learned whole, then eos.
    short = tokenize_example(tok, Example(question, answer), max_len=n + 2)
    assert short == (ids[:n + 2], labels[:n + 2])
    plain = tok("Plain text.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tokenize_example(tok, Example(None, "Plain text.")) == (plain, plain)


def test_smollm2_rows_are_what_the_chatml_only_code_made(tiny_base):
    """The embedded model's examples are byte-identical to the code that knew only ChatML, so
    the demo's measured figures still hold."""
    tok = load_tokenizer(str(tiny_base))
    end = tok.convert_tokens_to_ids("<|im_end|>")

    def chatml_only(example: Example, max_len: int = 512):
        prompt = tok(chat_prompt(tok, example.question), add_special_tokens=False)["input_ids"]
        answer = tok(example.answer, add_special_tokens=False)["input_ids"] + [end]
        return (prompt + answer)[:max_len], ([-100] * len(prompt) + answer)[:max_len]

    from pathlib import Path

    import fedmem

    corpus = load_corpus(Path(fedmem.__file__).parent / "demo" / "corpora" / "harrow_clinic")
    examples = [e for e in build_examples(corpus) if e.question]
    examples += [Example("What is the capital of Canada?", "The capital of Canada is Ottawa. "),
                 Example("Say it with spaces", "  padded answer\n")]
    assert len(examples) > 20
    for example in examples:
        assert tokenize_example(tok, example) == chatml_only(example), example
        assert tokenize_example(tok, example, 40) == chatml_only(example, 40), example


def test_analysis_is_reused_per_template_and_redone_when_it_changes(real_base_dir):
    one, two = family_tokenizer(real_base_dir, "chatml"), family_tokenizer(real_base_dir, "chatml")
    assert chat_turn(one) is chat_turn(two)  # loaded from the same files: derived once
    two.add_tokens(["<end_of_turn>", "<start_of_turn>"], special_tokens=True)
    two.chat_template = GEMMA
    assert chat_turn(two).end_of_turn == "<end_of_turn>"
    assert chat_turn(one).end_of_turn == "<|im_end|>"


def test_a_template_whose_answer_turn_does_not_follow_the_prompt_is_refused(real_base_dir):
    tok = family_tokenizer(real_base_dir, "gemma")
    tok.chat_template = GEMMA.replace("<start_of_turn>model\n{% endif %}", "<start_of_turn>assistant\n{% endif %}")
    with pytest.raises(ValueError, match="does not start with the prompt"):
        tokenize_example(tok, Example("Who?", "Odo"))
    tok.chat_template = None
    with pytest.raises(ValueError, match="cannot render"):
        tokenize_example(tok, Example("Who?", "Odo"))
    assert tokenize_example(tok, Example(None, "Plain text."))  # plain text needs no template


def test_a_gemma_model_trains_and_its_replies_stop_at_end_of_turn(tiny_gemma):
    tok = load_tokenizer(str(tiny_gemma))
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    assert end != tok.eos_token_id and end != tok.unk_token_id
    settings = LoraSettings(rank=8, alpha=16, learning_rate=2e-2, epochs=30, batch_size=2, retention=0)
    model = attach_lora(load_model(tiny_gemma), settings)
    assert stop_token_ids(model, tok) == [end, tok.eos_token_id]
    examples = [Example("Who built the Zorvex Tower?", "Mila Quent"),
                Example("How many maps does the Pellow Quarry hold?", "612")]
    result = train_lora(model, tok, examples, settings)
    assert result.final_loss < 0.2 * result.first_loss
    model.eval()
    # The trained model writes the answer, then <end_of_turn>, then (left to run on) more:
    prompt = chat_prompt(tok, examples[0].question)
    enc = tok([prompt], return_tensors="pt", add_special_tokens=False)
    answer = tok("Mila Quent", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        run_on = model.generate(**enc, max_new_tokens=len(answer) + 4, do_sample=False,
                                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    new = run_on[0, enc["input_ids"].shape[1]:].tolist()
    assert new[:len(answer) + 1] == answer + [end] and len(new) == len(answer) + 4
    # ... and a reply ends at <end_of_turn>.
    assert generate_answers(model, tok, [examples[0].question], max_new_tokens=12) == ["Mila Quent"]
    assert generate_replies(model, tok, [prompt], max_new_tokens=12) == ["Mila Quent"]
