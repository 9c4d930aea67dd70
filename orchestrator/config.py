"""experiments.yaml -> frozen dataclasses, validated before anything is rented.

Every problem is a ConfigError whose message names the file, the line and the key, and says
how to fix it: `experiments.yaml:12: hosts.gpu-box.prot: unknown key; did you mean 'port'?`.
Secrets are only ever references (`*_env`, `*_file`): a literal `password:`/`api_key:`/`token:`
is refused, and a `*_file` secret is checked for readability here but its value is not kept.
The schema is docs/contracts.md §5.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

from .config_source import YMap, YSeq, fail, nearest, read_yaml
from .errors import ConfigError
from .secrets import read_secret

# Keep in sync with ngp_train.synth.SCENES (a test checks); the controller must not import ngp_train.
GENERATOR_SCENES: tuple[str, ...] = ("default", "spheres", "rods", "blocks")
PROVIDERS: tuple[str, ...] = ("local", "ssh", "vastai", "runpod", "lambda")
CLOUD_PROVIDERS: tuple[str, ...] = ("vastai", "runpod", "lambda")
BACKENDS: tuple[str, ...] = ("auto", "torch", "tcnn")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
LAYOUTS: tuple[str, ...] = ("blender",)
MIRROR_SCHEMES: tuple[str, ...] = ("https", "http", "s3", "hf", "file")
SETTINGS: tuple[str, ...] = ("steps", "backend", "device", "max_seconds", "downscale", "seed")

TOP_KEYS = ("name", "budget", "defaults", "hosts", "datasets", "experiments")
HOST_COMMON = ("provider", "gpu", "price_per_hour", "currency", "python", "root", "idle_timeout_s",
               "deadline_s", "keep_on_failure", "torch", "setup", "tcnn_build_timeout_s")
HOST_SSH = ("host", "port", "user", "ssh_alias", "endpoint_command", "identity_file", "password_env",
            "password_file", "stop_command", "shutdown_on_host", "proxy_jump")
HOST_CLOUD = ("api_key_env", "api_key_file", "api_base", "max_price_per_hour", "image", "disk_gb",
              "region", "user", "identity_file", "ssh_key_name")
HOST_KEYS: dict[str, tuple[str, ...]] = {
    "local": HOST_COMMON, "ssh": HOST_COMMON + HOST_SSH,
    **{p: HOST_COMMON + HOST_CLOUD for p in CLOUD_PROVIDERS}}
DATASET_KEYS = ("generate", "layout", "mirrors", "sha256", "scenes")
GENERATE_KEYS = ("scene", "size", "seed")
EXPERIMENT_KEYS = ("name", "dataset", "scenes", "hosts") + SETTINGS
SECRET_WORDS = ("password", "passwd", "passphrase", "api_key", "apikey", "token", "secret",
                "secret_key", "access_key", "private_key")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
DEFAULT_HOST_NAME = "local"


@dataclass(frozen=True, slots=True)
class Budget:
    max_cost: float
    currency: str = "USD"


@dataclass(frozen=True, slots=True)
class Defaults:
    """Per-experiment fallbacks; a tuple value is a matrix axis."""
    steps: int | tuple[int, ...] | None = None
    backend: str | tuple[str, ...] | None = None
    device: str | tuple[str, ...] | None = None
    max_seconds: float | None | tuple[float | None, ...] = None
    downscale: int | tuple[int, ...] | None = None
    seed: int | tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class HostConfig:
    name: str
    provider: str
    gpu: str = "cpu"
    price_per_hour: float | None = None      # None: from the catalog or the marketplace offer
    currency: str = "USD"
    python: str | None = None                # None: found on the host (remote_payload/env.py)
    root: str | None = None                  # None: the provider's default work root
    idle_timeout_s: float = 600.0
    deadline_s: float | None = None          # None: the runner uses 3 x estimate, min 3600 s
    keep_on_failure: bool = False
    host: str | None = None
    port: int | None = None
    user: str | None = None
    ssh_alias: str | None = None
    endpoint_command: str | None = None
    identity_file: str | None = None
    password_env: str | None = None
    password_file: str | None = None
    stop_command: str | None = None
    shutdown_on_host: bool = False
    api_key_env: str | None = None
    api_key_file: str | None = None
    api_base: str | None = None
    max_price_per_hour: float | None = None
    image: str | None = None
    disk_gb: float | None = None
    region: str | None = None
    ssh_key_name: str | None = None
    torch: str = "require"                   # require | install (when the interpreter has none)
    setup: tuple[str, ...] = ()              # shell lines run once per instance after the environment
    tcnn_build_timeout_s: float = 1800.0
    proxy_jump: str | None = None            # ssh: [user@]host[:port] of a jump host
    gpu_in_catalog: bool = True              # False: a GPU the catalog does not know (price given)
    line: int = 0                            # where the host is defined, for later messages


@dataclass(frozen=True, slots=True)
class GenerateSpec:
    scene: str | None = None
    size: int = 64
    seed: int = 0


@dataclass(frozen=True, slots=True)
class DatasetConfig:
    name: str
    layout: str = "blender"
    generate: GenerateSpec | None = None
    mirrors: tuple[str, ...] = ()
    sha256: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    scenes: tuple[str, ...] = ()
    line: int = 0


@dataclass(frozen=True, slots=True)
class ExperimentConfig:
    """One experiment; a tuple-valued setting is a matrix axis."""
    name: str
    dataset: str
    scenes: tuple[str, ...]
    hosts: tuple[str, ...]
    steps: int | tuple[int, ...]
    backend: str | tuple[str, ...] = "auto"
    device: str | tuple[str, ...] = "auto"
    max_seconds: float | None | tuple[float | None, ...] = None
    downscale: int | tuple[int, ...] = 1
    seed: int | tuple[int, ...] = 0
    line: int = 0


@dataclass(frozen=True, slots=True)
class ExperimentsConfig:
    name: str
    budget: Budget | None
    defaults: Defaults
    hosts: Mapping[str, HostConfig]
    datasets: Mapping[str, DatasetConfig]
    experiments: tuple[ExperimentConfig, ...]
    path: Path | None = None
    source_name: str = "experiments.yaml"      # the file as the user named it, for messages


def is_secret_key(key: str) -> bool:
    k = key.lower()
    if k.endswith(("_env", "_file")):
        return False
    return k in SECRET_WORDS or k.endswith(tuple("_" + w for w in SECRET_WORDS))


def _did_you_mean(word: str, choices: tuple[str, ...] | list[str]) -> str:
    close = nearest(word, choices)
    if close:
        return f"did you mean {close!r}?"
    return "expected one of: " + ", ".join(choices)


class _Reader:
    """Typed access to YMap values with file:line:key errors."""

    def __init__(self, filename: str) -> None:
        self.filename = filename

    def fail(self, m: YMap | YSeq | None, key: str | int | None, path: str, msg: str,
             hint: str | None = None, at_key: bool = False) -> Any:
        line = 0
        if isinstance(m, YMap):
            line = (m.key_lines if at_key else m.value_lines).get(str(key), m.line) if key is not None else m.line
        elif isinstance(m, YSeq):
            line = m.item_lines[key] if isinstance(key, int) and key < len(m.item_lines) else m.line
        fail(self.filename, line, path, msg, hint)

    def mapping(self, parent: YMap | YSeq | None, key: str | int | None, value: Any, path: str) -> YMap:
        if not isinstance(value, YMap):
            self.fail(parent, key, path, f"expected a mapping (key: value lines), got {_kind(value)}")
        return value

    def keys(self, m: YMap, allowed: tuple[str, ...], path: str,
             elsewhere: Callable[[str], str | None] | None = None) -> None:
        for key in m:
            sub = f"{path}.{key}" if path else key
            if is_secret_key(key):
                self.fail(m, key, sub, "a secret cannot be written in the file; "
                          f"use {key}_env: VAR_NAME or {key}_file: PATH", at_key=True)
            if key not in allowed:
                other = elsewhere(key) if elsewhere else None
                self.fail(m, key, sub, other or f"unknown key; {_did_you_mean(key, allowed)}", at_key=True)

    def get(self, m: YMap, key: str, path: str, kind: str, *, required: bool = False,
            default: Any = None, choices: tuple[str, ...] = (), lo: float | None = None,
            lo_open: bool = False, hi: float | None = None) -> Any:
        sub = f"{path}.{key}" if path else key
        if key not in m or m[key] is None:
            if required:
                self.fail(m, None, sub, "missing; it is required")
            return default
        v = m[key]
        if kind == "str":
            if isinstance(v, bool) or not isinstance(v, (str, int, float)) or isinstance(v, float) and not math.isfinite(v):
                self.fail(m, key, sub, f"expected text, got {_kind(v)}")
            v = str(v).strip()
            if not v:
                self.fail(m, key, sub, "must not be empty")
            if choices and v not in choices:
                self.fail(m, key, sub, f"{v!r} is not allowed; {_did_you_mean(v, choices)}")
            return v
        if kind == "bool":
            if not isinstance(v, bool):
                self.fail(m, key, sub, f"expected true or false, got {_kind(v)}")
            return v
        if kind in ("int", "num"):
            ok = isinstance(v, int) if kind == "int" else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok or (isinstance(v, float) and not math.isfinite(v)):
                want = "a whole number" if kind == "int" else "a number"
                self.fail(m, key, sub, f"expected {want}, got {_kind(v)}")
            if lo is not None and (v <= lo if lo_open else v < lo):
                self.fail(m, key, sub, f"must be {'>' if lo_open else '>='} {lo:g}, got {v}")
            if hi is not None and v > hi:
                self.fail(m, key, sub, f"must be <= {hi:g}, got {v}")
            return float(v) if kind == "num" else int(v)
        raise AssertionError(kind)

    def str_list(self, m: YMap, key: str, path: str, *, check: Callable[[str, int], None] | None = None) -> tuple[str, ...]:
        sub = f"{path}.{key}"
        v = m.get(key)
        if v is None:
            return ()
        if isinstance(v, str):
            v_list, lines = [v], [m.value_lines[key]]
        elif isinstance(v, YSeq):
            v_list, lines = list(v), v.item_lines
        else:
            return self.fail(m, key, sub, f"expected a list of names, got {_kind(v)}")
        out: list[str] = []
        for i, item in enumerate(v_list):
            if isinstance(item, bool) or not isinstance(item, (str, int)) or not str(item).strip():
                fail(self.filename, lines[i], f"{sub}[{i}]", f"expected a name, got {_kind(item)}")
            s = str(item).strip()
            if s in out:
                fail(self.filename, lines[i], f"{sub}[{i}]", f"{s!r} is listed twice")
            if check:
                check(s, lines[i])
            out.append(s)
        if not out:
            self.fail(m, key, sub, "must not be an empty list")
        return tuple(out)


def _kind(v: Any) -> str:
    if v is None:
        return "nothing"
    if isinstance(v, bool):
        return f"a boolean ({str(v).lower()})"
    if isinstance(v, (YMap, dict)):
        return "a mapping"
    if isinstance(v, (YSeq, list)):
        return "a list"
    if isinstance(v, str):
        return f"text {v[:40]!r}"
    if isinstance(v, float) and not math.isfinite(v):
        return f"{v} (not a finite number)"
    if isinstance(v, (int, float)):
        return f"the number {v}"
    return type(v).__name__


def _check_name(r: _Reader, m: YMap, key: str, path: str, what: str, at_key: bool = True) -> None:
    if not _NAME_RE.match(key) or key in (".", ".."):
        r.fail(m, key, path, f"{what} name {key!r} may use only letters, digits, '_', '-' and '.'",
               at_key=at_key)


from .config_sections import parse_dataset, parse_experiment, parse_host, parse_settings  # noqa: E402


def parse_config(text: str, filename: str = "experiments.yaml", path: Path | None = None) -> ExperimentsConfig:
    """Validate YAML `text`; every problem raises ConfigError naming `filename`, line and key."""
    r = _Reader(filename)
    doc = read_yaml(text, filename)
    if doc is None:
        fail(filename, 1, "", "the file is empty; it needs name:, datasets: and experiments:")
    if not isinstance(doc, YMap):
        fail(filename, getattr(doc, "line", 1), "", f"expected a mapping at the top, got {_kind(doc)}",
             hint="start with `name: my-run`")
    r.keys(doc, TOP_KEYS, "")
    name = r.get(doc, "name", "", "str", required=True)
    budget = None
    if doc.get("budget") is not None:
        b = r.mapping(doc, "budget", doc["budget"], "budget")
        r.keys(b, ("max_cost", "currency"), "budget")
        budget = Budget(r.get(b, "max_cost", "budget", "num", required=True, lo=0, lo_open=True),
                        _currency(r, b, "budget"))
    defaults = Defaults()
    if doc.get("defaults") is not None:
        d = r.mapping(doc, "defaults", doc["defaults"], "defaults")
        r.keys(d, SETTINGS, "defaults")
        defaults = Defaults(**parse_settings(r, d, "defaults"))

    hosts: dict[str, HostConfig] = {}
    if doc.get("hosts") is None:
        hosts[DEFAULT_HOST_NAME] = HostConfig(name=DEFAULT_HOST_NAME, provider="local", gpu="cpu",
                                              price_per_hour=0.0, python=sys.executable, line=doc.line)
    else:
        hm = r.mapping(doc, "hosts", doc["hosts"], "hosts")
        if not hm:
            r.fail(doc, "hosts", "hosts", "no host defined; add one, e.g. `here: {provider: local}`")
        for hname, hval in hm.items():
            _check_name(r, hm, hname, f"hosts.{hname}", "host")
            hosts[hname] = parse_host(r, hm, hname, r.mapping(hm, hname, hval, f"hosts.{hname}"))

    dm = r.mapping(doc, "datasets", doc.get("datasets"), "datasets") if "datasets" in doc else None
    if not dm:
        r.fail(doc if dm is None else dm, None, "datasets",
               "no dataset defined; add one, e.g. `demo: {generate: {scene: default, size: 64}}`")
    datasets: dict[str, DatasetConfig] = {}
    for dname, dval in dm.items():
        _check_name(r, dm, dname, f"datasets.{dname}", "dataset")
        datasets[dname] = parse_dataset(r, dm, dname, r.mapping(dm, dname, dval, f"datasets.{dname}"))

    ex = doc.get("experiments")
    if not isinstance(ex, YSeq) or not ex:
        r.fail(doc, "experiments" if "experiments" in doc else None, "experiments",
               "expected a non-empty list of experiments (`- name: ...`)"
               + ("" if "experiments" in doc else "; it is missing"))
    experiments: list[ExperimentConfig] = []
    for i, e in enumerate(ex):
        em = r.mapping(ex, i, e, f"experiments[{i}]")
        exp = parse_experiment(r, em, f"experiments[{i}]", defaults, hosts, datasets)
        if any(x.name == exp.name for x in experiments):
            r.fail(em, "name", f"experiments[{i}].name", f"experiment name {exp.name!r} is used twice")
        experiments.append(exp)
    return ExperimentsConfig(name, budget, defaults, MappingProxyType(hosts), MappingProxyType(datasets),
                             tuple(experiments), path, filename)


def _currency(r: _Reader, m: YMap, path: str) -> str:
    cur = r.get(m, "currency", path, "str", default="USD").upper()
    if not re.fullmatch(r"[A-Z]{3}", cur):
        r.fail(m, "currency", f"{path}.currency", f"{cur!r} is not a currency code; use e.g. USD or CNY")
    return cur


def load_config(path: str | Path) -> ExperimentsConfig:
    """Read and validate an experiments file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file", hint="give the path of your experiments.yaml") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return parse_config(text, str(path), p.resolve())


def check_secrets(config: ExperimentsConfig, host_names: list[str] | None = None) -> None:
    """Check that every secret the given hosts reference can be read (before renting anything)."""
    for h in config.hosts.values():
        if host_names is not None and h.name not in host_names:
            continue
        for kind in ("password", "api_key"):
            env, file = getattr(h, f"{kind}_env"), getattr(h, f"{kind}_file")
            if env or file:
                try:
                    read_secret(env=env, file=file, what=f"hosts.{h.name}.{kind}_{'env' if env else 'file'}")
                except ConfigError as exc:
                    raise ConfigError(f"{config.source_name}:{h.line}: {exc.message}", hint=exc.hint) from None
