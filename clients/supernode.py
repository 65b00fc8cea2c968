"""Flower's SuperNode as a child process of ``fedmem-client join``.

It connects out to the coordinator over TLS (verifying the server with the
federation's CA), signs its requests with the client's key, and runs the fedmem
ClientApp on the local corpus. Its local Runtime API (the ClientApp talks to it)
listens on loopback only. App dependencies are never installed at run time.

The owner runs only its own code. Flower's SuperNode takes the app it runs from the
coordinator: the SuperLink sends a Flower App Bundle (FAB) with each run, and
``flwr-clientapp`` unpacks it, puts it first on ``sys.path`` and imports the
component it names. So the SuperNode ``join`` starts finds, first on its PATH,
fedmem's own ``flwr-clientapp`` (``pinned_bin``): Flower's, with two steps replaced.
The bundle is checked (``fab_problems``: exactly the project fedmem writes, a
``pyproject.toml`` naming ``fedmem.flower.client_app:app`` and no other file) and
never unpacked; the ClientApp is imported from this machine's installed fedmem,
whatever the bundle names. Any other bundle is refused with the reason, which Flower
returns to the server as the reply's error. The other task programs a SuperNode may
start (``flwr-agentapp``, ...) are replaced by ones that refuse.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shlex
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from fedmem.flower.executables import tool, tools_env

CLIENTAPP_REF = "fedmem.flower.client_app:app"
# What else a SuperNode's SuperExec may start for a run (flwr.supercore.constant.TASK_TYPE_TO_COMMAND).
REFUSED_TASK_PROGRAMS = ("flwr-agentapp", "flwr-serverapp", "flwr-simulation", "flwr-connector", "flwr-model")
FAB_FILES = ("pyproject.toml", ".info/CONTENT")
_MAX_FAB_FILE = 1 << 20  # fedmem's pyproject.toml is a few kB


class AppRefused(RuntimeError):
    """The coordinator's app bundle is not fedmem's own: it is not installed, imported or run."""


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_node_config(path: Path, values: dict[str, str]) -> Path:
    """The SuperNode's node config: what its ClientApp reads about this machine (``data``, ``state``,
    ``base``, ``device`` and, when capped, ``threads``) and the owner's client policy; all strings."""
    from fedmem.memory import atomic_write_text

    # A TOML file, not a command-line string: paths with spaces or quotes survive intact.
    atomic_write_text(path, "".join(f"{k} = {_toml_string(v)}\n" for k, v in values.items()))
    return path


def supernode_command(*, server: str, ca_cert: Path, private_key: Path, node_config: Path, runtime_port: int,
                      max_wait_time: float | None) -> list[str]:
    command = [
        tool("flower-supernode"),
        "--superlink", server,
        "--root-certificates", str(ca_cert),
        "--auth-supernode-private-key", str(private_key),
        "--node-config", str(node_config),
        "--host", "127.0.0.1", "--port", str(runtime_port),
        "--isolation", "subprocess",
    ]
    if max_wait_time:
        command += ["--max-wait-time", str(max_wait_time)]
    return command


def pinned_bin(directory: Path) -> Path:
    """Write the programs a SuperNode starts by name, to put first on its PATH: ``flwr-clientapp``
    runs ``pinned_clientapp`` with this interpreter (isolated: no PYTHONPATH, no working directory
    on ``sys.path``); every other task program refuses to start."""
    from fedmem.memory import atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    run = "import sys; from fedmem.clients.supernode import pinned_clientapp; sys.exit(pinned_clientapp())"
    scripts = {"flwr-clientapp": f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -I -u -c {shlex.quote(run)} \"$@\"\n"}
    for name in REFUSED_TASK_PROGRAMS:
        said = f"error: fedmem-client join runs only the fedmem ClientApp; refused to start {name} for the server"
        scripts[name] = f"#!/bin/sh\necho {shlex.quote(said)} >&2\nexit 1\n"
    for name, text in scripts.items():
        atomic_write_text(directory / name, text)
        os.chmod(directory / name, 0o755)
    return directory


def supernode_env(flwr_home: Path, threads: int | None, app_bin: Path) -> dict[str, str]:
    env = tools_env(flwr_home, threads)
    env["PATH"] = os.pathsep.join([str(pinned_bin(app_bin)), env["PATH"]])
    return env


