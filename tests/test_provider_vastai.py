"""vast.ai client against a real local HTTP server answering the API's documented shapes."""
from __future__ import annotations

import pytest

from orchestrator.errors import CapacityError, InstanceNotFound, ProviderError
from orchestrator.providers import make_label
from orchestrator.providers.base import Endpoint, InstanceSpec, InstanceState
from orchestrator.providers.vastai import VastProvider
from orchestrator.testing.canned_http import CannedAPI
from orchestrator.testing.hosts import make_host

KEY = "vast-secret-key-0123456789"


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TEST_VAST_KEY", KEY)
    with CannedAPI() as srv:
        yield srv


def client(srv: CannedAPI, **extra) -> VastProvider:
    return VastProvider(make_host("vastai", **{"api_base": srv.url, "api_key_env": "TEST_VAST_KEY", "gpu": "RTX 4090", **extra}))


# Shapes as `GET /api/v0/instances/{id}/` returns them (fields trimmed to what matters + noise).
RUNNING_DIRECT = {"id": 1234567, "label": "orch-r1-j1", "gpu_name": "RTX 4090", "num_gpus": 1,
                  "dph_total": 0.412, "actual_status": "running", "intended_status": "running",
                  "cur_state": "running", "public_ipaddr": " 203.0.113.9\n",
                  "ports": {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "40022"}],
                            "8080/tcp": [{"HostIp": "0.0.0.0", "HostPort": "40080"}]},
                  "ssh_host": "ssh4.vast.ai", "ssh_port": 12345, "inet_down": -1}


@pytest.mark.parametrize("fields, state, endpoint, price", [
    ({}, InstanceState.RUNNING, Endpoint("203.0.113.9", 40022, "root"), 0.412),
    # no direct mapping: the proxy endpoint
    ({"ports": None, "public_ipaddr": None}, InstanceState.RUNNING, Endpoint("ssh4.vast.ai", 12345), 0.412),
    ({"ports": {}, "public_ipaddr": ""}, InstanceState.RUNNING, Endpoint("ssh4.vast.ai", 12345), 0.412),
    # -1 = unknown: no proxy port, no price
    ({"ports": None, "ssh_port": -1, "dph_total": -1}, InstanceState.RUNNING, None, None),
    ({"actual_status": "loading", "ports": None}, InstanceState.BOOTING, None, 0.412),
    ({"actual_status": None, "ports": None}, InstanceState.PENDING, None, 0.412),
    # stopped: the disk alone bills (40 GB at 0.10 $/GB-month), not dph_total
    ({"actual_status": "exited", "intended_status": "stopped", "cur_state": "stopped", "ports": None,
      "disk_space": 40, "storage_cost": 0.10}, InstanceState.STOPPED, None, 40 * 0.10 / 730),
    ({"actual_status": "running", "intended_status": "stopped"}, InstanceState.STOPPING, None, 0.412),
    ({"actual_status": "exited"}, InstanceState.ERROR, None, 0.412),
    ({"actual_status": "offline"}, InstanceState.ERROR, None, 0.412),
    ({"actual_status": "frozen"}, InstanceState.UNKNOWN, None, 0.412),
    ({"actual_status": "hibernating-new-state"}, InstanceState.UNKNOWN, None, 0.412),
])
def test_describe_parses_state_endpoint_price(api, fields, state, endpoint, price):
    inst = {**RUNNING_DIRECT, **fields}
    api.set("GET", "/api/v0/instances/1234567/", (200, {"instances": inst}))
    info = client(api).describe("1234567")
    assert info.state == state
    assert info.endpoint == endpoint
    assert info.price_per_hour == price
    assert info.label == "orch-r1-j1"
    assert api.requests[0].headers["authorization"] == f"Bearer {KEY}"


def test_describe_missing_optional_fields(api):
    api.set("GET", "/api/v0/instances/9/", (200, {"instances": {"id": 9, "actual_status": "running"}}))
    info = client(api).describe("9")
    assert (info.state, info.endpoint, info.price_per_hour, info.label) == (InstanceState.RUNNING, None, None, "")


@pytest.mark.parametrize("reply", [(200, {"instances": None}), (404, {"success": False, "msg": "no"})])
def test_describe_unknown_instance(api, reply):
    api.set("GET", "/api/v0/instances/5/", reply)
    with pytest.raises(InstanceNotFound):
        client(api).describe("5")


def test_offers_parse_filter_sort(api):
    api.set("POST", "/api/v0/bundles/", (200, {"offers": [
        {"id": 11, "gpu_name": "RTX 4090", "dph_total": 0.52, "num_gpus": 1, "geolocation": "Norway, NO"},
        {"id": 12, "gpu_name": "RTX 4090", "dph_total": 0.31, "num_gpus": 1, "rentable": True},
        {"id": 13, "gpu_name": "RTX 4090", "dph_total": None},
        {"id": 14, "gpu_name": "RTX 4090", "dph_total": 0.90},
        {"id": 15, "gpu_name": "RTX 4090", "dph_total": -1}]}))
    offers = client(api, max_price_per_hour=0.6).offers("RTX 4090")
    assert [(o.offer_id, o.price_per_hour) for o in offers] == [("12", 0.31), ("11", 0.52)]
    assert offers[1].region == "Norway, NO"
    sent = api.requests[0].body
    assert sent["gpu_name"] == {"eq": "RTX 4090"} and sent["rentable"] == {"eq": True}


