"""RunPod: a thin client of its GraphQL API (https://api.runpod.io/graphql, bearer key).

Facts this client is built on (runpod-python and the API docs; reference provider-apis.md):
- Errors arrive with HTTP 200 in `errors[]` and `data.<field>` null ("no capacity" is one of
  them); only 401 is an HTTP status.
- `desiredStatus` is intent, not observation: RUNNING with a null `runtime` is still booting.
  `EXITED` is stopped, with the volume still billed.
- SSH: the `runtime.ports[]` entry with privatePort 22, type tcp, isIpPublic → ip:publicPort.
  `runtime` and `runtime.ports` may be null; mappings change on every resume.
- `podTerminate` returns a scalar (select no fields). Price fields may be null.
- An error in `errors[]` may be transient (an internal error): idempotent queries and
  mutations (read, stop, resume, terminate) are retried like a 5xx; a create never is (a pod
  it made is found by its name instead).
- A pod whose port 22 is mapped but not public (`isIpPublic: false`) cannot be reached: an
  error naming the cause, not a pod that looks up with no endpoint.
- `gpuTypes`: a type with prices but no `lowestPrice.stockStatus` is on sale at its price;
  the placed pod's price is `adjustedCostPerHr` (after discounts), else `costPerHr`.
- Interruptible (spot) pods: `gpuTypes.lowestPrice.minimumBidPrice` is the lowest bid per GPU;
  `podRentInterruptable(input: {bidPerGpu, gpuCount, gpuTypeId, ...})` rents a pod at that bid
  (runpod-python `create_pod` for a spot pod); the bid is what bills. A spot pod that is outbid
  is stopped by RunPod (`EXITED`, the volume kept and billed).
Billing (reference provider-apis.md): per second; volume $0.20/GB-month while stopped.
"""
from __future__ import annotations

import logging
import shlex
from typing import TYPE_CHECKING, Any

from ..errors import CapacityError, InstanceNotFound, ProviderError
from ..secrets import redact
from ._bid import choose_bid
from ._bootguard import boot_guard_script
from ._http import ApiClient, RetryPolicy, api_key_for, json_body, num, release_policy
from .base import BillingRules, Endpoint, InstanceInfo, InstanceSpec, InstanceState, Offer, Provider

if TYPE_CHECKING:
    from ..config import HostConfig

log = logging.getLogger(__name__)

DEFAULT_API_BASE = "https://api.runpod.io"
DEFAULT_IMAGE = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"
VOLUME_STOPPED_USD_PER_GB_MONTH = 0.20
HOURS_PER_MONTH = 730.0

POD_FIELDS = ("id name desiredStatus costPerHr adjustedCostPerHr gpuCount imageName machine { gpuDisplayName } "
              "runtime { uptimeInSeconds ports { ip isIpPublic privatePort publicPort type } }")
# %-formatting: GraphQL braces would all need doubling in a format string
Q_POD = "query Pod($input: PodFilter) { pod(input: $input) { %s } }" % POD_FIELDS  # noqa: UP031
Q_PODS = "query Pods { myself { pods { %s } } }" % POD_FIELDS  # noqa: UP031
# {gpus}: the pod's GPU count (stock is asked for that many); the prices are per GPU
Q_GPUS = ("query GpuTypes { gpuTypes { id displayName memoryInGb securePrice communityPrice "
          "lowestPrice(input: {gpuCount: %d}) { minimumBidPrice uninterruptablePrice stockStatus } } }")
M_CREATE = ("mutation Create($input: PodFindAndDeployOnDemandInput) { "
            "podFindAndDeployOnDemand(input: $input) { id desiredStatus costPerHr adjustedCostPerHr } }")
M_CREATE_SPOT = ("mutation Rent($input: PodRentInterruptableInput!) { "
                 "podRentInterruptable(input: $input) { id desiredStatus costPerHr adjustedCostPerHr } }")
