"""The typed form of experiments.yaml: frozen dataclasses and the constants the reader checks.

Values only; reading and validating the YAML is `config.reader` / `config.sections`, and
`config.load_config` is the entry point. The schema is docs/contracts.md §5.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

# the payload's own lists (its stdlib-only contract), named here for the reader
from ngp_train.contract import BACKENDS as BACKENDS
from ngp_train.contract import DEVICES as DEVICES
from ngp_train.contract import SCENES

GENERATOR_SCENES: tuple[str, ...] = SCENES          # the payload's own list (its contract module)
PROVIDERS: tuple[str, ...] = ("local", "ssh", "vastai", "runpod", "lambda", "slurm")
CLOUD_PROVIDERS: tuple[str, ...] = ("vastai", "runpod", "lambda")
# Providers that rent interruptible (bid) instances: the providers' own `interruptible_offers`
# capability says the same (a test holds the two together; config does not import providers).
INTERRUPTIBLE_PROVIDERS: tuple[str, ...] = ("vastai", "runpod")
LAYOUTS: tuple[str, ...] = ("blender",)
MIRROR_SCHEMES: tuple[str, ...] = ("https", "http", "s3", "hf", "file")
SETTINGS: tuple[str, ...] = ("steps", "backend", "device", "max_seconds", "downscale", "seed")

TOP_KEYS = ("name", "budget", "defaults", "hosts", "datasets", "experiments")
HOST_COMMON = ("provider", "gpu", "price_per_hour", "currency", "python", "root", "idle_timeout_s",
               "deadline_s", "keep_on_failure", "torch", "setup", "tcnn_build_timeout_s", "gpus_per_instance")
HOST_SSH = ("host", "port", "user", "ssh_alias", "endpoint_command", "identity_file", "password_env",
            "password_file", "stop_command", "shutdown_on_host", "proxy_jump")
HOST_CLOUD = ("api_key_env", "api_key_file", "api_base", "max_price_per_hour", "image", "disk_gb",
              "region", "user", "identity_file", "ssh_key_name", "release_retry_s",
              "max_instances", "max_offer_tries", "retry_until_up")
HOST_BID = ("interruptible", "max_bid")      # only where INTERRUPTIBLE_PROVIDERS says so
# A Slurm host is its login node (the ssh fields that reach it) plus what sbatch is told; its
# price is per allocated GPU (or CPU on a CPU partition), so price_per_hour is not among its keys.
# Its `setup` (a common key) runs before every login-node command and at the top of every task.
HOST_SLURM = ("host", "port", "user", "ssh_alias", "endpoint_command", "identity_file", "password_env",
              "password_file", "partition", "account", "qos", "gres", "cpus_per_task", "mem", "time_limit",
              "sbatch_lines", "price_per_gpu_hour", "proxy_jump")
HOST_KEYS: dict[str, tuple[str, ...]] = {
    "local": HOST_COMMON, "ssh": HOST_COMMON + HOST_SSH,
    **{p: HOST_COMMON + HOST_CLOUD + (HOST_BID if p in INTERRUPTIBLE_PROVIDERS else ())
       for p in CLOUD_PROVIDERS},
    # no bootstrap on a cluster's nodes (the site's modules are the environment): no torch/tcnn keys
    # nor gpus_per_instance: a task's GPUs are its gres
    "slurm": tuple(k for k in HOST_COMMON if k not in ("price_per_hour", "torch", "tcnn_build_timeout_s",
                                                        "gpus_per_instance"))
    + HOST_SLURM}
DATASET_KEYS = ("generate", "layout", "mirrors", "sha256", "scenes")
GENERATE_KEYS = ("scene", "size", "seed")
EXPERIMENT_KEYS = ("name", "dataset", "scenes", "hosts", "train") + SETTINGS
SECRET_WORDS = ("password", "passwd", "passphrase", "api_key", "apikey", "token", "secret",
                "secret_key", "access_key", "private_key")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")
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
    release_retry_s: float | None = None     # None: destroy/stop retried for 600 s, then reconcile
    torch: str = "require"                   # require | install (when the interpreter has none)
    setup: tuple[str, ...] = ()              # shell lines run once per instance after the environment
    tcnn_build_timeout_s: float = 1800.0
    proxy_jump: str | None = None            # ssh: [user@]host[:port] of a jump host
    partition: str | None = None             # slurm: what sbatch is told (None: the cluster's default)
    account: str | None = None
    qos: str | None = None
    gres: str | None = None                  # slurm: "gpu:1", "gpu:a100:1"; None on a CPU partition
    cpus_per_task: int = 1
    mem: str | None = None                   # slurm: sbatch --mem, e.g. "16G"
    time_limit_s: float | None = None        # slurm: None: from the estimate with a margin
    sbatch_lines: tuple[str, ...] = ()       # slurm: extra "#SBATCH ..." lines, verbatim
    price_per_gpu_hour: float = 0.0          # slurm: internal chargeback per allocated GPU (or CPU)
    gpu_in_catalog: bool = True              # False: a GPU the catalog does not know (price given)
    max_instances: int = 1                   # instances one run rents of this entry (sessions)
    gpus_per_instance: int = 1               # GPUs of one instance (clouds: offers with exactly this
                                             # many; ssh/local: the machine's); sessions run one job per GPU
    max_offer_tries: int = 3                 # offers tried when a create finds no capacity
    retry_until_up_s: float | None = None    # keep trying (with backoff) this long
    interruptible: bool = False              # rent interruptible (bid) instances: cheaper, may be taken back
    max_bid: float | None = None             # the highest bid per hour (None: the offer's minimum + a margin)
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
    # `train:` TrainConfig fields (ngp_train.contract.TRAIN_OPTIONS); a tuple value is an axis
    train: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
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


