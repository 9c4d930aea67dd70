"""vast.ai: a thin client of its REST API (https://console.vast.ai, `Authorization: Bearer`).

Facts this client is built on (vast-cli and the API docs; see docs reference provider-apis.md):
- HTTP 200 is not success: replies carry `success` (false with `msg`/`error`).
- State lives in three fields: `actual_status` (observed, may be null), `intended_status`
  (what was asked) and `cur_state`. `stopped` still bills storage; `frozen` still bills the GPU;
  `exited`/`offline`/`unknown` never reach running.
- SSH: direct = `public_ipaddr` (may carry whitespace) + `ports["22/tcp"][0]["HostPort"]` (a
  string); otherwise the proxy `ssh_host` + `ssh_port`. `ports` is null until running, and
  the mapping changes after every stop/start, so callers re-read it before each connect.
- `-1` means unknown in several numeric fields.
Billing: per second while running; storage (disk GB × $/GB-month) while stopped.
"""
from __future__ import annotations

import logging
import shlex
from typing import Any

from ..errors import CapacityError, InstanceNotFound, ProviderError
from ..secrets import redact
from .base import BillingRules, Endpoint, InstanceInfo, InstanceSpec, InstanceState, Offer, Provider
from ._bootguard import boot_guard_script
from ._http import ApiClient, RetryPolicy, api_key_for, host_attr, json_body, num

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://console.vast.ai"
DEFAULT_IMAGE = "pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime"
# vast.ai storage is priced per offer (`storage_cost`, $/GB-month); this is the typical figure
# seen on its offers page, used for the ledger's storage-while-stopped interval.
STORAGE_USD_PER_GB_MONTH = 0.15
HOURS_PER_MONTH = 730.0
MAX_LIST_PAGES = 100


def storage_price_per_hour(disk_gb: float) -> float:
    return disk_gb * STORAGE_USD_PER_GB_MONTH / HOURS_PER_MONTH


def parse_state(d: dict[str, Any]) -> tuple[InstanceState, str]:
    """Map vast's (actual_status, intended_status, cur_state) to one InstanceState."""
    actual = (d.get("actual_status") or "").strip().lower() or None
    intended = (d.get("intended_status") or "").strip().lower() or None
    cur = (d.get("cur_state") or "").strip().lower() or None
    raw = f"actual={actual} intended={intended} cur={cur}"
    if intended == "stopped":
        # A stopped vast instance reads actual=exited (or stopped/offline), cur=stopped.
        if actual in ("running", "loading", "frozen", "created", "scheduling"):
            return InstanceState.STOPPING, raw
        return InstanceState.STOPPED, raw
    if actual == "running":
        return InstanceState.RUNNING, raw
    if actual in ("exited", "offline", "unknown"):   # never reaches running: destroy it
        return InstanceState.ERROR, raw
    if actual == "frozen":   # paused but the GPU is still billed: neither usable nor stopped
        return InstanceState.UNKNOWN, raw
    if actual == "stopped":
        return InstanceState.STOPPED, raw
    if actual is None:
        return InstanceState.PENDING, raw
    if actual in ("loading", "created", "scheduling"):
        return InstanceState.BOOTING, raw
    return InstanceState.UNKNOWN, raw


def parse_endpoint(d: dict[str, Any], user: str = "root") -> Endpoint | None:
    """The direct 22/tcp mapping when present, else the proxy ssh_host/ssh_port."""
    ports = d.get("ports")
    ip = (d.get("public_ipaddr") or "").strip() if isinstance(d.get("public_ipaddr"), str) else ""
    if isinstance(ports, dict) and ip:
        mapping = ports.get("22/tcp")
        if isinstance(mapping, list) and mapping and isinstance(mapping[0], dict):
            port = num(str(mapping[0].get("HostPort", "")).strip() or None)
            if port and 0 < port < 65536:
                return Endpoint(ip, int(port), user)
    host = d.get("ssh_host")
    port = num(d.get("ssh_port"))
    if isinstance(host, str) and host.strip() and port and 0 < port < 65536:
        return Endpoint(host.strip(), int(port), user)
    return None


