"""Reconciliation against the fake cloud: orphans found by label, destroyed, ledger rows closed."""
from __future__ import annotations

import pytest

from orchestrator.ledger import CREATING, DESTROYED, FAILED, RUNNING, Ledger
from orchestrator.providers._http import RetryPolicy
from orchestrator.providers.base import InstanceSpec, InstanceState, make_label
from orchestrator.providers.runpod import RunPodProvider
from orchestrator.providers.vastai import VastProvider
from orchestrator.run.reconcile import down_orphans, find_orphans, hold_run_lock, lock_path, run_is_live
from orchestrator.testing.fakecloud import fake_cloud, fake_host, host_config  # noqa: F401 (fixture)

pytestmark = pytest.mark.sshd
FAST = RetryPolicy(deadline_s=5.0, attempt_timeout_s=2.0, backoff_s=0.02, max_backoff_s=0.1)


@pytest.fixture
def ledger(tmp_path):
    led = Ledger(tmp_path / "home" / "ledger.sqlite")
    yield led
    led.close()


def rented(led: Ledger, p, run_id: str, job_id: str) -> tuple[int, str]:
    """What the runner does: intent, create, record the id."""
    label = make_label(run_id, job_id)
    row = led.record_intent(run_id=run_id, job_id=job_id, host_name="h", provider=p.name, label=label,
                            gpu="RTX 4090", price_per_hour=0.44, currency="USD",
                            storage_price_per_hour=p.billing.storage_price_per_hour)
    iid = p.create(InstanceSpec(label=label, gpu="RTX 4090"))
    led.instance_created(row, iid)
    return row, iid


def start_run(led: Ledger, run_id: str, job_id: str) -> None:
    led.create_run(run_id, "t")
    led.add_job(run_id, job_id, experiment="e", scene="s", host_name="h", provider="vastai", gpu="g",
                steps=1, backend="torch", dataset="d", status="running")


def test_dead_controller_orphans_destroyed_live_run_untouched(fake_cloud, ledger):
    vast = VastProvider(fake_host(fake_cloud, "vastai"), policy=FAST)
    start_run(ledger, "dead", "j1")
    start_run(ledger, "alive", "j1")
    lock_path(ledger, "dead").parent.mkdir(parents=True, exist_ok=True)
    lock_path(ledger, "dead").write_text("12345")    # a lock file nobody holds: the controller died
    dead_row, dead_id = rented(ledger, vast, "dead", "j1")
    with hold_run_lock(ledger, "alive"):
        live_row, live_id = rented(ledger, vast, "alive", "j1")
        assert run_is_live(ledger, "alive") and not run_is_live(ledger, "dead")
        orphans = find_orphans(ledger, [vast])
        assert [(o.info.instance_id, o.row_id) for o in orphans] == [(dead_id, dead_row)]
        shown = down_orphans(ledger, None, False, providers=[vast])
        assert [t.destroyed for t in shown] == [False] and fake_cloud.live_count() == 2
        done = down_orphans(ledger, None, True, providers=[vast])
        assert [(t.orphan.info.instance_id, t.destroyed) for t in done] == [(dead_id, True)]
        assert vast.describe(live_id).state in (InstanceState.BOOTING, InstanceState.RUNNING)
    assert ledger.instance(dead_row).state == DESTROYED
    assert all(b.ended_at for b in ledger.billing(dead_row))
    assert ledger.instance(live_row).state == CREATING
    assert fake_cloud.live_count() == 1
    # the run is over now (lock released): the next reconcile takes the rest
    down_orphans(ledger, None, True, providers=[vast])
    assert fake_cloud.live_count() == 0 and ledger.instance(live_row).state == DESTROYED


