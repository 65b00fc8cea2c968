"""The local trainer: the answer-only loss and that training lowers it."""

import pytest
import torch

from fedmem.base_model import load_model, load_tokenizer
from fedmem.examples import Example, tokenize_example
from fedmem.lora import LoraSettings, attach_lora
from fedmem.train import _answer_loss, pack, train_lora


def test_answer_loss_equals_the_full_causal_lm_loss(tiny_base):
    tok = load_tokenizer(str(tiny_base))
    model = load_model(tiny_base)
    ids, labels = tokenize_example(tok, Example("Who built the tower?", "Mila Quent"))
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        ours = _answer_loss(model, pack([(ids, labels)]))
    assert torch.allclose(reference, ours, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_give_the_padded_batch_loss_and_gradients(tiny_base, attention):
    """Packing (no padding, the shared chat prefix once) changes the arithmetic, not the result."""
    tok = load_tokenizer(str(tiny_base))
    model = attach_lora(load_model(tiny_base), LoraSettings(rank=4, alpha=8))
    model.get_base_model().config._attn_implementation = attention
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the LoRA matter
            torch.nn.init.normal_(p, std=0.05)
    rows = [tokenize_example(tok, e) for e in [
        Example("Who built the Zorvex Tower?", "Mila Quent"), Example(None, "The Pellow Quarry holds 612 maps."),
        Example("How many maps does the Pellow Quarry hold?", "612. The Pellow Quarry holds 612 maps."),
        Example("Who?", "Odo")]]
    batch = pack(rows)
    assert batch.ids.shape[1] < sum(len(x) for x, _ in rows)  # the system turn is there once
    assert batch.tokens == sum(len(x) for x, _ in rows)
    params = [p for p in model.parameters() if p.requires_grad]
    width = max(len(x) for x, _ in rows)
    ids = torch.tensor([x + [tok.pad_token_id] * (width - len(x)) for x, _ in rows])
    labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in rows])
    mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in rows])
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    reference.backward()
    expected = [p.grad.clone() for p in params]
    model.zero_grad()
    ours = _answer_loss(model, batch)
    ours.backward()
    assert torch.allclose(reference, ours, atol=1e-5)
    for want, got in zip(expected, [p.grad for p in params]):
        assert torch.allclose(want, got, atol=1e-5, rtol=1e-4)


def test_pack_shares_only_unlabelled_prompt_tokens():
    rows = [([1, 2, 3, 4], [-100, -100, -100, 4]), ([1, 2, 3, 5], [-100, -100, -100, 5]), ([1, 2, 9], [1, 2, 9])]
    batch = pack(rows)
    # 1, 2 shared (3 predicts a labelled token, so each row keeps its own); the plain row
    # stands alone from position 0.
    assert batch.ids.tolist() == [[1, 2, 3, 4, 3, 5, 1, 2, 9]]
    assert batch.positions.tolist() == [[0, 1, 2, 3, 2, 3, 0, 1, 2]]
    assert batch.targets.tolist() == [[-100, -100, 4, -100, 5, -100, 2, 9, -100]]
    attend = batch.attend[0, 0]
    assert attend[3, :4].tolist() == [True] * 4 and attend[4, :5].tolist() == [True, True, False, False, True]
    assert not attend[6, :6].any()  # the plain row sees nothing before it
    # One prompt row: nothing to share.
    assert pack(rows[:1]).ids.tolist() == [[1, 2, 3, 4]]


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
