"""How LoRA factors travel (``--transport``): what comes back, what it costs in bytes, and
records crafted to break the decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmem.aggregate import dense
from fedmem.config import TRANSPORTS, FederationConfig
from fedmem.flower.messages import factors_to_record, message_bytes, record_to_factors, tensors_bytes


def _factors(seed=0, d_out=64, d_in=48, rank=4, modules=("m.q_proj", "m.down_proj")):
    g = torch.Generator().manual_seed(seed)
    # Rank components of very different sizes, as trained LoRAs have them; one all-zero component.
    sizes = torch.tensor([1.0, 1e-2, 1e-4, 0.0])[:rank]
    return {n: (torch.randn(d_out, rank, generator=g) * sizes, torch.randn(rank, d_in, generator=g) * 0.1)
            for n in modules}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), rank=st.integers(1, 4), transport=st.sampled_from(TRANSPORTS))
def test_every_transport_returns_float32_factors_close_to_what_was_sent(seed, rank, transport):
    sent = _factors(seed, rank=rank)
    back = record_to_factors(factors_to_record(sent, transport), transport)
    assert set(back) == set(sent)
    for name, (B, A) in sent.items():
        B2, A2 = back[name]
        assert B2.dtype == A2.dtype == torch.float32 and B2.shape == B.shape and A2.shape == A.shape
        if transport == "fp32":
            assert torch.equal(B2, B) and torch.equal(A2, A)
            continue
        if transport == "int8":
            # Each rank component (B column, A row) has its own scale: the error of an element is at
            # most half a step of its own component, so small components keep their precision.
            step_b = B.abs().amax(dim=0) / 127
            step_a = A.abs().amax(dim=1) / 127
            assert bool(((B2 - B).abs() <= step_b[None, :] / 2 + 1e-12).all())
            assert bool(((A2 - A).abs() <= step_a[:, None] / 2 + 1e-12).all())
        tolerance = {"bf16": 1e-2, "fp16": 2e-3, "int8": 2e-2}[transport]
        exact = dense(B, A)
        if float(exact.norm()) > 0:
            assert float((dense(B2, A2) - exact).norm() / exact.norm()) < tolerance
        assert torch.count_nonzero(B2[:, 3:]) == 0  # a zero component stays exactly zero


def test_the_compressed_transports_move_a_half_and_a_quarter_of_the_bytes():
    # A module of the embedded model's size: 576 x 1536 at rank 16.
    factors = _factors(d_out=1536, d_in=576, rank=4) | {
        "m.gate_proj": (torch.randn(1536, 16), torch.randn(16, 576))}
    size = {t: message_bytes(RecordDict({"u": factors_to_record({"m.gate_proj": factors["m.gate_proj"]}, t)}))
            for t in TRANSPORTS}
    raw = (1536 + 576) * 16 * 4
    assert raw < size["fp32"] < 1.02 * raw
    assert 0.49 < size["bf16"] / size["fp32"] < 0.52 and 0.49 < size["fp16"] / size["fp32"] < 0.52
    assert 0.24 < size["int8"] / size["fp32"] < 0.27
    assert tensors_bytes([torch.zeros(1536, 576)]) > 1536 * 576 * 4  # the full weight, for FedAvg's share


def _record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def _int8_arrays():
    arrays = {}
    for key, value in factors_to_record(_factors(modules=("m.q_proj",)), "int8").items():
        arrays[key] = value.numpy()
    return arrays


@pytest.mark.parametrize("tamper,problem", [
    (lambda a: a.pop("m.q_proj.B.scale"), "incomplete LoRA factors for module m.q_proj: no m.q_proj.B.scale"),
    (lambda a: a.update({"m.q_proj.B.scale": np.full(4, np.nan, np.float32)}), "finite and positive"),
    (lambda a: a.update({"m.q_proj.A.scale": np.zeros(4, np.float32)}), "finite and positive"),
    (lambda a: a.update({"m.q_proj.A.scale": -np.ones(4, np.float32)}), "finite and positive"),
    (lambda a: a.update({"m.q_proj.B.scale": np.ones(5, np.float32)}), "expected float32 of shape (4,)"),
    (lambda a: a.update({"m.q_proj.B.scale": np.ones(4, np.float64)}), "expected float32 of shape (4,)"),
    (lambda a: a.update({"m.q_proj.B": a["m.q_proj.B"].astype(np.float32)}), "transport int8 sends 2-d int8"),
    (lambda a: a.update({"m.q_proj.A": a["m.q_proj.A"][None]}), "transport int8 sends 2-d int8"),
    (lambda a: a.update({"m.q_proj.A.payload": np.zeros(3, np.int8)}), "is not a factor key of transport int8"),
])
def test_a_crafted_int8_record_is_refused_naming_the_array(tamper, problem):
    arrays = _int8_arrays()
    tamper(arrays)
    with pytest.raises(ValueError) as err:
        record_to_factors(_record(arrays), "int8")
    assert problem in str(err.value)


def test_an_update_in_another_transport_than_asked_is_refused():
    fp32 = factors_to_record(_factors(modules=("m.q_proj",)), "fp32")
    with pytest.raises(ValueError, match="transport bf16 sends 2-d int16"):
        record_to_factors(fp32, "bf16")
    with pytest.raises(ValueError, match="is not a factor key of transport fp32"):
        record_to_factors(factors_to_record(_factors(modules=("m.q_proj",)), "int8"), "fp32")
    with pytest.raises(ValueError, match="unknown transport"):
        record_to_factors(fp32, "int4")
    with pytest.raises(ValueError, match="transport"):
        FederationConfig(transport="int4")


def test_a_crafted_reply_is_refused_by_the_coordinator_and_the_round_goes_on():
    """Through the coordinator's screening: the decoder's refusal becomes a named rejection."""
    from flwr.app import ConfigRecord, MetricRecord

    from fedmem.config import LoraSettings, ServerSettings
    from fedmem.flower.messages import INFO_KEY, METRICS_KEY, UPDATE_KEY
    from fedmem.flower.roster import Owner
    from fedmem.flower.screening import Screen
    from fedmem.validate import Rejected

    arrays = _int8_arrays()
    arrays["m.q_proj.B.scale"] = np.full(4, np.inf, np.float32)
    content = RecordDict({UPDATE_KEY: _record(arrays), METRICS_KEY: MetricRecord({"first_loss": 1.0,
                                                                                   "final_loss": 0.5}),
                          INFO_KEY: ConfigRecord({"base_fingerprint": "fp"})})

    class Reply:
        def __init__(self, content):
            self.content = content

    config = FederationConfig(transport="int8", lora=LoraSettings(rank=4))
    screen = Screen("fp", config, ServerSettings(), {"m.q_proj": (64, 48)}, {})
    with pytest.raises(Rejected, match=r"cannot be read .*m.q_proj.B.scale: scales must be finite"):
        screen.check(Reply(content), Owner("mallory"), None)
