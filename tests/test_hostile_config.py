"""Hostile experiments files through the real CLI (issue 18, items 3, 4, 5, 12, 13, 16, 17, 19).

Each is answered before anything is rented: exit 2 (config error), one `error:` line (plus a
`hint:` line where there is advice) naming file:line and key, no traceback, no run or instance
in the ledger, and never the offending secret echoed back.
"""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.ledger import Ledger
from orchestrator.transport.sshconfig import managed_path, update_ssh_config


def base(host: str = "  here: {provider: local}", experiment: str = "  - {name: e, dataset: demo, steps: 5}",
         top: str = "name: t") -> str:
    return f"{top}\nhosts:\n{host}\ndatasets:\n  demo: {{generate: {{size: 16}}}}\nexperiments:\n{experiment}\n"


def orchestrate(tmp: Path, *args: str, env_extra: dict[str, str] | None = None,
                timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "ORCHESTRATE_HOME": str(tmp / "home"), "HOME": str(tmp / "user"), **(env_extra or {})}
    env.pop("ORCHESTRATE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout_s, stdin=subprocess.DEVNULL, cwd=tmp)


def nothing_started(tmp: Path) -> bool:
    db = tmp / "home" / "ledger.sqlite"
    if not db.exists():
        return True
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == 0
    finally:
        con.close()


def refused(tmp: Path, text: str, command: str = "run", **kw: object) -> tuple[str, str]:
    path = tmp / "experiments.yaml"
    path.write_text(text)
    args = [command, str(path)] + (["--yes"] if command == "run" else [])
    res = orchestrate(tmp, *args, **kw)  # type: ignore[arg-type]
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) <= 2 and lines[0].startswith("error: ") and all(
        ln.startswith("hint: ") for ln in lines[1:]), res.stderr
    assert nothing_started(tmp)
    return lines[0], res.stderr + res.stdout


SSH = "  box:\n    provider: ssh\n    host: {host}\n    user: {user}\n    gpu: cpu\n    price_per_hour: 1"


@pytest.mark.parametrize("field, value, shown", [
    ("user", '"root ProxyCommand=touch /tmp/orch-pwned"', "contains space, '='"),
    ("user", '"root\\tIdentityFile=/etc/shadow"', "contains '\\t', '='"),
    ("host", '"10.0.0.1 -oProxyCommand=x"', "contains space, '='"),
    ("host", '"a#b"', "contains '#'"),
])
def test_host_field_that_would_inject_ssh_config_is_refused(tmp_path: Path, field: str, value: str,
                                                             shown: str) -> None:
    values = {"host": "127.0.0.1", "user": "root", field: value}
    line, _ = refused(tmp_path, base(SSH.format(**values)))
    lineno = 5 if field == "host" else 6
    assert line.startswith(f"error: {tmp_path / 'experiments.yaml'}:{lineno}: hosts.box.{field}: {shown}")
    assert "ProxyCommand" not in line and "IdentityFile" not in line      # the value is not echoed
    assert not Path("/tmp/orch-pwned").exists()


