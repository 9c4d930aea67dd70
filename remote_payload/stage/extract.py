"""Safe extraction of zip and tar archives.

The whole archive is checked before anything is written: an entry with an absolute path, a
`..` component, a link leading outside the target, or a device/FIFO makes the archive refused
(BadData), never partially extracted.
"""
from __future__ import annotations

import logging
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

from .errors import BadData, StageError

log = logging.getLogger(__name__)


def safe_relpath(name: str, what: str) -> str:
    """Normalise an archive member name; raise BadData when it could escape the target."""
    if "\x00" in name:
        raise BadData(f"{what}: entry {name!r} has a NUL byte")
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        raise BadData(f"{what}: entry {name!r} has an absolute path; refusing to extract")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BadData(f"{what}: entry {name!r} contains '..'; refusing to extract")
    return "/".join(parts)


def _check_link(member: str, target: str, what: str, *, hard: bool) -> None:
    if target.startswith("/") or (len(target) > 1 and target[1] == ":"):
        raise BadData(f"{what}: link {member!r} points to absolute path {target!r}; refusing to extract")
    base = "" if hard else posixpath.dirname(member)   # hard links are relative to the archive root
    resolved = posixpath.normpath(posixpath.join(base, target))
    if resolved == ".." or resolved.startswith("../"):
        raise BadData(f"{what}: link {member!r} -> {target!r} points outside the archive; refusing to extract")


_MAX_LINK_HOPS = 40   # as the kernel's ELOOP limit: a longer chain is a loop or an attack


class _Tree:
    """The archive's tree as extraction would build it, entry by entry, without writing: each
    path is resolved through the symlinks earlier entries made, so a chain (`x/l -> ..`, then
    `x/l/y -> ../..`) is seen leaving the tree even though every link alone looks harmless."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.links: dict[str, str] = {}      # resolved location -> link target as written

    def _escape(self, member: str) -> BadData:
        return BadData(f"{self.what}: entry {member!r} leads outside the archive through its links; "
                       "refusing to extract")

    def resolve(self, parts: list[str], member: str, *, follow_last: bool, hops: int = 0) -> list[str]:
        """Where `parts` lands under the root, following the known links; BadData when it leaves."""
        out: list[str] = []
        for i, comp in enumerate(parts):
            if comp in ("", "."):
                continue
            if comp == "..":
                if not out:
                    raise self._escape(member)
                out.pop()
                continue
            here = "/".join(out + [comp])
            last = i == len(parts) - 1
            if here in self.links and (follow_last or not last):
                if hops >= _MAX_LINK_HOPS:
                    raise BadData(f"{self.what}: entry {member!r} goes through more than "
                                  f"{_MAX_LINK_HOPS} links; refusing to extract")
                target = self.links[here]
                if target.startswith("/"):
                    raise self._escape(member)
                out = self.resolve(out + target.split("/"), member, follow_last=True, hops=hops + 1)
                continue
            out.append(comp)
        return out

    def add(self, name: str, *, link: str | None = None, hard: bool = False) -> str:
        """Account for entry `name` (a symlink to `link`, or a hard link when `hard`); return
        where it will be written, relative to the root."""
        parts = name.split("/")
        where = self.resolve(parts[:-1], name, follow_last=True) + parts[-1:]
        loc = "/".join(where)
        if loc in self.links and link is None:
            raise BadData(f"{self.what}: entry {name!r} would be written through the link "
                          f"{loc!r}; refusing to extract")
        if link is not None:
            base = [] if hard else where[:-1]
            self.resolve(base + link.split("/"), name, follow_last=True)
            if not hard:
                self.links[loc] = link
        return loc


def _check_space(total_bytes: int, dest: Path, what: str) -> None:
    free = shutil.disk_usage(dest).free
    if total_bytes > free:
        raise StageError(f"{what}: needs {total_bytes / 1e9:.2f} GB to extract, {free / 1e9:.2f} GB free "
                         f"under {dest}; free some disk or use a bigger volume")


def _extract_tar(archive: Path, dest: Path, what: str) -> int:
    try:
        tf = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as exc:
        raise BadData(f"{what}: not a readable tar archive ({exc})") from None
    with tf:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise BadData(f"{what}: not a readable tar archive ({exc})") from None
        tree = _Tree(what)
        for m in members:
            name = safe_relpath(m.name, what)
            if m.isdev() or m.isfifo():
                raise BadData(f"{what}: entry {m.name!r} is a device or FIFO; refusing to extract")
            if m.issym() or m.islnk():
                _check_link(name, m.linkname, what, hard=m.islnk())
                tree.add(name, link=m.linkname, hard=m.islnk())
            elif name:
                tree.add(name)
        _check_space(sum(m.size for m in members if m.isfile()), dest, what)
        try:
            if hasattr(tarfile, "data_filter"):   # 3.10.12+/3.11.4+: a second line of defence
                tf.extractall(dest, members=members, filter="data")
            else:
                tf.extractall(dest, members=members)
        except getattr(tarfile, "FilterError", ()) as exc:   # the checks above should catch it first
            raise BadData(f"{what}: {exc}; refusing to extract") from None
    return len(members)


def _extract_zip(archive: Path, dest: Path, what: str) -> int:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BadData(f"{what}: not a readable zip archive ({exc})") from None
    with zf:
        infos = zf.infolist()
        links: list[tuple[zipfile.ZipInfo, str, str]] = []
        where: dict[int, str] = {}
        tree = _Tree(what)
        for info in infos:
            name = safe_relpath(info.filename, what)
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                target = zf.read(info).decode("utf-8", "replace")
                _check_link(name, target, what, hard=False)
                links.append((info, tree.add(name, link=target), target))
            elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode):
                raise BadData(f"{what}: entry {info.filename!r} is a device or FIFO; refusing to extract")
            elif name:
                where[id(info)] = tree.add(name)
        _check_space(sum(i.file_size for i in infos), dest, what)
        link_names = {id(i) for i, _, _ in links}
        for info in infos:
            if id(info) in link_names or id(info) not in where:
                continue
            out = dest / where[id(info)]
            if info.is_dir():
                out.mkdir(parents=True, exist_ok=True)
                continue
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1024 * 1024)
        for _, name, target in links:
            out = dest / name
            out.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, out)
    return len(infos)


def extract(archive: Path, dest: Path, what: str | None = None) -> int:
    """Extract `archive` (zip or any tar) into `dest` after checking every entry; return the count."""
    what = what or archive.name
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        n = _extract_zip(archive, dest, what)
    elif tarfile.is_tarfile(archive):
        n = _extract_tar(archive, dest, what)
    else:
        raise BadData(f"{what}: neither a zip nor a tar archive")
    log.info("extracted %d entries of %s", n, what)
    return n
