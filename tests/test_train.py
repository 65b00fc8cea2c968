"""The local trainer: the answer-only loss and that training lowers it."""

import pytest
import torch

from fedmem.base_model import load_model, load_tokenizer
from fedmem.config import LoraSettings
from fedmem.examples import Example, tokenize_example
from fedmem.lora import attach_lora
from fedmem.train import DISTIL_TOP_K, answer_loss, autocast_dtype, base_distributions, pack, train_lora


def testanswer_loss_equals_the_full_causal_lm_loss(tiny_base):
    tok = load_tokenizer(str(tiny_base))
    model = load_model(tiny_base)
    ids, labels = tokenize_example(tok, Example("Who built the tower?", "Mila Quent"))
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
        ours = answer_loss(model, pack([(ids, labels)]))
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
    ours = answer_loss(model, batch)
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
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    examples = [
        Example("Who built the Zorvex Tower?", "Mila Quent"),
        Example(None, "The Pellow Quarry holds 612 maps."),
    ]
    dtypes = _linear_output_dtypes(model)
    result = train_lora(model, tok, examples, settings)
    assert result.final_loss < 0.5 * result.first_loss
    assert result.examples == 2
    # Every example's every token, every epoch.
    assert result.tokens == settings.epochs * sum(
        len(tokenize_example(tok, e, settings.max_length)[0]) for e in examples
    )
    assert dtypes == {torch.float32}  # precision "fp32" (the default): no autocast
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert lora and all(not torch.equal(p, lora[n]) for n, p in model.named_parameters() if n in lora)


def _linear_output_dtypes(model) -> set:
    """The dtypes the adapted projections compute in while the model runs (filled as it runs)."""
    seen = set()
    for name, module in model.named_modules():
        if name.endswith("q_proj"):
            module.register_forward_hook(lambda mod, args, out: seen.add(out.dtype))
    return seen


def test_explicit_precision_ignores_the_hardware(monkeypatch):
    _hardware(monkeypatch, avx512_bf16=False, amx=False, cuda_bf16=False)
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert autocast_dtype("bf16", "cuda") is torch.bfloat16
    _hardware(monkeypatch, avx512_bf16=True, amx=True, cuda_bf16=True)
    assert autocast_dtype("fp32", "cpu") is None
    assert autocast_dtype("fp32", "cuda") is None
    with pytest.raises(ValueError, match="precision"):
        LoraSettings(precision="fp8")


def _hardware(monkeypatch, avx512_bf16, amx, cuda_bf16, cuda_emulated_bf16=False, cuda=True):
    """Pretend to run on given hardware. None for a CPU probe: this torch build lacks it.
    ``cuda_emulated_bf16``: bf16 works on the GPU, but only emulated (before Ampere)."""
    for probe, value in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx)):
        if value is None:
            monkeypatch.delattr(torch.cpu, probe, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, probe, lambda value=value: value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    # As torch answers: False whenever CUDA is unavailable.
    monkeypatch.setattr(
        torch.cuda,
        "is_bf16_supported",
        lambda including_emulation=True: cuda and (cuda_bf16 or (including_emulation and cuda_emulated_bf16)),
    )


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected",
    [
        (True, False, torch.bfloat16),  # AVX512-BF16 alone
        (False, True, torch.bfloat16),  # AMX alone
        (True, True, torch.bfloat16),
        (False, False, None),  # bf16 would be emulated: slower than float32
        (None, None, None),  # a torch build without the probes: float32
        (None, True, torch.bfloat16),  # one probe missing, the other says yes
    ],
)
def test_auto_precision_on_cpu_follows_the_probes(monkeypatch, avx512_bf16, amx, expected):
    _hardware(monkeypatch, avx512_bf16=avx512_bf16, amx=amx, cuda_bf16=True)  # a GPU says nothing about the CPU
    assert autocast_dtype("auto", "cpu") is expected


@pytest.mark.parametrize("cuda_bf16, expected", [(True, torch.bfloat16), (False, None)])
def test_auto_precision_on_cuda_follows_the_gpu_not_the_cpu(monkeypatch, cuda_bf16, expected):
    _hardware(monkeypatch, avx512_bf16=not cuda_bf16, amx=not cuda_bf16, cuda_bf16=cuda_bf16)
    assert autocast_dtype("auto", "cuda") is expected
    assert autocast_dtype("auto", "cuda:1") is expected
    # Another accelerator: no probe speaks for it.
    assert autocast_dtype("auto", "mps") is None


def test_auto_precision_with_cuda_unavailable_is_float32(monkeypatch):
    _hardware(monkeypatch, avx512_bf16=True, amx=True, cuda_bf16=True, cuda=False)
    assert autocast_dtype("auto", "cuda") is None


def test_auto_precision_on_a_gpu_that_only_emulates_bf16_is_float32(monkeypatch):
    _hardware(monkeypatch, avx512_bf16=False, amx=False, cuda_bf16=False, cuda_emulated_bf16=True)
    assert autocast_dtype("auto", "cuda") is None


def test_bf16_training_lowers_the_loss(tiny_base):
    tok = load_tokenizer(str(tiny_base))
    model = attach_lora(load_model(tiny_base), LoraSettings(rank=4, alpha=8))
    settings = LoraSettings(rank=4, alpha=8, learning_rate=2e-2, epochs=10, batch_size=2, precision="bf16")
    dtypes = _linear_output_dtypes(model)
    result = train_lora(model, tok, [Example("Who built the Zorvex Tower?", "Mila Quent")] * 2, settings)
    assert dtypes == {torch.bfloat16}  # the arithmetic really was bf16
    assert result.final_loss < 0.5 * result.first_loss
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay float32