def test_an_injected_endpoint_never_reaches_the_managed_ssh_config(tmp_path: Path) -> None:
    """An endpoint_command may print anything: the ledger row is left out of the managed file,
    so `ssh` keeps working for every other host (checked by OpenSSH itself, `ssh -G`)."""
    home, user = tmp_path / "home", tmp_path / "user"
    (user / ".ssh").mkdir(parents=True)
    ledger = Ledger.open(home)
    for job, iid, endpoint in (("j1", "good-1", "root@127.0.0.1:2222"),
                               ("j2", "evil-1", "root ProxyCommand=touch /tmp/orch-pwned@127.0.0.1:22")):
        row = ledger.record_intent(run_id="r1", job_id=job, host_name=iid.split("-")[0], provider="ssh",
                                   label=f"orch-r1-{job}", gpu="cpu", price_per_hour=1, currency="USD")
        ledger.instance_created(row, iid)
        ledger.set_endpoint(row, endpoint)
    entries = update_ssh_config(ledger, home, user_home=user)
    ledger.close()
    assert [e.instance_id for e in entries] == ["good-1"]
    text = managed_path(home).read_text()
    assert "ProxyCommand" not in text
    for name in ("good", "evil"):
        res = subprocess.run(["ssh", "-F", str(user / ".ssh" / "config"), "-G", name], capture_output=True,
                             text=True, timeout=10, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, res.stderr                   # the file still parses
        opts = dict(ln.partition(" ")[::2] for ln in res.stdout.splitlines())
        assert "proxycommand" not in opts
    assert opts["hostname"] == "evil"          # not in the managed file: ssh's default


BOMB = "".join(f"{c}: &{c} [" + ",".join([f"*{p}"] * 9 if p else ['"lol"'] * 9) + "]\n"
               for p, c in zip([""] + list("abcdefgh"), "abcdefghi"))


def test_yaml_alias_bomb_is_refused_fast(tmp_path: Path) -> None:
    assert len(BOMB.encode()) < 500
    t0 = time.monotonic()
    line, _ = refused(tmp_path, BOMB, command="estimate", timeout_s=30)
    assert time.monotonic() - t0 < 20
    assert line == (f"error: {tmp_path / 'experiments.yaml'}:1: the file expands to more than 100,000 values "
                    "once its aliases (*name) are expanded; refusing to read it")


def test_a_secret_pasted_into_password_env_is_not_echoed(tmp_path: Path) -> None:
    host = ("  box:\n    provider: ssh\n    host: 127.0.0.1\n    gpu: cpu\n    price_per_hour: 1\n"
            "    password_env: hunter2")
    line, everything = refused(tmp_path, base(host))
    assert "hunter2" not in everything
    assert line.endswith("hosts.box.password_env: no environment variable of that name is set, and it looks "
                         "like a value rather than a variable name")


def test_a_missing_variable_with_a_proper_name_is_named(tmp_path: Path) -> None:
    host = ("  box:\n    provider: ssh\n    host: 127.0.0.1\n    gpu: cpu\n    price_per_hour: 1\n"
            "    password_env: ORCH_TEST_UNSET_PW")
    line, _ = refused(tmp_path, base(host))
    assert line.endswith("environment variable ORCH_TEST_UNSET_PW is not set")


@pytest.mark.parametrize("price, why", [("1.0e+308", "must be <= 1e+06, got 1e+308"),
                                        ("2000000", "must be <= 1e+06, got 2000000"),
                                        (".inf", "expected a number, got inf (not a finite number)"),
                                        ("1e400", "expected a number, got inf (not a finite number)")])
def test_absurd_or_non_finite_price_is_refused(tmp_path: Path, price: str, why: str) -> None:
    host = f"  box: {{provider: local, price_per_hour: {price}}}"
    line, everything = refused(tmp_path, base(host), command="estimate")
    assert line.endswith(f"hosts.box.price_per_hour: {why}") and "Infinity" not in everything


def test_estimate_json_of_an_expensive_but_sane_price_is_finite(tmp_path: Path) -> None:
    (tmp_path / "experiments.yaml").write_text(base("  box: {provider: local, price_per_hour: 999999}"))
    res = orchestrate(tmp_path, "estimate", "experiments.yaml", "--json")
    assert res.returncode == 0, res.stderr
    assert "Infinity" not in res.stdout and "NaN" not in res.stdout
    json.loads(res.stdout)


def test_a_250_character_experiment_name_is_refused_before_renting(tmp_path: Path) -> None:
    name = "e" * 250
    line, _ = refused(tmp_path, base(experiment=f"  - {{name: {name}, dataset: demo, steps: 5}}"))
    assert line.endswith("experiments[0].name: experiment name is 250 characters long; at most 64 "
                         "(it becomes part of directory names on the host)")


def test_1e3_is_read_as_a_number(tmp_path: Path) -> None:
    (tmp_path / "experiments.yaml").write_text(base(experiment="  - {name: e, dataset: demo, steps: 1e3}"))
    res = orchestrate(tmp_path, "estimate", "experiments.yaml", "--json")
    assert res.returncode == 0, res.stderr
    assert "1000 steps / " in res.stdout


def test_unknown_currency_names_file_line_and_key(tmp_path: Path) -> None:
    text = base("  box: {provider: local, price_per_hour: 1, currency: XYZ}",
                top="name: t\nbudget: {max_cost: 10, currency: USD}")
    line, everything = refused(tmp_path, text, command="estimate")
    assert line == (f"error: {tmp_path / 'experiments.yaml'}:4: hosts.box.currency: no exchange rate for XYZ "
                    "(this file also uses USD; rates are known for CNY, EUR, USD); use one currency for "
                    "every host and the budget, or one of those")
    assert "site-packages" not in everything and "fx.csv" not in everything


def test_one_unknown_currency_throughout_needs_no_rate(tmp_path: Path) -> None:
    text = base("  box: {provider: local, price_per_hour: 1, currency: GBP}",
                top="name: t\nbudget: {max_cost: 10, currency: GBP}")
    (tmp_path / "experiments.yaml").write_text(text)
    res = orchestrate(tmp_path, "estimate", "experiments.yaml")
    assert res.returncode == 0, res.stderr


def test_dotdot_name_is_called_reserved(tmp_path: Path) -> None:
    line, _ = refused(tmp_path, base(experiment="  - {name: '..', dataset: demo, steps: 5}"))
    assert line.endswith("experiments[0].name: experiment name '..' is reserved (it means a directory); "
                         "choose another")


def test_control_characters_in_the_run_name_are_refused(tmp_path: Path) -> None:
    line, everything = refused(tmp_path, base(top='name: "ok\\x1b[31mred"'))
    assert "\x1b" not in everything
    assert line.endswith("name: the run name must be one line of at most 100 printable characters")
