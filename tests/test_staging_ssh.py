"""Staging through the real SSH transport (OpenSSH sshd on 127.0.0.1): the host pulls from a
loopback mirror with live progress, and a file:// copy is uploaded over the tar stream when no
mirror answers."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from test_staging_controller import REPO, TUNING, dataset, scene_dir, zip_dir  # noqa: F401  (fixture)

from orchestrator.providers.base import Endpoint
from orchestrator.staging import stage_dataset
from orchestrator.staging.mirror_server import MirrorBehaviour, MirrorServer
from orchestrator.testing.sshd import SSHServer, sshd_server  # noqa: F401  (fixture)
from orchestrator.transport.ssh import SSHAuth, SSHTransport

pytestmark = pytest.mark.sshd


def ssh_transport(srv: SSHServer, root: Path) -> SSHTransport:
    auth = SSHAuth(identity_file=str(srv.client_key_path), allow_agent=False, look_for_keys=False)
    return SSHTransport(lambda: Endpoint(srv.host, srv.port, srv.user), root=str(root), auth=auth)


def test_stage_over_ssh_from_a_mirror_then_cached(sshd_server: SSHServer, scene_dir: Path, tmp_path: Path) -> None:
    t = ssh_transport(sshd_server, tmp_path / "host")
    try:
        archive = zip_dir(scene_dir, "nerf_synthetic/lego")
        with MirrorServer({"/ns.zip": archive}, MirrorBehaviour(rate_bytes_per_s=500_000)) as m:
            ds = dataset("nerf", [m.url("/ns.zip")])
            seen: list[tuple[str, int, int | None]] = []
            path = stage_dataset(t, ds, "lego", python=sys.executable, payload_dir=str(REPO), tuning=TUNING,
                                 progress=lambda msg, done, total: seen.append((msg, done, total)))
            assert (Path(path) / "transforms_train.json").is_file()
            assert any("downloading" in s[0] and s[2] == len(archive) for s in seen)
            n = len(m.requests)
            assert stage_dataset(t, ds, "lego", python=sys.executable, payload_dir=str(REPO), tuning=TUNING) == path
            assert len(m.requests) == n
    finally:
        t.close()


def test_upload_fallback_over_ssh(sshd_server: SSHServer, scene_dir: Path, tmp_path: Path) -> None:
    t = ssh_transport(sshd_server, tmp_path / "host")
    try:
        with MirrorServer({}, MirrorBehaviour(status=503)) as down:
            ds = dataset("nerf", [down.url("/ns.zip"), f"file://{scene_dir.parent}"])
            path = stage_dataset(t, ds, "lego", python=sys.executable, payload_dir=str(REPO), tuning=TUNING)
        assert (Path(path) / "padding.bin").read_bytes() == (scene_dir / "padding.bin").read_bytes()
        assert (Path(path).parent / ".complete-lego").is_file()
    finally:
        t.close()