def start_supernode(command: list[str], flwr_home: Path, threads: int | None = None,
                    app_bin: Path | None = None) -> subprocess.Popen:
    """Start the SuperNode with the pinned task programs (``pinned_bin``, by default beside ``flwr_home``)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = supernode_env(flwr_home, threads, app_bin or flwr_home.parent / "pinned-bin")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)


# --- which app bundle is fedmem's own ---


def _toml(text: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10: Flower depends on tomli
        import tomli as tomllib
    return tomllib.loads(text)


@functools.lru_cache(maxsize=1)
def genuine_project() -> dict:
    """The ``pyproject.toml`` of the bundle ``flwr run`` makes from the app project this machine's
    fedmem writes (``fedmem.flower.app_project.write_app_project``), as parsed TOML."""
    from flwr.cli.build import build_fab_from_disk

    from fedmem.flower.app_project import write_app_project

    with tempfile.TemporaryDirectory() as tmp:
        fab = build_fab_from_disk(write_app_project(Path(tmp) / "app"))
    with zipfile.ZipFile(io.BytesIO(fab)) as zf:
        return _toml(zf.read("pyproject.toml").decode("utf-8"))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _differences(want, got, where: str = "") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        out = []
        for key in sorted(set(want) | set(got)):
            at = f"{where}.{key}" if where else key
            if key not in got:
                out.append(f"{at} is missing")
            elif key not in want:
                out.append(f"{at} = {_short(got[key])} is not in fedmem's app")
            else:
                out += _differences(want[key], got[key], at)
        return out
    return [] if want == got else [f"{where} = {_short(got)} (fedmem's app: {_short(want)})"]


def _app_table(project) -> dict | None:
    node = project
    for key in ("tool", "flwr", "app"):
        node = node.get(key) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


def _without_config(project: dict) -> dict:
    """The project with its run config left out (the tables above it copied, not changed)."""
    app = {k: v for k, v in _app_table(project).items() if k != "config"}
    tool = project["tool"]
    return {**project, "tool": {**tool, "flwr": {**tool["flwr"], "app": app}}}


def fab_problems(content: bytes) -> list[str]:
    """Why a bundle is not fedmem's own app; [] if it is.

    fedmem's bundle is exactly a ``pyproject.toml`` (with Flower's ``.info/CONTENT`` manifest):
    every table and value equal to the one ``genuine_project`` builds here, components
    ``fedmem.flower.client_app:app`` and the ServerApp, except the values of the run config
    (``[tool.flwr.app.config]``: the coordinator's settings, plain values, which the ClientApp
    does not read). No other file: no code, nothing to import."""
    from flwr.common.constant import FAB_MAX_SIZE

    if len(content) > FAB_MAX_SIZE:
        return [f"the bundle is {len(content)} bytes, above Flower's limit"]
    try:
        zf = zipfile.ZipFile(io.BytesIO(content))
    except zipfile.BadZipFile:
        return ["the bundle is not a zip archive"]
    with zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        problems = []
        extra = [n for n in names if n not in FAB_FILES]
        if extra:
            problems.append(f"it carries {len(extra)} file(s) fedmem's app does not ({', '.join(extra[:8])}"
                            f"{', ...' if len(extra) > 8 else ''}); fedmem's app is a pyproject.toml, no code")
        if len(set(names)) != len(names):
            problems.append("it names a file twice")
        missing = [n for n in FAB_FILES if n not in names]
        if missing:
            problems.append(f"it lacks {', '.join(missing)}")
        big = [i.filename for i in infos if i.file_size > _MAX_FAB_FILE]
        if big:
            problems.append(f"{', '.join(big)}: larger than fedmem's app could be")
        if missing or big or len(set(names)) != len(names):
            return problems
        raw = zf.read("pyproject.toml")
        manifest = zf.read(".info/CONTENT").decode("utf-8", "replace").strip()
    if not extra and manifest != f"pyproject.toml,{hashlib.sha256(raw).hexdigest()},{len(raw) * 8}":
        problems.append("its CONTENT manifest does not list exactly its pyproject.toml with that file's hash")
    try:
        got = _toml(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        return [*problems, f"its pyproject.toml is not TOML ({err})"]
    if _app_table(got) is None:
        return [*problems, "its pyproject.toml has no [tool.flwr.app] table"]
    problems += _differences(_without_config(genuine_project()), _without_config(got))
    config = _app_table(got).get("config", {})
    if not isinstance(config, dict):
        problems.append("tool.flwr.app.config is not a table")
    else:
        nested = [k for k, v in config.items() if not isinstance(v, (str, int, float, bool))]
        if nested:
            problems.append(f"tool.flwr.app.config: {', '.join(nested)} not plain values (fedmem's run config is)")
    return problems


def check_fab(content: bytes) -> None:
    problems = fab_problems(content)
    if problems:
        raise AppRefused(
            "this owner runs only the fedmem ClientApp installed on its machine; the app the server sent "
            f"(sha256 {hashlib.sha256(content).hexdigest()[:16]}...) is not fedmem's: " + "; ".join(problems)
        )


def genuine_fab_id() -> str:
    project = genuine_project()
    return f"{project['tool']['flwr']['app']['publisher']}/{project['project']['name']}"


def clientapp_modules():
    """Flower's ``flwr-clientapp`` command-line module and its ClientApp process module."""
    import importlib

    # By module name: the package ``flwr.supernode.cli`` exports a function of the same name.
    return (importlib.import_module("flwr.supernode.cli.flwr_clientapp"),
            importlib.import_module("flwr.supernode.runtime.run_clientapp"))


