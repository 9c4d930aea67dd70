"""Issue 16: the provider clients against replies shaped as the providers document them.

Every case goes through the real HTTP client (httpx) to a real loopback server
(`CannedAPI`) answering bodies with the documented field names and realistic values.

Sources (field names and behaviour checked against them):
- vast.ai API reference, https://docs.vast.ai/api-reference : show instance (`actual_status`,
  `intended_status`, `cur_state`, `status_msg`, `disk_space`, `storage_cost`), search offers
  (`dph_total`, `storage_cost`, `inet_up_cost`, `inet_down_cost`, `verified`, `rentable`,
  `rented`, `external`), create instance (`PUT /api/v0/asks/{id}/`, 404/410 `no_such_ask`),
  attach SSH key (`POST /api/v0/instances/{id}/ssh/` with `{"ssh_key": ...}`,
  https://docs.vast.ai/api-reference/instances/attach-ssh-key), rate limits (429).
- vast.ai's official CLI, github.com/vast-ai/vast-cli `vast.py`: `search offers` default query
  (verified, external false, rentable, rented false) and `allocated_storage` from `--storage`;
  `create instance --cancel-unavail`.
- RunPod GraphQL API, https://docs.runpod.io/sdks/graphql/manage-pods and the schema at
  https://graphql-spec.runpod.io/ : `Pod.costPerHr`, `Pod.adjustedCostPerHr`,
  `PodRuntimePorts.isIpPublic`, `LowestPrice.stockStatus`; errors in `errors[]` with HTTP 200
  (GraphQL over HTTP, https://spec.graphql.org/October2021/#sec-Errors), `extensions.code`.
- Lambda Cloud API, https://docs-api.lambda.ai/api/cloud : listInstanceTypes (older form:
  `price_cents_per_hour` as a string, no `specs.gpus`), launchInstance request schema
  (region_name, instance_type_name, ssh_key_names, name), error objects and `field_errors`,
  terminate (`global/object-does-not-exist`).
"""
from __future__ import annotations

import threading
import time

import pytest

from orchestrator.errors import (
    CapacityError,
    ConfigError,
    InstanceNotFound,
    ProviderError,
)
from orchestrator.ledger import Ledger
from orchestrator.providers._http import RetryPolicy
from orchestrator.providers.base import InstanceSpec, InstanceState
from orchestrator.providers.lambdalabs import LambdaProvider
from orchestrator.providers.runpod import RunPodProvider
from orchestrator.providers.vastai import VastProvider
from orchestrator.run.provisioning import provision, release, wait_running
from orchestrator.testing.canned_http import CannedAPI
from orchestrator.testing.hosts import make_host

KEY = "doc-shaped-secret-key-0123456789"
FAST = RetryPolicy(deadline_s=3.0, attempt_timeout_s=1.0, max_attempts=5, backoff_s=0.01, max_backoff_s=0.05,
                   release_deadline_s=10.0, release_max_backoff_s=0.3, jitter_frac=0.25)
OCI_MSG = ("Error response from daemon: failed to create task for container: failed to create shim task: "
           "OCI runtime create failed: runc create failed: unable to start container process: error "
           "during container init: error running hook #0: nvidia-container-cli: initialization error: "
           "nvml error: driver/library version mismatch: unknown")


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DOC_KEY", KEY)
    with CannedAPI() as srv:
        yield srv


def vast(srv: CannedAPI, policy: RetryPolicy = FAST, **extra) -> VastProvider:
    return VastProvider(make_host("vastai", **{"api_base": srv.url, "api_key_env": "DOC_KEY", "gpu": "RTX 4090", **extra}),
                        policy=policy)


def runpod(srv: CannedAPI, policy: RetryPolicy = FAST, **extra) -> RunPodProvider:
    return RunPodProvider(make_host("runpod", **{"api_base": srv.url, "api_key_env": "DOC_KEY", **extra}), policy=policy)


def lam(srv: CannedAPI, policy: RetryPolicy = FAST, **extra) -> LambdaProvider:
    return LambdaProvider(make_host("lambda", **{"api_base": srv.url, "api_key_env": "DOC_KEY", **extra}), policy=policy)


