"""The sections of experiments.yaml: hosts, datasets, experiments and their settings.

`config.parse_config` is the entry point; the shared checks are `config.reader`'s.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ngp_train.contract import TRAIN_OPTIONS

from .. import catalog
from ..errors import ConfigError, did_you_mean
from ..secrets import read_secret
from . import model as c
from .limits import MAX_PRICE_PER_HOUR, name_problem, ssh_field_problem
from .model import DatasetConfig, Defaults, ExperimentConfig, HostConfig
from .reader import Reader, check_currency, check_name
from .source import YMap, YSeq, fail


def _provider_of(key: str) -> str | None:
    if key in c.HOST_SLURM and key not in c.HOST_SSH and key not in c.HOST_CLOUD:
        return "slurm"
    if key in c.HOST_SSH and key not in c.HOST_CLOUD:
        return "ssh"
    if key in c.HOST_CLOUD and key not in c.HOST_SSH:
        return "cloud (vastai, runpod, lambda)"
    return None


def parse_host(r: Reader, parent: YMap, name: str, m: YMap) -> HostConfig:
    path = f"hosts.{name}"
    provider = r.get(m, "provider", path, "str", required=True)
    if provider not in c.PROVIDERS:
        r.fail(m, "provider", f"{path}.provider",
               f"unknown provider {provider!r}; {did_you_mean(provider, c.PROVIDERS)}")
    allowed = c.HOST_KEYS[provider]

    def elsewhere(key: str) -> str | None:
        if key in c.HOST_BID:
            return (f"provider {provider} has no interruptible offers; interruptible instances are "
                    f"rented from {', '.join(c.INTERRUPTIBLE_PROVIDERS)} hosts only")
        owner = _provider_of(key)
        if owner:
            return f"not a key for provider {provider}: it is only for {owner} hosts"
        return None

    r.keys(m, allowed, path, elsewhere)
    local = provider == "local"
    price = (r.get(m, "price_per_hour", path, "num", lo=0, hi=MAX_PRICE_PER_HOUR)
             if "price_per_hour" in allowed else None)
    slurm = parse_slurm(r, m, path) if provider == "slurm" else {}
    if slurm:
        price = slurm["price_per_gpu_hour"] * slurm_units(slurm["gres"], slurm["cpus_per_task"])
    if provider == "ssh" and price is None:
        r.fail(m, None, f"{path}.price_per_hour",
               "missing; an ssh host needs what it costs you per hour, e.g. price_per_hour: 15 "
               "with currency: CNY")
    gpu_raw = r.get(m, "gpu", path, "str", default="cpu" if local or (slurm and not slurm["gres"]) else None)
    if gpu_raw is None:
        r.fail(m, None, f"{path}.gpu", f"missing; name the GPU, e.g. gpu: RTX 4090 "
               f"(known: {', '.join(catalog.gpu_names())})")
    gpu = catalog.canonical_gpu(gpu_raw)
    in_catalog = gpu is not None
    if gpu is None:
        if price is None:
            hint = catalog.suggest_gpu(gpu_raw)
            why = f"did you mean {hint!r}?" if hint else f"known: {', '.join(catalog.gpu_names())}"
            r.fail(m, "gpu", f"{path}.gpu", f"unknown GPU {gpu_raw!r}; {why} "
                   "(or give price_per_hour for a GPU the catalog does not list)")
        gpu = gpu_raw
    if local and price is None:
        price = 0.0
    fields: dict[str, Any] = dict(
        name=name, provider=provider, gpu=gpu, price_per_hour=price,
        currency=check_currency(r, m, path), gpu_in_catalog=in_catalog, line=parent.key_lines.get(name, m.line),
        python=r.get(m, "python", path, "str", default=sys.executable if local else None),
        torch=r.get(m, "torch", path, "str", default="require", choices=("require", "install")),
        setup=_setup_lines(r, m, path),
        tcnn_build_timeout_s=r.get(m, "tcnn_build_timeout_s", path, "num", default=1800.0, lo=0, lo_open=True),
        root=r.get(m, "root", path, "str"),
        idle_timeout_s=r.get(m, "idle_timeout_s", path, "num", default=600.0, lo=0, lo_open=True),
        deadline_s=r.get(m, "deadline_s", path, "num", lo=0, lo_open=True),
        keep_on_failure=r.get(m, "keep_on_failure", path, "bool", default=False))
    if "gpus_per_instance" in allowed:
        fields["gpus_per_instance"] = r.get(m, "gpus_per_instance", path, "int", default=1, lo=1, hi=64)
    if local and fields["root"]:
        fields["root"] = str(Path(fields["root"]).expanduser())
    for key in ("host", "user", "ssh_alias", "endpoint_command", "stop_command", "image", "region",
                "ssh_key_name", "proxy_jump"):
        if key in allowed:
            fields[key] = r.get(m, key, path, "str")
            problem = fields[key] and ssh_field_problem(key, fields[key])
            if problem:
                r.fail(m, key, f"{path}.{key}", problem)
    if "port" in allowed:
        fields["port"] = r.get(m, "port", path, "int", lo=1, hi=65535)
    if "shutdown_on_host" in allowed:
        fields["shutdown_on_host"] = r.get(m, "shutdown_on_host", path, "bool", default=False)
    if "max_price_per_hour" in allowed:
        fields["max_price_per_hour"] = r.get(m, "max_price_per_hour", path, "num", lo=0, lo_open=True,
                                             hi=MAX_PRICE_PER_HOUR)
        fields["disk_gb"] = r.get(m, "disk_gb", path, "num", lo=0, lo_open=True)
        base = r.get(m, "api_base", path, "str")
        if base and not base.startswith(("http://", "https://")):
            r.fail(m, "api_base", f"{path}.api_base", f"{base!r} is not an http(s) URL")
        fields["api_base"] = base
        fields["release_retry_s"] = r.get(m, "release_retry_s", path, "num", lo=0, lo_open=True)
        fields["max_instances"] = r.get(m, "max_instances", path, "int", default=1, lo=1, hi=64)
        fields["max_offer_tries"] = r.get(m, "max_offer_tries", path, "int", default=3, lo=1, hi=50)
        fields["retry_until_up_s"] = parse_duration(r, m, "retry_until_up", path)
    if "interruptible" in allowed:
        fields.update(parse_bid(r, m, path))
    fields.update(slurm)
    if provider in ("ssh", "slurm"):
        ways = [k for k in ("host", "ssh_alias", "endpoint_command") if fields.get(k)]
        if len(ways) != 1:
            r.fail(m, ways[1] if len(ways) > 1 else None, path,
                   "say how to reach the host with exactly one of host:, ssh_alias: or endpoint_command:"
                   + (f" (got {', '.join(ways)})" if ways else ""))
        if fields.get("port") is not None and not fields.get("host"):
            r.fail(m, "port", f"{path}.port", "port: goes with host:; an ssh_alias or endpoint_command "
                   "gives its own port")
    if "identity_file" in allowed:
        ident = r.get(m, "identity_file", path, "str")
        if ident is not None:
            p = Path(ident).expanduser()
            if not p.is_file() or not os.access(p, os.R_OK):
                r.fail(m, "identity_file", f"{path}.identity_file",
                       f"cannot read {str(p)!r}; give the path of a private key you can read")
        fields["identity_file"] = ident
    for kind in ("password", "api_key"):
        if f"{kind}_env" not in allowed:
            continue
        env = r.get(m, f"{kind}_env", path, "str")
        file = r.get(m, f"{kind}_file", path, "str")
        if env and file:
            r.fail(m, f"{kind}_file", f"{path}.{kind}_file", f"give either {kind}_env or {kind}_file, not both")
        # Never echo the value: a user who pasted the secret itself here must not see it in logs.
        if env and (not c.ENV_RE.match(env) or (len(env) >= 24 and any(ch.islower() for ch in env)
                                                 and any(ch.isdigit() for ch in env))):
            r.fail(m, f"{kind}_env", f"{path}.{kind}_env",
                   "expected the name of an environment variable (e.g. VAST_API_KEY); this looks like "
                   "the secret itself: put it in the environment and write the variable's name here")
        if file:
            try:
                read_secret(file=file, what=f"{path}.{kind}_file")
            except ConfigError as exc:
                reason = exc.message.split(": ", 1)[-1]
                r.fail(m, f"{kind}_file", f"{path}.{kind}_file", f"{reason}; the file must hold the {kind}")
        fields[f"{kind}_env"], fields[f"{kind}_file"] = env, file
    return c.HostConfig(**fields)


def parse_bid(r: Reader, m: YMap, path: str) -> dict[str, Any]:
    """`interruptible: true` and its `max_bid` (money per hour in the host's currency, as
    max_price_per_hour is)."""
    interruptible = r.get(m, "interruptible", path, "bool", default=False)
    max_bid = r.get(m, "max_bid", path, "num", lo=0, lo_open=True, hi=MAX_PRICE_PER_HOUR)
    if max_bid is not None and not interruptible:
        r.fail(m, "max_bid", f"{path}.max_bid", "a bid is only for interruptible instances; "
               "add interruptible: true, or remove max_bid")
    return {"interruptible": interruptible, "max_bid": max_bid}


def slurm_units(gres: str | None, cpus_per_task: int) -> int:
    """What a Slurm task is charged for: its GPUs (the gres count), or its CPUs without a GPU."""
    if not gres:
        return cpus_per_task
    last = gres.rsplit(":", 1)[-1]
    return int(last) if last.isdigit() and ":" in gres else 1


def slurm_time_s(text: str) -> float | None:
    """Seconds of a Slurm time limit: "MM", "MM:SS", "HH:MM:SS", "D-HH", "D-HH:MM", "D-HH:MM:SS"."""
    days, _, rest = text.strip().rpartition("-") if "-" in text else ("", "", text.strip())
    parts = rest.split(":")
    if not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3 or (days and not days.isdigit()):
        return None
    n = [int(p) for p in parts]
    if days:   # with days, the fields are hours[:minutes[:seconds]]
        secs = n[0] * 3600 + (n[1] * 60 if len(n) > 1 else 0) + (n[2] if len(n) > 2 else 0)
        return float(int(days) * 86400 + secs)
    if len(n) == 1:
        return float(n[0] * 60)
    if len(n) == 2:
        return float(n[0] * 60 + n[1])
    return float(n[0] * 3600 + n[1] * 60 + n[2])


_SBATCH_VALUE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:,+@%/-]*$")


def parse_slurm(r: Reader, m: YMap, path: str) -> dict[str, Any]:
    """The Slurm settings of a host (its login node's ssh fields are read with the ssh ones)."""
    out: dict[str, Any] = {k: r.get(m, k, path, "str") for k in ("partition", "account", "qos", "mem")}
    gres = r.get(m, "gres", path, "str", default="gpu:1")
    out["gres"] = None if gres.strip().lower() in ("", "none") else gres.strip()
    for key in ("partition", "account", "qos", "mem", "gres"):
        # each becomes one "#SBATCH --key=value" line: a space or newline would start another
        if out[key] and not _SBATCH_VALUE_RE.match(out[key]):
            r.fail(m, key, f"{path}.{key}", "may use only letters, digits and _ . : , + @ % / - "
                   "(it is passed to sbatch as one value)")
    if out["gres"] and not out["gres"].startswith("gpu"):
        r.fail(m, "gres", f"{path}.gres", f"{gres!r}: expected gpu:<count> or gpu:<type>:<count> "
               "(or none on a CPU partition)")
    out["cpus_per_task"] = r.get(m, "cpus_per_task", path, "int", default=1, lo=1)
    limit = r.get(m, "time_limit", path, "str")
    out["time_limit_s"] = None
    if limit is not None:
        out["time_limit_s"] = slurm_time_s(limit)
        if not out["time_limit_s"]:
            r.fail(m, "time_limit", f"{path}.time_limit", f"{limit!r} is not a Slurm time limit; "
                   "write minutes or [D-]HH:MM:SS, e.g. time_limit: \"2:00:00\"")
    lines = r.str_list(m, "sbatch_lines", path)
    for i, line in enumerate(lines):
        if not line.startswith("#SBATCH ") or any(ch in line for ch in "\n\r"):
            fail(r.filename, m.value_lines["sbatch_lines"], f"{path}.sbatch_lines[{i}]",
                 f"{line!r} does not start with \"#SBATCH \"")
    out["sbatch_lines"] = lines
    out["price_per_gpu_hour"] = r.get(m, "price_per_gpu_hour", path, "num", default=0.0, lo=0,
                                      hi=MAX_PRICE_PER_HOUR)
    return out


def _setup_lines(r: Reader, m: YMap, path: str) -> tuple[str, ...]:
    """`setup:` is one shell line or a list of them."""
    v = m.get("setup")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else list(v) if isinstance(v, YSeq) else None
    if items is None or not all(isinstance(x, str) and x.strip() for x in items):
        r.fail(m, "setup", f"{path}.setup", "expected a shell line or a list of shell lines")
    return tuple(str(x) for x in items or ())


def _check_scene_name(r: Reader, path: str, s: str, line: int) -> None:
    """A scene name becomes a directory on the host: short, and plain characters only."""
    problem = name_problem(s, "scene")
    if problem:
        fail(r.filename, line, f"{path}.scenes", problem)
    if not c.NAME_RE.match(s):
        fail(r.filename, line, f"{path}.scenes", f"scene name {s!r} may use only letters, digits, '_', '-', '.'")


def parse_dataset(r: Reader, parent: YMap, name: str, m: YMap) -> DatasetConfig:
    path = f"datasets.{name}"
    r.keys(m, c.DATASET_KEYS, path)
    layout = r.get(m, "layout", path, "str", default="blender", choices=c.LAYOUTS)
    gen = None
    if "generate" in m:
        g = m["generate"]
        if g is None:
            g = YMap(m.value_lines["generate"])
        g = r.mapping(m, "generate", g, f"{path}.generate")
        r.keys(g, c.GENERATE_KEYS, f"{path}.generate")
        scene = r.get(g, "scene", f"{path}.generate", "str")
        if scene is not None and scene not in c.GENERATOR_SCENES:
            r.fail(g, "scene", f"{path}.generate.scene",
                   f"unknown generated scene {scene!r}; {did_you_mean(scene, c.GENERATOR_SCENES)}")
        gen = c.GenerateSpec(scene, r.get(g, "size", f"{path}.generate", "int", default=64, lo=8, hi=4096),
                             r.get(g, "seed", f"{path}.generate", "int", default=0, lo=0, hi=2**32 - 1))
    mirrors = r.str_list(m, "mirrors", path)
    for i, url in enumerate(mirrors):
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme not in c.MIRROR_SCHEMES:
            line = m["mirrors"].item_lines[i] if isinstance(m["mirrors"], YSeq) else m.value_lines["mirrors"]
            fail(r.filename, line, f"{path}.mirrors[{i}]",
                 f"{url!r} is not a URL this tool can fetch; use one of "
                 + ", ".join(f"{s}://" for s in c.MIRROR_SCHEMES))
    if gen is None and not mirrors:
        r.fail(parent, name, path, "say where the data comes from: generate: {...} or mirrors: [url, ...]",
               at_key=True)
    if gen is not None and mirrors:
        r.fail(m, "mirrors", f"{path}.mirrors", "a dataset is either generate: or mirrors:, not both")
    sums: dict[str, str] = {}
    if m.get("sha256") is not None:
        s = r.mapping(m, "sha256", m["sha256"], f"{path}.sha256")
        for k in s:
            v = s[k]
            if not isinstance(v, str) or not c.HEX64_RE.match(v.strip().lower()):
                r.fail(s, k, f"{path}.sha256.{k}", "expected 64 hex digits (a sha256 checksum)")
            sums[k] = v.strip().lower()

    def check_scene(s: str, line: int) -> None:
        _check_scene_name(r, path, s, line)

    scenes = r.str_list(m, "scenes", path, check=check_scene)
    return c.DatasetConfig(name, layout, gen, mirrors, MappingProxyType(sums), scenes,
                           parent.key_lines.get(name, m.line))


def _typed(r: Reader, full_path: str, value: Any, line: int, kind: str, **kw: Any) -> Any:
    """One value checked by the reader, its errors naming `full_path` at `line`."""
    holder = YMap(line)
    holder[full_path] = value
    holder.value_lines[full_path] = line
    holder.key_lines[full_path] = line
    return r.get(holder, full_path, "", kind, **kw)


def _one(r: Reader, key: str, full_path: str, value: Any, line: int) -> Any:
    """Validate one setting value; errors name `full_path` (e.g. experiments[0].steps[1])."""
    if value is None and key != "max_seconds":
        fail(r.filename, line, full_path, f"empty value; give a {key} value")
    rules: dict[str, tuple[str, dict[str, Any]]] = {
        "steps": ("int", dict(lo=1, hi=100_000_000)),
        "backend": ("str", dict(choices=c.BACKENDS)),
        "device": ("str", dict(choices=c.DEVICES)),
        "max_seconds": ("num", dict(lo=0, lo_open=True)),
        "downscale": ("int", dict(lo=1, hi=64)),
        "seed": ("int", dict(lo=0, hi=2**32 - 1)),
    }
    kind, kw = rules[key]
    return _typed(r, full_path, value, line, kind, **kw)


def parse_train(r: Reader, em: YMap, path: str) -> Mapping[str, Any]:
    """`train:` — TrainConfig fields the payload accepts (the contract's TRAIN_OPTIONS), each a
    value or a list of values (another axis of the matrix)."""
    if em.get("train") is None:
        return MappingProxyType({})
    tm = r.mapping(em, "train", em["train"], f"{path}.train")

    def elsewhere(key: str) -> str | None:
        if key in c.SETTINGS:
            return f"{key} is a setting of its own: write it beside train:, not under it"
        return None

    r.keys(tm, tuple(TRAIN_OPTIONS), f"{path}.train", elsewhere)
    out: dict[str, Any] = {}
    for key, v in tm.items():
        kind, choices, lo, hi = TRAIN_OPTIONS[key]
        kw: dict[str, Any] = {"choices": choices} if choices else {"lo": lo, "hi": hi}
        if kind == "bool":
            kw = {}
        sub = f"{path}.train.{key}"
        if isinstance(v, YSeq):
            if not v:
                r.fail(tm, key, sub, "an empty list gives no jobs; give at least one value")
            vals = tuple(_typed(r, f"{sub}[{i}]", x, v.item_lines[i], kind, **kw) for i, x in enumerate(v))
            if len(set(vals)) != len(vals):
                r.fail(tm, key, sub, "a value is listed twice")
            out[key] = vals
        elif v is None:
            r.fail(tm, key, sub, f"empty value; give a {key} value")
        else:
            out[key] = _typed(r, sub, v, tm.value_lines[key], kind, **kw)
    return MappingProxyType(out)


def parse_settings(r: Reader, m: YMap, path: str) -> dict[str, Any]:
    """The settings present in `m`: a scalar, or a tuple (a matrix axis) for a list."""
    out: dict[str, Any] = {}
    for key in c.SETTINGS:
        if key not in m:
            continue
        v = m[key]
        if isinstance(v, YSeq):
            if not v:
                r.fail(m, key, f"{path}.{key}", "an empty list gives no jobs; give at least one value")
            vals = tuple(_one(r, key, f"{path}.{key}[{i}]", x, v.item_lines[i]) for i, x in enumerate(v))
            if len(set(vals)) != len(vals):
                r.fail(m, key, f"{path}.{key}", "a value is listed twice")
            out[key] = vals
        elif v is None and key != "max_seconds":
            continue
        else:
            out[key] = _one(r, key, f"{path}.{key}", v, m.value_lines[key])
    return out


def _pick(r: Reader, em: YMap, key: str, path: str, names: Mapping[str, Any], what: str) -> str:
    v = r.get(em, key, path, "str")
    if v is None:
        if len(names) == 1:
            return next(iter(names))
        r.fail(em, None, f"{path}.{key}", f"missing; name one of the {what}s: {', '.join(names)}")
    if v not in names:
        r.fail(em, key, f"{path}.{key}", f"unknown {what} {v!r}; {did_you_mean(v, list(names))}")
    return v


def parse_experiment(r: Reader, em: YMap, path: str, defaults: Defaults,
                     hosts: Mapping[str, HostConfig], datasets: Mapping[str, DatasetConfig]
                     ) -> ExperimentConfig:
    r.keys(em, c.EXPERIMENT_KEYS, path)
    name = r.get(em, "name", path, "str", required=True)
    check_name(r, em, name, f"{path}.name", "experiment", at_key=False)
    ds = datasets[_pick(r, em, "dataset", path, datasets, "dataset")]

    def check_host(h: str, line: int) -> None:
        if h not in hosts:
            fail(r.filename, line, f"{path}.hosts", f"unknown host {h!r}; {did_you_mean(h, list(hosts))}")

    host_names = r.str_list(em, "hosts", path, check=check_host)
    if not host_names:
        host_names = (_pick(r, em, "hosts", path, hosts, "host"),)

    def check_scene(s: str, line: int) -> None:
        if ds.generate is not None and s not in c.GENERATOR_SCENES:
            fail(r.filename, line, f"{path}.scenes", f"unknown generated scene {s!r} for dataset "
                 f"{ds.name!r}; {did_you_mean(s, c.GENERATOR_SCENES)}")
        if ds.generate is None and ds.scenes and s not in ds.scenes:
            fail(r.filename, line, f"{path}.scenes", f"dataset {ds.name!r} has no scene {s!r}; "
                 f"{did_you_mean(s, ds.scenes)}")
        _check_scene_name(r, path, s, line)

    scenes = r.str_list(em, "scenes", path, check=check_scene)
    if not scenes:
        if ds.generate is not None:
            scenes = (ds.generate.scene or c.GENERATOR_SCENES[0],)
        elif ds.scenes:
            scenes = ds.scenes
        else:
            r.fail(em, None, f"{path}.scenes", f"missing; dataset {ds.name!r} lists no scenes, so name them "
                   "here, e.g. scenes: [lego]")
    settings = {k: getattr(defaults, k) for k in c.SETTINGS if getattr(defaults, k) is not None}
    settings.update(parse_settings(r, em, path))
    if "steps" not in settings:
        r.fail(em, None, f"{path}.steps", "missing; set steps: here or under defaults:")
    for hn in host_names:
        h = hosts[hn]
        if h.gpu != "cpu":
            continue
        for key, bad in (("device", "cuda"), ("backend", "tcnn")):
            vals = settings.get(key)
            if vals == bad or (isinstance(vals, tuple) and bad in vals):
                r.fail(em, key if key in em else None, f"{path}.{key}",
                       f"{key} {bad} needs a GPU but host {hn!r} has none (gpu: cpu); use auto")
    return c.ExperimentConfig(name=name, dataset=ds.name, scenes=scenes, hosts=host_names,
                              train=parse_train(r, em, path), line=em.line, **settings)


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(r: Reader, m: YMap, key: str, path: str) -> float | None:
    """Seconds from a number or a text such as `90s`, `20m`, `2h`."""
    if key not in m or m[key] is None:
        return None
    v = m[key]
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        seconds = float(v)
    else:
        text = str(v).strip().lower()
        unit = _DURATION_UNITS.get(text[-1:]) if text else None
        try:
            seconds = float(text[:-1]) * unit if unit else float(text)
        except ValueError:
            r.fail(m, key, f"{path}.{key}", f"expected a duration such as 30m or 2h, got {v!r}")
    if not seconds > 0 or seconds > 7 * 24 * 3600:
        r.fail(m, key, f"{path}.{key}", f"must be between 0 and 7 days, got {v!r}")
    return seconds
