"""Bad experiments files through the real command line: one `error:` line naming file:line:key,
a non-zero exit, no traceback, and nothing started (the ledger holds no run)."""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from test_config import VALID, replace_line

CASES = [
    ("malformed YAML", "name: t\nhosts:\n  here: {provider: local\ndatasets: {}\n",
     ":4: malformed YAML: expected ',' or '}', but got ':' (while parsing a flow mapping that starts on line 3)"),
    ("unknown key", replace_line(VALID, 9, "    prot: 2222"), ":9: hosts.box.prot: unknown key; did you mean 'port'?"),
    ("unknown GPU", replace_line(VALID, 13, "  vast: {provider: vastai, gpu: RTX 4900}"),
     ":13: hosts.vast.gpu: unknown GPU 'RTX 4900'; did you mean 'RTX 4090'? "
     "(or give price_per_hour for a GPU the catalog does not list)"),
    ("unknown provider", replace_line(VALID, 5, "  here: {provider: aws}"),
     ":5: hosts.here.provider: unknown provider 'aws'; expected one of: local, ssh, vastai, runpod, lambda, slurm"),
    ("negative steps", replace_line(VALID, 28, "    steps: -1"), ":28: experiments[1].steps: must be >= 1, got -1"),
    ("missing scene", replace_line(VALID, 22, "    scenes: [lego]"),
     ":22: experiments[0].scenes: unknown generated scene 'lego' for dataset 'demo'; "
     "expected one of: default, spheres, rods, blocks"),
    ("unreadable secret file", replace_line(VALID, 12, "    password_file: /nonexistent/pw"),
     ":12: hosts.box.password_file: cannot read secret file /nonexistent/pw: No such file or directory; "
     "the file must hold the password"),
]


def _orchestrate(args: list[str], home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCHESTRATE_HOME": str(home)}
    code = "import sys; from orchestrator.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.mark.parametrize("command", ["estimate", "run"])
@pytest.mark.parametrize("name,text,tail", CASES, ids=[c[0] for c in CASES])
def test_bad_file_one_line_nonzero_exit(tmp_path: Path, command: str, name: str, text: str, tail: str) -> None:
    path = tmp_path / "experiments.yaml"
    path.write_text(text)
    home = tmp_path / "home"
    args = [command, str(path)] + (["--yes"] if command == "run" else [])
    res = _orchestrate(args, home)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    first = res.stderr.strip().splitlines()[0]
    assert first == f"error: {path}{tail}"
    db = home / "ledger.sqlite"
    if db.exists():
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0
            assert conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0