# A `GET /api/v0/instances/{id}/` body (trimmed to the fields that matter, plus noise).
VAST_INSTANCE = {"id": 13507426, "label": "orch-r1-j1", "gpu_name": "RTX 4090", "num_gpus": 1,
                 "dph_total": 0.4117, "dph_base": 0.38, "storage_cost": 0.2, "disk_space": 40.0,
                 "actual_status": "loading", "intended_status": "running", "cur_state": "running",
                 "status_msg": "Pulling image pytorch/pytorch", "next_state": "running",
                 "public_ipaddr": "203.0.113.7\n", "ports": None, "ssh_host": "ssh5.vast.ai",
                 "ssh_port": 27426, "inet_down": 802.4, "inet_up": 712.1, "machine_id": 4102,
                 "image_uuid": "pytorch/pytorch", "start_date": 1764662400.2}


# -- 1. vast.ai: a failure state ends the boot wait ---------------------------------------------
@pytest.mark.parametrize("fields, words", [
    ({"actual_status": "created", "status_msg": OCI_MSG}, "OCI runtime create failed"),
    ({"actual_status": "loading", "status_msg": "Error: image pull failed: manifest unknown"}, "manifest unknown"),
    ({"actual_status": "stopped", "intended_status": "running", "cur_state": "stopped", "status_msg": ""},
     "stopped while it should be running"),
])
def test_vast_boot_failure_reads_as_error_with_the_providers_message(api, fields, words):
    api.set("GET", "/api/v0/instances/13507426/", (200, {"instances": {**VAST_INSTANCE, **fields}}))
    info = vast(api).describe("13507426")
    assert info.state == InstanceState.ERROR
    assert words in info.raw_state


@pytest.mark.parametrize("msg", ["Pulling image pytorch/pytorch",
                                 "Unable to find image 'pytorch/pytorch:2.4.0' locally", None, ""])
def test_vast_loading_with_a_progress_message_is_still_booting(api, msg):
    api.set("GET", "/api/v0/instances/13507426/", (200, {"instances": {**VAST_INSTANCE, "status_msg": msg}}))
    assert vast(api).describe("13507426").state == InstanceState.BOOTING


def test_vast_boot_wait_ends_at_the_first_failed_poll(api):
    failed = {**VAST_INSTANCE, "actual_status": "created", "status_msg": OCI_MSG}
    api.set("GET", "/api/v0/instances/13507426/", [(200, {"instances": VAST_INSTANCE}),
                                                  (200, {"instances": failed})])
    t0 = time.monotonic()
    with pytest.raises(ProviderError, match="failed at boot: failed to start: Error response from daemon"):
        wait_running(vast(api), "13507426", timeout_s=900.0, poll_s=2.0)
    assert time.monotonic() - t0 < 2.0   # not the 15-minute ready timeout
    assert len(api.calls("GET", "/api/v0/instances/13507426/")) == 2


# -- 2. vast.ai: an offer rented between search and create is capacity ---------------------------
@pytest.mark.parametrize("status", [404, 410])
def test_vast_create_no_such_ask_is_capacity_and_not_retried(api, status):
    api.set("PUT", "/api/v0/asks/8675309/", (status, {"success": False, "error": "no_such_ask",
                                                      "msg": "Instance type by id 8675309 is not available."}))
    with pytest.raises(CapacityError, match="not available") as exc:
        vast(api).create(InstanceSpec(label="orch-r1-j1", gpu="RTX 4090", offer_id="8675309"))
    assert exc.value.status == status
    assert len(api.requests) == 1


def test_vast_create_other_client_error_is_not_capacity(api):
    api.set("PUT", "/api/v0/asks/8675309/", (400, {"success": False, "error": "invalid_args",
                                                   "msg": "disk must be a number"}))
    with pytest.raises(ProviderError, match="disk must be a number") as exc:
        vast(api).create(InstanceSpec(label="orch-r1-j1", gpu="RTX 4090", offer_id="8675309"))
    assert not isinstance(exc.value, CapacityError)


# -- 3. vast.ai: the search and create the official CLI sends; per-offer storage and traffic -----
OFFER = {"id": 8675309, "ask_contract_id": 8675309, "machine_id": 4102, "gpu_name": "RTX 4090",
         "num_gpus": 1, "gpu_ram": 24564, "dph_base": 0.38, "dph_total": 0.4117, "storage_cost": 0.2,
         "inet_up_cost": 0.0125, "inet_down_cost": 0.0063, "rentable": True, "rented": False,
         "verified": True, "external": False, "geolocation": "Norway, NO", "reliability2": 0.9961}