def parse_instance(d: dict[str, Any], user: str = "root") -> InstanceInfo:
    state, raw = parse_state(d)
    endpoint = parse_endpoint(d, user) if state == InstanceState.RUNNING else None
    return InstanceInfo(instance_id=str(d.get("id")), state=state, label=d.get("label") or "",
                        endpoint=endpoint, gpu=d.get("gpu_name") or "",
                        price_per_hour=num(d.get("dph_total")), currency="USD", raw_state=raw)


def parse_offer(d: dict[str, Any]) -> Offer | None:
    price = num(d.get("dph_total"))
    if price is None or d.get("id") is None:
        return None
    return Offer(provider="vastai", gpu=d.get("gpu_name") or "", price_per_hour=price,
                 currency="USD", region=(d.get("geolocation") or "").strip(),
                 available=d.get("rentable", True) is not False, offer_id=str(d["id"]),
                 gpu_count=int(num(d.get("num_gpus")) or 1), inet_down_mbps=num(d.get("inet_down")),
                 reliability=num(d.get("reliability2")))


class VastProvider(Provider):
    name = "vastai"
    transport_kind = "ssh"

    def __init__(self, host: Any, *, policy: RetryPolicy | None = None) -> None:
        key = api_key_for(host, "vast.ai", "VAST_API_KEY")
        self.api_base = str(host_attr(host, "api_base", DEFAULT_API_BASE)).rstrip("/")
        self.api = ApiClient(self.name, self.api_base, headers={"Authorization": f"Bearer {key}"},
                             policy=policy)
        self.gpu = str(host_attr(host, "gpu", ""))
        self.image = str(host_attr(host, "image", DEFAULT_IMAGE))
        self.disk_gb = float(host_attr(host, "disk_gb", 20.0))
        self.max_price_per_hour = host_attr(host, "max_price_per_hour")
        self.user = str(host_attr(host, "user", "root"))
        self.billing = BillingRules(granularity_s=1.0,
                                    storage_price_per_hour=storage_price_per_hour(self.disk_gb))

    # -- helpers --------------------------------------------------------------------------
    def _checked(self, body: Any, what: str, instance_id: str | None = None) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ProviderError(f"vastai: {what}: unexpected reply {str(body)[:120]}",
                                provider=self.name, instance_id=instance_id)
        if body.get("success") is False:
            msg = body.get("msg") or body.get("error") or "success: false"
            raise ProviderError(redact(f"vastai: {what} refused: {msg}"), provider=self.name,
                                instance_id=instance_id)
        return body

    # -- Provider -------------------------------------------------------------------------
    def offers(self, gpu: str) -> list[Offer]:
        query = {"gpu_name": {"eq": gpu}, "rentable": {"eq": True}, "num_gpus": {"eq": 1},
                 "type": "on-demand", "order": [["dph_total", "asc"]], "limit": 64}
        resp = self.api.request("POST", "/api/v0/bundles/", json=query, idempotent=True)
        body = self._checked(json_body(resp, self.name), "search offers")
        found = [o for o in (parse_offer(x) for x in body.get("offers") or [] if isinstance(x, dict))
                 if o is not None]
        if self.max_price_per_hour is not None:
            found = [o for o in found if o.price_per_hour <= float(self.max_price_per_hour)]
        return sorted(found, key=lambda o: o.price_per_hour)

    def create(self, spec: InstanceSpec) -> str:
        offer_id = spec.offer_id
        if offer_id is None:
            offers = [o for o in self.offers(spec.gpu) if o.available]
            if spec.max_price_per_hour is not None:
                offers = [o for o in offers if o.price_per_hour <= spec.max_price_per_hour]
            if not offers:
                raise CapacityError(f"vastai: no rentable {spec.gpu} offer"
                                    + (f" at or under {spec.max_price_per_hour}/h"
                                       if spec.max_price_per_hour is not None else ""),
                                    provider=self.name, hint="raise max_price_per_hour or pick another GPU")
            offer_id = offers[0].offer_id
        body = {"client_id": "me", "image": spec.image or self.image, "disk": spec.disk_gb,
                "label": spec.label, "runtype": "ssh_direct", "env": dict(spec.env)}
        if spec.onstart:
            body["onstart"] = spec.onstart
        # Never retried: a create whose reply was lost may still have rented the machine.
        resp = self.api.request("PUT", f"/api/v0/asks/{offer_id}/", json=body, idempotent=False)
        reply = json_body(resp, self.name)
        if isinstance(reply, dict) and reply.get("success") is False:
            msg = str(reply.get("msg") or reply.get("error") or "")
            words = f"{reply.get('error') or ''} {msg}".lower()
            if any(w in words for w in ("no_such_ask", "not available", "unavailable", "rented")):
                raise CapacityError(f"vastai: offer {offer_id} is gone: {msg}", provider=self.name)
        reply = self._checked(reply, f"create from offer {offer_id}")
        new_id = reply.get("new_contract")
        if new_id in (None, "", -1):
            raise ProviderError(f"vastai: create reply has no new_contract: {str(reply)[:120]}",
                                provider=self.name)
        log.info("vastai: created instance %s (%s)", new_id, spec.label)
        return str(new_id)

    def _set_state(self, instance_id: str, state: str) -> None:
        resp = self.api.request("PUT", f"/api/v0/instances/{instance_id}/", json={"state": state},
                                idempotent=True, instance_id=instance_id, accept_statuses=(404,))
        if resp.status_code == 404:
            raise InstanceNotFound(f"vastai: no instance {instance_id}", provider=self.name,
                                   instance_id=instance_id, status=404)
        self._checked(json_body(resp, self.name), f"set {instance_id} {state}", instance_id)

    def start(self, instance_id: str) -> None:
        self._set_state(instance_id, "running")

    def stop(self, instance_id: str) -> None:
        self._set_state(instance_id, "stopped")

    def destroy(self, instance_id: str) -> None:
        """Destroy; an instance the provider no longer knows counts as destroyed."""
        resp = self.api.request("DELETE", f"/api/v0/instances/{instance_id}/",
                                instance_id=instance_id, accept_statuses=(404,))
        if resp.status_code == 404:
            return
        self._checked(json_body(resp, self.name), f"destroy {instance_id}", instance_id)

    def describe(self, instance_id: str) -> InstanceInfo:
        resp = self.api.request("GET", f"/api/v0/instances/{instance_id}/", instance_id=instance_id,
                                accept_statuses=(404,))
        body = json_body(resp, self.name) if resp.status_code != 404 else {}
        inst = body.get("instances") if isinstance(body, dict) else None
        if not isinstance(inst, dict):
            raise InstanceNotFound(f"vastai: no instance {instance_id}", provider=self.name,
                                   instance_id=instance_id, status=resp.status_code)
        return parse_instance(inst, self.user)

    def list(self, label_prefix: str) -> list[InstanceInfo]:
        out: list[InstanceInfo] = []
        token: str | None = None
        for _page in range(MAX_LIST_PAGES):
            params: dict[str, Any] = {"limit": 100}
            if token:
                params["after_token"] = token
            resp = self.api.request("GET", "/api/v1/instances/", params=params)
            body = self._checked(json_body(resp, self.name), "list instances")
            for d in body.get("instances") or []:
                if isinstance(d, dict) and str(d.get("label") or "").startswith(label_prefix):
                    out.append(parse_instance(d, self.user))
            token = body.get("next_token") or None
            if not token:
                break
        return out

    def self_stop_command(self, instance_id: str) -> str | None:
        """vast.ai gives every instance `$CONTAINER_ID` and a key scoped to it
        (`$CONTAINER_API_KEY`): the instance can stop itself without the user's key."""
        return self._stop_command(shlex.quote(f"{self.api_base}/api/v0/instances/{instance_id}/"))

    def boot_guard(self, *, root: str, idle_timeout_s: float) -> str | None:
        """The `onstart` dead-man's switch (see _bootguard): the id is not known before the
        create, so the stop command reads it from `$CONTAINER_ID` on the instance."""
        url = shlex.quote(f"{self.api_base}/api/v0/instances/") + '"$CONTAINER_ID"/'
        return boot_guard_script(self._stop_command(url), root=root, idle_timeout_s=idle_timeout_s)

    @staticmethod
    def _stop_command(url_word: str) -> str:
        return ("curl -fsS --max-time 30 --retry 3 -X PUT "
                "-H \"Authorization: Bearer $CONTAINER_API_KEY\" "
                "-H 'Content-Type: application/json' "
                "-d '{\"state\": \"stopped\"}' " + url_word)
