"""RunPod GraphQL client against a real local HTTP server answering documented shapes."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from orchestrator.errors import CapacityError, InstanceNotFound, ProviderError
from orchestrator.providers._http import RetryPolicy
from orchestrator.providers.base import Endpoint, InstanceSpec, InstanceState
from orchestrator.providers.runpod import RunPodProvider
from orchestrator.testing.canned_http import CannedAPI
from orchestrator.testing.hosts import make_host

KEY = "rp-secret-key-abcdef0123"
PORTS = [
    {"ip": "100.65.1.2", "isIpPublic": False, "privatePort": 22, "publicPort": 22, "type": "tcp"},
    {"ip": "194.68.245.3", "isIpPublic": True, "privatePort": 8888, "publicPort": 22101, "type": "http"},
    {"ip": " 194.68.245.3 ", "isIpPublic": True, "privatePort": 22, "publicPort": 22102, "type": "tcp"},
]
POD = {"id": "abc123xyz", "name": "orch-r1-j1", "desiredStatus": "RUNNING", "costPerHr": 0.34,
       "gpuCount": 1, "imageName": "runpod/pytorch", "machine": {"gpuDisplayName": "RTX 4090"},
       "runtime": {"uptimeInSeconds": 12, "ports": PORTS}}


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TEST_RP_KEY", KEY)
    with CannedAPI() as srv:
        yield srv


def client(srv: CannedAPI, **extra) -> RunPodProvider:
    return RunPodProvider(make_host("runpod", **{"api_base": srv.url, "api_key_env": "TEST_RP_KEY", **extra}))


def by_op(replies: dict[str, object]):
    """Answer by the first field of the GraphQL operation (as the real endpoint is one URL)."""
    import re

    def answer(req):
        op = re.search(r"\{\s*(\w+)", req.body["query"]).group(1)
        return replies[op]
    return answer


@pytest.mark.parametrize("fields, state, endpoint", [
    ({}, InstanceState.RUNNING, Endpoint("194.68.245.3", 22102)),
    ({"runtime": None}, InstanceState.BOOTING, None),                    # desiredStatus is intent
    ({"runtime": {"uptimeInSeconds": 0, "ports": None}}, InstanceState.RUNNING, None),
    ({"runtime": {"ports": [PORTS[0], PORTS[1]]}}, InstanceState.ERROR, None),   # 22 only private
    ({"desiredStatus": "EXITED", "runtime": None}, InstanceState.STOPPED, None),
    ({"desiredStatus": "TERMINATED", "runtime": None}, InstanceState.TERMINATED, None),
    ({"desiredStatus": "CREATED", "runtime": None}, InstanceState.PENDING, None),
    ({"desiredStatus": "SOMETHING_NEW"}, InstanceState.UNKNOWN, None),
])
def test_describe_state_and_endpoint(api, fields, state, endpoint):
    api.set("POST", "/graphql", (200, {"data": {"pod": {**POD, **fields}}}))
    info = client(api).describe("abc123xyz")
    assert (info.state, info.endpoint) == (state, endpoint)
    assert info.price_per_hour == 0.34 and info.gpu == "RTX 4090"
    req = api.requests[0]
    assert req.body["variables"] == {"input": {"podId": "abc123xyz"}}
    assert req.headers["authorization"] == f"Bearer {KEY}" and "api_key" not in req.query


def test_null_price_and_missing_machine(api):
    api.set("POST", "/graphql", (200, {"data": {"pod": {"id": "p1", "desiredStatus": "RUNNING",
                                                        "costPerHr": None, "runtime": None}}}))
    info = client(api).describe("p1")
    assert (info.price_per_hour, info.gpu, info.label, info.state) == (None, "", "", InstanceState.BOOTING)


def test_unknown_pod(api):
    api.set("POST", "/graphql", (200, {"data": {"pod": None}}))
    with pytest.raises(InstanceNotFound):
        client(api).describe("gone")


def test_graphql_errors_with_http_200(api):
    api.set("POST", "/graphql", (200, {"errors": [{"message": "There are no longer any instances available "
                                                               "with the requested specifications."}],
                                       "data": {"podFindAndDeployOnDemand": None}}))
    with pytest.raises(CapacityError):
        client(api).create(InstanceSpec(label="orch-a-b", gpu="RTX 4090", offer_id="NVIDIA GeForce RTX 4090"))
    assert len(api.requests) == 1   # a create is never retried
    api.set("POST", "/graphql", (200, {"errors": [{"message": "Something else went wrong"}], "data": None}))
    fast = RetryPolicy(deadline_s=0.5, attempt_timeout_s=0.5, backoff_s=0.01, max_backoff_s=0.02,
                       release_deadline_s=0.5, release_max_backoff_s=0.05)
    with pytest.raises(ProviderError, match="Something else") as exc:
        RunPodProvider(make_host("runpod", **{"api_base": api.url, "api_key_env": "TEST_RP_KEY"}), policy=fast).stop("abc")
    assert not isinstance(exc.value, CapacityError)
    assert len(api.requests) > 2   # an unexplained error on an idempotent call is retried first


def test_offers_use_uninterruptable_price_and_handle_nulls(api):
    api.set("POST", "/graphql", (200, {"data": {"gpuTypes": [
        {"id": "NVIDIA GeForce RTX 4090", "displayName": "RTX 4090", "securePrice": 0.69,
         "communityPrice": 0.34, "lowestPrice": {"minimumBidPrice": 0.2, "uninterruptablePrice": 0.39,
                                                 "stockStatus": "High"}},
        {"id": "NVIDIA RTX 4090 Ti", "displayName": "RTX 4090 Ti", "securePrice": None, "communityPrice": None,
         "lowestPrice": None},
        {"id": "NVIDIA H100 80GB HBM3", "displayName": "H100 SXM", "securePrice": None, "communityPrice": None,
         "lowestPrice": {"minimumBidPrice": None, "uninterruptablePrice": None, "stockStatus": None}}]}}))
    offers = client(api).offers("RTX 4090")
    assert [(o.offer_id, o.price_per_hour, o.available) for o in offers] == [("NVIDIA GeForce RTX 4090", 0.39, True)]
    h100 = client(api).offers("H100 SXM")
    assert len(h100) == 1 and h100[0].available is False


def test_create_sends_label_and_ssh_port(api):
    api.set("POST", "/graphql", by_op({"podFindAndDeployOnDemand": (200, {"data": {"podFindAndDeployOnDemand":
                                       {"id": "newpod1", "desiredStatus": "RUNNING", "costPerHr": 0.39}}})}))
    iid = client(api).create(InstanceSpec(label="orch-run9-j2", gpu="RTX 4090", offer_id="NVIDIA GeForce RTX 4090",
                                          ssh_public_key="ssh-ed25519 AAAA test", env={"A": "1"}))
    assert iid == "newpod1"
    inp = api.requests[0].body["variables"]["input"]
    assert inp["name"] == "orch-run9-j2" and inp["gpuTypeId"] == "NVIDIA GeForce RTX 4090"
    assert "22/tcp" in inp["ports"]
    assert {"key": "PUBLIC_KEY", "value": "ssh-ed25519 AAAA test"} in inp["env"]


def test_terminate_selects_no_fields_and_unknown_is_gone(api):
    api.set("POST", "/graphql", (200, {"data": {"podTerminate": None}}))
    client(api).destroy("p1")
    q = api.requests[0].body["query"]
    assert "podTerminate(input: $input) }" in q
    api.set("POST", "/graphql", (200, {"errors": [{"message": "pod not found"}], "data": None}))
    client(api).destroy("p2")   # already gone: no error


def test_list_filters_by_name_prefix(api):
    pods = [POD, {**POD, "id": "x2", "name": "my-notebook"}, {**POD, "id": "x3", "name": None},
            {**POD, "id": "x4", "name": "orch-r2-j1", "desiredStatus": "EXITED", "runtime": None}]
    api.set("POST", "/graphql", (200, {"data": {"myself": {"pods": pods}}}))
    found = client(api).list("orch-")
    assert [(i.instance_id, i.state) for i in found] == [("abc123xyz", InstanceState.RUNNING),
                                                        ("x4", InstanceState.STOPPED)]


def test_http_401_names_the_key_problem_without_the_key(api):
    api.set("POST", "/graphql", (401, {"error": f"invalid key {KEY}"}))
    with pytest.raises(ProviderError) as exc:
        client(api).list("orch-")
    assert exc.value.status == 401 and KEY not in str(exc.value)


def test_self_stop_command_uses_pod_key(api):
    cmd = client(api).self_stop_command("abc123xyz")
    assert "$RUNPOD_API_KEY" in cmd and KEY not in cmd
    assert json.loads(sent_body(cmd))["query"] == 'mutation { podStop(input: {podId: "abc123xyz"}) { id desiredStatus } }'


def test_boot_guard_reads_the_pod_id_and_hands_over_to_the_image_start(api):
    guard = client(api).boot_guard(root="~/orchestrate", idle_timeout_s=60)
    assert KEY not in guard and guard.startswith("bash -c ")
    assert "exec /start.sh" in guard and guard.rstrip("'").endswith("exec sleep infinity")
    assert "$RUNPOD_POD_ID" in guard                  # run on the pod: tests/test_fakecloud.py


def sent_body(cmd: str) -> str:
    """The -d argument `cmd` would POST, as bash expands it (curl replaced by a printer)."""
    shim = 'curl() { while [ $# -gt 0 ]; do if [ "$1" = -d ]; then printf %s "$2"; return; fi; shift; done; }; '
    out = subprocess.run(["bash", "-c", shim + cmd], capture_output=True, text=True, timeout=10,
                         env={"PATH": os.environ["PATH"]})
    assert out.returncode == 0, out.stderr
    return out.stdout
