"""Deployment pieces that need no network: certificates, keys, the allow-list, and the checks
``fedmem-client join`` / ``fedmem-server start`` make before anything connects."""

from __future__ import annotations

import json
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from fedmem.clients.cli import main as client_main
from fedmem.clients.keys import ensure_keys, parse_public_key
from fedmem.server import admission
from fedmem.server.certificates import ensure_certificates
from fedmem.server.cli import main as server_main
from fedmem.server.coordinator import parse_address


def _sans(path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)}


def test_certificates_made_once_signed_by_the_ca_and_reissued_for_new_hosts(tmp_path):
    certs = ensure_certificates(tmp_path, ["fed.example.org", "10.0.0.5"])
    assert {"fed.example.org", "10.0.0.5", "localhost", "127.0.0.1"} <= _sans(certs.server_cert)
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE((tmp_path / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(certs.server_key.stat().st_mode) == 0o600

    same = ensure_certificates(tmp_path, ["fed.example.org"])
    assert same.server_cert.read_bytes() == server.public_bytes(serialization.Encoding.PEM)  # reused
    more = ensure_certificates(tmp_path, ["other.example.org"])
    assert "other.example.org" in _sans(more.server_cert)
    assert more.ca_cert.read_bytes() == ca.public_bytes(serialization.Encoding.PEM)  # the CA stays
    assert more.fingerprint() == certs.fingerprint() and len(certs.fingerprint().split(":")) == 32


def test_client_key_pair_made_once(tmp_path):
    first = ensure_keys(tmp_path)
    again = ensure_keys(tmp_path)
    assert first.created and not again.created
    assert first.fingerprint == again.fingerprint and first.fingerprint.startswith("SHA256:")
    assert stat.S_IMODE(first.private_key.stat().st_mode) == 0o600
    assert parse_public_key(first.public_text + " owner@laptop")[1] == first.fingerprint
    assert first.public_key.read_text().strip() == first.public_text


def test_allow_list_add_list_remove(tmp_path, capsys):
    state = tmp_path / "server"
    a, b = ensure_keys(tmp_path / "a"), ensure_keys(tmp_path / "b")
    assert server_main(["clients", "add", "--state", str(state), "alpha", a.public_text]) == 0
    assert server_main(["clients", "add", "--state", str(state), "beta", str(b.public_key)]) == 0  # a .pub path
    assert server_main(["clients", "list", "--state", str(state)]) == 0
    out = capsys.readouterr().out
    assert a.fingerprint in out and b.fingerprint in out
    assert set(json.loads((state / "clients.json").read_text())["clients"]) == {"alpha", "beta"}

    assert server_main(["clients", "add", "--state", str(state), "gamma", a.public_text]) == 2
    assert "already admitted as 'alpha'" in capsys.readouterr().err
    assert server_main(["clients", "add", "--state", str(state), "bad name", b.public_text]) == 2
    ed = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    assert server_main(["clients", "add", "--state", str(state), "delta", ed]) == 2
    assert "not an EC public key" in capsys.readouterr().err
    assert server_main(["clients", "remove", "--state", str(state), "alpha"]) == 0
    assert set(admission.load(state)) == {"beta"}
    assert server_main(["clients", "remove", "--state", str(state), "alpha"]) == 2
    capsys.readouterr()
    assert server_main(["clients", "add", "--state", str(state), "alpha", a.public_text]) == 2
    assert "cannot be admitted again" in capsys.readouterr().err


@pytest.mark.parametrize("address,problem", [("localhost", "expected HOST:PORT"), ("host:http", "not a number"),
                                             ("host:70000", "between 1 and 65535")])
def test_bad_addresses_are_named(address, problem):
    with pytest.raises(ValueError, match=problem):
        parse_address(address)
    assert parse_address("[::1]:9443") == ("::1", 9443)


def test_join_checks_everything_before_connecting(tmp_path, capsys):
    certs = ensure_certificates(tmp_path / "certs")
    good = tmp_path / "corpus"
    good.mkdir()
    (good / "notes.md").write_text("# Notes\n\nThe Zorvex Tower was built by Mila Quent in 1911.\n")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "facts.jsonl").write_text('{"question": "Who?", "answer": "Mila"}\n{"question": "no answer"}\n')
    state = tmp_path / "client"

    def join(*args):
        return client_main(["join", "--state", str(state), *args])

    assert join("--server", "127.0.0.1:9", "--ca", str(tmp_path / "missing.pem"), "--data", str(good)) == 2
    assert "no such file" in capsys.readouterr().err
    assert join("--server", "127.0.0.1:9", "--ca", str(certs.server_cert), "--data", str(good)) == 2
    assert "not a CA certificate" in capsys.readouterr().err
    assert join("--server", "127.0.0.1", "--ca", str(certs.ca_cert), "--data", str(good)) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err
    assert join("--server", "0.0.0.0:9443", "--ca", str(certs.ca_cert), "--data", str(good)) == 2
    assert "listening address" in capsys.readouterr().err
    assert join("--server", "127.0.0.1:9", "--ca", str(certs.ca_cert), "--data", str(bad)) == 2
    assert "facts.jsonl:2" in capsys.readouterr().err
    assert not (state / "supernode.log").exists()  # nothing was started


def test_server_start_refuses_bad_settings_before_starting(tmp_path, capsys):
    state = tmp_path / "server"
    assert server_main(["start", "--state", str(state), "--address", "nowhere"]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err
    assert server_main(["start", "--state", str(state), "--rounds", "0"]) == 2
    assert "rounds must be a positive integer" in capsys.readouterr().err
    assert not (state / "superlink.db").exists()


def test_app_project_is_a_valid_flower_app(tmp_path):
    import tomli
    from flwr.common.config import validate_config

    from fedmem.server.flower_app import RUN_CONFIG_DEFAULTS, plan_from_run_config, write_app_project

    project = write_app_project(tmp_path / "app", {"rounds": 5})
    config = tomli.loads((project / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(config, check_module=True, project_dir=project)
    assert ok, errors
    assert config["tool"]["flwr"]["app"]["config"]["rounds"] == 5
    assert set(config["tool"]["flwr"]["app"]["config"]) == set(RUN_CONFIG_DEFAULTS)
    with pytest.raises(ValueError, match="unknown run config keys: roundz"):
        plan_from_run_config({"roundz": 3})


def test_resume_takes_the_newest_checkpoint_that_verifies(tmp_path, tiny_base):
    from fedmem.base_model import fingerprint, load_model
    from fedmem.federation import FederationConfig
    from fedmem.lora import LoraSettings, attach_lora, extract_factors
    from fedmem.memory import save_memory
    from fedmem.server.server_app import RunPlan, last_checkpoint

    config = FederationConfig(rounds=3, memory_rank=4, lora=LoraSettings(rank=4, alpha=8, epochs=1))
    factors = extract_factors(attach_lora(load_model(str(tiny_base), "cpu"), LoraSettings(rank=4, alpha=8)))
    fp = fingerprint(tiny_base)
    for rnd in (1, 2):
        save_memory(tmp_path / "rounds" / f"round-{rnd:03d}", factors, tiny_base,
                    {"round": rnd, "rounds": 3, "base_fingerprint": fp, "clients": ["a"], "federation": config.to_dict()})
    said = []
    plan = RunPlan(base_dir=str(tiny_base), out_dir=tmp_path, federation=config, report=said.append)
    assert last_checkpoint(plan, fp)[0] == 2

    weights = tmp_path / "rounds" / "round-002" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"damaged!")  # damage from outside
    done, restored, manifest = last_checkpoint(plan, fp)
    assert done == 1 and manifest["clients"] == ["a"] and set(restored) == set(factors)
    assert "round-002 is unusable" in said[0]

    more_rounds = RunPlan(base_dir=str(tiny_base), out_dir=tmp_path, federation=FederationConfig(
        rounds=5, memory_rank=4, lora=LoraSettings(rank=4, alpha=8, epochs=1)))
    assert last_checkpoint(more_rounds, fp)[0] == 1  # asking for more rounds is fine
    other = RunPlan(base_dir=str(tiny_base), out_dir=tmp_path, federation=FederationConfig(rounds=3, memory_rank=8))
    with pytest.raises(RuntimeError, match="other federation settings"):
        last_checkpoint(other, fp)