def pin_flower() -> None:
    """Replace, in this process, the two steps of Flower's ClientApp process that take code from the
    bundle: installing it (now: ``check_fab``, nothing written) and loading the component it names
    (now: this machine's ``fedmem.flower.client_app:app``); runtime dependency installation is off.
    Raises ``AppRefused`` if this Flower no longer has those steps, rather than run unpinned."""
    try:
        from flwr.clientapp.client_app import LoadClientAppError

        cli, runtime = clientapp_modules()
    except ImportError as err:
        raise AppRefused(f"cannot pin the app with this Flower ({err})") from err
    missing = [n for n in ("install_from_fab", "get_load_client_app_fn", "get_project_dir") if not hasattr(runtime, n)]
    missing += [] if hasattr(cli, "run_clientapp") else ["flwr_clientapp.run_clientapp"]
    if missing:
        raise AppRefused(f"cannot pin the app with this Flower: {', '.join(missing)} not found")
    if getattr(runtime.install_from_fab, "fedmem_pinned", False):
        return

    def install_from_fab(fab_file, install_dir=None, skip_prompt=False) -> Path:
        try:
            check_fab(fab_file if isinstance(fab_file, bytes) else Path(fab_file).read_bytes())
        except AppRefused as err:
            print(f"error: {err}", file=sys.stderr, flush=True)  # `join` shows the owner what it refused
            raise
        return Path(os.devnull)  # nothing to install: fedmem's app is its pyproject.toml

    def get_load_client_app_fn(default_app_ref, app_path, multi_app):
        def load(fab_id: str, fab_version: str, fab_hash: str):
            if fab_id != genuine_fab_id():
                raise LoadClientAppError(f"app {fab_id!r} is not fedmem's ({genuine_fab_id()!r})")
            from fedmem.flower.client_app import app

            return app

        return load

    run_clientapp = cli.run_clientapp

    def run_clientapp_pinned(*args, **kwargs):
        return run_clientapp(*args, **{**kwargs, "runtime_dependency_install": False})

    install_from_fab.fedmem_pinned = True
    runtime.install_from_fab = install_from_fab
    runtime.get_load_client_app_fn = get_load_client_app_fn
    cli.run_clientapp = run_clientapp_pinned


def pinned_clientapp(argv: list[str] | None = None) -> int:
    """``flwr-clientapp`` for a SuperNode of ``fedmem-client join``: Flower's, pinned (``pin_flower``)."""
    try:
        pin_flower()
    except AppRefused as err:
        print(f"error: {err}; refusing to run any app", file=sys.stderr, flush=True)
        return 1
    cli, _ = clientapp_modules()
    sys.argv = ["flwr-clientapp", *(sys.argv[1:] if argv is None else argv)]
    cli.flwr_clientapp()
    return 0
