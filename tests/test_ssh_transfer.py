"""Tar-stream transfers both ways through a real sshd: content, manifest skip, resume."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from test_ssh_transport import make_transport

from orchestrator.errors import TransportError
from orchestrator.testing.sshd import SSHServer, sshd_server  # noqa: F401  (fixture)
from orchestrator.transport.ssh import SSHTransport

pytestmark = pytest.mark.sshd


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def make_tree(root: Path, n: int = 12, size: int = 50_000) -> Path:
    rnd = __import__("random").Random(7)
    for i in range(n):
        sub = root / ("train" if i % 2 else "test") / ("deep" if i % 3 == 0 else "")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"r_{i}.png").write_bytes(rnd.randbytes(size + i))
    (root / "name with spaces.json").write_text('{"frames": []}')
    (root / "empty.txt").write_bytes(b"")
    return root


@pytest.fixture
def tr(sshd_server: SSHServer, tmp_path: Path) -> SSHTransport:
    t = make_transport(sshd_server, tmp_path / "remote")
    yield t
    t.close()


def test_put_tree_then_skip_unchanged(tr: SSHTransport, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    seen: list[tuple[int, int | None]] = []
    first = tr.put(src, "cache/scene", progress=lambda d, t: seen.append((d, t)))
    assert (first.files, first.bytes, first.skipped_files) == (14, total, 0)
    assert tree_digest(tmp_path / "remote/cache/scene") == tree_digest(src)
    assert seen[-1] == (total, total) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    second = tr.put(src, "cache/scene")
    assert (second.files, second.bytes, second.skipped_files) == (0, 0, 14)


def test_corrupted_truncated_and_changed_files_are_resent(tr: SSHTransport, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src")
    tr.put(src, "data")
    remote = tmp_path / "remote/data"
    victim = remote / "train/r_1.png"                     # same size, same mtime, other bytes
    st = victim.stat()
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    partial = remote / "test/r_2.png"                     # as a cut transfer leaves it
    partial.write_bytes(partial.read_bytes()[:1000])
    (src / "test/r_4.png").write_bytes(b"changed locally")
    again = tr.put(src, "data")
    assert again.files == 3 and again.skipped_files == 11
    assert again.bytes == (src / "train/r_1.png").stat().st_size + (src / "test/r_2.png").stat().st_size + 15
    assert tree_digest(remote) == tree_digest(src)


def test_get_tree_skip_and_refetch(tr: SSHTransport, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "remote/jobs/j/out")
    back = tmp_path / "home"
    got = tr.get("jobs/j/out", back)
    assert got.files == 14 and tree_digest(back) == tree_digest(src)
    assert not list(back.rglob("*.part"))
    assert tr.get("jobs/j/out", back).files == 0
    (back / "test/deep/r_0.png").write_bytes(b"x" * (back / "test/deep/r_0.png").stat().st_size)   # corrupted
    (back / "train/deep/r_3.png").unlink()
    again = tr.get("jobs/j/out", back)
    assert again.files == 2 and again.skipped_files == 12
    assert tree_digest(back) == tree_digest(src)


def test_single_file_both_ways(tr: SSHTransport, tmp_path: Path) -> None:
    f = tmp_path / "summary.json"
    f.write_text('{"psnr": 31.5}')
    st = tr.put(f, "jobs/x/in.json")
    assert st.files == 1 and (tmp_path / "remote/jobs/x/in.json").read_text() == '{"psnr": 31.5}'
    assert tr.put(f, "jobs/x/in.json").files == 0
    out = tmp_path / "back/copy.json"
    assert tr.get("jobs/x/in.json", out).files == 1 and out.read_text() == '{"psnr": 31.5}'
    assert tr.get("jobs/x/in.json", out).files == 0
    with pytest.raises(TransportError, match="no such file"):
        tr.get("jobs/x/missing.json", out)
    with pytest.raises(TransportError, match="no such file"):
        tr.put(tmp_path / "nothing-here", "x")


def test_put_cut_by_dropped_connection_resumes(sshd_server: SSHServer, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", n=30, size=1_000_000)
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file())
    tr = make_transport(sshd_server, tmp_path / "remote")
    killed: list[int] = []

    def cut(done: int, _total: int | None) -> None:
        if not killed and done > total // 3:
            killed.append(sshd_server.kill_sessions())     # the link dies mid-transfer
    stats = tr.put(src, "data", progress=cut)              # retried once on a new connection
    assert killed and killed[0] >= 1
    assert tr.connects == 2
    assert stats.skipped_files >= 5 and stats.bytes < total      # the complete files were kept
    assert tree_digest(tmp_path / "remote/data") == tree_digest(src)
    tr.close()
