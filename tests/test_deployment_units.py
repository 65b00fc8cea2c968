"""Deployment pieces that need no network: certificates, keys, the allow-list, and the checks
``fedmem-client join`` / ``fedmem-server start`` make before anything connects."""

from __future__ import annotations

import json
import logging
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


class _Said(logging.Handler):
    """(level, message) of what a fedmem logger logs, caught directly: fedmem's loggers may not
    propagate to pytest's."""

    def __init__(self, logger_name: str = "fedmem"):
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(logger_name)
        self.records: list[tuple[int, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.getMessage()))

    def __enter__(self):
        self.level_before = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level_before)

    @property
    def text(self) -> str:
        return "\n".join(message for _, message in self.records)


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


def test_node_ids_map_to_admitted_names_and_keys_only(tmp_path):
    state = tmp_path / "server"
    a, b = ensure_keys(tmp_path / "a"), ensure_keys(tmp_path / "b")
    admission.add(state, "alpha", a.public_text)
    admission.add(state, "beta", b.public_text)
    with pytest.raises(admission.AdmissionError, match="use letters"):
        admission.add(state, "gamma\nround 9/9: forged", ensure_keys(tmp_path / "c").public_text)
    data = admission.read_allow_list(admission.allow_list_path(state))
    assert admission.owners_by_node(data["clients"]) == {}  # nobody registered with the SuperLink yet
    data["clients"]["alpha"]["node_id"] = "1234567890123"  # as `sync` records it: a string
    data["clients"]["beta"]["node_id"] = "77"
    assert admission.owners_by_node(data["clients"]) == {1234567890123: ("alpha", a.fingerprint),
                                                         77: ("beta", b.fingerprint)}
    # A hand-edited file: a node id under two names maps to neither; a name that could forge a log line, to none.
    data["clients"]["alpha"]["node_id"] = "77"
    data["clients"]["x\ny"] = {"fingerprint": "SHA256:x", "node_id": "5"}
    assert admission.owners_by_node(data["clients"]) == {}
    assert admission.read_allow_list(tmp_path / "missing.json") == {"clients": {}, "removed": {}}
    (tmp_path / "bad.json").write_text('{"clients": [1]}')
    with pytest.raises(admission.AdmissionError, match="corrupt allow-list"):
        admission.read_allow_list(tmp_path / "bad.json")


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


def test_join_writes_the_owners_own_settings_into_the_node_config(tmp_path, tiny_base, monkeypatch):
    import tomli
    from fedmem.clients import join as join_module

    certs = ensure_certificates(tmp_path / "certs")
    data = tmp_path / "corpus"
    data.mkdir()
    (data / "notes.md").write_text("# Notes\n\nThe Zorvex Tower was built by Mila Quent in 1911.\n")
    started = []
    monkeypatch.setattr(join_module, "_run_supernode", lambda command, *a, **k: started.append(command) or ("done", 0))

    def options(state, **extra):
        return join_module.JoinOptions(server="127.0.0.1:9", data=data, ca=certs.ca_cert, state=tmp_path / state,
                                       base=str(tiny_base), **extra)

    assert join_module.join(options("one", device="cpu", threads=2)) == 0
    node = tomli.loads((tmp_path / "one" / "node-config.toml").read_text())
    assert node == {"data": str(data.resolve()), "base": str(tiny_base), "state": str(tmp_path / "one"),
                    "device": "cpu", "threads": "2"}
    assert "--node-config" in started[0]
    assert join_module.join(options("two")) == 0  # the device defaults to auto; threads only when capped
    node = tomli.loads((tmp_path / "two" / "node-config.toml").read_text())
    assert node["device"] == "auto" and "threads" not in node
    with pytest.raises(ValueError, match="device"):
        join_module.join(options("three", device="gpu"))
    assert len(started) == 2  # a bad device is refused before a SuperNode starts


