"""experiments.yaml -> frozen dataclasses, validated before anything is rented.

Every problem is a ConfigError whose message names the file, the line and the key, and says
how to fix it: `experiments.yaml:12: hosts.gpu-box.prot: unknown key; did you mean 'port'?`.
Secrets are only ever references (`*_env`, `*_file`): a literal `password:`/`api_key:`/`token:`
is refused, and a `*_file` secret is checked for readability here but its value is not kept.
The schema is docs/contracts.md §5.

The parts: `model` (dataclasses, constants), `source` (YAML with line numbers), `reader`
(typed access, shared checks), `sections` (hosts, datasets, experiments), `plan` (the matrix).
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import MappingProxyType

from .. import catalog
from ..errors import ConfigError
from ..secrets import read_secret
from .limits import currency_problem
from .model import (
    BACKENDS,
    CLOUD_PROVIDERS,
    DEFAULT_HOST_NAME,
    DEVICES,
    GENERATOR_SCENES,
    PROVIDERS,
    SETTINGS,
    TOP_KEYS,
    Budget,
    DatasetConfig,
    Defaults,
    ExperimentConfig,
    ExperimentsConfig,
    GenerateSpec,
    HostConfig,
    is_secret_key,
)
from .reader import Reader, check_currency, check_name, kind_of
from .sections import parse_dataset, parse_experiment, parse_host, parse_settings
from .source import YMap, YSeq, fail, read_yaml

__all__ = ["BACKENDS", "CLOUD_PROVIDERS", "DEFAULT_HOST_NAME", "DEVICES", "GENERATOR_SCENES", "PROVIDERS",
           "SETTINGS", "Budget", "DatasetConfig", "Defaults", "ExperimentConfig", "ExperimentsConfig",
           "GenerateSpec", "HostConfig", "check_secrets", "is_secret_key", "load_config", "parse_config"]


def parse_config(text: str, filename: str = "experiments.yaml", path: Path | None = None) -> ExperimentsConfig:
    """Validate YAML `text`; every problem raises ConfigError naming `filename`, line and key."""
    r = Reader(filename)
    doc = read_yaml(text, filename)
    if doc is None:
        fail(filename, 1, "", "the file is empty; it needs name:, datasets: and experiments:")
    if not isinstance(doc, YMap):
        fail(filename, getattr(doc, "line", 1), "", f"expected a mapping at the top, got {kind_of(doc)}",
             hint="start with `name: my-run`")
    r.keys(doc, TOP_KEYS, "")
    name = r.get(doc, "name", "", "str", required=True)
    if len(name) > 100 or any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        r.fail(doc, "name", "name", "the run name must be one line of at most 100 printable characters")
    budget = None
    if doc.get("budget") is not None:
        b = r.mapping(doc, "budget", doc["budget"], "budget")
        r.keys(b, ("max_cost", "currency"), "budget")
        budget = Budget(r.get(b, "max_cost", "budget", "num", required=True, lo=0, lo_open=True,
                              hi=1e12),
                        check_currency(r, b, "budget"))
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
            check_name(r, hm, hname, f"hosts.{hname}", "host")
            hosts[hname] = parse_host(r, hm, hname, r.mapping(hm, hname, hval, f"hosts.{hname}"))

    dm = r.mapping(doc, "datasets", doc.get("datasets"), "datasets") if "datasets" in doc else None
    if not dm:
        r.fail(doc if dm is None else dm, None, "datasets",
               "no dataset defined; add one, e.g. `demo: {generate: {scene: default, size: 64}}`")
    datasets: dict[str, DatasetConfig] = {}
    for dname, dval in dm.items():
        check_name(r, dm, dname, f"datasets.{dname}", "dataset")
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
    used = [(h.currency, f"{filename}:{h.line}: hosts.{h.name}.currency") for h in hosts.values()]
    if budget is not None:
        used.append((budget.currency, f"{filename}:{doc.key_lines.get('budget', doc.line)}: budget.currency"))
    bad_currency = currency_problem(used, set(catalog.fx_rates()))
    if bad_currency:
        raise ConfigError(f"{bad_currency[0]}: {bad_currency[1]}")
    return ExperimentsConfig(name, budget, defaults, MappingProxyType(hosts), MappingProxyType(datasets),
                             tuple(experiments), path, filename)


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
