"""The fake cloud's API surface: the providers' paths and reply shapes over `World`.

vast.ai REST under /api/v0 and /api/v1, RunPod GraphQL at /graphql, Lambda Cloud at
/api/v1/instance-types, /api/v1/instances, /api/v1/instance-operations/*. Returns
(status, body); raises LostReply when a create must succeed but its reply be lost.
"""
from __future__ import annotations

import re
from typing import Any

from .fakecloud_state import FakeCloudError, Instance, World


class LostReply(Exception):
    def __init__(self, delay_s: float) -> None:
        super().__init__("reply lost")
        self.delay_s = delay_s


def kind_of(path: str) -> str:
    if path.startswith("/graphql"):
        return "runpod"
    if path.startswith(("/api/v1/instance-types", "/api/v1/instance-operations")) or \
            re.fullmatch(r"/api/v1/instances(/[0-9a-f]+)?", path):
        return "lambda"
    return "vastai"


def error_body(path: str, exc: FakeCloudError) -> tuple[int, Any]:
    kind = kind_of(path)
    if kind == "lambda":
        code = {"not-found": "global/object-does-not-exist",
                "insufficient-capacity": "instance-operations/launch/insufficient-capacity",
                "unauthorized": "global/invalid-api-key"}.get(exc.code, f"global/{exc.code}")
        return exc.status, {"error": {"code": code, "message": str(exc), "suggestion": "see the fake cloud"}}
    if kind == "runpod":
        if exc.status == 401:
            return 401, {"error": "unauthorized"}
        return 200, {"errors": [{"message": str(exc), "path": []}], "data": None}
    if exc.status in (401, 404):
        return exc.status, {"success": False, "error": exc.code, "msg": str(exc)}
    return 200, {"success": False, "error": exc.code, "msg": str(exc)}   # vast: 200 is not success


def failure_body(path: str, status: int) -> Any:
    if kind_of(path) == "lambda":
        return {"error": {"code": "global/internal-error", "message": f"injected HTTP {status}"}}
    if status == 429:
        return {"detail": "API requests too frequent"}
    return {"success": False, "error": "server_error", "msg": f"injected HTTP {status}"}


def fake_admin(world: World, method: str, path: str, body: Any) -> tuple[int, Any]:
    if path == "/_fake/bill":
        return 200, world.bill()
    if path == "/_fake/instances":
        with world.lock:
            return 200, {"instances": [vars(i) | {"intervals": list(i.intervals)} for i in world.instances.values()]}
    if path == "/_fake/faults":
        if method == "POST":
            world.set_faults(body or {})
        return 200, vars(world.faults)
    if path == "/_fake/clock" and method == "POST":
        world.advance_clock(float((body or {}).get("advance_s", 0)))
        return 200, {"now": world.now()}
    raise FakeCloudError(f"no fake endpoint {method} {path}", 404, "not-found")


def route(world: World, method: str, path: str, query: dict[str, str], body: Any,
          token: str) -> tuple[int, Any]:
    kind = kind_of(path)
    if kind == "runpod":
        return _runpod(world, body or {}, token)
    scoped = _scoped_instance(world, token)
    if token != world.api_key and scoped is None:
        raise FakeCloudError("invalid API key", 401, "unauthorized")
    if kind == "lambda":
        if scoped is not None:
            raise FakeCloudError("invalid API key", 401, "unauthorized")
        return _lambda(world, method, path, body or {})
    return _vast(world, method, path, query, body or {}, scoped)


def _scoped_instance(world: World, token: str) -> Instance | None:
    if not token.startswith("ck-"):
        return None
    with world.lock:
        return next((i for i in world.instances.values() if i.scoped_key == token), None)


# -- vast.ai ------------------------------------------------------------------------------
def _vast_instance(i: Instance) -> dict[str, Any]:
    # A container that failed to start stays `created` with the daemon's error in status_msg.
    # An outbid interruptible instance: stopped by vast while we still intend it running.
    actual, intended, cur = {"booting": ("loading", "running", "running"),
                             "running": ("running", "running", "running"),
                             "failed": ("created", "running", "running"),
                             "stopped": ("exited", "stopped", "stopped")}[i.status]
    if i.outbid and i.status == "stopped":
        intended = "running"
    msg = {"booting": "Pulling image", "running": "success, running", "failed": i.boot_fail_msg,
           "stopped": ""}[i.status]
    d: dict[str, Any] = {"id": int(i.id), "label": i.label, "gpu_name": i.gpu, "num_gpus": 1,
                         "dph_total": i.price_per_hour, "actual_status": actual,
                         "intended_status": intended, "cur_state": cur, "status_msg": msg, "ports": None,
                         "public_ipaddr": None, "ssh_host": None, "ssh_port": None,
                         "disk_space": 20, "storage_cost": 0.15, "inet_down": -1,
                         "start_date": i.created_at, "is_bid": i.bid is not None}
    if i.status == "running" and i.port:
        if int(i.id) % 2:   # odd ids: direct port mapping (IP with the real API's stray whitespace)
            d["public_ipaddr"] = "127.0.0.1\n"
            d["ports"] = {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(i.port)}]}
        else:               # even ids: only the proxy endpoint
            d["ssh_host"], d["ssh_port"] = "127.0.0.1", i.port
    return d


