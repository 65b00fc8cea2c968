"""Signed memories and the base fingerprint, attacked one defence at a time.

Each attack is a copy of a correctly signed memory with one thing changed, refused by
``fedmem ask`` (exit code 2, the reason on stderr) or by the verify function; the
untouched memory is accepted. Small random LoRA factors on the tiny Llama, no training.
"""

from __future__ import annotations

import base64
import json
import os
import shutil

import pytest
import torch
from conftest import fine_tuned_copy

from fedmem import base_model
from fedmem.base_model import fingerprint
from fedmem.cli import main
from fedmem.memory import MemoryFormatError, save_memory, verify_memory
from fedmem.signing import (
    PINNED_KEY,
    SIGNATURE_FILE,
    SignatureError,
    Trust,
    default_client_state,
    default_server_state,
    ensure_signing_key,
    key_fingerprint,
    load_signing_key,
    local_signing_key,
    pack_memory,
    pin_coordinator_key,
    public_key_path,
    receive_memory,
    sign_memory,
    trust_for_user,
)


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_base):
    """A private FEDMEM_HOME and default client/server state dirs: no key of the machine's user counts."""
    monkeypatch.setenv("FEDMEM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FEDMEM_CLIENT_STATE", str(tmp_path / "client-default"))
    monkeypatch.setenv("FEDMEM_SERVER_STATE", str(tmp_path / "server-default"))
    return tmp_path / "home"


@pytest.fixture
def coordinator_key(tmp_path, home):
    key = ensure_signing_key(tmp_path / "coordinator" / "memory-signing.key")
    return key, public_key_path(tmp_path / "coordinator" / "memory-signing.key")


def _factors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {f"model.layers.{i}.self_attn.q_proj": (torch.randn(32, 2, generator=g) * 0.1,
                                                   torch.randn(2, 32, generator=g)) for i in range(2)}


@pytest.fixture
def signed(tmp_path, tiny_base, coordinator_key):
    """A memory signed by the coordinator's key, made for tiny_base."""
    key, pub = coordinator_key
    path = tmp_path / "memory"
    save_memory(path, _factors(), tiny_base, {"base_fingerprint": fingerprint(tiny_base), "round": 1, "rounds": 1},
                signing_key=key)
    return path


def _ask(memory, *options):
    return main(["ask", "--memory", str(memory), "--max-new-tokens", "2", *options, "Who built the Zorvex Tower?"])


def _flip_weights_byte(memory):
    weights = memory / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))


def _alpha_times_1000(memory):
    path = memory / "adapter_config.json"
    config = json.loads(path.read_text())
    config["lora_alpha"] *= 1000
    path.write_text(json.dumps(config))


def _recomputed_sha(memory):
    from fedmem.memory import sha256_file

    _flip_weights_byte(memory)
    manifest = json.loads((memory / "fedmem.json").read_text())
    manifest["weights_sha256"] = sha256_file(memory / "adapter_model.safetensors")
    (memory / "fedmem.json").write_text(json.dumps(manifest))


def _forged_statement(memory):
    path = memory / SIGNATURE_FILE
    doc = json.loads(path.read_text())
    statement = json.loads(base64.b64decode(doc["statement"]))
    statement["files"] = [f for f in statement["files"] if f["path"] != "adapter_config.json"]
    doc["statement"] = base64.b64encode(json.dumps(statement).encode()).decode()
    path.write_text(json.dumps(doc))


def _symlinked_weights(memory):
    weights = memory / "adapter_model.safetensors"
    shutil.move(weights, memory.parent / "weights-elsewhere")
    weights.symlink_to(memory.parent / "weights-elsewhere")


