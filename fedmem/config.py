"""Every setting of a federation, declared once.

Three kinds of settings, by who decides them:

- ``FederationConfig`` (with its ``LoraSettings``): the recipe every owner trains with and
  the rounds. The coordinator decides them and sends them to the owners.
- ``ServerSettings``: how the coordinator runs the rounds (quorum, timeouts, resume).
- ``NodeSettings``: a machine's own environment (device, base-model directory, threads).
  Each party sets its own; the coordinator never sends them.
- ``ClientPolicy``: an owner's limits on the recipe it accepts from the coordinator
  (``fedmem.client_policy`` checks a recipe against them).

Each field's metadata carries its help text and whether it is a user-facing command-line
flag (``flag``); every other field is an experiment switch, reachable as
``--set key=value``. ``fedmem simulate``, ``fedmem-server start`` and the Flower run
config (``flwr run --run-config``) are all generated from these classes, so they share
one set of names, defaults and checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import asdict, dataclass, field

from .examples import RECIPES

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PRECISIONS = ("auto", "fp32", "bf16")
METHODS = ("exact", "fedit")
SCHEDULES = ("cyclic", "parallel", "routed")
# How the LoRA factors travel, both ways (fedmem.flower.messages): the coordinator keeps float32.
TRANSPORTS = ("fp32", "bf16", "fp16", "int8")


def setting(default, help: str, *, flag: bool = False, choices: tuple | None = None, short: str | None = None,
            metavar: str | None = None, factory=None):
    """A dataclass field with its command-line description.

    ``flag``: shown as its own ``--key`` flag (a setting a user needs); otherwise it is
    set with ``--set key=value``. ``short``: an extra flag name (``--lr``).
    """
    metadata = {"help": help, "flag": flag, "choices": choices, "short": short, "metavar": metavar}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _problems_in_fields(obj) -> list[str]:
    """Type and choice checks every settings class shares; class-specific ranges follow in each."""
    problems = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), hints[f.name]
        choices = f.metadata.get("choices")
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            problems.append(f"{key_of(f)} must be a whole number, got {value!r}")
        elif kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            problems.append(f"{key_of(f)} must be a number, got {value!r}")
        elif kind is str and not isinstance(value, str):
            problems.append(f"{key_of(f)} must be a string, got {value!r}")
        elif kind is bool and not isinstance(value, bool):
            problems.append(f"{key_of(f)} must be true or false, got {value!r}")
        elif choices and value not in choices:
            problems.append(f"{key_of(f)} must be one of {', '.join(choices)}, got {value!r}")
    return problems


def _raise(problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))


@dataclass
class LoraSettings:
    """Local training recipe. Defaults are tuned for knowledge injection on small models:
    all linear layers, and ~10x the full-fine-tuning learning rate."""

    rank: int = setting(16, "LoRA rank of each owner's update and of the memory", flag=True)
    alpha: int = setting(32, "LoRA alpha: the update is scaled by alpha/rank while training")
    target_modules: list[str] = setting(None, "the linear layers a LoRA is put on (comma-separated)",
                                        factory=lambda: list(ALL_LINEAR))
    learning_rate: float = setting(
        3e-3, "peak learning rate of the owners' training", flag=True, short="--lr", metavar="RATE"
    )
    epochs: int = setting(3, "passes over an owner's examples per round", flag=True)
    batch_size: int = setting(4, "examples per training step")
    max_length: int = setting(384, "longest training example, in tokens")
    seed: int = setting(0, "seed for LoRA initialisation and example order", flag=True)
    # "auto": bfloat16 autocast where the hardware computes it natively (CUDA with bf16,
    # CPUs with AVX512-BF16/AMX), else float32. ~1.4x the tokens/s on the 2-core CPU, but
    # on the demo it cost 2 of 24 questions against float32 (docs/results.md).
    precision: str = setting(
        "fp32", "training arithmetic: auto = bf16 where the hardware has it natively", choices=PRECISIONS
    )
    recipe: str = setting(
        "statements",
        "how documents become examples: statements (rewritten standalone "
        "statements, then questions) or sentences (questions per sentence as written)",
        choices=RECIPES,
    )
    # The memory must not answer everything with owners' facts (fedmem.retention).
    retention: float = setting(
        0.25,
        "general questions answered as the base model answers them, added as this "
        "share of each corpus's examples; 0 turns it off",
    )
    generator: str = setting(
        "",
        "also train questions written by a model and checked by asking them back: "
        "'base' = the base model, or a local instruct model directory; '' = off",
    )

    def __post_init__(self):
        if isinstance(self.target_modules, str):
            self.target_modules = [m.strip() for m in self.target_modules.split(",") if m.strip()]
        problems = _problems_in_fields(self)
        for name in ("rank", "alpha", "epochs", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                problems.append(f"{key_of(name)} must be at least 1, got {value!r}")
        if isinstance(self.learning_rate, (int, float)) and not self.learning_rate > 0:
            problems.append(f"learning-rate must be > 0, got {self.learning_rate!r}")
        if isinstance(self.retention, (int, float)) and not 0 <= self.retention <= 1:
            problems.append(f"retention must be a share between 0 and 1, got {self.retention!r}")
        if not self.target_modules:
            problems.append("target-modules must name at least one module")
        _raise(problems)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PrivacySettings:
    """Owner-level differential privacy (``fedmem.privacy``; docs/security.md, "Differential privacy").
    Part of the recipe, so every owner is told the guarantee it trains under."""

    dp_epsilon: float = setting(
        0.0,
        "owner-level differential privacy: the ε the whole run may spend (at dp-delta); the coordinator clips "
        "each owner's update to dp-clip and adds Gaussian noise, owners report nothing but their update, and "
        "no round runs past the budget; 0 = off",
        flag=True,
        metavar="EPSILON",
    )
    dp_delta: float = setting(1e-5, "the δ of the (ε, δ) guarantee (below 1 / number of owners)")
    # An update's ‖ΔW‖ on the devset's owners is 74-92 in parallel round 1 (89-127 in cyclic round 1;
    # metrics.jsonl "norm"), smaller in later rounds. The noise is proportional to this bound.
    dp_clip: float = setting(50.0, "the largest ‖ΔW‖ (Frobenius, all modules together) one owner may add "
                             "under differential privacy; larger updates are scaled down to it")

    def __post_init__(self):
        problems = _problems_in_fields(self)
        if isinstance(self.dp_epsilon, (int, float)) and not (self.dp_epsilon >= 0 and self.dp_epsilon < float("inf")):
            problems.append(f"dp-epsilon must be >= 0 (0 = off), got {self.dp_epsilon!r}")
        if isinstance(self.dp_delta, (int, float)) and not 0 < self.dp_delta < 1:
            problems.append(f"dp-delta must be in (0, 1), got {self.dp_delta!r}")
        if isinstance(self.dp_clip, (int, float)) and not (self.dp_clip > 0 and self.dp_clip < float("inf")):
            problems.append(f"dp-clip must be > 0, got {self.dp_clip!r}")
        _raise(problems)

    @property
    def enabled(self) -> bool:
        return self.dp_epsilon > 0


@dataclass
class FederationConfig:
    """What every owner trains with, and the rounds: decided by the coordinator, sent to owners."""

    rounds: int = setting(3, "federated rounds", flag=True)
    # Routed and parallel rounds take the longest owner's training time, cyclic ones the sum. Routed is
    # the default because it answers best at the same compute (94% of the demo over three seeds
    # against cyclic's 83% and parallel's 61%; docs/aggregation.md); what it gives up (one adapter
    # that works alone, secure aggregation, DP) is there too.
    schedule: str = setting(
        "routed",
        "routed: all owners at once, each on its own LoRA, kept apart in the memory and each question "
        "answered by its owner's (fedmem.routing); cyclic: each round the owners train one after another, "
        "each on the memory the one before left, into one merged adapter; parallel: all on the same memory, "
        "updates combined (FedAvg's round; the schedule secure aggregation and DP need)",
        flag=True,
        choices=SCHEDULES,
    )
    method: str = setting(
        "exact",
        "exact: the updates' B·A summed and re-factorised; fedit: A and B averaged separately (the FedIT baseline)",
        choices=METHODS,
    )
    transport: str = setting(
        "fp32",
        "how the memory and the updates travel: fp32, bf16 or fp16 (half the bytes), int8 (a quarter: "
        "8-bit values with one float32 scale per rank component); the coordinator keeps float32",
        flag=True,
        choices=TRANSPORTS,
    )
    # A bool flag: `--secure`. What each owner sends changes with it (masked sketches), so it is sent to owners.
    secure: bool = setting(
        False,
        "secure aggregation (parallel rounds, method exact): owners mask linear sketches of their updates so "
        "the coordinator learns only their sum, from which it rebuilds the memory a plain parallel round would "
        "make (fedmem.secure_sum, docs/security.md)",
        flag=True,
    )
    lora: LoraSettings = field(default_factory=LoraSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = LoraSettings(**self.lora)
        if isinstance(self.privacy, dict):
            self.privacy = PrivacySettings(**self.privacy)
        problems = _problems_in_fields(self)
        if isinstance(self.rounds, int) and self.rounds < 1:
            problems.append(f"rounds must be at least 1, got {self.rounds!r}")
        if isinstance(self.privacy, PrivacySettings) and self.privacy.enabled and self.method != "exact":
            problems.append("dp-epsilon needs method exact: the noise is added to the summed ΔW, which fedit "
                            "never forms")
        if self.schedule == "routed":
            if isinstance(self.privacy, PrivacySettings) and self.privacy.enabled:
                problems.append("dp-epsilon needs --schedule parallel or cyclic: routed (the default) keeps each "
                                "owner's LoRA apart in the memory, so there is no sum for the noise to hide it in")
            if self.method != "exact":
                problems.append("schedule routed needs method exact (nothing is averaged, so fedit means nothing)")
        if self.secure is True:
            if self.schedule != "parallel":
                problems.append("secure needs --schedule parallel: a routed round (the default) keeps each owner's "
                                "LoRA apart and a cyclic one adds one owner's update at a time, so neither has a "
                                "sum to hide it in")
            if self.method != "exact":
                problems.append("secure needs method exact")
        _raise(problems)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ServerSettings:
    """How the coordinator runs the rounds; never sent to owners."""

    min_clients: int = setting(2, "clients needed for a round", flag=True)
    round_timeout: float = setting(
        600.0,
        "seconds a round waits for replies before going on with those it has; 0 = no limit",
        flag=True,
        metavar="SECONDS",
    )
    quorum: float = setting(
        1.0,
        "parallel rounds: the share of the owners asked whose replies close a round; the others' replies "
        "come too late and are dropped (1 = wait for every owner, up to round-timeout)",
        flag=True,
        metavar="SHARE",
    )
    wait_for_clients: float = setting(
        3600.0, "seconds to wait for min-clients to connect before giving up", flag=True, metavar="SECONDS"
    )
    join_grace: float = setting(
        10.0,
        "once min-clients are connected, start a round only after nobody new has joined for this many seconds",
        flag=True,
        metavar="SECONDS",
    )
    resume: bool = setting(True, "pick up after the last round checkpoint of an earlier run in the same output")
    # Update validation (fedmem.validate; docs/security.md, "Updates and identity").
    max_update_norm: float = setting(
        0.0,
        "largest ‖ΔW‖ (Frobenius, all modules together) accepted from one owner; 0 = derived: "
        "update-norm-factor x the lower median of the updates accepted so far in the run",
    )
    update_norm_factor: float = setting(
        10.0, "how many times the lower median of the accepted updates' ‖ΔW‖ an update may be (max-update-norm 0)"
    )
    max_relative_update: float = setting(
        1.0,
        "largest ‖ΔW‖ of one module from one owner, as a multiple of the base weight's norm; guards the first "
        "updates, before there are any to compare with; 0 = off",
    )
    clip_updates: bool = setting(
        False,
        "parallel rounds, method exact: scale each update down to the round's median ‖ΔW‖ before combining",
    )

    def __post_init__(self):
        problems = _problems_in_fields(self)
        if isinstance(self.min_clients, int) and self.min_clients < 1:
            problems.append(f"min-clients must be at least 1, got {self.min_clients!r}")
        for name in ("round_timeout", "wait_for_clients", "join_grace", "max_update_norm", "max_relative_update"):
            value = getattr(self, name)
            if isinstance(value, (int, float)) and not value >= 0:
                problems.append(f"{key_of(name)} must be >= 0, got {value!r}")
        if isinstance(self.quorum, (int, float)) and not 0 < self.quorum <= 1:
            problems.append(f"quorum must be a share in (0, 1], got {self.quorum!r}")
        if isinstance(self.update_norm_factor, (int, float)) and not self.update_norm_factor >= 1:
            problems.append(f"update-norm-factor must be >= 1, got {self.update_norm_factor!r}")
        _raise(problems)


@dataclass
class NodeSettings:
    """One machine's own environment. Every party sets its own: a coordinator with a GPU
    says nothing about an owner's laptop."""

    device: str = setting("auto", "auto, cpu or cuda[:N]", flag=True, metavar="DEVICE")
    base: str = setting(
        "", "local Hugging Face model directory ('' = the embedded SmolLM2-135M-Instruct)", flag=True, metavar="DIR"
    )
    threads: int = setting(
        0, "CPU threads for training (0 = every core this process may use; lower it on a shared machine)", flag=True
    )

    def __post_init__(self):
        problems = _problems_in_fields(self)
        if isinstance(self.device, str) and not (
            self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            problems.append(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if isinstance(self.threads, int) and self.threads < 0:
            problems.append(f"threads must be >= 0, got {self.threads!r}")
        _raise(problems)


def _default_of(cls, name: str):
    f = cls.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


@dataclass
class ClientPolicy:
    """What an owner accepts from the coordinator's recipe (``FederationConfig``): a training
    setting above its limit is refused, never clamped. The defaults are the recipe's defaults
    x4 (x10 for the learning rate); the owner sets its own with ``fedmem-client join``."""

    limit_rounds: int = setting(4 * _default_of(FederationConfig, "rounds"),
                                "most federated rounds this owner trains in", flag=True)
    limit_epochs: int = setting(4 * _default_of(LoraSettings, "epochs"),
                                "most epochs per round this owner trains", flag=True)
    limit_learning_rate: float = setting(round(10 * _default_of(LoraSettings, "learning_rate"), 12),
                                         "highest learning rate this owner trains with", flag=True, metavar="RATE")
    limit_rank: int = setting(4 * _default_of(LoraSettings, "rank"), "highest LoRA rank this owner trains")
    limit_alpha: int = setting(4 * _default_of(LoraSettings, "alpha"), "highest LoRA alpha this owner trains with")
    limit_batch_size: int = setting(4 * _default_of(LoraSettings, "batch_size"),
                                    "largest batch (examples per step) this owner trains")
    limit_max_length: int = setting(4 * _default_of(LoraSettings, "max_length"),
                                    "longest training example, in tokens, this owner accepts")
    limit_retention: float = setting(min(1.0, 4 * _default_of(LoraSettings, "retention")),
                                     "largest share of general retention questions this owner adds")
    allow_generator: bool = setting(
        True,
        "accept generator='base' (questions written by this owner's own base model; slower training). A "
        "generator path is never accepted from the coordinator: it would name a model directory to load here",
        flag=True,
        metavar="yes|no",
    )
    allow_routed: bool = setting(
        True,
        "train in routed runs (the default schedule), where this owner's LoRA stays apart in the memory and "
        "reaches every holder of the memory on its own; no: only in runs that merge it with the others' "
        "(cyclic or parallel)",
        flag=True,
        metavar="yes|no",
    )
    require_dp_epsilon: float = setting(
        0.0,
        "train only in runs under owner-level differential privacy of at most this ε (the coordinator's declared "
        "dp-epsilon); 0 = no requirement",
        flag=True,
        metavar="EPSILON",
    )

    require_secure: bool = setting(
        False,
        "train only in runs under secure aggregation, where the coordinator learns the owners' updates only summed",
        flag=True,
    )

    def __post_init__(self):
        problems = _problems_in_fields(self)
        if isinstance(self.require_dp_epsilon, (int, float)) and not (0 <= self.require_dp_epsilon < float("inf")):
            problems.append(f"require-dp-epsilon must be >= 0 (0 = no requirement), got {self.require_dp_epsilon!r}")
        for name in ("limit_rounds", "limit_epochs", "limit_rank", "limit_alpha", "limit_batch_size",
                     "limit_max_length"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                problems.append(f"{key_of(name)} must be at least 1, got {value!r}")
        if isinstance(self.limit_learning_rate, (int, float)) and not self.limit_learning_rate > 0:
            problems.append(f"limit-learning-rate must be > 0, got {self.limit_learning_rate!r}")
        if isinstance(self.limit_retention, (int, float)) and not 0 <= self.limit_retention <= 1:
            problems.append(f"limit-retention must be a share between 0 and 1, got {self.limit_retention!r}")
        _raise(problems)


# --- flat keys: the one naming of every setting, for --set, flags and the Flower run config ---


def key_of(f) -> str:
    """A setting's flat key: its field name with dashes (``learning-rate``)."""
    return (f if isinstance(f, str) else f.name).replace("_", "-")


def _leaf_fields(cls) -> list[tuple[tuple[str, ...], dataclasses.Field, type]]:
    """(path of field names, field, type) for every setting of ``cls``, nested classes flattened."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out += [((f.name, *path), leaf, t) for path, leaf, t in _leaf_fields(kind)]
        else:
            out.append(((f.name,), f, kind))
    return out


def parse_value(kind, text: str, key: str):
    """A setting's value from text (a ``--set`` or run-config string), by the field's type."""
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if typing.get_origin(kind) is list:
            return [part.strip() for part in text.split(",") if part.strip()]
        return text
    except ValueError:
        raise ValueError(f"{key}: cannot read {text!r} as {getattr(kind, '__name__', kind)}") from None


def _coerce(kind, value, key: str):
    """Run-config values arrive as TOML scalars: accept the field's type, or a string of it."""
    if isinstance(value, str) and kind is not str:
        return parse_value(kind, value, key)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def to_flat(config) -> dict[str, object]:
    """Flat ``key: value`` pairs (lists joined by commas) of a settings object: the run-config form."""
    flat: dict[str, object] = {}
    for path, f, kind in _leaf_fields(type(config)):
        value = config
        for name in path:
            value = getattr(value, name)
        flat[key_of(f)] = ",".join(value) if typing.get_origin(kind) is list else value
    return flat


def from_flat(cls, values: dict[str, object]):
    """A settings object from flat keys; missing keys take their defaults, unknown keys are errors."""
    leaves = {key_of(f): (path, f, kind) for path, f, kind in _leaf_fields(cls)}
    unknown = sorted(set(values) - set(leaves))
    if unknown:
        raise ValueError(f"unknown setting {', '.join(unknown)}; known: {', '.join(leaves)}")
    nested: dict = {}
    for key, value in values.items():
        path, _, kind = leaves[key]
        target = nested
        for name in path[:-1]:
            target = target.setdefault(name, {})
        target[path[-1]] = _coerce(kind, value, key)
    return _build(cls, nested)


def _build(cls, nested: dict):
    hints = typing.get_type_hints(cls)
    kwargs = {
        name: _build(hints[name], value) if dataclasses.is_dataclass(hints[name]) else value
        for name, value in nested.items()
    }
    return cls(**kwargs)


def keys(cls) -> list[str]:
    return [key_of(f) for _, f, _ in _leaf_fields(cls)]


# --- command line ---


def add_arguments(parser: argparse.ArgumentParser, *classes) -> None:
    """The user-facing flags of ``classes`` (fields marked ``flag``), and ``--set`` for every other setting.

    Flags default to None (not given), so ``from_args`` can tell a flag left alone from one
    set to its default, and settings a ``--set`` names are not overridden by it.
    """
    expert = []
    for cls in classes:
        defaults = from_flat(cls, {})
        flat_defaults = to_flat(defaults)
        for path, f, kind in _leaf_fields(cls):
            key = key_of(f)
            if not f.metadata.get("flag"):
                expert.append(f"{key} ({flat_defaults[key]!r})")
                continue
            names = [f"--{key}"] + ([f.metadata["short"]] if f.metadata.get("short") else [])
            if kind is bool and not f.metadata.get("metavar"):  # a switch: given means true (else yes|no)
                parser.add_argument(*names, dest=f"setting:{key}", default=None, action="store_const", const=True,
                                    help=f"{f.metadata['help']} (default: off)")
                continue
            choices = f.metadata.get("choices")
            metavar = (
                "{" + ",".join(choices) + "}"
                if choices
                else f.metadata.get("metavar") or {int: "N", float: "X"}.get(kind, "VALUE")
            )
            parser.add_argument(
                *names,
                dest=f"setting:{key}",
                default=None,
                metavar=metavar,
                type=lambda text, kind=kind, key=key: parse_value(kind, text, key),
                choices=choices,
                help=f"{f.metadata['help']} (default: {flat_defaults[key]})",
            )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other setting (repeat for several): " + ", ".join(expert),
    )


def from_args(cls, args: argparse.Namespace, fixed: dict | None = None):
    """A settings object from parsed ``add_arguments`` flags plus ``--set`` pairs; ``fixed``
    are the caller's own values (taken only where the user did not set the key)."""
    mine = set(keys(cls))
    values: dict[str, object] = {k: v for k, v in (fixed or {}).items() if k in mine}
    for pair in getattr(args, "settings", []):
        key, sep, value = pair.partition("=")
        key = key.strip().replace("_", "-")
        if not sep or not key:
            raise ValueError(f"--set {pair!r}: expected KEY=VALUE")
        if key not in mine and not any(key in keys(other) for other in _ALL_CLASSES):
            raise ValueError(
                f"--set {key}: no such setting; known: {', '.join(k for c in _ALL_CLASSES for k in keys(c))}"
            )
        if key in mine:
            values[key] = value
    for key in mine:
        given = getattr(args, f"setting:{key}", None)
        if given is not None:
            values[key] = given
    return from_flat(cls, values)


_ALL_CLASSES = (FederationConfig, ServerSettings, NodeSettings, ClientPolicy)
