"""The local trainer: the answer-only loss and that training lowers it."""

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
