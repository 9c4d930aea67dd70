"""Lambda Cloud: a thin client of its REST API v1 (https://cloud.lambda.ai/api/v1, bearer key).

Facts this client is built on (Lambda Cloud API docs; reference provider-apis.md):
- Launch and terminate only. There is no stop: `stop()` here TERMINATES the instance (the disk
  is lost), because a Lambda instance bills until it is terminated; `start()` cannot bring a
  terminated instance back and says so.
- Instance types are an object keyed by name; `price_cents_per_hour` is an int; an empty
  `regions_with_capacity_available` means sold out. The older form of the reply gives the price
  as a string of cents and no `specs.gpus`: the GPU count is then read from the type's name
  (`gpu_8x_a100` has 8), so a multi-GPU type never passes for a 1-GPU request.
- Invalid-parameter errors name the fields at fault in `field_errors`; their text is kept.
- Launch sends only fields of the current launch request schema (region_name,
  instance_type_name, ssh_key_names, name).
- Errors are `{"error": {"code", "message", "suggestion"}}`; insufficient capacity is HTTP 400
  with a code naming it, so we branch on `code`. Launch is rate-limited (~1 call / 12 s).
- `ip`/`hostname` are absent or null while booting. SSH listens on 22 as `ubuntu`.
Billing (https://docs.lambda.ai/public-cloud/billing): hourly price billed in one-minute
increments, from launch to terminate; no stopped state, so no storage-while-stopped.
"""
from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import httpx

from ..errors import CapacityError, InstanceNotFound, ProviderError
from ..secrets import redact
from ._http import ApiClient, RetryPolicy, api_key_for, error_detail, json_body, num, release_policy
from .base import BillingRules, Endpoint, InstanceInfo, InstanceSpec, InstanceState, Offer, Provider

if TYPE_CHECKING:
    from ..config import HostConfig

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://cloud.lambda.ai"
STATES = {"booting": InstanceState.BOOTING, "active": InstanceState.RUNNING,
          "unhealthy": InstanceState.ERROR, "terminating": InstanceState.STOPPING,
          "terminated": InstanceState.TERMINATED, "preempted": InstanceState.TERMINATED}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


TYPE_GPUS_RE = re.compile(r"^gpu_(\d+)x_")


def type_gpu_count(itype: dict[str, Any], name: str = "") -> int | None:
    """GPUs of an instance type: `specs.gpus`, else the count in its name (gpu_8x_a100 → 8)."""
    specs = itype.get("specs")
    specs = specs if isinstance(specs, dict) else {}
    gpus = num(specs.get("gpus"))
    if gpus is not None:
        return int(gpus)
    m = TYPE_GPUS_RE.match(str(itype.get("name") or name))
    return int(m.group(1)) if m else None


def type_matches(itype: dict[str, Any], wanted: str, gpus: int = 1) -> bool:
    """'H100 PCIe' matches gpu_1x_h100_pcie / '1x H100 (80 GB PCIe)'; types with exactly `gpus`
    GPUs only (a type whose GPU count cannot be told is not taken for any count)."""
    if type_gpu_count(itype) != gpus:
        return False
    have = _words(" ".join(str(itype.get(k) or "") for k in ("name", "description", "gpu_description"))
                  .replace("_", " "))
    want = _words(wanted)
    return bool(want) and want <= have


def parse_instance(d: dict[str, Any], user: str = "ubuntu") -> InstanceInfo:
    status = str(d.get("status") or "").strip().lower()
    state = STATES.get(status, InstanceState.UNKNOWN)
    endpoint = None
    ip = d.get("ip")
    if state == InstanceState.RUNNING and isinstance(ip, str) and ip.strip():
        # Lambda's SSH is always on 22; `ssh_port` is the fake cloud's extension (its
        # instances are sshd processes on loopback that cannot all listen on 22).
        port = num(d.get("ssh_port")) or 22
        endpoint = Endpoint(ip.strip(), int(port), user)
    itype = d.get("instance_type")
    itype = itype if isinstance(itype, dict) else {}
    cents = num(itype.get("price_cents_per_hour"))
    return InstanceInfo(instance_id=str(d.get("id")), state=state, label=d.get("name") or "",
                        endpoint=endpoint, gpu=str(itype.get("gpu_description") or itype.get("name") or ""),
                        price_per_hour=cents / 100.0 if cents is not None else None,
                        currency="USD", raw_state=status)


