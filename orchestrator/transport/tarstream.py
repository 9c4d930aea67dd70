"""Fast file transfer: one tar stream through one SSH exec channel, both ways.

Per-file SFTP or scp pays one or more round trips per file; on a 50 ms link with hundreds of
1 MB images that is most of the time. Here a directory goes as a single tar stream (the remote
end runs GNU tar), so the link stays full.

A manifest makes it resumable: both ends are listed (relative path, size), files whose size
matches are compared by sha256 (`sha256sum` on the host, hashlib here), and only missing or
different files are sent. A transfer cut in the middle leaves a short or wrong file, which the
next call detects and sends again; after a transfer, sizes are checked on the receiving side.

The functions take a live `paramiko.Transport`; `SSHTransport` (ssh.py) owns reconnection.
"""
from __future__ import annotations

import hashlib
import io
import os
import shlex
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import paramiko

from ..errors import CommandError, TransportError
from ..secrets import redact
from .base import ProgressFn, TransferStats

CHUNK_BYTES = 1 << 20
EOF_GRACE_S = 2.0      # after a command's exit status, how long its output's EOF is waited for
_SHA_CHUNK = 1 << 20


class LinkLost(TransportError):
    """The connection died under a command or transfer (the caller may reconnect and retry)."""


@dataclass(frozen=True, slots=True)
class Listing:
    kind: str                       # "dir", "file" or "missing"
    files: dict[str, int]           # relative path -> size (for "file": {basename: size})


# -- remote helpers -------------------------------------------------------------------------------
def exec_capture(t: paramiko.Transport, command: str, *, stdin: bytes | None = None,
                 timeout_s: float = 600.0) -> tuple[int, bytes, bytes]:
    """Run `command`, feed `stdin`, return (exit code, stdout, stderr). Bounded by timeout_s."""
    chan = t.open_session(timeout=min(timeout_s, 30.0))
    try:
        chan.settimeout(timeout_s)
        chan.exec_command(command)
        if stdin:
            chan.sendall(stdin)
        chan.shutdown_write()
        return _drain(chan, timeout_s)
    finally:
        chan.close()


def _drain(chan: paramiko.Channel, timeout_s: float) -> tuple[int, bytes, bytes]:
    deadline = time.monotonic() + timeout_s
    out, err = bytearray(), bytearray()
    exited_at: float | None = None
    while True:
        if time.monotonic() > deadline:
            raise TransportError(f"remote command timed out after {timeout_s:.0f} s")
        got = False
        while chan.recv_ready():
            out += chan.recv(CHUNK_BYTES)
            got = True
        while chan.recv_stderr_ready():
            err += chan.recv_stderr(CHUNK_BYTES)
            got = True
        if chan.exit_status_ready() and not chan.recv_ready() and not chan.recv_stderr_ready():
            # sshd may send the exit status before the last output: the output is complete at
            # EOF. A command that left a background child holding its stdout never sends EOF,
            # so after the exit status EOF is waited for only briefly.
            if chan.eof_received:
                break
            exited_at = exited_at or time.monotonic()
            if time.monotonic() - exited_at > EOF_GRACE_S:
                break
        if not got:
            if exited_at is None:
                chan.status_event.wait(0.02)
            else:    # the status event stays set from here on: do not spin on it
                time.sleep(0.01)
            if chan.closed and not chan.recv_ready() and not chan.recv_stderr_ready() \
                    and not chan.exit_status_ready():
                raise LinkLost("connection lost during a remote command")
    return chan.recv_exit_status(), bytes(out), bytes(err)


def _listing_script(path: str) -> str:
    q = shlex.quote(path)
    return (f"if [ -d {q} ]; then echo D; cd {q} && find . -type f -printf '%s %P\\0'; "
            f"elif [ -f {q} ]; then echo F; stat -c '%s' {q}; else echo N; fi")