M_STOP = "mutation Stop($input: PodStopInput!) { podStop(input: $input) { id desiredStatus } }"
M_RESUME = "mutation Resume($input: PodResumeInput!) { podResume(input: $input) { id desiredStatus } }"
M_TERMINATE = "mutation Terminate($input: PodTerminateInput!) { podTerminate(input: $input) }"

CAPACITY_WORDS = ("no longer any instances available", "not enough", "no capacity",
                  "not available", "out of stock")
# GraphQL error codes (`extensions.code`) that no retry can fix.
FINAL_CODES = ("GRAPHQL_PARSE_FAILED", "GRAPHQL_VALIDATION_FAILED", "BAD_USER_INPUT",
               "UNAUTHENTICATED", "FORBIDDEN")


def error_message(errors: Any) -> str:
    first = errors[0] if isinstance(errors, list) and errors else errors
    return str(first.get("message") if isinstance(first, dict) else first)


def transient_errors(errors: Any) -> bool:
    """Whether a reply's errors[] may go away on a retry (an internal error, a timeout), as
    opposed to a final answer: not found, no capacity, a bad query, a bad key."""
    if not errors:
        return False
    low = error_message(errors).lower()
    if "not found" in low or "does not exist" in low or any(w in low for w in CAPACITY_WORDS):
        return False
    items = errors if isinstance(errors, list) else [errors]
    codes = {str((e.get("extensions") or {}).get("code") or "") for e in items
             if isinstance(e, dict) and isinstance(e.get("extensions"), dict)}
    return not (codes & set(FINAL_CODES))


def _reply_has_transient_errors(resp: Any) -> bool:
    try:
        body = resp.json()
    except ValueError:
        return False
    return isinstance(body, dict) and transient_errors(body.get("errors"))


def private_ssh_only(runtime: Any) -> bool:
    """Port 22 is mapped, but only on a private address: nobody outside can reach it."""
    if not isinstance(runtime, dict) or not isinstance(runtime.get("ports"), list):
        return False
    ssh = [p for p in runtime["ports"] if isinstance(p, dict) and p.get("privatePort") == 22
           and str(p.get("type", "")).lower() == "tcp"]
    return bool(ssh) and not any(p.get("isIpPublic") is True for p in ssh)


def ssh_endpoint(runtime: Any, user: str = "root") -> Endpoint | None:
    if not isinstance(runtime, dict) or not isinstance(runtime.get("ports"), list):
        return None
    for p in runtime["ports"]:
        if not isinstance(p, dict):
            continue
        if (p.get("privatePort") == 22 and str(p.get("type", "")).lower() == "tcp"
                and p.get("isIpPublic") is True):
            ip = (p.get("ip") or "").strip() if isinstance(p.get("ip"), str) else ""
            port = num(p.get("publicPort"))
            if ip and port and 0 < port < 65536:
                return Endpoint(ip, int(port), user)
    return None


def parse_pod(d: dict[str, Any], user: str = "root") -> InstanceInfo:
    desired = str(d.get("desiredStatus") or "").upper()
    runtime = d.get("runtime")
    endpoint = None
    if desired == "RUNNING":
        if isinstance(runtime, dict):
            state = InstanceState.RUNNING
            endpoint = ssh_endpoint(runtime, user)
            if endpoint is None and private_ssh_only(runtime):
                state = InstanceState.ERROR
        else:
            state = InstanceState.BOOTING
    elif desired == "EXITED":
        state = InstanceState.STOPPED
    elif desired == "TERMINATED":
        state = InstanceState.TERMINATED
    elif desired == "CREATED":
        state = InstanceState.PENDING
    elif desired == "DEAD":
        state = InstanceState.ERROR
    else:
        state = InstanceState.UNKNOWN
    machine = d.get("machine")
    machine = machine if isinstance(machine, dict) else {}
    raw = desired + ("" if runtime else " (no runtime)")
    if state == InstanceState.ERROR and desired == "RUNNING":
        raw = ("RUNNING but its SSH port 22 is not public (isIpPublic: false): it cannot be reached; "
               "rent a pod with a public IP")
    return InstanceInfo(instance_id=str(d.get("id")), state=state, label=d.get("name") or "",
                        endpoint=endpoint, gpu=machine.get("gpuDisplayName") or "",
                        price_per_hour=pod_price(d), currency="USD", raw_state=raw)