def test_vast_search_sends_cli_defaults_and_our_disk(api):
    api.set("POST", "/api/v0/bundles/", (200, {"offers": [
        OFFER, {**OFFER, "id": 2, "dph_total": 0.20, "rented": True},          # taken meanwhile
        {**OFFER, "id": 3, "dph_total": 0.21, "verified": False}]}))
    offers = vast(api, disk_gb=40).offers("RTX 4090")
    q = api.requests[0].body
    assert q["verified"] == {"eq": True} and q["external"] == {"eq": False}
    assert q["rentable"] == {"eq": True} and q["rented"] == {"eq": False}
    assert q["allocated_storage"] == 40.0 and q["num_gpus"] == {"eq": 1}
    by_id = {o.offer_id: o for o in offers}
    assert by_id["8675309"].available and not by_id["2"].available and not by_id["3"].available
    best = by_id["8675309"]
    assert best.storage_price_per_hour == pytest.approx(40 * 0.2 / 730)   # the offer's $/GB-month
    assert (best.upload_price_per_gb, best.download_price_per_gb) == (0.0063, 0.0125)


def test_vast_create_sends_cancel_unavail(api):
    api.set("PUT", "/api/v0/asks/8675309/", (200, {"success": True, "new_contract": 13507426}))
    assert vast(api).create(InstanceSpec(label="orch-r1-j1", gpu="RTX 4090", offer_id="8675309")) == "13507426"
    assert api.requests[0].body["cancel_unavail"] is True


def test_vast_stopped_instance_reports_the_storage_price(api):
    stopped = {**VAST_INSTANCE, "actual_status": "exited", "intended_status": "stopped", "cur_state": "stopped"}
    api.set("GET", "/api/v0/instances/13507426/", (200, {"instances": stopped}))
    info = vast(api).describe("13507426")
    assert info.state == InstanceState.STOPPED
    assert info.price_per_hour == pytest.approx(40.0 * 0.2 / 730)   # not dph_total 0.4117


# -- 4. calls that stop billing ride out a 429 burst, then hand over loudly ----------------------
RATE_429 = (429, {"success": False, "error": "rate_limited", "msg": "API requests too frequent"},
            {"Retry-After": "0.3"})


def test_vast_destroy_rides_out_a_429_burst_honouring_retry_after(api):
    api.set("DELETE", "/api/v0/instances/13507426/", [RATE_429] * 4 + [(200, {"success": True})])
    t0 = time.monotonic()
    vast(api).destroy("13507426")
    elapsed = time.monotonic() - t0
    calls = api.calls("DELETE", "/api/v0/instances/13507426/")
    assert len(calls) == 5   # more than a describe would be allowed (max_attempts=5 spans 4 pauses)
    assert elapsed >= 4 * 0.3 - 0.05   # every pause waited at least what Retry-After asked


def test_billing_stop_outlasts_the_ordinary_attempt_limit(api):
    # 8 refusals: an ordinary idempotent call (max_attempts=5) gives up; destroy does not.
    api.set("DELETE", "/api/v0/instances/13507426/",
            [(429, {"detail": "API requests too frequent"}, {"Retry-After": "0.05"})] * 8 + [(200, {"success": True})])
    vast(api).destroy("13507426")
    assert len(api.calls("DELETE", "/api/v0/instances/13507426/")) == 9


def test_billing_stop_gives_up_at_its_bound_and_release_hands_over_loudly(api, tmp_path):
    api.set("DELETE", "/api/v0/instances/13507426/", (429, {"detail": "API requests too frequent"},
                                                       {"Retry-After": "0.2"}))
    policy = RetryPolicy(backoff_s=0.01, release_deadline_s=1.0, release_max_backoff_s=0.3)
    provider = vast(api, policy=policy)
    t0 = time.monotonic()
    with pytest.raises(ProviderError, match="429") as exc:
        provider.destroy("13507426")
    assert 0.8 <= time.monotonic() - t0 < 2.5
    assert "reconciliation" in (exc.value.hint or "")
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        row = ledger.record_intent(run_id="r1", job_id="j1", host_name="cloud", provider="vastai",
                                   label="orch-r1-j1", gpu="RTX 4090", price_per_hour=0.41, currency="USD")
        ledger.instance_created(row, "13507426")
        assert release(provider, "13507426", row, ledger=ledger, run_id="r1", job_id="j1") is False
        events = [e for e in ledger.events("r1") if e["kind"] == "release_failed"]
        assert len(events) == 1 and "orchestrate down --orphans" in events[0]["message"]
        assert ledger.instance(row).state not in ("destroyed", "failed")   # left open for reconcile
    finally:
        ledger.close()


def test_release_retry_window_is_a_host_setting(api):
    assert vast(api, policy=None, release_retry_s=42).api.policy.release_deadline_s == 42.0
    assert vast(api, policy=None).api.policy.release_deadline_s == 600.0