def _vast(world: World, method: str, path: str, query: dict[str, str], body: dict[str, Any],
          scoped: Instance | None) -> tuple[int, Any]:
    m = re.fullmatch(r"/api/v0/instances/(\d+)/?", path)
    if scoped is not None:   # a scoped key may only change its own instance's state
        if not (m and m.group(1) == scoped.id and method == "PUT"):
            raise FakeCloudError("scoped key not allowed here", 401, "unauthorized")
    if path.rstrip("/") == "/api/v0/bundles" and method in ("POST", "GET"):
        with world.lock:
            world.searches = [*world.searches[-19:], dict(body)]
        wanted = ((body.get("gpu_name") or {}).get("eq") or "").lower()
        # every offer carries its current minimum bid (`"type": "bid"` searches rent by it)
        offers = [{"id": int(oid), "ask_contract_id": int(oid), "gpu_name": gpu, "num_gpus": 1,
                   "dph_total": price, "min_bid": world.min_bid("vastai", oid),
                   "rentable": True, "rented": False, "verified": True,
                   "external": False, "geolocation": " Fakeland, FK",
                   "gpu_ram": 24576, "cpu_ram": 65536, "storage_cost": 0.15, "reliability2": 0.99,
                   "inet_up_cost": 0.02, "inet_down_cost": 0.01, **world.offer_extra.get(oid, {})}
                  for oid, gpu, price in world.offers("vastai") if not wanted or gpu.lower() == wanted]
        # the documented query filter on the machine's GPU count (`num_gpus: {"eq": N}`)
        gpus = (body.get("num_gpus") or {}).get("eq") if isinstance(body.get("num_gpus"), dict) else None
        if gpus is not None:
            offers = [o for o in offers if o["num_gpus"] == gpus]
        return 200, {"offers": offers}
    ask = re.fullmatch(r"/api/v0/asks/(\d+)/?", path)
    if ask and method == "PUT":
        if world.find_offer("vastai", ask.group(1)) is None or world.take_offer_lost():
            # rented by someone else since the search (documented as 404/410 no_such_ask)
            return 410, {"success": False, "error": "no_such_ask",
                         "msg": f"Instance type by id {ask.group(1)} is not available."}
        world.pause("create")
        inst = world.create("vastai", ask.group(1), str(body.get("label") or ""),
                            disk_gb=float(body.get("disk") or 20), env=body.get("env") or {},
                            onstart=str(body.get("onstart") or ""),
                            bid=float(body["price"]) if body.get("price") is not None else None)
        _maybe_lose(world)
        return 200, {"success": True, "new_contract": int(inst.id)}
    key = re.fullmatch(r"/api/v0/instances/(\d+)/ssh/?", path)
    if key and method == "POST":
        world.attach_key("vastai", key.group(1), str(body.get("ssh_key") or ""))
        return 200, {"success": True, "msg": "SSH key attached successfully"}
    if m:
        iid = m.group(1)
        if method == "GET":
            got = world.instances.get(iid)
            if got is None or got.provider != "vastai" or got.status == "terminated":
                return 200, {"instances": None}
            return 200, {"instances": _vast_instance(got)}
        if method == "PUT":
            state = body.get("state")
            if state == "stopped":
                world.stop("vastai", iid)
            elif state == "running":
                world.start("vastai", iid)
            else:
                return 200, {"success": False, "error": "invalid_args", "msg": f"bad state {state!r}"}
            return 200, {"success": True}
        if method == "DELETE":
            world.pause("destroy")
            world.destroy("vastai", iid)
            return 200, {"success": True}
    if path.rstrip("/") in ("/api/v1/instances", "/api/v0/instances") and method == "GET":
        with world.lock:
            live = [_vast_instance(i) for i in world.instances.values()
                    if i.provider == "vastai" and i.status != "terminated"]
        if path.startswith("/api/v1"):   # paged: 2 per page exercises the client's paging
            start = int(query.get("after_token") or 0)
            limit = min(int(query.get("limit") or 100), 2)
            page = live[start:start + limit]
            nxt = str(start + limit) if start + limit < len(live) else None
            return 200, {"success": True, "instances": page, "next_token": nxt}
        return 200, {"instances": live}
    raise FakeCloudError(f"no vast endpoint {method} {path}", 404, "not-found")