def test_create_labels_and_returns_new_contract(api):
    api.set("POST", "/api/v0/bundles/", (200, {"offers": [{"id": 77, "gpu_name": "RTX 4090", "dph_total": 0.3}]}))
    api.set("PUT", "/api/v0/asks/77/", (200, {"success": True, "new_contract": 7654321}))
    label = make_label("run1", "job-a")
    iid = client(api).create(InstanceSpec(label=label, gpu="RTX 4090", disk_gb=32))
    assert iid == "7654321"
    body = api.calls("PUT", "/api/v0/asks/77/")[0].body
    assert body["label"] == label == "orch-run1-job-a"
    assert body["disk"] == 32


def test_create_success_false_is_an_error_even_with_200(api):
    api.set("PUT", "/api/v0/asks/5/", (200, {"success": False, "error": "no_such_ask",
                                              "msg": "Instance type 5 is no longer available."}))
    with pytest.raises(CapacityError, match="no longer available"):
        client(api).create(InstanceSpec(label="orch-a-b", gpu="RTX 4090", offer_id="5"))
    api.set("PUT", "/api/v0/asks/6/", (200, {"success": False, "error": "insufficient_credit", "msg": "add credit"}))
    with pytest.raises(ProviderError, match="add credit") as exc:
        client(api).create(InstanceSpec(label="orch-a-b", gpu="RTX 4090", offer_id="6"))
    assert not isinstance(exc.value, CapacityError)


def test_no_offer_under_cap_is_capacity_error(api):
    api.set("POST", "/api/v0/bundles/", (200, {"offers": [{"id": 1, "gpu_name": "RTX 4090", "dph_total": 2.0}]}))
    with pytest.raises(CapacityError):
        client(api).create(InstanceSpec(label="orch-a-b", gpu="RTX 4090", max_price_per_hour=0.5))
    assert not api.calls("PUT", "/api/v0/asks/1/")


def test_state_change_checks_success(api):
    api.set("PUT", "/api/v0/instances/3/", [(200, {"success": True}), (200, {"success": False, "msg": "not yours"})])
    client(api).stop("3")
    assert api.requests[0].body == {"state": "stopped"}
    with pytest.raises(ProviderError, match="not yours"):
        client(api).start("3")
    assert api.requests[1].body == {"state": "running"}


def test_destroy_treats_unknown_as_gone(api):
    api.set("DELETE", "/api/v0/instances/3/", (404, {"success": False, "msg": "no such instance"}))
    client(api).destroy("3")
    assert len(api.calls("DELETE", "/api/v0/instances/3/")) == 1


def test_list_pages_and_filters_by_label(api):
    a = {**RUNNING_DIRECT, "id": 1, "label": "orch-r1-j1"}
    b = {**RUNNING_DIRECT, "id": 2, "label": None}
    c = {**RUNNING_DIRECT, "id": 3, "label": "someone-else"}
    d = {**RUNNING_DIRECT, "id": 4, "label": "orch-r2-j9", "actual_status": "exited",
         "intended_status": "stopped", "cur_state": "stopped"}
    api.set("GET", "/api/v1/instances/", lambda req: (200, {"instances": [a, b], "next_token": "p2"})
            if "after_token" not in req.query else (200, {"instances": [c, d], "next_token": None}))
    found = client(api).list("orch-")
    assert [(i.instance_id, i.state) for i in found] == [("1", InstanceState.RUNNING), ("4", InstanceState.STOPPED)]
    assert api.requests[1].query["after_token"] == "p2"


def test_api_key_never_in_errors(api):
    api.set("GET", "/api/v0/instances/1/", (401, {"success": False, "msg": f"bad key {KEY}"}))
    with pytest.raises(ProviderError) as exc:
        client(api).describe("1")
    assert KEY not in str(exc.value) and "***" in str(exc.value)
    assert exc.value.status == 401 and "API key" in (exc.value.hint or "")


def test_self_stop_uses_scoped_key_not_ours(api):
    cmd = client(api).self_stop_command("42")
    assert "$CONTAINER_API_KEY" in cmd and KEY not in cmd
    assert f"{api.url}/api/v0/instances/42/" in cmd and '"state": "stopped"' in cmd


def test_missing_key_is_config_error(monkeypatch):
    from orchestrator.errors import ConfigError
    monkeypatch.delenv("NOPE_KEY", raising=False)
    with pytest.raises(ConfigError, match="NOPE_KEY"):
        VastProvider(make_host("vastai", **{"api_base": "http://127.0.0.1:9", "api_key_env": "NOPE_KEY"}))


def test_onstart_boot_guard_sent_with_create(api):
    api.set("PUT", "/api/v0/asks/5/", (200, {"success": True, "new_contract": 8}))
    p = client(api)
    guard = p.boot_guard(root="~/orchestrate", idle_timeout_s=600)
    p.create(InstanceSpec(label="orch-a-b", gpu="RTX 4090", offer_id="5", onstart=guard))
    sent = api.requests[0].body["onstart"]
    assert sent == guard and '"$HOME"/orchestrate' in sent and "$CONTAINER_API_KEY" in sent
    assert "600 seconds ago" in sent and KEY not in sent