def pod_price(d: dict[str, Any]) -> float | None:
    """What the pod bills per hour: the adjusted price (after discounts) when given."""
    adjusted = num(d.get("adjustedCostPerHr"))
    return adjusted if adjusted else num(d.get("costPerHr"))


def gpu_matches(gpu_type: dict[str, Any], wanted: str) -> bool:
    w = wanted.strip().lower()
    names = [str(gpu_type.get(k) or "").strip().lower() for k in ("id", "displayName")]
    return any(n == w or n.endswith(" " + w) for n in names if n)


def parse_gpu_offer(g: dict[str, Any], gpus: int = 1, *, bid: bool = False, max_bid: float | None = None) -> Offer:
    """A GPU type as an offer of a pod with `gpus` of them: RunPod prices a type per GPU, so
    the offer's price (like every offer's) is for the whole pod. With `bid`, an interruptible one
    priced at the bid we would place on it (RunPod bids per GPU; `max_bid` is the whole pod's),
    unavailable when its minimum bid is unknown or above `max_bid`."""
    lowest: dict[str, Any] = g["lowestPrice"] if isinstance(g.get("lowestPrice"), dict) else {}
    per_gpu = (num(lowest.get("uninterruptablePrice")) or num(g.get("communityPrice"))
               or num(g.get("securePrice")))
    min_bid = num(lowest.get("minimumBidPrice"))
    if bid:
        per_gpu = choose_bid(min_bid, max_bid / gpus if max_bid is not None else None)
    price = per_gpu * gpus if per_gpu is not None else None
    # No stockStatus at all (not reported for this type): on sale at its on-demand price.
    # A stockStatus that is present but null/empty: none in stock.
    in_stock = bool(lowest.get("stockStatus")) if "stockStatus" in lowest else True
    return Offer(provider="runpod", gpu=str(g.get("displayName") or g.get("id") or ""),
                 price_per_hour=price if price is not None else float("nan"), currency="USD",
                 available=price is not None and in_stock, offer_id=str(g.get("id") or ""), gpu_count=gpus,
                 interruptible=bid, min_bid=min_bid)


