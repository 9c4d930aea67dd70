"""Lambda Cloud v1 client against a real local HTTP server answering documented shapes."""
from __future__ import annotations

import pytest

from orchestrator.errors import CapacityError, InstanceNotFound, ProviderError
from orchestrator.providers.base import Endpoint, InstanceSpec, InstanceState
from orchestrator.providers.lambdalabs import LambdaProvider
from orchestrator.testing.canned_http import CannedAPI
from orchestrator.testing.hosts import make_host

KEY = "secret_lambda_0123456789abcdef"
H100 = {"name": "gpu_1x_h100_pcie", "description": "1x H100 (80 GB PCIe)", "gpu_description": "H100 (80 GB PCIe)",
        "price_cents_per_hour": 329, "specs": {"vcpus": 26, "memory_gib": 200, "storage_gib": 1024, "gpus": 1}}
H100x8 = {**H100, "name": "gpu_8x_h100_sxm5", "description": "8x H100 (80 GB SXM5)", "price_cents_per_hour": 2392,
          "specs": {"gpus": 8}}
A10 = {"name": "gpu_1x_a10", "description": "1x A10 (24 GB PCIe)", "gpu_description": "A10 (24 GB PCIe)",
       "price_cents_per_hour": 75, "specs": {"gpus": 1}}
INSTANCE = {"id": "0920582c7ff041399e34823a0be62549", "name": "orch-r1-j1", "ip": " 198.51.100.2 ",
            "private_ip": "10.0.2.100", "status": "active", "ssh_key_names": ["orchestrate"],
            "region": {"name": "us-east-1", "description": "Virginia, USA"}, "instance_type": H100,
            "hostname": "10-0-2-100.cloud.lambdalabs.com", "is_reserved": False}
IID = INSTANCE["id"]


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TEST_LAMBDA_KEY", KEY)
    with CannedAPI() as srv:
        yield srv


def client(srv: CannedAPI, **extra) -> LambdaProvider:
    return LambdaProvider(make_host("lambda", **{"api_base": srv.url, "api_key_env": "TEST_LAMBDA_KEY", **extra}))


def test_instance_types_price_in_cents_and_capacity(api):
    api.set("GET", "/api/v1/instance-types", (200, {"data": {
        "gpu_1x_h100_pcie": {"instance_type": H100, "regions_with_capacity_available": []},
        "gpu_8x_h100_sxm5": {"instance_type": H100x8, "regions_with_capacity_available": [{"name": "us-east-1"}]},
        "gpu_1x_a10": {"instance_type": A10, "regions_with_capacity_available": [
            {"name": "us-west-1", "description": "California"}, {"name": "us-east-1"}]}}}))
    h100 = client(api).offers("H100 PCIe")
    assert [(o.price_per_hour, o.available, o.offer_id) for o in h100] == [(3.29, False, "gpu_1x_h100_pcie")]
    a10 = client(api).offers("A10")
    assert [(o.offer_id, o.price_per_hour, o.region) for o in a10] == [
        ("gpu_1x_a10@us-west-1", 0.75, "us-west-1"), ("gpu_1x_a10@us-east-1", 0.75, "us-east-1")]
    assert all(o.available for o in a10)


@pytest.mark.parametrize("fields, state, endpoint", [
    ({}, InstanceState.RUNNING, Endpoint("198.51.100.2", 22, "ubuntu")),
    ({"status": "booting", "ip": None, "hostname": None}, InstanceState.BOOTING, None),
    ({"status": "unhealthy"}, InstanceState.ERROR, None),
    ({"status": "terminating"}, InstanceState.STOPPING, None),
    ({"status": "terminated"}, InstanceState.TERMINATED, None),
    ({"status": "preempted"}, InstanceState.TERMINATED, None),
    ({"status": "brand-new"}, InstanceState.UNKNOWN, None),
])
def test_describe(api, fields, state, endpoint):
    api.set("GET", f"/api/v1/instances/{IID}", (200, {"data": {**INSTANCE, **fields}}))
    info = client(api).describe(IID)
    assert (info.state, info.endpoint, info.price_per_hour) == (state, endpoint, 3.29)


def test_booting_without_ip_key_at_all(api):
    booting = {k: v for k, v in INSTANCE.items() if k not in ("ip", "hostname", "private_ip")}
    api.set("GET", f"/api/v1/instances/{IID}", (200, {"data": {**booting, "status": "active"}}))
    info = client(api).describe(IID)
    assert info.state == InstanceState.RUNNING and info.endpoint is None


def test_describe_unknown_is_not_found(api):
    api.set("GET", "/api/v1/instances/ff", (404, {"error": {"code": "global/object-does-not-exist",
                                                            "message": "Specified instance does not exist."}}))
    with pytest.raises(InstanceNotFound):
        client(api).describe("ff")


def test_launch_sends_name_and_branches_on_error_code(api):
    api.set("POST", "/api/v1/instance-operations/launch", [
        (200, {"data": {"instance_ids": [IID]}}),
        (400, {"error": {"code": "instance-operations/launch/insufficient-capacity",
                         "message": "Not enough capacity to fulfill launch request.",
                         "suggestion": "Choose an instance type with more availability"}}),
        (400, {"error": {"code": "global/invalid-parameters", "message": "Invalid SSH key name"}})])
    spec = InstanceSpec(label="orch-r1-j1", gpu="H100 PCIe", offer_id="gpu_1x_h100_pcie@us-east-1")
    assert client(api, ssh_key_name="mykey").create(spec) == IID
    body = api.requests[0].body
    assert body == {"region_name": "us-east-1", "instance_type_name": "gpu_1x_h100_pcie",
                    "ssh_key_names": ["mykey"], "name": "orch-r1-j1"}
    with pytest.raises(CapacityError, match="Not enough capacity"):
        client(api).create(spec)
    with pytest.raises(ProviderError, match="Invalid SSH key") as exc:
        client(api).create(spec)
    assert not isinstance(exc.value, CapacityError)
    assert len(api.requests) == 3   # never retried


def test_stop_is_terminate_and_start_refuses(api):
    api.set("POST", "/api/v1/instance-operations/terminate", (200, {"data": {"terminated_instances": [INSTANCE]}}))
    client(api).stop(IID)
    assert api.requests[0].body == {"instance_ids": [IID]}
    with pytest.raises(ProviderError, match="no stop/start"):
        client(api).start(IID)


def test_list_filters_by_name(api):
    api.set("GET", "/api/v1/instances", (200, {"data": [INSTANCE, {**INSTANCE, "id": "2", "name": None},
                                                        {**INSTANCE, "id": "3", "name": "jupyter"}]}))
    assert [i.instance_id for i in client(api).list("orch-")] == [IID]


def test_billing_is_per_minute_and_no_self_stop(api):
    p = client(api)
    assert p.billing.granularity_s == 60.0 and p.billing.storage_price_per_hour == 0.0
    assert p.self_stop_command(IID) is None