def test_the_apps_log_lines_are_relayed_at_their_level():
    from fedmem.clients.join import relay_clientapp_line
    from fedmem.server.coordinator import relay_serverapp_line

    server_lines = ["INFO :      [ROUND 1]", "[fedmem] round 1/2: training on 3 clients",
                    "[fedmem] warning:   client delta ignored: its base model differs from the federation's",
                    "ERROR :     ServerApp raised an exception"]
    with _Said("fedmem.server.coordinator") as said:
        for line in server_lines:
            relay_serverapp_line(line + "\n")
    assert said.records == [(logging.INFO, "round 1/2: training on 3 clients"),
                    (logging.WARNING, "  client delta ignored: its base model differs from the federation's"),
                    (logging.ERROR, "ERROR :     ServerApp raised an exception")]

    client_lines = ["INFO :      Receiving: train message", "[alpha round 1] 12 examples", "[beta round 1] not mine",
                    "warning: memory of round 2 not kept: it was made for another base model",
                    "warning: [alpha round 2] slow", "Traceback (most recent call last):"]
    with _Said("fedmem.clients.join") as said:
        relayed = [relay_clientapp_line(line, "alpha") for line in client_lines]
    assert relayed == [False, True, False, True, True, True]
    assert said.records == [(logging.INFO, "[alpha round 1] 12 examples"),
                    (logging.WARNING, "memory of round 2 not kept: it was made for another base model"),
                    (logging.WARNING, "[alpha round 2] slow"),
                    (logging.ERROR, "Traceback (most recent call last):")]


def test_server_start_refuses_bad_settings_before_starting(tmp_path, capsys):
    state = tmp_path / "server"
    assert server_main(["start", "--state", str(state), "--address", "nowhere"]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err
    assert server_main(["start", "--state", str(state), "--rounds", "0"]) == 2
    assert "rounds must be" in capsys.readouterr().err  # named before anything starts
    assert not (state / "superlink.db").exists()


def test_app_project_is_a_valid_flower_app(tmp_path):
    import tomli
    from flwr.common.config import validate_config

    from fedmem.flower.app_project import RUN_CONFIG_DEFAULTS, plan_from_run_config, write_app_project

    project = write_app_project(tmp_path / "app", {"rounds": 5})
    config = tomli.loads((project / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(config, check_module=True, project_dir=project)
    assert ok, errors
    assert config["tool"]["flwr"]["app"]["config"]["rounds"] == 5
    assert set(config["tool"]["flwr"]["app"]["config"]) == set(RUN_CONFIG_DEFAULTS)
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "fedmem.flower.app_project:app", "clientapp": "fedmem.flower.client_app:app"}
    with pytest.raises(ValueError, match="roundz"):  # an unknown key is named, not ignored
        plan_from_run_config({"roundz": 3})
    # Who the owners are: the coordinator's allow-list (`fedmem-server start` passes its own), else nobody's.
    out = str(tmp_path / "run")  # the run's memory-signing key is made there
    assert RUN_CONFIG_DEFAULTS["allow-list"] == "" and plan_from_run_config({"out": out}).allow_list is None
    allow = tmp_path / "state" / "clients.json"
    assert plan_from_run_config({"allow-list": str(allow), "out": out}).allow_list == allow


def test_resume_takes_the_newest_checkpoint_that_verifies(tmp_path, tiny_base):
    from fedmem.base_model import fingerprint, load_model
    from fedmem.config import FederationConfig, LoraSettings
    from fedmem.flower.server_app import RunPlan, last_checkpoint
    from fedmem.lora import attach_lora, extract_factors
    from fedmem.memory import save_memory

    config = FederationConfig(rounds=3, lora=LoraSettings(rank=4, alpha=8, epochs=1))
    factors = extract_factors(attach_lora(load_model(str(tiny_base), "cpu"), LoraSettings(rank=4, alpha=8)))
    fp = fingerprint(tiny_base)
    for rnd in (1, 2):
        save_memory(tmp_path / "rounds" / f"round-{rnd:03d}", factors, tiny_base,
                    {"round": rnd, "rounds": 3, "base_fingerprint": fp, "clients": ["a"],
                     "federation": config.to_dict()})
    plan = RunPlan(base_dir=str(tiny_base), out_dir=tmp_path, federation=config)
    assert last_checkpoint(plan, fp)[0] == 2

    weights = tmp_path / "rounds" / "round-002" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"damaged!")  # damage from outside
    with _Said() as said:
        done, restored, manifest = last_checkpoint(plan, fp)
    assert done == 1 and manifest["clients"] == ["a"] and set(restored) == set(factors)
    assert "round-002 is unusable" in said.text

    more_rounds = RunPlan(base_dir=str(tiny_base), out_dir=tmp_path, federation=FederationConfig(
        rounds=5, lora=LoraSettings(rank=4, alpha=8, epochs=1)))
    assert last_checkpoint(more_rounds, fp)[0] == 1  # asking for more rounds is fine
    other = RunPlan(base_dir=str(tiny_base), out_dir=tmp_path, federation=FederationConfig(
        rounds=3, lora=LoraSettings(rank=8, alpha=8, epochs=1)))
    with pytest.raises(RuntimeError, match="other federation settings"):
        last_checkpoint(other, fp)