def test_lambda_terminate_and_runpod_terminate_ride_out_429(api):
    api.set("POST", "/api/v1/instance-operations/terminate",
            [(429, {"error": {"code": "global/too-many-requests", "message": "Too many requests"}},
              {"Retry-After": "0.1"})] * 6 + [(200, {"data": {"terminated_instances": []}})])
    lam(api).destroy("0920582c7ff041399e34823a0be62549")
    assert len(api.calls("POST", "/api/v1/instance-operations/terminate")) == 7
    api.set("POST", "/graphql", [(429, {"errors": [{"message": "rate limited"}]}, {"Retry-After": "0.1"})] * 6
            + [(200, {"data": {"podTerminate": None}})])
    runpod(api).destroy("4qyhmgmpsdbn6x")
    assert len(api.calls("POST", "/graphql")) == 7


# -- 5. RunPod: errors with HTTP 200 are retried on idempotent calls, never on create -------------
GQL_INTERNAL = (200, {"errors": [{"message": "Something went wrong. Please try again later or contact support.",
                                  "locations": [{"line": 1, "column": 59}], "path": ["podTerminate"],
                                  "extensions": {"code": "INTERNAL_SERVER_ERROR"}}],
                      "data": {"podTerminate": None}})


def test_runpod_terminate_retries_an_internal_error(api):
    api.set("POST", "/graphql", [GQL_INTERNAL, GQL_INTERNAL, (200, {"data": {"podTerminate": None}})])
    runpod(api).destroy("4qyhmgmpsdbn6x")
    assert len(api.requests) == 3


def test_runpod_create_is_never_resent_on_an_internal_error(api):
    api.set("POST", "/graphql", [GQL_INTERNAL, (200, {"data": {"podFindAndDeployOnDemand": {"id": "x"}}})])
    with pytest.raises(ProviderError, match="Something went wrong"):
        runpod(api).create(InstanceSpec(label="orch-r1-j1", gpu="RTX 4090", offer_id="NVIDIA GeForce RTX 4090"))
    assert len(api.requests) == 1


def test_runpod_validation_error_is_final(api):
    api.set("POST", "/graphql", (200, {"errors": [{"message": "Cannot query field \"bogus\" on type \"Pod\".",
                                                   "extensions": {"code": "GRAPHQL_VALIDATION_FAILED"}}]}))
    with pytest.raises(ProviderError, match="Cannot query field"):
        runpod(api).describe("4qyhmgmpsdbn6x")
    assert len(api.requests) == 1


# -- 6. RunPod: port 22 mapped but not public is an error naming the cause -------------------------
POD = {"id": "4qyhmgmpsdbn6x", "name": "orch-r1-j1", "desiredStatus": "RUNNING", "costPerHr": 0.69,
       "adjustedCostPerHr": 0.62, "gpuCount": 1, "imageName": "runpod/pytorch:2.4.0",
       "machine": {"gpuDisplayName": "RTX 4090"},
       "runtime": {"uptimeInSeconds": 41, "ports": [
           {"ip": "100.65.13.61", "isIpPublic": False, "privatePort": 22, "publicPort": 22, "type": "tcp"},
           {"ip": "100.65.13.61", "isIpPublic": False, "privatePort": 8888, "publicPort": 60411, "type": "http"}]}}


def test_runpod_private_only_ssh_is_an_error(api):
    api.set("POST", "/graphql", (200, {"data": {"pod": POD}}))
    info = runpod(api).describe("4qyhmgmpsdbn6x")
    assert info.state == InstanceState.ERROR and info.endpoint is None
    assert "isIpPublic" in info.raw_state
    with pytest.raises(ProviderError, match="not public"):
        wait_running(runpod(api), "4qyhmgmpsdbn6x", timeout_s=60.0)


def test_runpod_create_asks_for_a_public_ip(api):
    api.set("POST", "/graphql", (200, {"data": {"podFindAndDeployOnDemand": {
        "id": "4qyhmgmpsdbn6x", "desiredStatus": "RUNNING", "costPerHr": 0.69, "adjustedCostPerHr": 0.69}}}))
    runpod(api).create(InstanceSpec(label="orch-r1-j1", gpu="RTX 4090", offer_id="NVIDIA GeForce RTX 4090"))
    inp = api.requests[0].body["variables"]["input"]
    assert inp["supportPublicIp"] is True and "22/tcp" in inp["ports"]


