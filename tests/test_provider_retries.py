"""Retries: idempotent calls ride out 429/5xx and lost replies within a deadline; creates never repeat."""
from __future__ import annotations

import time

import pytest

from orchestrator.errors import ProviderError
from orchestrator.providers._http import RetryPolicy
from orchestrator.providers.base import InstanceSpec, InstanceState
from orchestrator.providers.lambdalabs import LambdaProvider
from orchestrator.providers.runpod import RunPodProvider
from orchestrator.providers.vastai import VastProvider
from orchestrator.testing.canned_http import CannedAPI
from orchestrator.testing.hosts import make_host

FAST = RetryPolicy(deadline_s=3.0, attempt_timeout_s=1.0, max_attempts=5, backoff_s=0.01, max_backoff_s=0.05)
RUNNING = {"id": 7, "label": "orch-a-b", "actual_status": "running", "intended_status": "running",
           "ssh_host": "h", "ssh_port": 2200, "dph_total": 0.5}


@pytest.fixture
def api(monkeypatch):
    monkeypatch.setenv("K", "key-for-retry-tests")
    with CannedAPI() as srv:
        yield srv


def vast(srv, policy=FAST):
    return VastProvider(make_host("vastai", **{"api_base": srv.url, "api_key_env": "K"}), policy=policy)


@pytest.mark.parametrize("failure", [(503, {"msg": "busy"}), (500, "oops"), (502, "<html>bad gateway</html>"),
                                     (429, {"detail": "API requests too frequent"}, {"Retry-After": "0"}),
                                     "drop"])
def test_describe_retries_then_succeeds(api, failure):
    api.set("GET", "/api/v0/instances/7/", [failure, failure, (200, {"instances": RUNNING})])
    info = vast(api).describe("7")
    assert info.state == InstanceState.RUNNING
    assert len(api.calls("GET", "/api/v0/instances/7/")) == 3


@pytest.mark.parametrize("failure", [(503, {"msg": "busy"}), (429, {"msg": "slow down"}), "drop"])
def test_create_is_never_retried(api, failure):
    api.set("PUT", "/api/v0/asks/1/", [failure, (200, {"success": True, "new_contract": 9})])
    with pytest.raises(ProviderError):
        vast(api).create(InstanceSpec(label="orch-a-b", gpu="RTX 4090", offer_id="1"))
    assert len(api.calls("PUT", "/api/v0/asks/1/")) == 1


def test_create_lost_reply_message_says_it_may_exist(api):
    api.set("PUT", "/api/v0/asks/1/", "drop")
    with pytest.raises(ProviderError, match="may have taken effect"):
        vast(api).create(InstanceSpec(label="orch-a-b", gpu="RTX 4090", offer_id="1"))


def test_destroy_and_stop_are_retried(api):
    api.set("DELETE", "/api/v0/instances/7/", [(503, {}), (200, {"success": True})])
    api.set("PUT", "/api/v0/instances/7/", [(502, {}), (200, {"success": True})])
    vast(api).destroy("7")
    vast(api).stop("7")
    assert len(api.calls("DELETE", "/api/v0/instances/7/")) == 2
    assert len(api.calls("PUT", "/api/v0/instances/7/")) == 2


def test_client_errors_are_not_retried(api):
    api.set("GET", "/api/v0/instances/7/", (400, {"msg": "bad request"}))
    with pytest.raises(ProviderError, match="bad request"):
        vast(api).describe("7")
    assert len(api.requests) == 1


def test_retries_stop_at_the_deadline(api):
    api.set("GET", "/api/v0/instances/7/", (503, {"msg": "down"}))
    policy = RetryPolicy(deadline_s=1.0, attempt_timeout_s=0.5, max_attempts=1000, backoff_s=0.05, max_backoff_s=0.2)
    t0 = time.monotonic()
    with pytest.raises(ProviderError, match="503"):
        vast(api, policy).describe("7")
    elapsed = time.monotonic() - t0
    assert elapsed < 2.0
    assert 3 <= len(api.requests) < 30


def test_runpod_queries_retry_but_create_does_not(api):
    api.set("POST", "/graphql", [(503, {}), (200, {"data": {"pod": {"id": "p", "desiredStatus": "EXITED"}}})])
    rp = RunPodProvider(make_host("runpod", **{"api_base": api.url, "api_key_env": "K"}), policy=FAST)
    assert rp.describe("p").state == InstanceState.STOPPED
    assert len(api.requests) == 2
    api.set("POST", "/graphql", [(503, {}), (200, {"data": {"podFindAndDeployOnDemand": {"id": "x"}}})])
    with pytest.raises(ProviderError):
        rp.create(InstanceSpec(label="orch-a-b", gpu="g", offer_id="g"))
    assert len(api.requests) == 3


def test_lambda_launch_rate_limit_not_retried_terminate_retried(api):
    lp = LambdaProvider(make_host("lambda", **{"api_base": api.url, "api_key_env": "K"}), policy=FAST)
    api.set("POST", "/api/v1/instance-operations/launch",
            [(429, {"error": {"code": "global/too-many-requests", "message": "rate limited"}}),
             (200, {"data": {"instance_ids": ["x"]}})])
    with pytest.raises(ProviderError, match="429"):
        lp.create(InstanceSpec(label="orch-a-b", gpu="A10", offer_id="gpu_1x_a10@us-west-1"))
    api.set("POST", "/api/v1/instance-operations/terminate",
            [(500, {"error": {"code": "global/internal", "message": "x"}}), (200, {"data": {"terminated_instances": []}})])
    lp.destroy("x")
    assert len(api.calls("POST", "/api/v1/instance-operations/launch")) == 1
    assert len(api.calls("POST", "/api/v1/instance-operations/terminate")) == 2