def _with_random_lora(tiny_base, seed=0):
    model = attach_lora(load_model(tiny_base), LoraSettings(rank=4, alpha=8))
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_distilled_rows_target_the_base_models_distribution_not_the_memorys(tiny_base):
    tok = load_tokenizer(str(tiny_base))
    model = _with_random_lora(tiny_base)
    rows = [tokenize_example(tok, Example("Name a primary colour.", "Red is one.", distil=True)),
            tokenize_example(tok, Example("Who built the tower?", "Mila Quent"))]
    soft = base_distributions(model, rows, [True, False])
    assert soft[1] is None
    ids, probs = soft[0]
    x, y = rows[0]
    at = [j for j in range(len(x) - 1) if y[j + 1] != -100]
    with torch.no_grad(), model.disable_adapter():
        base = torch.softmax(model(input_ids=torch.tensor([x])).logits[0, at], -1)
        top = base.topk(DISTIL_TOP_K, -1)
    assert ids.shape == (len(at), DISTIL_TOP_K) and torch.equal(ids, top.indices)
    assert torch.allclose(probs.sum(-1), torch.ones(len(at)))
    # The memory (the LoRA) does not count as the base: the targets are the plain model's.
    with torch.no_grad():
        tuned = torch.softmax(model(input_ids=torch.tensor([x])).logits[0, at], -1)
    assert not torch.allclose(tuned.topk(DISTIL_TOP_K, -1).values, top.values, atol=1e-3)

    # The loss: soft cross-entropy on the distilled row, the label's on the other, one mean.
    batch = pack(rows, soft)
    assert batch.soft.sum() == len(at) and (~batch.soft).sum() == sum(label != -100 for label in rows[1][1][1:])
    with torch.no_grad():
        ours = answer_loss(model, batch)
        logp0 = torch.log_softmax(model(input_ids=torch.tensor([x])).logits[0, at].float(), -1)
        soft_terms = -(probs * logp0.gather(1, ids)).sum(1)
        x1, y1 = rows[1]
        at1 = [j for j in range(len(x1) - 1) if y1[j + 1] != -100]
        logp1 = torch.log_softmax(model(input_ids=torch.tensor([x1])).logits[0, at1].float(), -1)
        hard_terms = -logp1.gather(1, torch.tensor([[y1[j + 1]] for j in at1])).squeeze(1)
    assert torch.allclose(ours, torch.cat([hard_terms, soft_terms]).mean(), atol=1e-4)


def test_distillation_keeps_the_base_model_where_training_on_its_reply_sharpens_it(tiny_base):
    """Trained on the base model's own reply as labels, the LoRA memorises that reply and moves
    away from the base model; trained on the base model's distribution along it, it stays."""
    tok = load_tokenizer(str(tiny_base))
    reply = Example("Name a primary colour.", "Red is a primary colour, and so is blue.")
    x, y = tokenize_example(tok, reply)
    at = [j for j in range(len(x) - 1) if y[j + 1] != -100]
    drift = {}
    for distil in (False, True):
        model = attach_lora(load_model(tiny_base), LoraSettings(rank=4, alpha=8))
        settings = LoraSettings(rank=4, alpha=8, learning_rate=1e-2, epochs=8, batch_size=1, retention=0)
        train_lora(model, tok, [Example(reply.question, reply.answer, distil=distil)] * 4, settings)
        with torch.no_grad():
            tuned = torch.log_softmax(model(input_ids=torch.tensor([x])).logits[0, at].float(), -1)
            with model.disable_adapter():
                base = torch.log_softmax(model(input_ids=torch.tensor([x])).logits[0, at].float(), -1)
        drift[distil] = torch.nn.functional.kl_div(tuned, base, log_target=True, reduction="batchmean").item()
    assert drift[True] < drift[False] / 10, drift


def _three_facts(tiny_base, learning_rate: float, epochs: int = 3):
    tok = load_tokenizer(str(tiny_base))
    settings = LoraSettings(rank=4, alpha=8, learning_rate=learning_rate, epochs=epochs, batch_size=2)
    model = attach_lora(load_model(tiny_base), settings)
    examples = [Example("Who built the Zorvex Tower?", "Mila Quent"),
                Example(None, "The Pellow Quarry holds 612 maps."),
                Example("How many maps does the Pellow Quarry hold?", "612")]
    return model, tok, examples, settings


# Rates far too high for this model: at 12 the third epoch's loss is NaN (its weights already broken
# by epoch 2's last step, after epoch 2's last loss); at 25 the second's.
@pytest.mark.parametrize("learning_rate", [12.0, 25.0])
def test_a_diverged_epoch_is_undone_and_trained_again_at_a_lower_rate(tiny_base, caplog, learning_rate):
    model, tok, examples, settings = _three_facts(tiny_base, learning_rate)
    with caplog.at_level("INFO", logger="fedmem.train"):
        result = train_lora(model, tok, examples, settings)
    messages = [r.getMessage() for r in caplog.records]
    assert any("diverged" in m and "0.5 of the learning rate" in m for m in messages), messages
    assert all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad), "broken weights kept"
    assert 0 < result.final_loss < float("inf")
    # What is kept answers as well as the last good epoch did.
    assert answer_loss(model, pack([tokenize_example(tok, e, settings.max_length) for e in examples])) < float("inf")


def test_training_that_diverges_at_every_rate_in_its_first_epoch_stops_with_a_clear_error(tiny_base):
    model, tok, examples, settings = _three_facts(tiny_base, 1e6)
    with pytest.raises(RuntimeError, match="diverged in its first epoch"):
        train_lora(model, tok, examples, settings)
