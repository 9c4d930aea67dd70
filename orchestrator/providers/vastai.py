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
- A container that fails to start stays `created`/`loading` with the daemon's error in
  `status_msg` (e.g. an OCI runtime failure), and an instance can sit `stopped` while its
  intended status is `running`: both are failures, never a slow boot.
- Create answers 404/410 with `no_such_ask` when the offer was rented since the search.
- Offer search: the official CLI (vast-ai/vast-cli `search offers`) sends verified, rentable,
  not rented, not external by default, and `allocated_storage` (the disk to price `dph_total`
  for); create sends `cancel_unavail` so an offer gone meanwhile is refused, not queued.
- SSH keys: an instance gets the account's keys; a run's own key is attached with
  `POST /api/v0/instances/{id}/ssh/` `{"ssh_key": ...}`.
- Interruptible (bid) instances (https://docs.vast.ai/cli/reference/create-instance, `--price`:
  "per machine bid price in $/hour"; https://docs.vast.ai/cli/reference/change-bid): a search
  with `"type": "bid"` returns interruptible offers, each with its current `min_bid` ($/h); a
  create whose body carries `"price"` rents the machine at that bid, and the bid is what bills.
  Outbid, the instance is stopped by vast (intended still running, actual exited): storage keeps
  billing and it may resume when the bid wins again. Instances say `is_bid`.
Billing: per second while running; storage (disk GB × the offer's `storage_cost` $/GB-month)
while stopped; traffic per GB (`inet_down_cost` into, `inet_up_cost` out of the instance).
"""
from __future__ import annotations

import logging
import re
import shlex
from typing import TYPE_CHECKING, Any

from ..errors import CapacityError, InstanceNotFound, ProviderError
from ..secrets import redact
from ._bid import choose_bid
from ._bootguard import boot_guard_script
from ._http import ApiClient, RetryPolicy, api_key_for, error_detail, json_body, num, release_policy
from .base import BillingRules, Endpoint, InstanceInfo, InstanceSpec, InstanceState, Offer, Provider

if TYPE_CHECKING:
    from ..config import HostConfig

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://console.vast.ai"
# -devel: nvcc is in the image, so tiny-cuda-nn can be built on the first host of a GPU
# (orchestrator/run/tcnn_cache.py); `image:` on the host overrides it
DEFAULT_IMAGE = "pytorch/pytorch:2.4.0-cuda12.4-cudnn9-devel"
# vast.ai storage is priced per offer (`storage_cost`, $/GB-month); this typical figure is used
# only until an offer's own price is known (the offer choice records the offer's).
STORAGE_USD_PER_GB_MONTH = 0.15
HOURS_PER_MONTH = 730.0
MAX_LIST_PAGES = 100


# Words of a `status_msg` that reports a failure (the Docker daemon's "Error response from
# daemon: ... OCI runtime create failed ..."). Not "unable": a pull starts with the daemon's
# "Unable to find image ... locally", which is progress.
FAILURE_MSG_RE = re.compile(r"\b(error|failed|failure|oci runtime)\b", re.IGNORECASE)


def storage_price_per_hour(disk_gb: float, usd_per_gb_month: float | None = None) -> float:
    rate = STORAGE_USD_PER_GB_MONTH if usd_per_gb_month is None else usd_per_gb_month
    return disk_gb * rate / HOURS_PER_MONTH


def parse_state(d: dict[str, Any]) -> tuple[InstanceState, str]:
    """Map vast's (actual_status, intended_status, cur_state, status_msg) to one InstanceState.
    For a failure, the returned text leads with the provider's own message."""
    actual = (d.get("actual_status") or "").strip().lower() or None
    intended = (d.get("intended_status") or "").strip().lower() or None
    cur = (d.get("cur_state") or "").strip().lower() or None
    msg = " ".join(str(d.get("status_msg") or "").split())[:300]
    raw = f"actual={actual} intended={intended} cur={cur}"
    if intended != "stopped" and actual in (None, "created", "loading", "scheduling") \
            and FAILURE_MSG_RE.search(msg):
        return InstanceState.ERROR, f"failed to start: {msg} ({raw})"
    if d.get("is_bid") is True and intended == "running" and actual in ("stopped", "exited"):
        # outbid: vast stopped it (storage still bills); it is not ours to wait for
        return InstanceState.STOPPED, f"outbid: stopped by the provider while it should run ({raw})"
    if intended == "running" and actual in ("stopped", "exited", "offline"):
        return InstanceState.ERROR, (f"{actual} while it should be running"
                                     + (f": {msg}" if msg else "") + f" ({raw})")
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
    price = num(d.get("dph_total"))
    if state == InstanceState.STOPPED:
        # `dph_total` does not drop when stopped; what bills then is the disk alone.
        disk, rate = num(d.get("disk_space")), num(d.get("storage_cost"))
        price = storage_price_per_hour(disk, rate) if disk is not None and rate is not None else None
    return InstanceInfo(instance_id=str(d.get("id")), state=state, label=d.get("label") or "",
                        endpoint=endpoint, gpu=d.get("gpu_name") or "",
                        price_per_hour=price, currency="USD", raw_state=raw)


def parse_offer(d: dict[str, Any], disk_gb: float = 20.0, *, bid: bool = False,
                max_bid: float | None = None) -> Offer | None:
    """One offer; with `bid`, an interruptible one priced at the bid we would place (None when
    its minimum bid is above `max_bid`)."""
    price = num(d.get("dph_total"))
    if price is None or d.get("id") is None:
        return None
    min_bid = num(d.get("min_bid"))
    if bid:
        price = choose_bid(min_bid, max_bid)
        if price is None:
            return None
    storage = num(d.get("storage_cost"))
    # Not rentable, already rented, or not verified: the search asked for none of these, so
    # one in the reply is not ours to rent (an older server, a filter ignored).
    available = (d.get("rentable", True) is not False and d.get("rented") is not True
                 and d.get("verified", True) is not False and d.get("external") is not True)
    return Offer(provider="vastai", gpu=d.get("gpu_name") or "", price_per_hour=price,
                 currency="USD", region=(d.get("geolocation") or "").strip(),
                 available=available, offer_id=str(d["id"]),
                 gpu_count=int(num(d.get("num_gpus")) or 1),
                 storage_price_per_hour=storage_price_per_hour(disk_gb, storage) if storage is not None else None,
                 upload_price_per_gb=num(d.get("inet_down_cost")),
                 download_price_per_gb=num(d.get("inet_up_cost")),
                 inet_down_mbps=num(d.get("inet_down")), reliability=num(d.get("reliability2")),
                 interruptible=bid, min_bid=min_bid)


def is_offer_gone(status: int, reply: Any) -> bool:
    """The offer was rented (or withdrawn) between search and create."""
    words = ""
    if isinstance(reply, dict):
        words = f"{reply.get('error') or ''} {reply.get('msg') or ''} {reply.get('detail') or ''}".lower()
    if "no_such_ask" in words:
        return True
    if status in (404, 410):
        return True
    return any(w in words for w in ("not available", "unavailable", "already rented"))


class VastProvider(Provider):
    name = "vastai"
    transport_kind = "ssh"
    interruptible_offers = True

    def __init__(self, host: HostConfig, *, policy: RetryPolicy | None = None) -> None:
        key = api_key_for(host, "vast.ai", "VAST_API_KEY")
        self.api_base = str(host.api_base or DEFAULT_API_BASE).rstrip("/")
        self.api = ApiClient(self.name, self.api_base, headers={"Authorization": f"Bearer {key}"},
                             policy=release_policy(host, policy))
        self.gpu = str(host.gpu or "")
        self.image = str(host.image or DEFAULT_IMAGE)
        self.disk_gb = float(host.disk_gb or 20.0)
        self.max_price_per_hour = host.max_price_per_hour
        self.gpus = int(host.gpus_per_instance or 1)   # an offer's dph_total is for the whole machine
        self.interruptible = bool(host.interruptible)
        self.max_bid = host.max_bid if self.interruptible else None
        self.user = str(host.user or "root")
        self.billing = BillingRules(granularity_s=1.0,
                                    storage_price_per_hour=storage_price_per_hour(self.disk_gb))
        # A run needs its own key on the instance (the account's keys may not include it).
        self.needs_ssh_public_key = True

    # -- helpers --------------------------------------------------------------------------
    def _checked(self, body: Any, what: str, instance_id: str | None = None) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise ProviderError(f"vastai: {what}: unexpected reply {str(body)[:120]}",
                                provider=self.name, instance_id=instance_id)
        if body.get("success") is False:
            msg = body.get("msg") or body.get("error") or "success: false"
            if str(body.get("error") or "") in ("no_such_instance", "not_found"):
                raise InstanceNotFound(redact(f"vastai: {what}: {msg}"), provider=self.name,
                                       instance_id=instance_id)
            raise ProviderError(redact(f"vastai: {what} refused: {msg}"), provider=self.name,
                                instance_id=instance_id)
        return body

    # -- Provider -------------------------------------------------------------------------
    def offers(self, gpu: str) -> list[Offer]:
        # The official CLI's default filters, and the disk we rent so dph_total is priced for it.
        query = {"gpu_name": {"eq": gpu}, "num_gpus": {"eq": self.gpus},
                 "verified": {"eq": True}, "external": {"eq": False}, "rentable": {"eq": True},
                 "rented": {"eq": False}, "allocated_storage": self.disk_gb,
                 "type": "bid" if self.interruptible else "on-demand",
                 "order": [["dph_total", "asc"]], "limit": 64}
        resp = self.api.request("POST", "/api/v0/bundles/", json=query, idempotent=True)
        body = self._checked(json_body(resp, self.name), "search offers")
        # the search asked for exactly `gpus`; a reply that ignored the filter is not taken
        found = [o for o in (parse_offer(x, self.disk_gb, bid=self.interruptible, max_bid=self.max_bid)
                             for x in body.get("offers") or [] if isinstance(x, dict))
                 if o is not None and o.gpu_count == self.gpus]
        if self.max_price_per_hour is not None:
            found = [o for o in found if o.price_per_hour <= float(self.max_price_per_hour)]
        return sorted(found, key=lambda o: o.price_per_hour)

    def create(self, spec: InstanceSpec) -> str:
        # a host that is not interruptible never bids, whatever the spec says
        offer_id, bid = spec.offer_id, (spec.bid_per_hour if self.interruptible else None)
        if offer_id is None or (self.interruptible and bid is None):
            offers = [o for o in self.offers(spec.gpu) if o.available
                      and (spec.offer_id is None or o.offer_id == spec.offer_id)]
            if spec.max_price_per_hour is not None:
                offers = [o for o in offers if o.price_per_hour <= spec.max_price_per_hour]
            if not offers:
                raise CapacityError(f"vastai: no rentable {spec.gpu} {'bid ' if self.interruptible else ''}offer"
                                    + (f" at or under {spec.max_price_per_hour}/h"
                                       if spec.max_price_per_hour is not None else "")
                                    + (f" with a minimum bid at or under {self.max_bid:g}/h"
                                       if self.max_bid is not None else ""),
                                    provider=self.name, hint="raise max_price_per_hour (or max_bid) or pick another GPU")
            offer_id = offers[0].offer_id
            if self.interruptible:
                bid = offers[0].price_per_hour
        body = {"client_id": "me", "image": spec.image or self.image, "disk": spec.disk_gb,
                "label": spec.label, "runtype": "ssh_direct", "env": dict(spec.env),
                # refuse at once when the offer is gone, rather than queue for the machine
                "cancel_unavail": True}
        if spec.onstart:
            body["onstart"] = spec.onstart
        if bid is not None:
            # the bid in $/h: the instance is interruptible, billed at this price
            body["price"] = round(float(bid), 6)
        # Never retried: a create whose reply was lost may still have rented the machine.
        resp = self.api.request("PUT", f"/api/v0/asks/{offer_id}/", json=body, idempotent=False,
                                accept_statuses=(400, 404, 410))
        reply: Any = None
        try:
            reply = resp.json()
        except ValueError:
            pass
        refused = resp.status_code >= 300 or (isinstance(reply, dict) and reply.get("success") is False)
        if refused and is_offer_gone(resp.status_code, reply):
            raise CapacityError(redact(f"vastai: offer {offer_id} is gone (rented since the search): "
                                       f"{error_detail(resp)}"), provider=self.name,
                                status=resp.status_code, hint="another offer can be tried")
        if refused and bid is not None and isinstance(reply, dict) \
                and "bid" in f"{reply.get('error') or ''} {reply.get('msg') or ''}".lower():
            # the minimum bid rose past ours since the search: like an offer gone, try another
            raise CapacityError(redact(f"vastai: bid {bid:g}/h on offer {offer_id} refused: {error_detail(resp)}"),
                                provider=self.name, status=resp.status_code,
                                hint="another offer can be tried, or raise max_bid")
        if resp.status_code >= 300:
            raise self.api.error_for(resp, "PUT", f"/api/v0/asks/{offer_id}/", None)
        reply = self._checked(json_body(resp, self.name), f"create from offer {offer_id}")
        new_id = reply.get("new_contract")
        if new_id in (None, "", -1):
            raise ProviderError(f"vastai: create reply has no new_contract: {str(reply)[:120]}",
                                provider=self.name)
        log.info("vastai: created instance %s (%s)", new_id, spec.label)
        if spec.ssh_public_key:
            # If this raises, the caller's cleanup finds the instance by label and destroys it.
            self.attach_ssh_key(str(new_id), spec.ssh_public_key)
        return str(new_id)

    def attach_ssh_key(self, instance_id: str, public_key: str) -> None:
        """Attach the run's public key to the instance (attaching it twice is harmless)."""
        resp = self.api.request("POST", f"/api/v0/instances/{instance_id}/ssh/",
                                json={"ssh_key": public_key.strip()}, idempotent=True,
                                instance_id=instance_id)
        self._checked(json_body(resp, self.name), f"attach the run's SSH key to {instance_id}", instance_id)

    def _set_state(self, instance_id: str, state: str) -> None:
        resp = self.api.request("PUT", f"/api/v0/instances/{instance_id}/", json={"state": state},
                                idempotent=True, instance_id=instance_id, accept_statuses=(404,),
                                release=state == "stopped")
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
                                instance_id=instance_id, accept_statuses=(404,), release=True)
        if resp.status_code == 404:
            return
        try:
            self._checked(json_body(resp, self.name), f"destroy {instance_id}", instance_id)
        except InstanceNotFound:
            return

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