def _parse_listing(out: bytes, path: str) -> Listing:
    head, _, rest = out.partition(b"\n")
    if head == b"N":
        return Listing("missing", {})
    if head == b"F":
        return Listing("file", {PurePosixPath(path).name: int(rest.strip() or 0)})
    files: dict[str, int] = {}
    for rec in rest.split(b"\0"):
        if rec:
            size, _, name = rec.partition(b" ")
            files[os.fsdecode(name)] = int(size)
    return Listing("dir", files)


def remote_listing(t: paramiko.Transport, path: str) -> Listing:
    """What exists at `path` on the host: a directory's files with sizes, a file, or nothing."""
    code, out, err = exec_capture(t, _listing_script(path), timeout_s=120)
    if code != 0:
        raise CommandError(f"list {path}", code, redact(err.decode(errors="replace")))
    return _parse_listing(out, path)


def remote_sha256(t: paramiko.Transport, base: str, names: list[str]) -> dict[str, str]:
    """sha256 of each file (relative to `base`) on the host, in one command."""
    if not names:
        return {}
    payload = b"\0".join(os.fsencode(n) for n in names) + b"\0"
    code, out, err = exec_capture(t, f"cd {shlex.quote(base)} && xargs -0 sha256sum --",
                                  stdin=payload, timeout_s=1800)
    lines = out.decode(errors="replace").splitlines()
    if code != 0 or len(lines) != len(names):
        # a file that vanished or is unreadable just counts as different
        return {}
    return {n: line.lstrip("\\")[:64] for n, line in zip(names, lines)}


# -- local helpers --------------------------------------------------------------------------------
def local_listing(path: Path) -> Listing:
    if path.is_dir():
        files = {}
        for root, _dirs, names in os.walk(path):
            for name in names:
                full = Path(root) / name
                if full.is_file() and not full.is_symlink():
                    files[full.relative_to(path).as_posix()] = full.stat().st_size
        return Listing("dir", dict(sorted(files.items())))
    if path.is_file():
        return Listing("file", {path.name: path.stat().st_size})
    return Listing("missing", {})


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_SHA_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def plan_transfer(src: dict[str, int], dst: dict[str, int], src_sha: Callable[[list[str]], dict[str, str]],
                  dst_sha: Callable[[list[str]], dict[str, str]]) -> list[str]:
    """Names to send: missing at the destination, a different size, or a different sha256."""
    todo = [n for n, size in src.items() if dst.get(n) != size]
    same_size = [n for n, size in src.items() if dst.get(n) == size]
    if same_size:
        a, b = src_sha(same_size), dst_sha(same_size)
        todo += [n for n in same_size if not a.get(n) or a.get(n) != b.get(n)]
    return sorted(todo)


# -- streams --------------------------------------------------------------------------------------
class _ChannelReader(io.RawIOBase):
    def __init__(self, chan: paramiko.Channel) -> None:
        self.chan = chan

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.chan.recv(len(b))
        b[:len(data)] = data
        return len(data)


class _Progress:
    def __init__(self, total: int, fn: ProgressFn | None) -> None:
        self.total, self.done, self.fn = total, 0, fn
        self._last_s, self._last_bytes = 0.0, 0

    def add(self, n: int) -> None:
        """Report at most every 0.2 s or 4 MB, and always at the end."""
        self.done += n
        now = time.monotonic()
        if self.fn is not None and (now - self._last_s > 0.2 or self.done >= self.total
                                    or self.done - self._last_bytes >= 4 << 20):
            self._last_s, self._last_bytes = now, self.done
            self.fn(self.done, self.total)