def _maybe_lose(world: World) -> None:
    delay = world.take_lost_reply()
    if delay is not None:
        raise LostReply(delay)


# -- RunPod -------------------------------------------------------------------------------
def _pod(i: Instance) -> dict[str, Any]:
    desired = {"booting": "RUNNING", "running": "RUNNING", "failed": "RUNNING", "stopped": "EXITED"}[i.status]
    runtime = None
    if i.status == "running":
        ports = None
        if i.port and i.private_ssh:   # 22 mapped on the pod's private address only
            ports = [{"ip": "10.2.0.7", "isIpPublic": False, "privatePort": 22, "publicPort": 22, "type": "tcp"}]
        elif i.port:
            ports = [{"ip": "10.2.0.7", "isIpPublic": False, "privatePort": 22, "publicPort": 22, "type": "tcp"},
                     {"ip": "127.0.0.1", "isIpPublic": True, "privatePort": 8888, "publicPort": 1, "type": "http"},
                     {"ip": " 127.0.0.1 ", "isIpPublic": True, "privatePort": 22, "publicPort": i.port, "type": "tcp"}]
        runtime = {"uptimeInSeconds": 1, "ports": ports}
    return {"id": i.id, "name": i.label, "desiredStatus": desired, "costPerHr": i.price_per_hour,
            "adjustedCostPerHr": i.price_per_hour, "gpuCount": 1, "imageName": "fake",
            "machine": {"gpuDisplayName": i.gpu}, "runtime": runtime}


def _runpod(world: World, body: dict[str, Any], token: str) -> tuple[int, Any]:
    q = str(body.get("query") or "")
    var = body.get("variables") or {}
    inp = var.get("input")
    inp = inp if isinstance(inp, dict) else {}
    lit = re.search(r'podId:\s*"([^"]+)"', q)
    pod_id = inp.get("podId") or (lit.group(1) if lit else None)
    op = re.search(r"\{\s*(\w+)", q)
    field = op.group(1) if op else ""
    scoped = _scoped_instance(world, token)
    if token != world.api_key and not (scoped and field == "podStop" and pod_id == scoped.id):
        raise FakeCloudError("unauthorized", 401, "unauthorized")
    if world.take_gql_error():   # a transient internal error, reported the GraphQL way
        return 200, {"errors": [{"message": "Something went wrong. Please try again later or contact support.",
                                 "path": [field], "extensions": {"code": "INTERNAL_SERVER_ERROR"}}],
                     "data": {field: None}}
    if field == "gpuTypes":
        return 200, {"data": {"gpuTypes": [
            {"id": gid, "displayName": name, "memoryInGb": 80, "securePrice": None,
             "communityPrice": price,
             "lowestPrice": {"minimumBidPrice": world.min_bid("runpod", gid), "uninterruptablePrice": price,
                             "stockStatus": "High"}}
            for gid, name, price in world.offers("runpod")]}}
    if field in ("podFindAndDeployOnDemand", "podRentInterruptable"):
        if world.find_offer("runpod", str(inp.get("gpuTypeId"))) is None or world.take_offer_lost():
            return 200, {"errors": [{"message": "There are no longer any instances available with the "
                                                "requested specifications. Please refresh and try again."}],
                         "data": {field: None}}
        env = {e["key"]: e["value"] for e in inp.get("env") or [] if isinstance(e, dict)}
        keys = [env.pop("PUBLIC_KEY")] if "PUBLIC_KEY" in env else []
        world.pause("create")
        # a spot pod (podRentInterruptable) is rented at its bid per GPU, refused below the minimum
        bid = float(inp["bidPerGpu"]) if field == "podRentInterruptable" and inp.get("bidPerGpu") is not None \
            else None
        if field == "podRentInterruptable" and bid is None:
            raise FakeCloudError("bidPerGpu is required", 400, "invalid")
        inst = world.create("runpod", str(inp["gpuTypeId"]), str(inp.get("name") or ""),
                            disk_gb=float(inp.get("volumeInGb") or 0), env=env, extra_keys=keys,
                            onstart=str(inp.get("dockerArgs") or ""), bid=bid)
        _maybe_lose(world)
        return 200, {"data": {field: {"id": inst.id, "desiredStatus": "RUNNING", "costPerHr": inst.price_per_hour,
                                      "adjustedCostPerHr": inst.price_per_hour}}}
    if field == "myself":
        with world.lock:
            pods = [_pod(i) for i in world.instances.values() if i.provider == "runpod" and i.status != "terminated"]
        return 200, {"data": {"myself": {"pods": pods}}}
    if field == "pod":
        pod = world.instances.get(str(pod_id))
        if pod is None or pod.provider != "runpod" or pod.status == "terminated":
            return 200, {"data": {"pod": None}}
        return 200, {"data": {"pod": _pod(pod)}}
    if field in ("podStop", "podResume", "podTerminate"):
        if field == "podTerminate":
            world.pause("destroy")
        action = {"podStop": world.stop, "podResume": world.start, "podTerminate": world.destroy}[field]
        inst = action("runpod", str(pod_id))
        if field == "podTerminate":
            return 200, {"data": {"podTerminate": None}}
        return 200, {"data": {field: {"id": inst.id, "desiredStatus": _pod(inst)["desiredStatus"]}}}
    return 200, {"errors": [{"message": f"Cannot query field \"{field}\""}], "data": None}