# -- 7. RunPod: no stockStatus = on sale; the placed price is recorded and checked ---------------
def test_runpod_type_without_stock_status_is_available(api):
    api.set("POST", "/graphql", (200, {"data": {"gpuTypes": [
        {"id": "NVIDIA GeForce RTX 4090", "displayName": "RTX 4090", "memoryInGb": 24,
         "securePrice": 0.69, "communityPrice": 0.34, "lowestPrice": {"minimumBidPrice": 0.2,
                                                                      "uninterruptablePrice": 0.34}},
        {"id": "NVIDIA A40", "displayName": "A40", "memoryInGb": 48, "securePrice": 0.4,
         "communityPrice": None}]}}))
    offers = runpod(api).offers("RTX 4090")
    assert [(o.offer_id, o.price_per_hour, o.available) for o in offers] == [("NVIDIA GeForce RTX 4090", 0.34, True)]
    a40 = runpod(api).offers("A40")
    assert [(o.price_per_hour, o.available) for o in a40] == [(0.4, True)]   # no lowestPrice at all


def test_runpod_describe_reports_the_adjusted_price(api):
    public = {**POD, "runtime": {"uptimeInSeconds": 41, "ports": [
        {"ip": "194.68.245.3", "isIpPublic": True, "privatePort": 22, "publicPort": 22102, "type": "tcp"}]}}
    api.set("POST", "/graphql", (200, {"data": {"pod": public}}))
    info = runpod(api).describe("4qyhmgmpsdbn6x")
    assert info.state == InstanceState.RUNNING and info.price_per_hour == 0.62


def test_runpod_pod_placed_above_the_cap_is_terminated_at_once(api):
    import re

    def answer(req):
        op = re.search(r"\{\s*(\w+)", req.body["query"]).group(1)
        if op == "podFindAndDeployOnDemand":
            return (200, {"data": {op: {"id": "4qyhmgmpsdbn6x", "desiredStatus": "RUNNING",
                                        "costPerHr": 0.79, "adjustedCostPerHr": 0.79}}})
        return (200, {"data": {"podTerminate": None}})
    api.set("POST", "/graphql", answer)
    with pytest.raises(CapacityError, match="0.79 USD/h, above max_price_per_hour 0.5"):
        runpod(api).create(InstanceSpec(label="orch-r1-j1", gpu="RTX 4090", offer_id="NVIDIA GeForce RTX 4090",
                                        max_price_per_hour=0.5))
    ops = [re.search(r"\{\s*(\w+)", r.body["query"]).group(1) for r in api.requests]
    assert ops == ["podFindAndDeployOnDemand", "podTerminate"]
    assert api.requests[1].body["variables"]["input"]["podId"] == "4qyhmgmpsdbn6x"


# -- 8. Lambda: the older instance-type list, field_errors, the launch schema ---------------------
OLD_TYPES = {"data": {
    "gpu_8x_a100": {"instance_type": {"name": "gpu_8x_a100", "description": "8x A100 (40 GB SXM4)",
                                      "price_cents_per_hour": "1032",
                                      "specs": {"vcpus": 124, "memory_gib": 1800, "storage_gib": 6000}},
                    "regions_with_capacity_available": [{"name": "us-east-1", "description": "Virginia, USA"}]},
    "gpu_1x_a100": {"instance_type": {"name": "gpu_1x_a100", "description": "1x A100 (40 GB SXM4)",
                                      "price_cents_per_hour": "129",
                                      "specs": {"vcpus": 30, "memory_gib": 200, "storage_gib": 512}},
                    "regions_with_capacity_available": []}}}


def test_lambda_older_type_list_never_offers_eight_gpus_for_one(api):
    api.set("GET", "/api/v1/instance-types", (200, OLD_TYPES))
    offers = lam(api).offers("A100")
    assert [(o.offer_id, o.price_per_hour, o.available, o.gpu_count) for o in offers] == \
        [("gpu_1x_a100", 1.29, False, 1)]
    with pytest.raises(CapacityError):
        lam(api).create(InstanceSpec(label="orch-r1-j1", gpu="A100"))
    assert not api.calls("POST", "/api/v1/instance-operations/launch")