def put_tree(t: paramiko.Transport, local: Path, remote: str, *,
             progress: ProgressFn | None = None, timeout_s: float = 24 * 3600) -> TransferStats:
    """Copy a local file or directory to `remote` (absolute) through one tar stream."""
    start = time.monotonic()
    src = local_listing(local)
    if src.kind == "missing":
        raise TransportError(f"cannot upload {local}: no such file or directory")
    if src.kind == "file":
        base, rename_to = str(PurePosixPath(remote).parent), PurePosixPath(remote).name
    else:
        base, rename_to = remote, None
    dst = remote_listing(t, remote)
    if src.kind == "file":
        dst_files = {local.name: next(iter(dst.files.values()))} if dst.kind == "file" else {}
        local_root = local.parent
        src_files = {local.name: src.files[local.name]}
    else:
        if dst.kind == "file":
            raise TransportError(f"cannot upload directory {local} to {remote}: it is a file on the host")
        dst_files, local_root, src_files = dst.files, local, src.files
    def dst_sha(names: list[str]) -> dict[str, str]:
        if rename_to is None:
            return remote_sha256(t, base, names)
        return {local.name: remote_sha256(t, base, [rename_to]).get(rename_to, "")}

    todo = plan_transfer(src_files, dst_files,
                         lambda names: {n: sha256_file(local_root / n) for n in names}, dst_sha)
    total = sum(src_files[n] for n in todo)
    if todo:
        after = _send_tar(t, local_root, todo, base, rename_to, total, progress, timeout_s,
                          then_list=remote)
        got = after.files if after.kind == "dir" else (
            {local.name: next(iter(after.files.values()))} if after.kind == "file" else {})
        short = [n for n in todo if got.get(n) != src_files[n]]
        if short:
            raise TransportError(f"upload to {remote} incomplete: {len(short)} file(s) differ after "
                                 f"transfer (first: {short[0]})", hint="retry; unchanged files are skipped")
    return TransferStats(files=len(todo), bytes=total, seconds=time.monotonic() - start,
                         skipped_files=len(src_files) - len(todo))


def _send_member(chan: paramiko.Channel, path: Path, arcname: str, meter: _Progress) -> None:
    """One tar member: header, exactly `size` bytes of data (zero-filled if the file shrank,
    which the size check afterwards catches), padding. Written straight to the channel in
    large chunks: tarfile's stream writer copies its buffer on every small write."""
    st = path.stat()
    info = tarfile.TarInfo(arcname)
    info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), st.st_mode & 0o777
    pending = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    left = info.size
    with open(path, "rb") as f:
        while left > 0:
            block = f.read(min(CHUNK_BYTES, left)) or b"\0" * min(CHUNK_BYTES, left)
            left -= len(block)
            meter.add(len(block))
            chan.sendall(pending + block if pending else block)
            pending = b""
    pad = -info.size % tarfile.BLOCKSIZE
    chan.sendall(pending + b"\0" * pad)


def _send_tar(t: paramiko.Transport, local_root: Path, names: list[str], base: str,
              rename_to: str | None, total: int, progress: ProgressFn | None, timeout_s: float,
              then_list: str) -> Listing:
    """Stream the files; the same remote command then lists `then_list` (saves a round trip)."""
    qb = shlex.quote(base)
    cmd = (f"mkdir -p {qb} && tar -x -f - -C {qb} --no-same-owner --no-same-permissions && "
           f"{{ {_listing_script(then_list)}; }}")
    chan = t.open_session(timeout=30)
    chan.settimeout(timeout_s)
    meter = _Progress(total, progress)
    try:
        chan.exec_command(cmd)
        for name in names:
            _send_member(chan, local_root / name, rename_to or name, meter)
        chan.sendall(b"\0" * (2 * tarfile.BLOCKSIZE))          # end-of-archive marker
        chan.shutdown_write()
        code, out, err = _drain(chan, timeout_s)
    except (OSError, EOFError, paramiko.SSHException) as exc:
        raise LinkLost(f"upload to {base} interrupted: {redact(str(exc)) or type(exc).__name__}",
                             hint="run again: files already complete are skipped") from None
    finally:
        chan.close()
    if code != 0:
        raise CommandError(f"tar -x into {base}", code, redact(err.decode(errors="replace")))
    return _parse_listing(out, then_list)