# -- Lambda Cloud ---------------------------------------------------------------------------
def _lambda_type(name: str, gpu: str, price: float) -> dict[str, Any]:
    return {"name": name, "description": f"1x {gpu}", "gpu_description": gpu,
            "price_cents_per_hour": int(round(price * 100)),
            "specs": {"vcpus": 26, "memory_gib": 200, "storage_gib": 1024, "gpus": 1}}


def _lambda_type_old(name: str, gpu: str, price: float) -> dict[str, Any]:
    """The older form of an instance type: the price a string of cents, no specs.gpus."""
    count = int(name.split("_")[1].rstrip("x")) if name.startswith("gpu_") else 1
    return {"name": name, "description": f"{count}x {gpu}", "gpu_description": gpu,
            "price_cents_per_hour": str(round(price * 100)),
            "specs": {"vcpus": 26 * count, "memory_gib": 200 * count, "storage_gib": 1024 * count}}


def _lambda_instance(i: Instance) -> dict[str, Any]:
    status = {"booting": "booting", "running": "active", "failed": "unhealthy",
              "stopped": "terminating"}[i.status]
    d: dict[str, Any] = {"id": i.id, "name": i.label, "status": status, "ssh_key_names": ["orchestrate"],
                         "region": {"name": "us-fake-1", "description": "Fake 1"},
                         "instance_type": _lambda_type(i.offer_id, i.gpu, i.price_per_hour),
                         "is_reserved": False}
    if i.status == "running" and i.port:
        d.update(ip="127.0.0.1", private_ip="10.0.0.2", hostname="fake.lambda", ssh_port=i.port)
    return d


def _lambda(world: World, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    if path == "/api/v1/instance-types" and method == "GET":
        f = world.faults
        types = list(world.offers("lambda"))
        if f.lambda_old_types:   # the 8-GPU sibling of every type, as the older list carried them
            types += [(name.replace("gpu_1x_", "gpu_8x_"), gpu, price * 8) for name, gpu, price in types
                      if name.startswith("gpu_1x_")]
        render = _lambda_type_old if f.lambda_old_types else _lambda_type
        region = [{"name": "us-fake-1", "description": "Fake 1"}]
        return 200, {"data": {name: {"instance_type": render(name, gpu, price),
                                     "regions_with_capacity_available": [] if name in f.lambda_no_capacity else region}
                              for name, gpu, price in types}}
    if path == "/api/v1/instances" and method == "GET":
        with world.lock:
            return 200, {"data": [_lambda_instance(i) for i in world.instances.values()
                                  if i.provider == "lambda" and i.status != "terminated"]}
    m = re.fullmatch(r"/api/v1/instances/([0-9a-f]+)", path)
    if m and method == "GET":
        return 200, {"data": _lambda_instance(world.get("lambda", m.group(1)))}
    if path == "/api/v1/instance-operations/launch" and method == "POST":
        if not body.get("ssh_key_names"):
            raise FakeCloudError("ssh_key_names: exactly one key name is required", 400, "invalid-parameters")
        if world.take_offer_lost() or str(body.get("instance_type_name")) in world.faults.lambda_no_capacity:
            raise FakeCloudError("Not enough capacity to fulfill launch request.", 400, "insufficient-capacity")
        world.pause("create")
        inst = world.create("lambda", str(body.get("instance_type_name")), str(body.get("name") or ""), disk_gb=0)
        _maybe_lose(world)
        return 200, {"data": {"instance_ids": [inst.id]}}
    if path == "/api/v1/instance-operations/terminate" and method == "POST":
        done = [_lambda_instance(world.get("lambda", str(iid))) for iid in body.get("instance_ids") or []]
        world.pause("destroy")
        for d in done:
            world.destroy("lambda", d["id"])
            d["status"] = "terminating"
        return 200, {"data": {"terminated_instances": done}}
    raise FakeCloudError(f"no lambda endpoint {method} {path}", 404, "not-found")
