"""The local trainer: the answer-only loss and that training lowers it."""

import pytest
import torch

from fedmem.base_model import load_model, load_tokenizer
from fedmem.examples import Example, tokenize_example
from fedmem.lora import LoraSettings, attach_lora
from fedmem.train import _answer_loss, train_lora


def test_answer_loss_equals_the_full_causal_lm_loss(tiny_base):
    tok = load_tokenizer(str(tiny_base))
    model = load_model(tiny_base)
    ids, labels = tokenize_example(tok, Example("Who built the tower?", "Mila Quent"))
    ids, labels = torch.tensor([ids]), torch.tensor([labels])
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        ours = _answer_loss(model, ids, mask, labels)
    assert torch.allclose(reference, ours, atol=1e-5)


def test_training_lowers_the_loss_and_touches_only_lora(tiny_base):
    tok = load_tokenizer(str(tiny_base))
    settings = LoraSettings(rank=4, alpha=8, learning_rate=2e-2, epochs=20, batch_size=2)
    model = attach_lora(load_model(tiny_base), settings)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    examples = [Example("Who built the Zorvex Tower?", "Mila Quent"), Example(None, "The Pellow Quarry holds 612 maps.")]
    result = train_lora(model, tok, examples, settings)
    assert result.final_loss < 0.5 * result.first_loss
    assert result.tokens > 0 and result.examples == 2
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_precision_setting():
    from fedmem.train import autocast_dtype

    assert autocast_dtype("fp32", "cpu") is None
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert autocast_dtype("auto", "cpu") in (None, torch.bfloat16)
    with pytest.raises(ValueError, match="precision"):
        LoraSettings(precision="fp8")


def test_bf16_training_lowers_the_loss(tiny_base):
    tok = load_tokenizer(str(tiny_base))
    model = attach_lora(load_model(tiny_base), LoraSettings(rank=4, alpha=8))
    settings = LoraSettings(rank=4, alpha=8, learning_rate=2e-2, epochs=10, batch_size=2, precision="bf16")
    result = train_lora(model, tok, [Example("Who built the Zorvex Tower?", "Mila Quent")] * 2, settings)
    assert result.final_loss < 0.5 * result.first_loss