ATTACKS = {
    "tampered-weights": (_flip_weights_byte, "adapter_model.safetensors was modified after signing"),
    "lora-alpha-x1000": (_alpha_times_1000, "adapter_config.json was modified after signing"),
    "deleted-fedmem-json": (lambda m: (m / "fedmem.json").unlink(), "fedmem.json is listed in the signature but "
                            "missing"),
    "recomputed-sha": (_recomputed_sha, "adapter_model.safetensors was modified after signing"),
    "extra-file": (lambda m: (m / "notes.txt").write_text("hello"), "notes.txt is not covered by the signature"),
    "removed-file": (lambda m: (m / "adapter_config.json").unlink(), "adapter_config.json is listed in the signature "
                     "but missing"),
    "forged-statement": (_forged_statement, "the signature does not verify"),
    "symlinked-weights": (_symlinked_weights, "adapter_model.safetensors is a symbolic link"),
    "signature-stripped": (lambda m: (m / SIGNATURE_FILE).unlink(), "the memory is not signed"),
    "stripped-and-alpha": (lambda m: (_alpha_times_1000(m), (m / SIGNATURE_FILE).unlink()), "the memory is not signed"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_ask_refuses_a_tampered_memory(signed, coordinator_key, capsys, attack):
    tamper, message = ATTACKS[attack]
    tamper(signed)
    assert _ask(signed, "--trust-key", str(coordinator_key[1])) == 2
    err = capsys.readouterr().err
    assert "fedmem: error:" in err and message in err, err


def test_ask_accepts_the_signed_memory_and_eval_too(signed, coordinator_key, capsys, tmp_path):
    assert _ask(signed, "--trust-key", str(coordinator_key[1])) == 0
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Who built the Zorvex Tower?", "answer": "Mila Quent"}) + "\n")
    assert main(["eval", "--memory", str(signed), "--questions", str(questions),
                 "--trust-key", str(coordinator_key[1])]) == 0
    assert "fedmem: error" not in capsys.readouterr().err


def test_a_memory_resigned_by_another_key_is_refused(signed, coordinator_key, tmp_path, tiny_base, capsys):
    other = ensure_signing_key(tmp_path / "attacker" / "k.key")
    _alpha_times_1000(signed)
    sign_memory(signed, other, fingerprint(tiny_base))  # a valid signature over the tampered files
    assert verify_memory(signed)  # intact as signed: only trust tells who may sign
    assert _ask(signed, "--trust-key", str(coordinator_key[1])) == 2
    err = capsys.readouterr().err
    assert f"signed by an untrusted key with fingerprint {key_fingerprint(other.public_key())}" in err, err
    with pytest.raises(SignatureError, match="untrusted key"):
        verify_memory(signed, fingerprint(tiny_base), trust=Trust.of_files([coordinator_key[1]]))
    assert _ask(signed) == 2  # and with no key configured at all: a signature is a claim that must hold


def test_a_pinned_coordinator_key_requires_a_signature(signed, coordinator_key, capsys):
    pin_coordinator_key(default_client_state(), coordinator_key[1])
    assert _ask(signed) == 0  # the owner's pinned key is trusted without options
    (signed / SIGNATURE_FILE).unlink()
    assert _ask(signed) == 2
    err = capsys.readouterr().err
    assert "the memory is not signed" in err and "coordinator key pinned in" in err, err


def test_the_trust_store_and_the_coordinators_own_key(signed, coordinator_key, home, tmp_path):
    assert _ask(signed) == 2  # unknown signer
    (home / "trusted-keys").mkdir(parents=True)
    shutil.copy(coordinator_key[1], home / "trusted-keys" / "coordinator.pub")
    assert _ask(signed) == 0
    shutil.rmtree(home / "trusted-keys")
    own = default_server_state() / "memory-signing.key"
    own.parent.mkdir(parents=True)
    shutil.copy(coordinator_key[1], public_key_path(own))
    assert _ask(signed) == 0


def test_unsigned_memory_without_any_key_is_used_with_a_warning(tmp_path, tiny_base, home, capsys):
    memory = tmp_path / "plain"
    save_memory(memory, _factors(), tiny_base, {"base_fingerprint": fingerprint(tiny_base)})
    local_signing_key()  # a local key alone (made by simulate) does not make signatures required
    assert _ask(memory) == 0
    assert "is not signed" in capsys.readouterr().err
    assert _ask(memory, "--require-signature") == 2
    assert "the memory is not signed" in capsys.readouterr().err


def test_memories_signed_with_the_local_key_are_trusted_by_the_same_user(tmp_path, tiny_base, home, capsys):
    memory = tmp_path / "local"
    save_memory(memory, _factors(), tiny_base, {}, signing_key=local_signing_key())
    manifest = json.loads((memory / "fedmem.json").read_text())
    assert manifest["base_fingerprint"] == fingerprint(tiny_base)  # a signed memory always names its base
    assert _ask(memory, "--require-signature") == 0
    assert "not signed" not in capsys.readouterr().err


def test_wrong_base_is_refused(signed, coordinator_key, tmp_path, tiny_base, capsys):
    other = fine_tuned_copy(tiny_base, tmp_path / "other-base")
    assert _ask(signed, "--trust-key", str(coordinator_key[1]), "--base", str(other)) == 2
    assert "wrong base" in capsys.readouterr().err
    with pytest.raises(MemoryFormatError, match="wrong base"):
        verify_memory(signed, fingerprint(other), trust=Trust.of_files([coordinator_key[1]]))


def test_bad_trust_key_files_are_errors(signed, coordinator_key, tmp_path, capsys):
    assert _ask(signed, "--trust-key", str(tmp_path / "missing.pub")) == 2
    assert "cannot read the public key" in capsys.readouterr().err
    private = tmp_path / "coordinator" / "memory-signing.key"
    assert _ask(signed, "--trust-key", str(private)) == 2
    assert "this is a private key" in capsys.readouterr().err


def test_signing_keys_are_private_and_made_once(tmp_path):
    path = tmp_path / "keys" / "memory-signing.key"
    key = ensure_signing_key(path)
    assert (path.stat().st_mode & 0o777, public_key_path(path).stat().st_mode & 0o777) == (0o600, 0o644)
    assert key_fingerprint(ensure_signing_key(path).public_key()) == key_fingerprint(key.public_key())
    assert public_key_path(path).read_text().startswith("ssh-ed25519 ")
    os.chmod(path, 0o644)
    with pytest.raises(SignatureError, match="readable by others"):
        load_signing_key(path)


def test_save_fsyncs_every_file_and_the_directory(tmp_path, tiny_base, coordinator_key, monkeypatch):
    from fedmem import memory

    synced = []
    real = memory.fsync_path
    monkeypatch.setattr(memory, "fsync_path", lambda p: (synced.append(os.path.basename(p)), real(p)))
    save_memory(tmp_path / "m", _factors(), tiny_base, {}, signing_key=coordinator_key[0])
    for name in ("adapter_config.json", "adapter_model.safetensors", "fedmem.json", SIGNATURE_FILE):
        assert name in synced
    assert synced[-1] == tmp_path.name  # the parent, after the rename


# --- coordinator -> owner: received, pinned, pulled byte for byte ---------------------------

def _files(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_received_memory_is_kept_byte_for_byte_and_the_key_pinned(signed, coordinator_key, tmp_path, tiny_base):
    state = tmp_path / "owner"
    fp = fingerprint(tiny_base)
    manifest, pinned = receive_memory(pack_memory(signed), state, fp)
    assert pinned == key_fingerprint(coordinator_key[0].public_key()) and (state / PINNED_KEY).is_file()
    assert _files(state / "memory") == _files(signed)  # nothing rewritten, weights_sha256 included
    assert manifest["weights_sha256"] == json.loads((signed / "fedmem.json").read_text())["weights_sha256"]

    # Then: another signer, an unsigned memory, another base model, a path outside: refused, kept memory untouched.
    forged = tmp_path / "forged"
    shutil.copytree(signed, forged)
    _alpha_times_1000(forged)
    sign_memory(forged, ensure_signing_key(tmp_path / "attacker.key"), fp)
    with pytest.raises(SignatureError, match="untrusted key"):
        receive_memory(pack_memory(forged), state, fp)
    unsigned = {k: v for k, v in pack_memory(signed).items() if k != SIGNATURE_FILE}
    with pytest.raises(SignatureError, match="not signed"):
        receive_memory(unsigned, state, fp)
    with pytest.raises(MemoryFormatError, match="wrong base"):
        receive_memory(pack_memory(signed), state, "sha256:" + "0" * 64)
    with pytest.raises(SignatureError, match="not a plain relative path"):
        receive_memory({**pack_memory(signed), "../escape": b"x"}, state, fp)
    assert not (tmp_path / "escape").exists()
    assert _files(state / "memory") == _files(signed)
    assert [p.name for p in state.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_pull_copies_byte_for_byte_and_refuses_tampering(signed, coordinator_key, tmp_path, tiny_base, capsys):
    from fedmem.clients.cli import main as client_main
    from fedmem.clients.pull import pull

    state = tmp_path / "owner"
    receive_memory(pack_memory(signed), state, fingerprint(tiny_base))
    out = tmp_path / "mine"
    manifest = pull(state, out, str(tiny_base))
    assert manifest["signer"] == key_fingerprint(coordinator_key[0].public_key())
    assert _files(out) == _files(signed)
    assert _ask(out, "--trust-key", str(state / PINNED_KEY)) == 0

    _alpha_times_1000(state / "memory")
    assert client_main(["pull", "--state", str(state), "--out", str(out), "--base", str(tiny_base)]) == 2
    assert "adapter_config.json was modified after signing" in capsys.readouterr().err
    assert _files(out) == _files(signed)  # the earlier copy stays as it was
    (state / "memory" / SIGNATURE_FILE).unlink()
    with pytest.raises(SignatureError, match="not signed"):
        pull(state, out, str(tiny_base))


def test_pinning_a_different_coordinator_key_is_refused(tmp_path, coordinator_key):
    state = tmp_path / "owner"
    fp, new = pin_coordinator_key(state, coordinator_key[1])
    assert new and pin_coordinator_key(state, coordinator_key[1]) == (fp, False)
    ensure_signing_key(tmp_path / "other.key")
    with pytest.raises(SignatureError, match="already pins the coordinator key"):
        pin_coordinator_key(state, tmp_path / "other.pub")


def test_default_state_dirs_match_the_command_lines(monkeypatch, tmp_path):
    from fedmem.clients.join import default_state_dir as client_default
    from fedmem.server.coordinator import default_state_dir as server_default

    monkeypatch.setenv("FEDMEM_CLIENT_STATE", str(tmp_path / "c"))
    monkeypatch.setenv("FEDMEM_SERVER_STATE", str(tmp_path / "s"))
    assert default_client_state() == client_default() and default_server_state() == server_default()


def test_trust_rule(home, coordinator_key):
    assert not trust_for_user().required
    local_signing_key()
    assert not trust_for_user().required and len(trust_for_user().keys) == 1
    assert trust_for_user(require=True).required
    assert trust_for_user([coordinator_key[1]]).required


# --- The base fingerprint: the weights' content, never a stamp beside them ------------------

def test_a_forged_fingerprint_stamp_beside_the_weights_is_not_believed(tmp_path, tiny_base, home, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_base, model)
    truth = base_model._hash_weights(model)
    # What the old cache beside the weights looked like, with the real stat values copied in.
    forged = {"fingerprint": "sha256:" + "f" * 64, "files": base_model._weights_state(model)}
    (model / "fedmem-fingerprint.json").write_text(json.dumps(forged))
    assert fingerprint(model) == truth
    # Nor is a forged entry in a cache keyed by another directory's path.
    monkeypatch.setattr(base_model, "_SETTLED_NS", 0)
    assert fingerprint(model) == truth
    cache = base_model.fingerprint_cache_file(model)
    assert cache.is_file() and str(home) in str(cache)
    entry = json.loads(cache.read_text())
    entry["model_dir"] = str(tmp_path / "elsewhere")
    entry["fingerprint"] = "sha256:" + "e" * 64
    cache.write_text(json.dumps(entry))
    assert fingerprint(model) == truth


def test_a_read_only_model_dir_is_fingerprinted_and_cached(tmp_path, tiny_base, home, monkeypatch):
    monkeypatch.setattr(base_model, "_SETTLED_NS", 0)
    model = tmp_path / "ro-model"
    shutil.copytree(tiny_base, model)
    os.chmod(model, 0o555)
    try:
        assert fingerprint(model) == base_model._hash_weights(model)
        assert base_model.fingerprint_cache_file(model).is_file()
        monkeypatch.setattr(base_model, "_hash_weights", lambda d: pytest.fail("hashed again"))
        assert fingerprint(model)
        assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in tiny_base.iterdir())
    finally:
        os.chmod(model, 0o755)