def test_unknown_and_closed_rows_are_orphans_foreign_labels_are_not(fake_cloud, ledger):
    rp = RunPodProvider(fake_host(fake_cloud, "runpod"), policy=FAST)
    stray = rp.create(InstanceSpec(label="orch-ghost-j9", gpu="RTX 4090"))      # nothing in the ledger
    mine = rp.create(InstanceSpec(label="my-notebook", gpu="RTX 4090"))         # not ours: never touched
    start_run(ledger, "r", "j1")
    ledger.finish_run("r", "failed")
    lock_path(ledger, "r").parent.mkdir(parents=True, exist_ok=True)
    lock_path(ledger, "r").touch()
    row, closed_id = rented(ledger, rp, "r", "j1")
    ledger.set_instance_state(row, DESTROYED, note="we thought it was gone")
    # the stray names run "ghost", which this ledger never had: another controller's, left
    # alone unless asked (issue 18: another machine's live run must not be destroyed)
    reasons = {o.info.instance_id: o.reason for o in find_orphans(ledger, {"runpod": rp})}
    assert set(reasons) == {closed_id} and "still lists" in reasons[closed_id]
    reasons = {o.info.instance_id: o.reason
               for o in find_orphans(ledger, {"runpod": rp}, any_controller=True)}
    assert set(reasons) == {stray, closed_id}
    assert "a controller this ledger does not know" in reasons[stray]
    down_orphans(ledger, None, True, providers=[rp])
    assert sorted(i.instance_id for i in rp.list("")) == sorted([mine, stray])
    down_orphans(ledger, None, True, providers=[rp], any_controller=True)
    assert [i.instance_id for i in rp.list("")] == [mine]


def test_lost_reply_after_intent_gets_billed_from_intent(fake_cloud, ledger):
    vast = VastProvider(fake_host(fake_cloud, "vastai"), policy=FAST)
    start_run(ledger, "lr", "j1")
    lock_path(ledger, "lr").parent.mkdir(parents=True, exist_ok=True)
    lock_path(ledger, "lr").touch()
    label = make_label("lr", "j1")
    row = ledger.record_intent(run_id="lr", job_id="j1", host_name="h", provider="vastai", label=label,
                               gpu="RTX 4090", price_per_hour=0.44, currency="USD")
    fake_cloud.set_faults(lose_create_replies=1)
    with pytest.raises(Exception):
        vast.create(InstanceSpec(label=label, gpu="RTX 4090"))
    # ...and the controller died here, before it could look for the label.
    done = down_orphans(ledger, None, True, providers=[vast])
    assert len(done) == 1 and done[0].destroyed and done[0].orphan.row_id == row
    r = ledger.instance(row)
    assert r.state == DESTROYED and r.instance_id == done[0].orphan.info.instance_id
    assert ledger.instance_cost(row) > 0
    assert fake_cloud.live_count() == 0


def test_vanished_instances_close_open_rows(fake_cloud, ledger):
    vast = VastProvider(fake_host(fake_cloud, "vastai"), policy=FAST)
    start_run(ledger, "v", "j1")
    lock_path(ledger, "v").parent.mkdir(parents=True, exist_ok=True)
    lock_path(ledger, "v").touch()
    row, iid = rented(ledger, vast, "v", "j1")
    ledger.set_instance_state(row, RUNNING)
    vast.destroy(iid)                      # gone behind our back
    intent = ledger.record_intent(run_id="v", job_id="j1", host_name="h", provider="vastai",
                                  label=make_label("v", "j2"), gpu="g", price_per_hour=1, currency="USD")
    assert down_orphans(ledger, None, True, providers=[vast]) == []
    assert ledger.instance(row).state == DESTROYED and ledger.instance(intent).state == FAILED
    assert ledger.open_billing() == []


def test_failed_intent_row_gets_the_cost_of_the_stray_it_made(fake_cloud, ledger):
    """The runner marked the intent failed (it could not list); the stray is later destroyed and
    billed to that row from the intent's time, not lost from the books."""
    vast = VastProvider(fake_host(fake_cloud, "vastai"), policy=FAST)
    start_run(ledger, "fi", "j1")
    lock_path(ledger, "fi").parent.mkdir(parents=True, exist_ok=True)
    lock_path(ledger, "fi").touch()
    label = make_label("fi", "j1")
    row = ledger.record_intent(run_id="fi", job_id="j1", host_name="h", provider="vastai", label=label,
                               gpu="RTX 4090", price_per_hour=0.44, currency="USD")
    iid = vast.create(InstanceSpec(label=label, gpu="RTX 4090"))
    ledger.set_instance_state(row, FAILED, note="create failed; could not list")
    done = down_orphans(ledger, None, True, providers=[vast])
    assert [(t.orphan.info.instance_id, t.orphan.row_id, t.destroyed) for t in done] == [(iid, row, True)]
    r = ledger.instance(row)
    assert (r.state, r.instance_id) == (DESTROYED, iid) and ledger.instance_cost(row) > 0
    assert ledger.open_billing() == []