class RunPodProvider(Provider):
    name = "runpod"
    transport_kind = "ssh"
    interruptible_offers = True

    def __init__(self, host: HostConfig, *, policy: RetryPolicy | None = None) -> None:
        key = api_key_for(host, "RunPod", "RUNPOD_API_KEY")
        self.api_base = str(host.api_base or DEFAULT_API_BASE).rstrip("/")
        self.api = ApiClient(self.name, self.api_base, headers={"Authorization": f"Bearer {key}"},
                             policy=release_policy(host, policy))
        self.image = str(host.image or DEFAULT_IMAGE)
        self.disk_gb = float(host.disk_gb or 20.0)
        self.max_price_per_hour = host.max_price_per_hour
        self.gpus = int(host.gpus_per_instance or 1)
        self.interruptible = bool(host.interruptible)
        self.max_bid = host.max_bid if self.interruptible else None
        self.user = str(host.user or "root")
        self.billing = BillingRules(
            granularity_s=1.0,
            storage_price_per_hour=self.disk_gb * VOLUME_STOPPED_USD_PER_GB_MONTH / HOURS_PER_MONTH)

    def _gql(self, query: str, variables: dict[str, Any] | None, field: str, *,
             idempotent: bool, instance_id: str | None = None, release: bool = False) -> Any:
        """One GraphQL call; returns data[field]. errors[] with HTTP 200 become ProviderError,
        after retries when the call is idempotent and the error may be transient."""
        resp = self.api.request("POST", "/graphql", json={"query": query, "variables": variables or {}},
                                idempotent=idempotent, instance_id=instance_id, release=release,
                                retry_reply=_reply_has_transient_errors if idempotent else None)
        body = json_body(resp, self.name)
        if not isinstance(body, dict):
            raise ProviderError(f"runpod: unexpected reply {str(body)[:120]}", provider=self.name)
        errors = body.get("errors")
        if errors:
            msg = error_message(errors)
            low = msg.lower()
            if "not found" in low or "does not exist" in low:
                raise InstanceNotFound(redact(f"runpod: {field}: {msg}"), provider=self.name,
                                       instance_id=instance_id)
            cls = CapacityError if any(w in low for w in CAPACITY_WORDS) else ProviderError
            raise cls(redact(f"runpod: {field}: {msg}"), provider=self.name, instance_id=instance_id)
        data = body.get("data")
        return data.get(field) if isinstance(data, dict) else None

    def offers(self, gpu: str) -> list[Offer]:
        types = self._gql(Q_GPUS % self.gpus, None, "gpuTypes", idempotent=True) or []
        found = [parse_gpu_offer(g, self.gpus, bid=self.interruptible, max_bid=self.max_bid)
                 for g in types if isinstance(g, dict) and gpu_matches(g, gpu)]
        if self.max_price_per_hour is not None:
            found = [o for o in found if o.available and o.price_per_hour <= float(self.max_price_per_hour)]
        return sorted(found, key=lambda o: (not o.available, o.price_per_hour if o.available else 0.0))

    def create(self, spec: InstanceSpec) -> str:
        # a host that is not interruptible never bids, whatever the spec says
        gpu_type_id, bid = spec.offer_id, (spec.bid_per_hour if self.interruptible else None)
        if gpu_type_id is None or (self.interruptible and bid is None):
            avail = [o for o in self.offers(spec.gpu) if o.available
                     and (spec.offer_id is None or o.offer_id == spec.offer_id)]
            if spec.max_price_per_hour is not None:
                avail = [o for o in avail if o.price_per_hour <= spec.max_price_per_hour]
            if not avail:
                raise CapacityError(f"runpod: no {spec.gpu} available"
                                    + (f" with a minimum bid at or under {self.max_bid:g}/h"
                                       if self.max_bid is not None else ""), provider=self.name,
                                    hint="raise max_price_per_hour (or max_bid) or pick another GPU")
            gpu_type_id = avail[0].offer_id
            if self.interruptible:
                bid = avail[0].price_per_hour
        env = [{"key": k, "value": v} for k, v in spec.env.items()]
        if spec.ssh_public_key:
            env.append({"key": "PUBLIC_KEY", "value": spec.ssh_public_key})
        inp = {"cloudType": "ALL", "gpuCount": self.gpus, "gpuTypeId": gpu_type_id, "name": spec.label,
               "imageName": spec.image or self.image, "containerDiskInGb": 10,
               "volumeInGb": int(round(spec.disk_gb)), "volumeMountPath": "/workspace",
               "ports": "22/tcp", "supportPublicIp": True, "startSsh": True, "env": env}
        if spec.onstart:
            inp["dockerArgs"] = spec.onstart
        if bid is not None:    # the offer's price is the pod's bid; RunPod takes it per GPU
            inp["bidPerGpu"] = round(float(bid) / self.gpus, 6)
        # Never retried: the pod may exist even when the reply was lost.
        if bid is not None:
            pod = self._gql(M_CREATE_SPOT, {"input": inp}, "podRentInterruptable", idempotent=False)
        else:
            pod = self._gql(M_CREATE, {"input": inp}, "podFindAndDeployOnDemand", idempotent=False)
        if not isinstance(pod, dict) or not pod.get("id"):
            raise CapacityError(f"runpod: no pod was created for {spec.gpu} (empty reply)",
                                provider=self.name)
        log.info("runpod: created pod %s (%s)", pod["id"], spec.label)
        cap = spec.max_price_per_hour if spec.max_price_per_hour is not None else self.max_price_per_hour
        placed = pod_price(pod)
        if cap is not None and placed is not None and placed > float(cap) + 1e-9:
            # The pod landed above the ceiling (the offer list is a guide, not a quote): give it
            # back now; a terminate that fails here leaves the pod to the caller's label cleanup.
            self.destroy(str(pod["id"]))
            raise CapacityError(f"runpod: pod {pod['id']} was placed at {placed:g} USD/h, above "
                                f"max_price_per_hour {float(cap):g}; it was terminated at once",
                                provider=self.name, instance_id=str(pod["id"]),
                                hint="raise max_price_per_hour or pick another GPU")
        return str(pod["id"])

    def start(self, instance_id: str) -> None:
        self._gql(M_RESUME, {"input": {"podId": instance_id, "gpuCount": self.gpus}}, "podResume",
                  idempotent=True, instance_id=instance_id)

    def stop(self, instance_id: str) -> None:
        """Stop; a pod RunPod no longer knows raises InstanceNotFound (as describe does)."""
        pod = self._gql(M_STOP, {"input": {"podId": instance_id}}, "podStop", idempotent=True,
                        instance_id=instance_id, release=True)
        if pod is None:
            raise InstanceNotFound(f"runpod: no pod {instance_id} to stop", provider=self.name,
                                   instance_id=instance_id)

    def destroy(self, instance_id: str) -> None:
        """Terminate; a pod RunPod no longer knows counts as terminated."""
        try:
            self._gql(M_TERMINATE, {"input": {"podId": instance_id}}, "podTerminate",
                      idempotent=True, instance_id=instance_id, release=True)
        except InstanceNotFound:
            return

    def describe(self, instance_id: str) -> InstanceInfo:
        pod = self._gql(Q_POD, {"input": {"podId": instance_id}}, "pod", idempotent=True,
                        instance_id=instance_id)
        if not isinstance(pod, dict):
            raise InstanceNotFound(f"runpod: no pod {instance_id}", provider=self.name,
                                   instance_id=instance_id)
        return parse_pod(pod, self.user)

    def list(self, label_prefix: str) -> list[InstanceInfo]:
        me = self._gql(Q_PODS, None, "myself", idempotent=True)
        pods = me.get("pods") if isinstance(me, dict) else None
        return [parse_pod(p, self.user) for p in pods or []
                if isinstance(p, dict) and str(p.get("name") or "").startswith(label_prefix)]

    def self_stop_command(self, instance_id: str) -> str | None:
        """RunPod puts `$RUNPOD_POD_ID` and a pod-scoped `$RUNPOD_API_KEY` in every pod, so the
        pod can stop itself (podStop) without the user's key."""
        return self._stop_command(shlex.quote(instance_id))

    def boot_guard(self, *, root: str, idle_timeout_s: float) -> str | None:
        """The dead-man's switch for the time before the pipeline's watchdog (see _bootguard).
        RunPod runs `dockerArgs` as the container's start command in place of the image's own,
        so the guard starts detached and then hands over to the image's start script
        (`/start.sh` in RunPod's images: it starts sshd), or keeps the container up without one.
        The pod id is not known before the create: the stop reads `$RUNPOD_POD_ID`."""
        guard = boot_guard_script(self._stop_command('"$RUNPOD_POD_ID"'), root=root,
                                  idle_timeout_s=idle_timeout_s)
        return "bash -c " + shlex.quote(
            f"{guard} if [ -x /start.sh ]; then exec /start.sh; fi; exec sleep infinity")

    def _stop_command(self, pod_id_word: str) -> str:
        """curl podStop for the pod named by the shell word `pod_id_word`, with the pod's key."""
        payload = 'printf \'{"query": "mutation { podStop(input: {podId: \\\\"%s\\\\"}) { id desiredStatus } }"}\' '
        return ("curl -fsS --max-time 30 --retry 3 -X POST "
                "-H \"Authorization: Bearer $RUNPOD_API_KEY\" -H 'Content-Type: application/json' "
                f"-d \"$({payload}{pod_id_word})\" {shlex.quote(self.api_base + '/graphql')}")
