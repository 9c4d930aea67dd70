"""The fake cloud's world: instances, its own clock and bill, fault switches, persistence.

Provider-neutral: `fakecloud.py` renders these records in each provider's API shapes. Every
instance that boots gets a real sshd (`SSHServer`) on a new loopback port; stopping it kills
the sshd and its sessions. State is a JSON file in the state directory, so a restarted fake
cloud still knows (and still bills) its instances.
"""
from __future__ import annotations

import json
import logging
import math
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .sshd import SSHServer, SSHServerError

log = logging.getLogger(__name__)

# Billing granularity per provider, as our clients declare it (see providers/*.py).
GRANULARITY_S = {"vastai": 1.0, "runpod": 1.0, "lambda": 60.0}
HOURS_PER_MONTH = 730.0
STORAGE_USD_PER_GB_MONTH = {"vastai": 0.15, "runpod": 0.20, "lambda": 0.0}

# An interruptible offer's minimum bid, as a share of its on-demand price (unless `min_bids` says).
MIN_BID_SHARE = 0.5

# What the fake rents out: provider -> list of (offer id / gpu type id, display GPU name, USD/h).
DEFAULT_CATALOG: dict[str, list[tuple[str, str, float]]] = {
    "vastai": [("7001", "RTX 4090", 0.44), ("7002", "H100 SXM", 2.13), ("7003", "RTX 3090", 0.40)],
    "runpod": [("NVIDIA GeForce RTX 4090", "RTX 4090", 0.34), ("NVIDIA H100 80GB HBM3", "H100 SXM", 2.69)],
    "lambda": [("gpu_1x_h100_pcie", "H100 PCIe", 3.29), ("gpu_1x_a10", "A10", 0.75)],
}


def kill_instance_processes(scoped_key: str) -> list[int]:
    """SIGKILL every process started on one instance: those whose environment holds its scoped
    key (CONTAINER_API_KEY=..., random per instance, so two fake clouds never collide)."""
    needle = f"CONTAINER_API_KEY={scoped_key}".encode()
    killed: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle in env:
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed.append(int(entry))
            except (ProcessLookupError, PermissionError):
                pass
    return killed