def test_lambda_launch_sends_only_schema_fields_and_keeps_field_errors(api):
    api.set("POST", "/api/v1/instance-operations/launch", [
        (200, {"data": {"instance_ids": ["0920582c7ff041399e34823a0be62549"]}}),
        (400, {"error": {"code": "global/invalid-parameters", "message": "Invalid request data.",
                         "suggestion": "Check the request body."},
               "field_errors": {"ssh_key_names": {"code": "global/invalid-parameters",
                                                  "message": "SSH key 'orchestrate' does not exist."}}})])
    spec = InstanceSpec(label="orch-r1-j1", gpu="A10", offer_id="gpu_1x_a10@us-east-1")
    lam(api).create(spec)
    assert set(api.requests[0].body) == {"region_name", "instance_type_name", "ssh_key_names", "name"}
    with pytest.raises(ProviderError, match="ssh_key_names: SSH key 'orchestrate' does not exist"):
        lam(api).create(spec)


# -- 9. stopping an instance that no longer exists ---------------------------------------------
def test_stop_of_a_vanished_instance_is_instance_not_found(api):
    api.set("PUT", "/api/v0/instances/13507426/", (200, {"success": False, "error": "no_such_instance",
                                                        "msg": "Instance 13507426 not found."}))
    with pytest.raises(InstanceNotFound):
        vast(api).stop("13507426")
    api.set("POST", "/graphql", (200, {"data": {"podStop": None}}))
    with pytest.raises(InstanceNotFound):
        runpod(api).stop("4qyhmgmpsdbn6x")
    api.set("POST", "/api/v1/instance-operations/terminate",
            (404, {"error": {"code": "global/object-does-not-exist", "message": "Specified instance does not exist."}}))
    with pytest.raises(InstanceNotFound):
        lam(api).stop("0920582c7ff041399e34823a0be62549")
    lam(api).destroy("0920582c7ff041399e34823a0be62549")   # destroy: gone counts as done


# -- 11. vast.ai: the run's key is attached to the instance --------------------------------------
def test_vast_create_attaches_the_runs_key(api):
    api.set("PUT", "/api/v0/asks/8675309/", (200, {"success": True, "new_contract": 13507426}))
    api.set("POST", "/api/v0/instances/13507426/ssh/", (200, {"success": True, "msg": "SSH key attached successfully"}))
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE7x3mJ1QbB5ZkL2P0v8 run@controller"
    vast(api).create(InstanceSpec(label="orch-r1-j1", gpu="RTX 4090", offer_id="8675309", ssh_public_key=key))
    assert api.calls("POST", "/api/v0/instances/13507426/ssh/")[0].body == {"ssh_key": key}


def test_vast_key_refused_makes_the_create_fail(api):
    api.set("PUT", "/api/v0/asks/8675309/", (200, {"success": True, "new_contract": 13507426}))
    api.set("POST", "/api/v0/instances/13507426/ssh/", (400, {"success": False, "error": "invalid_args",
                                                              "msg": "invalid ssh key"}))
    with pytest.raises(ProviderError, match="invalid ssh key"):
        vast(api).create(InstanceSpec(label="orch-r1-j1", gpu="RTX 4090", offer_id="8675309",
                                      ssh_public_key="ssh-ed25519 AAAA x"))


def test_provision_refuses_before_paying_when_no_public_key(api, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))   # no ~/.ssh/id_*.pub either
    private = tmp_path / "missing_key"
    private.write_text("not a key\n")
    from orchestrator.config import HostConfig
    host = HostConfig(name="cloud", provider="vastai", gpu="RTX 4090", api_base=api.url,
                      api_key_env="DOC_KEY", identity_file=str(private))
    ledger = Ledger(tmp_path / "ledger.sqlite")
    try:
        with pytest.raises(ConfigError, match="no SSH public key") as exc:
            provision(vast(api), host, ledger=ledger, run_id="r1", job_id="j1", label="orch-r1-j1",
                      stop=threading.Event())
        assert "missing_key.pub" in str(exc.value)
        assert api.requests == [] and ledger.instances() == []   # nothing asked, nothing recorded
    finally:
        ledger.close()


def test_retry_after_as_an_http_date_is_honoured(api):
    from email.utils import formatdate
    when = formatdate(time.time() + 2.0, usegmt=True)   # whole seconds: 1-2 s from now
    api.set("DELETE", "/api/v0/instances/13507426/", [(429, {"detail": "API requests too frequent"},
                                                       {"Retry-After": when}), (200, {"success": True})])
    t0 = time.monotonic()
    vast(api, policy=RetryPolicy(backoff_s=0.01, release_deadline_s=10.0, release_max_backoff_s=5.0)).destroy("13507426")
    assert 0.9 <= time.monotonic() - t0 < 4.0
    assert len(api.calls("DELETE", "/api/v0/instances/13507426/")) == 2