class LambdaProvider(Provider):
    name = "lambda"
    transport_kind = "ssh"

    def __init__(self, host: HostConfig, *, policy: RetryPolicy | None = None) -> None:
        key = api_key_for(host, "Lambda Cloud", "LAMBDA_API_KEY")
        self.api_base = str(host.api_base or DEFAULT_API_BASE).rstrip("/")
        self.api = ApiClient(self.name, self.api_base, headers={"Authorization": f"Bearer {key}"},
                             policy=release_policy(host, policy))
        self.region = host.region
        self.max_price_per_hour = host.max_price_per_hour
        self.gpus = int(host.gpus_per_instance or 1)   # an instance type's price is for all its GPUs
        self.ssh_key_name = str(host.ssh_key_name or "orchestrate")
        self.user = str(host.user or "ubuntu")
        self.billing = BillingRules(granularity_s=60.0, storage_price_per_hour=0.0)

    def _raise(self, resp: httpx.Response, what: str, instance_id: str | None = None) -> None:
        body: Any = None
        try:
            body = resp.json()
        except ValueError:
            pass
        err = body.get("error") if isinstance(body, dict) else None
        code = str(err.get("code") or "") if isinstance(err, dict) else ""
        detail = redact(error_detail(resp))
        if "insufficient-capacity" in code or "capacity" in code:
            raise CapacityError(f"lambda: {what}: {detail}", provider=self.name, status=resp.status_code,
                                hint="try another region or GPU type")
        if resp.status_code == 404 or code.endswith("object-does-not-exist") or code.endswith("not-found"):
            raise InstanceNotFound(f"lambda: {what}: {detail}", provider=self.name,
                                   instance_id=instance_id, status=resp.status_code)
        hint = "check the API key (api_key_env / api_key_file)" if resp.status_code in (401, 403) else None
        raise ProviderError(f"lambda: {what} -> HTTP {resp.status_code}: {detail}", provider=self.name,
                            instance_id=instance_id, status=resp.status_code, hint=hint)

    def _call(self, method: str, path: str, what: str, *, json: Any = None, idempotent: bool | None = None,
              instance_id: str | None = None, release: bool = False) -> Any:
        resp = self.api.request(method, path, json=json, idempotent=idempotent, instance_id=instance_id,
                                accept_statuses=(400, 401, 403, 404, 409), release=release)
        if resp.status_code >= 300:
            self._raise(resp, what, instance_id)
        body = json_body(resp, self.name)
        if not isinstance(body, dict) or "data" not in body:
            raise ProviderError(f"lambda: {what}: unexpected reply {str(body)[:120]}", provider=self.name)
        return body["data"]

    def offers(self, gpu: str) -> list[Offer]:
        data = self._call("GET", "/api/v1/instance-types", "instance types") or {}
        out: list[Offer] = []
        for name, entry in (data.items() if isinstance(data, dict) else []):
            itype = entry.get("instance_type") if isinstance(entry, dict) else None
            if not isinstance(itype, dict):
                continue
            itype = {"name": name, **itype}
            if not type_matches(itype, gpu, self.gpus):
                continue
            cents = num(itype.get("price_cents_per_hour"))
            if cents is None:
                continue
            price = cents / 100.0
            if self.max_price_per_hour is not None and price > float(self.max_price_per_hour):
                continue
            regions = [str(r.get("name")) for r in entry.get("regions_with_capacity_available") or []
                       if isinstance(r, dict) and r.get("name")]
            label = str(itype.get("gpu_description") or itype.get("description") or name)
            count = type_gpu_count(itype, name) or 1
            if not regions:
                out.append(Offer("lambda", label, price, "USD", "", False, str(itype.get("name") or name),
                                 gpu_count=count))
            for region in regions:
                out.append(Offer("lambda", label, price, "USD", region, True,
                                 f"{itype.get('name') or name}@{region}", gpu_count=count))
        return sorted(out, key=lambda o: (not o.available, o.price_per_hour))

    def create(self, spec: InstanceSpec) -> str:
        offer_id = spec.offer_id
        if offer_id is None:
            region = spec.region or self.region
            avail = [o for o in self.offers(spec.gpu)
                     if o.available and o.gpu_count == self.gpus and (not region or o.region == region)]
            if spec.max_price_per_hour is not None:
                avail = [o for o in avail if o.price_per_hour <= spec.max_price_per_hour]
            if not avail:
                raise CapacityError(f"lambda: no {spec.gpu} with capacity"
                                    + (f" in {region}" if region else ""), provider=self.name,
                                    hint="try another region or GPU type")
            offer_id = avail[0].offer_id
        type_name, _, region_name = str(offer_id).partition("@")
        body = {"region_name": region_name or spec.region or self.region, "instance_type_name": type_name,
                "ssh_key_names": [self.ssh_key_name], "name": spec.label}
        # Never retried (and launch is rate-limited): a lost reply is resolved by label search.
        data = self._call("POST", "/api/v1/instance-operations/launch", "launch", json=body,
                          idempotent=False)
        ids = data.get("instance_ids") if isinstance(data, dict) else None
        if not ids:
            raise ProviderError(f"lambda: launch reply has no instance id: {str(data)[:120]}",
                                provider=self.name)
        log.info("lambda: launched %s (%s)", ids[0], spec.label)
        return str(ids[0])

    def start(self, instance_id: str) -> None:
        raise ProviderError(f"lambda: instance {instance_id} cannot be started again: Lambda Cloud "
                            "has no stop/start, only launch and terminate", provider=self.name,
                            instance_id=instance_id)

    def stop(self, instance_id: str) -> None:
        """Lambda has no stopped state: stopping means terminating (and losing the disk). An
        instance that no longer exists raises InstanceNotFound, as describe does."""
        self._terminate(instance_id)

    def destroy(self, instance_id: str) -> None:
        """Terminate; an instance Lambda no longer knows counts as terminated."""
        try:
            self._terminate(instance_id)
        except InstanceNotFound:
            return

    def _terminate(self, instance_id: str) -> None:
        self._call("POST", "/api/v1/instance-operations/terminate", f"terminate {instance_id}",
                   json={"instance_ids": [instance_id]}, idempotent=True, instance_id=instance_id,
                   release=True)

    def describe(self, instance_id: str) -> InstanceInfo:
        data = self._call("GET", f"/api/v1/instances/{instance_id}", f"describe {instance_id}",
                          instance_id=instance_id)
        if not isinstance(data, dict):
            raise InstanceNotFound(f"lambda: no instance {instance_id}", provider=self.name,
                                   instance_id=instance_id)
        return parse_instance(data, self.user)

    def list(self, label_prefix: str) -> list[InstanceInfo]:
        data = self._call("GET", "/api/v1/instances", "list instances") or []
        return [parse_instance(d, self.user) for d in data
                if isinstance(d, dict) and str(d.get("name") or "").startswith(label_prefix)]

    def self_stop_command(self, instance_id: str) -> str | None:
        """None: Lambda gives instances no scoped key, and putting the account key on a rented
        host would hand it to everything that runs there. A Lambda instance left behind by a
        dead controller is terminated by the next `orchestrate` command's reconciliation."""
        return None