class FakeCloudError(Exception):
    """A request the fake cloud refuses; rendered by the API layer in the provider's shape."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class Faults:
    lose_create_replies: int = 0      # next N creates succeed, but the reply is never sent
    lost_reply_delay_s: float = 0.0   # ...after hanging this long (a timeout rather than a drop)
    boot_s: float = 0.3               # time from create/start to SSH (raise for "slow boot")
    fail_next: int = 0                # next N API calls answer `fail_status`
    fail_status: int = 503
    fail_methods: list[str] = field(default_factory=list)   # empty = any method
    never_ssh: int = 0                # next N created instances never get SSH
    sold_out: bool = False            # no capacity anywhere
    create_delay_s: float = 0.0       # a create request is held this long before it takes effect
    destroy_delay_s: float = 0.0      # likewise for destroy (a controller can die meanwhile)
    fail_retry_after_s: float | None = None   # Retry-After header on injected failures (a 429 burst)
    # The states the providers document (issue 16):
    boot_fail_next: int = 0           # next N created instances fail at container start...
    boot_fail_msg: str = ("Error response from daemon: failed to create task for container: "
                          "OCI runtime create failed: runc create failed: unable to start container "
                          "process: error during container init: nvidia-container-cli: "
                          "initialization error: driver rpc error: timed out: unknown")  # ...saying this
    offer_lost_next: int = 0          # next N creates find their offer rented since the search
    gql_errors_next: int = 0          # next N RunPod calls: HTTP 200 + errors[] (internal), no effect
    private_ssh_next: int = 0         # next N RunPod pods map port 22 on a private IP only
    lambda_old_types: bool = False    # instance-types in the older form (price a string, no specs.gpus)
    lambda_no_capacity: list[str] = field(default_factory=list)   # types listed with no region
    vast_no_account_keys: bool = False   # vast instances accept only keys attached to them
    vanish_offers: int = 0            # next N creates find their offer rented away since the search
    preempt_after_s: float = 0.0      # the next created instance is preempted this long after boot
    outbid_after_s: float = 0.0       # the next interruptible (bid) instance is outbid this long after boot


@dataclass
class Instance:
    id: str
    provider: str
    label: str
    gpu: str
    offer_id: str
    price_per_hour: float
    storage_price_per_hour: float
    status: str                       # booting | running | failed | stopped | terminated
    created_at: float
    ready_at: float | None
    scoped_key: str
    never_ssh: bool = False
    boot_fail_msg: str = ""           # set: the container never starts; this is why
    private_ssh: bool = False         # RunPod: port 22 mapped on a private IP only
    no_account_keys: bool = False     # only keys attached to the instance are accepted
    port: int | None = None
    used_ports: list[int] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    extra_keys: list[str] = field(default_factory=list)
    onstart: str = ""
    intervals: list[list[Any]] = field(default_factory=list)   # [kind, start, end|None]
    ended_at: float | None = None
    preempt_at: float | None = None   # fake clock: the provider takes the machine back then
    bid: float | None = None          # an interruptible instance's bid ($/h, what bills); None: on-demand
    outbid_at: float | None = None    # fake clock: a higher bid takes the machine then
    outbid: bool = False              # stopped by the provider (outbid), though intended running

    def open_interval(self, kind: str, t: float) -> None:
        if not any(i[0] == kind and i[2] is None for i in self.intervals):
            self.intervals.append([kind, t, None])

    def close_intervals(self, t: float, kind: str | None = None) -> None:
        for i in self.intervals:
            if i[2] is None and (kind is None or i[0] == kind):
                i[2] = t

    def bill(self, now: float) -> dict[str, Any]:
        g = GRANULARITY_S.get(self.provider, 1.0)
        out: dict[str, Any] = {"provider": self.provider, "label": self.label, "status": self.status,
                               "gpu_seconds": 0.0, "storage_seconds": 0.0, "gpu_cost": 0.0,
                               "storage_cost": 0.0}
        for kind, start, end in self.intervals:
            seconds = max(0.0, (end if end is not None else now) - start)
            billed = math.ceil(seconds / g - 1e-9) * g if seconds > 0 else 0.0
            price = self.price_per_hour if kind == "gpu" else self.storage_price_per_hour
            out[f"{kind}_seconds"] += seconds
            out[f"{kind}_cost"] += billed * price / 3600.0
        out["total"] = out["gpu_cost"] + out["storage_cost"]
        return out


class World:
    """All fake-cloud state behind one lock. Times are the fake clock: time.time() + offset."""

    def __init__(self, state_dir: Path, *, api_key: str | None = None,
                 catalog: dict[str, list[tuple[str, str, float]]] | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = self.state_dir / "fakecloud.json"
        self.lock = threading.RLock()
        self.catalog = catalog or DEFAULT_CATALOG
        self.offer_extra: dict[str, dict[str, Any]] = {}   # offer id -> extra API fields (inet_down, num_gpus, ...)
        self.searches: list[dict[str, Any]] = []          # the last offer searches' bodies (vast), newest last
        self.min_bids: dict[str, float] = {}   # offer id -> its minimum bid (default: MIN_BID_SHARE of its price)
        self.instances: dict[str, Instance] = {}
        self.faults = Faults()
        self.clock_offset_s = 0.0
        self.host_env: dict[str, str] = {}     # every instance's environment gets these (the index)
        self.next_serial = 1
        self.vast_id_base = 1_000_000 * (10 + secrets.randbelow(80))
        self.servers: dict[str, SSHServer] = {}
        self.api_key = api_key or ""
        self.inflight = {"create": 0, "destroy": 0}   # requests held by a *_delay_s fault
        self._load()
        if not self.api_key:
            self.api_key = "fk-" + secrets.token_hex(16)
        self.account_key_path = self.state_dir / "account_ed25519"
        self._ensure_account_key()
        self.save()

    # -- clock and persistence ------------------------------------------------------------
    def now(self) -> float:
        return time.time() + self.clock_offset_s

    def _load(self) -> None:
        if not self.state_path.exists():
            return
        data = json.loads(self.state_path.read_text())
        self.clock_offset_s = float(data.get("clock_offset_s", 0.0))
        self.next_serial = int(data.get("next_serial", 1))
        self.vast_id_base = int(data.get("vast_id_base", self.vast_id_base))
        self.api_key = self.api_key or data.get("api_key", "")
        self.faults = Faults(**data.get("faults", {}))
        for d in data.get("instances", []):
            inst = Instance(**d)
            if inst.status in ("booting", "running"):   # the host "rebooted" with us: new port
                inst.status, inst.ready_at, inst.port = "booting", self.now() + self.faults.boot_s, None
            self.instances[inst.id] = inst

    def save(self) -> None:
        with self.lock:
            data = {"clock_offset_s": self.clock_offset_s, "next_serial": self.next_serial,
                    "vast_id_base": self.vast_id_base,
                    "api_key": self.api_key, "faults": asdict(self.faults),
                    "instances": [asdict(i) for i in self.instances.values()]}
            tmp = self.state_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.state_path)

    def _ensure_account_key(self) -> None:
        if self.account_key_path.exists():
            return
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fakecloud-account",
                        "-f", str(self.account_key_path)], check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=30)

    @property
    def account_public_key(self) -> str:
        return Path(str(self.account_key_path) + ".pub").read_text().strip()

    # -- catalog --------------------------------------------------------------------------
    def offers(self, provider: str) -> list[tuple[str, str, float]]:
        return [] if self.faults.sold_out else list(self.catalog.get(provider, []))

    def find_offer(self, provider: str, offer_id: str) -> tuple[str, str, float] | None:
        self._vanish(provider, offer_id)
        found = next((o for o in self.offers(provider) if o[0] == offer_id), None)
        if found is None and provider == "lambda" and self.faults.lambda_old_types \
                and offer_id.startswith("gpu_8x_"):   # the 8-GPU siblings the older list shows
            one = self.find_offer(provider, offer_id.replace("gpu_8x_", "gpu_1x_", 1))
            found = (offer_id, one[1], one[2] * 8) if one else None
        return found

    def _vanish(self, provider: str, offer_id: str) -> None:
        """The `vanish_offers` fault: someone else rents the offer between our search and our
        create, so it leaves the catalog (later searches no longer list it)."""
        with self.lock:
            if self.faults.vanish_offers <= 0 or not any(o[0] == offer_id for o in self.catalog.get(provider, [])):
                return
            self.faults.vanish_offers -= 1
            self.catalog = {**self.catalog, provider: [o for o in self.catalog[provider] if o[0] != offer_id]}
            log.info("fakecloud: offer %s %s was rented away", provider, offer_id)

    def min_bid(self, provider: str, offer_id: str) -> float | None:
        offer = next((o for o in self.catalog.get(provider, []) if o[0] == offer_id), None)
        if offer is None:
            return None
        return self.min_bids.get(offer_id, round(offer[2] * MIN_BID_SHARE, 4))

    # -- lifecycle ------------------------------------------------------------------------
    def new_id(self, provider: str) -> str:
        n = self.next_serial
        self.next_serial += 1
        if provider == "vastai":   # a random base per fake cloud: ids differ between fake clouds
            return str(self.vast_id_base + n)
        if provider == "runpod":
            return f"pod{n:04d}" + secrets.token_hex(4)
        return secrets.token_hex(16)

    def create(self, provider: str, offer_id: str, label: str, *, disk_gb: float = 20.0,
               env: dict[str, str] | None = None, extra_keys: list[str] | None = None,
               onstart: str = "", bid: float | None = None) -> Instance:
        with self.lock:
            offer = self.find_offer(provider, offer_id)
            if offer is None:
                raise FakeCloudError(f"no capacity for {offer_id!r}", 400, "insufficient-capacity")
            if bid is not None:
                floor = self.min_bid(provider, offer_id) or 0.0
                if bid < floor:
                    raise FakeCloudError(f"Bid price {bid:g} is below the minimum bid {floor:g} for this "
                                         "machine.", 400, "invalid_bid")
            t = self.now()
            never = self.faults.never_ssh > 0
            if never:
                self.faults.never_ssh -= 1
            fail_msg = ""
            if self.faults.boot_fail_next > 0:
                self.faults.boot_fail_next -= 1
                fail_msg = self.faults.boot_fail_msg
            private = provider == "runpod" and self.faults.private_ssh_next > 0
            if private:
                self.faults.private_ssh_next -= 1
            inst = Instance(id=self.new_id(provider), provider=provider, label=label, gpu=offer[1],
                            offer_id=offer_id, price_per_hour=offer[2] if bid is None else bid, bid=bid,
                            storage_price_per_hour=disk_gb * STORAGE_USD_PER_GB_MONTH.get(provider, 0.0)
                            / HOURS_PER_MONTH,
                            status="booting", created_at=t, ready_at=t + self.faults.boot_s,
                            scoped_key="ck-" + secrets.token_hex(12), never_ssh=never,
                            env=dict(env or {}), extra_keys=list(extra_keys or []), onstart=onstart,
                            boot_fail_msg=fail_msg, private_ssh=private,
                            no_account_keys=provider == "vastai" and self.faults.vast_no_account_keys)
            if self.faults.preempt_after_s > 0:
                inst.preempt_at = t + self.faults.boot_s + self.faults.preempt_after_s
                self.faults.preempt_after_s = 0.0
            if bid is not None and self.faults.outbid_after_s > 0:
                inst.outbid_at = t + self.faults.boot_s + self.faults.outbid_after_s
                self.faults.outbid_after_s = 0.0
            inst.open_interval("gpu", t)
            self.instances[inst.id] = inst
            self.save()
            log.info("fakecloud: created %s %s (%s)", provider, inst.id, label)
            return inst

    def take_offer_lost(self) -> bool:
        """Consume one 'offer rented by someone else between search and create'."""
        with self.lock:
            if self.faults.offer_lost_next > 0:
                self.faults.offer_lost_next -= 1
                self.save()
                return True
            return False

    def take_gql_error(self) -> bool:
        with self.lock:
            if self.faults.gql_errors_next > 0:
                self.faults.gql_errors_next -= 1
                self.save()
                return True
            return False

    def attach_key(self, provider: str, instance_id: str, public_key: str) -> Instance:
        """vast.ai's attach-ssh: the key is accepted from now on (and after restarts)."""
        with self.lock:
            inst = self.get(provider, instance_id)
            key = public_key.strip()
            if key and key not in inst.extra_keys:
                inst.extra_keys.append(key)
                srv = self.servers.get(inst.id)
                if srv is not None:
                    srv.authorize_key(key)
                self.save()
            return inst

    def get(self, provider: str, instance_id: str, *, include_terminated: bool = False) -> Instance:
        inst = self.instances.get(instance_id)
        if inst is None or inst.provider != provider or (inst.status == "terminated" and not include_terminated):
            raise FakeCloudError(f"instance {instance_id} not found", 404, "not-found")
        return inst

    def stop(self, provider: str, instance_id: str) -> Instance:
        with self.lock:
            inst = self.get(provider, instance_id)
            if inst.status in ("booting", "running", "failed"):
                self._kill_sshd(inst)
                t = self.now()
                inst.status, inst.ready_at, inst.outbid = "stopped", None, False
                inst.close_intervals(t, "gpu")
                if inst.storage_price_per_hour > 0:
                    inst.open_interval("storage", t)
                self.save()
            elif inst.outbid:      # stopped by the provider; now we intend it stopped too
                inst.outbid = False
                self.save()
            return inst

    def start(self, provider: str, instance_id: str) -> Instance:
        with self.lock:
            inst = self.get(provider, instance_id)
            if inst.status == "stopped":
                t = self.now()
                inst.status, inst.ready_at, inst.outbid = "booting", t + self.faults.boot_s, False
                inst.close_intervals(t, "storage")
                inst.open_interval("gpu", t)
                self.save()
            return inst

    def destroy(self, provider: str, instance_id: str) -> Instance:
        with self.lock:
            inst = self.get(provider, instance_id)
            self._kill_sshd(inst)
            t = self.now()
            inst.status, inst.ready_at, inst.ended_at = "terminated", None, t
            inst.close_intervals(t)
            self.save()
            log.info("fakecloud: destroyed %s %s", provider, instance_id)
            return inst

    def tick(self) -> None:
        """Finish boots whose time has come: start a real sshd on a fresh port."""
        with self.lock:
            now = self.now()
            changed = False
            for inst in self.instances.values():
                if inst.status == "booting" and inst.ready_at is not None and now >= inst.ready_at:
                    inst.ready_at = None
                    if inst.boot_fail_msg:   # the container never starts; the machine still bills
                        inst.status = "failed"
                        changed = True
                        continue
                    inst.status = "running"
                    try:
                        if not inst.never_ssh:
                            self._start_sshd(inst)
                        if inst.onstart:
                            self._run_onstart(inst)
                    except (SSHServerError, OSError, subprocess.SubprocessError) as exc:
                        log.warning("fakecloud: instance %s did not start cleanly: %s", inst.id, exc)
                    changed = True
            changed = self._preempt_due(now) or changed
            changed = self._outbid_due(now) or changed
            if changed:
                self.save()

    def preempt(self, instance_id: str, at: float | None = None) -> None:
        """Preempt an instance at fake-clock time `at` (now when None)."""
        with self.lock:
            self.instances[instance_id].preempt_at = self.now() if at is None else at
        self.tick()

    def _preempt_due(self, now: float) -> bool:
        """Interruptible capacity taken back: the machine powers off (its processes die with it)
        and the instance is gone; billing ends there."""
        changed = False
        for inst in self.instances.values():
            if inst.preempt_at is not None and now >= inst.preempt_at and inst.status in ("booting", "running"):
                self._kill_sshd(inst)
                inst.status, inst.ended_at, inst.preempt_at = "terminated", now, None
                inst.close_intervals(now)
                log.info("fakecloud: instance %s preempted", inst.id)
                changed = True
        return changed

    def outbid(self, instance_id: str, at: float | None = None) -> None:
        """Outbid an interruptible instance at fake-clock time `at` (now when None)."""
        with self.lock:
            inst = self.instances[instance_id]
            if inst.bid is None:
                raise FakeCloudError(f"instance {instance_id} is not interruptible", 400, "invalid")
            inst.outbid_at = self.now() if at is None else at
        self.tick()

    def _outbid_due(self, now: float) -> bool:
        """A higher bid takes the machine: the provider stops the instance (its processes die
        with it); the GPU stops billing, the disk does not, and the instance stays listed."""
        changed = False
        for inst in self.instances.values():
            if inst.outbid_at is not None and now >= inst.outbid_at and inst.status in ("booting", "running"):
                self._kill_sshd(inst)
                inst.status, inst.ready_at, inst.outbid_at, inst.outbid = "stopped", None, None, True
                inst.close_intervals(now, "gpu")
                if inst.storage_price_per_hour > 0:
                    inst.open_interval("storage", now)
                log.info("fakecloud: instance %s outbid", inst.id)
                changed = True
        return changed

    # -- sshd -----------------------------------------------------------------------------
    def _start_sshd(self, inst: Instance) -> None:
        env = self._instance_env(inst)
        set_env = " ".join(f"{k}={v}" for k, v in env.items() if " " not in v and '"' not in v)
        srv = self.servers.get(inst.id)
        if srv is None:
            srv = SSHServer(base_dir=self.state_dir / "hosts" / inst.id, extra_config={"SetEnv": set_env})
            srv._used_ports.update(inst.used_ports)    # a new port on every start, even across restarts
            if srv.host_key_path.exists():              # keep the host key across fake-cloud restarts
                srv._keys_made = True
            srv._ensure_keys()
            account = [] if inst.no_account_keys else [self.account_public_key]
            for key in [*account, *inst.extra_keys]:
                if key.strip() and key.strip() not in srv.authorized_keys_path.read_text():
                    srv.authorize_key(key)
            self.servers[inst.id] = srv
        srv.start()
        inst.port = srv.port
        inst.used_ports.append(srv.port)

    def _instance_env(self, inst: Instance) -> dict[str, str]:
        """What processes on the instance see. Each instance gets its own HOME (so `~/orchestrate`
        is per machine, as on a real cloud, and root's ~/.bashrc is not run by every session),
        this interpreter first on PATH, and the provider's self-stop variables."""
        home = self.state_dir / "homes" / inst.id
        home.mkdir(parents=True, exist_ok=True)
        path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "/usr/bin:/bin")])
        return {"CONTAINER_ID": inst.id, "CONTAINER_API_KEY": inst.scoped_key,
                "RUNPOD_POD_ID": inst.id, "RUNPOD_API_KEY": inst.scoped_key,
                "HOME": str(home), "PATH": path, **self.host_env, **inst.env}

    def _run_onstart(self, inst: Instance) -> None:
        """vast.ai runs the instance's `onstart` at every container start, and RunPod its
        `dockerArgs` as the container's start command (the container's main process, killed
        with the instance's other processes at stop); so do we. Our sshd stands in for the
        image's own start script."""
        env = self._instance_env(inst)
        proc = subprocess.Popen(["bash", "-c", inst.onstart], env=env, cwd=env["HOME"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
        if inst.provider == "runpod":
            return
        try:
            proc.wait(timeout=10)   # an onstart backgrounds its long-running parts
        except subprocess.TimeoutExpired:
            log.warning("fakecloud: onstart of %s still running after 10 s", inst.id)

    def _kill_sshd(self, inst: Instance) -> None:
        """Power off: the sshd, its sessions, and every process the instance started (found by
        the CONTAINER_ID in their environment, since detached ones leave sshd's process tree)."""
        srv = self.servers.pop(inst.id, None)
        if srv is not None:
            srv.stop()
        kill_instance_processes(inst.scoped_key)
        inst.port = None

    def shutdown(self) -> None:
        """Kill every sshd (and its sessions) and every process the instances started, as if the
        machines lost power; instances stay in the state file (and boot again on restart)."""
        with self.lock:
            for srv in list(self.servers.values()):
                try:
                    srv.stop()
                except OSError:
                    pass
            self.servers.clear()
            for inst in self.instances.values():
                inst.port = None
                kill_instance_processes(inst.scoped_key)
            self.save()

    # -- inspection -----------------------------------------------------------------------
    def bill(self) -> dict[str, Any]:
        with self.lock:
            now = self.now()
            per = {i.id: i.bill(now) for i in self.instances.values()}
            return {"instances": per, "total": sum(b["total"] for b in per.values()),
                    "running": sum(1 for i in self.instances.values() if i.status in ("booting", "running", "failed")),
                    "live": sum(1 for i in self.instances.values() if i.status != "terminated"),
                    "created": len(per), "at": now, "inflight": dict(self.inflight)}

    def advance_clock(self, seconds: float) -> None:
        with self.lock:
            self.clock_offset_s += float(seconds)
            self.save()

    def set_faults(self, changes: dict[str, Any]) -> Faults:
        with self.lock:
            known = set(asdict(self.faults))
            bad = set(changes) - known
            if bad:
                raise FakeCloudError(f"unknown fault switches {sorted(bad)}; known: {sorted(known)}")
            for k, v in changes.items():
                setattr(self.faults, k, v)
            self.save()
            return self.faults

    def take_failure(self, method: str) -> int | None:
        """Consume one injected failure for this call; returns the status to answer, if any."""
        with self.lock:
            f = self.faults
            if f.fail_next > 0 and (not f.fail_methods or method in f.fail_methods):
                f.fail_next -= 1
                return f.fail_status
            return None

    def pause(self, kind: str) -> None:
        """Hold a create/destroy request for the fault's delay (the work still happens after)."""
        delay = float(getattr(self.faults, f"{kind}_delay_s"))
        if delay <= 0:
            return
        with self.lock:
            self.inflight[kind] += 1
        try:
            time.sleep(delay)
        finally:
            with self.lock:
                self.inflight[kind] -= 1

    def take_lost_reply(self) -> float | None:
        with self.lock:
            if self.faults.lose_create_replies > 0:
                self.faults.lose_create_replies -= 1
                return self.faults.lost_reply_delay_s
            return None