def get_tree(t: paramiko.Transport, remote: str, local: Path, *,
             progress: ProgressFn | None = None, timeout_s: float = 24 * 3600) -> TransferStats:
    """Copy a remote file or directory (absolute path) to `local` through one tar stream."""
    start = time.monotonic()
    src = remote_listing(t, remote)
    if src.kind == "missing":
        raise TransportError(f"cannot download {remote}: no such file or directory on the host")
    if src.kind == "file":
        base = str(PurePosixPath(remote).parent)
        name = PurePosixPath(remote).name
        dest_root = local.parent
        dst = {name: local.stat().st_size} if local.is_file() else {}
        src_files = src.files
        rename = {name: local.name}
    else:
        base, dest_root = remote, local
        dst = local_listing(local).files if local.is_dir() else {}
        src_files, rename = src.files, {}
    todo = plan_transfer(src_files, dst, lambda names: remote_sha256(t, base, names),
                         lambda names: {n: sha256_file(dest_root / rename.get(n, n)) for n in names})
    total = sum(src_files[n] for n in todo)
    if todo:
        dest_root.mkdir(parents=True, exist_ok=True)
        _receive_tar(t, base, todo, dest_root, rename, total, progress, timeout_s)
        short = [n for n in todo
                 if not (dest_root / rename.get(n, n)).is_file()
                 or (dest_root / rename.get(n, n)).stat().st_size != src_files[n]]
        if short:
            raise TransportError(f"download of {remote} incomplete: {len(short)} file(s) differ "
                                 f"(first: {short[0]})", hint="retry; complete files are skipped")
    return TransferStats(files=len(todo), bytes=total, seconds=time.monotonic() - start,
                         skipped_files=len(src_files) - len(todo))


def _receive_tar(t: paramiko.Transport, base: str, names: list[str], dest_root: Path,
                 rename: dict[str, str], total: int, progress: ProgressFn | None, timeout_s: float) -> None:
    cmd = f"cd {shlex.quote(base)} && tar -c -f - --null -T -"
    chan = t.open_session(timeout=30)
    chan.settimeout(timeout_s)
    meter = _Progress(total, progress)
    try:
        chan.exec_command(cmd)
        chan.sendall(b"\0".join(os.fsencode(n) for n in names) + b"\0")
        chan.shutdown_write()
        reader = io.BufferedReader(_ChannelReader(chan), buffer_size=CHUNK_BYTES)
        with tarfile.open(fileobj=reader, mode="r|", bufsize=CHUNK_BYTES) as tar:
            for member in tar:
                _extract_member(tar, member, dest_root, rename, meter)
        code, _out, err = _drain(chan, timeout_s)
    except (OSError, EOFError, tarfile.TarError, paramiko.SSHException) as exc:
        raise LinkLost(f"download from {base} interrupted: {redact(str(exc)) or type(exc).__name__}",
                             hint="run again: files already complete are skipped") from None
    finally:
        chan.close()
    if code != 0:
        raise CommandError(f"tar -c in {base}", code, redact(err.decode(errors="replace")))


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest_root: Path,
                    rename: dict[str, str], meter: _Progress) -> None:
    if not member.isfile():
        return   # directories are created as needed; links and devices are never extracted
    rel = PurePosixPath(rename.get(member.name, member.name))
    if rel.is_absolute() or ".." in rel.parts:
        raise TransportError(f"refusing unsafe path in a downloaded archive: {member.name}")
    target = dest_root.joinpath(*rel.parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    src = tar.extractfile(member)
    assert src is not None
    with open(tmp, "wb") as out:
        for block in iter(lambda: src.read(CHUNK_BYTES), b""):
            out.write(block)
            meter.add(len(block))
    os.utime(tmp, (member.mtime, member.mtime))
    os.replace(tmp, target)

