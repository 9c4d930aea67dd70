"""Archives whose links form a chain out of the dataset cache (issue 18, item 2).

Each link alone stays inside the tree, but resolved after the earlier entries (`x/l -> ..`
makes `x/l/y` sit at the root, so `x/l/y -> ../..` leaves it) the chain escapes. Through the
staging CLI against a real HTTP mirror on loopback: exit 2 (bad data), one line, and nothing
written: no partial tree, no link anywhere.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from orchestrator.staging.mirror_server import MirrorServer
from remote_payload.stage.errors import BadData
from remote_payload.stage.extract import extract

REPO = Path(__file__).resolve().parents[1]


def chain_zip(entries: list[tuple[str, str | None]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, target in entries:
            info = zipfile.ZipInfo(name)
            if target is None:
                zf.writestr(info, "data")
            else:
                info.external_attr = 0o120777 << 16
                zf.writestr(info, target)
    return buf.getvalue()


def chain_tar(entries: list[tuple[str, str | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, target in entries:
            info = tarfile.TarInfo(name)
            if target is None:
                info.size = 4
                tf.addfile(info, io.BytesIO(b"data"))
            else:
                info.type = tarfile.SYMTYPE
                info.linkname = target
                tf.addfile(info)
    return buf.getvalue()


CHAIN = [("lego/a.txt", None), ("x/l", ".."), ("x/l/y", "../.."), ("lego/b.txt", None)]
LOOP = [("lego/a.txt", None)] + [(f"l{i}", f"l{i + 1}") for i in range(60)] + [("l60", "l0")] \
    + [("l0/z", None)]


def stage_cli(dest: Path, url: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "remote_payload", "stage", "--dest", str(dest), "--scene", "lego",
                           "--mirror", url], capture_output=True, text=True, timeout=60, env=env, cwd=REPO)


def links_under(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_symlink()] if root.exists() else []


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_symlink_chain_out_of_the_tree_exits_2_and_writes_nothing(tmp_path: Path, kind: str) -> None:
    data = chain_zip(CHAIN) if kind == "zip" else chain_tar(CHAIN)
    with MirrorServer({f"/evil.{kind}": data}) as m:
        res = stage_cli(tmp_path / "ds", m.url(f"/evil.{kind}"))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "'x/l/y' leads outside the archive through its links" in lines[0]
    assert "Traceback" not in res.stderr
    assert links_under(tmp_path) == []
    assert not (tmp_path / "ds" / "lego").exists()
    assert not [p for p in (tmp_path / "ds").rglob("a.txt")]     # nothing of the archive written


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_file_written_through_an_escaping_chain_is_refused(tmp_path: Path, kind: str) -> None:
    entries = [("x/l", ".."), ("x/l/m", ".."), ("x/l/m/pwned.txt", None)]
    arc = tmp_path / f"e.{kind}"
    arc.write_bytes(chain_zip(entries) if kind == "zip" else chain_tar(entries))
    with pytest.raises(BadData, match="'x/l/m' leads outside"):
        extract(arc, tmp_path / "out")
    assert not (tmp_path / "pwned.txt").exists() and list((tmp_path / "out").rglob("*")) == []


def test_a_link_loop_is_refused_without_recursing_forever(tmp_path: Path) -> None:
    arc = tmp_path / "loop.zip"
    arc.write_bytes(chain_zip(LOOP))
    with pytest.raises(BadData, match="more than 40 links"):
        extract(arc, tmp_path / "out")


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_a_chain_that_stays_inside_extracts(tmp_path: Path, kind: str) -> None:
    entries = [("scene/train/r_0.png", None), ("scene/cur", "train"), ("scene/cur/alias", "r_0.png")]
    arc = tmp_path / f"ok.{kind}"
    arc.write_bytes(chain_zip(entries) if kind == "zip" else chain_tar(entries))
    assert extract(arc, tmp_path / "out") == 3
    assert (tmp_path / "out" / "scene" / "train" / "alias").read_bytes() == b"data"
    assert os.readlink(tmp_path / "out" / "scene" / "cur") == "train"
