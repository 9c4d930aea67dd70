"""`orchestrate logs [RUN] JOB [-f]`: a job's log and status, from the live host while it runs,
else from the copy pulled into its results directory."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import ConfigError, OrchestratorError
from ..ledger import OPEN_STATES, JobRow, Ledger
from ..secrets import redact

FOLLOW_POLL_S = 2.0
FOLLOW_MAX_S = 7 * 24 * 3600.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("logs", help="a job's log and status (live host, or the pulled copy)",
                       description="Print a job's log.txt and its status: from the host while the job "
                                   "runs there, else from the results directory it was pulled into.")
    p.add_argument("names", nargs="+", metavar="[RUN] JOB", help="job id, optionally after its run id "
                   "(default: the latest run that has the job)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until the job ends")
    p.set_defaults(func=main)


def find_job(ledger: Ledger, names: list[str]) -> JobRow:
    if len(names) > 2:
        raise ConfigError("give at most a run id and a job id", hint="orchestrate logs [RUN] JOB")
    run_id, job_id = (names[0], names[1]) if len(names) == 2 else (None, names[0])
    rows = [j for j in ledger.jobs(run_id) if j.job_id == job_id]
    if not rows:
        known = sorted({j.job_id for j in ledger.jobs(run_id)})
        where = f"run {run_id}" if run_id else "the ledger"
        raise ConfigError(f"no job {job_id!r} in {where}"
                          + (f"; jobs there: {', '.join(known[:10])}" if known else ""),
                          hint="see `orchestrate status`")
    return rows[-1]


def _status_line(job: JobRow, status_text: str | None, where: str) -> str:
    line = f"{job.run_id} {job.job_id}: {job.status} ({where})"
    try:
        st = json.loads(status_text) if status_text else None
    except ValueError:
        st = None
    if isinstance(st, dict):
        line += f"; phase {st.get('phase')}, step {st.get('step', 0)}/{st.get('total_steps', 0)}"
        if st.get("exit_code") is not None:
            line += f", exit {st.get('exit_code')}"
    return line


def _live(ledger: Ledger, job: JobRow) -> Any:
    """A transport to the job's instance when it is still up, with the job's remote directory."""
    if job.status not in ("running", "pending") or job.instance_row is None:
        return None
    inst = ledger.instance(job.instance_row)
    run = ledger.run(job.run_id)
    if inst is None or inst.state not in OPEN_STATES or not inst.instance_id or not run or not run.get("config_path"):
        return None
    from ..config import load_config
    from ..providers import make_provider
    from ..run.payload import job_key
    from ..transport import connect
    config = load_config(Path(run["config_path"]))
    host = config.hosts.get(inst.host_name)
    if host is None:
        return None
    provider = make_provider(host)
    t = connect(provider, inst.instance_id, host, ledger=ledger, instance_row=inst.row_id)
    return t, f"{t.root}/jobs/{job_key(job.job_id, job.settings)}"


def main(args: argparse.Namespace) -> int:
    ledger = Ledger.open()
    try:
        job = find_job(ledger, args.names)
        try:
            live = _live(ledger, job)
        except OrchestratorError as exc:   # the host went away meanwhile: the pulled copy, if any
            sys.stderr.write(f"live host not reachable ({redact(str(exc)).splitlines()[0]}); "
                             "showing the pulled copy\n")
            live = None
        if live is None:
            return _pulled(job)
        t, job_dir = live
        try:
            return _from_host(t, job, job_dir, follow=args.follow)
        finally:
            t.close()
    finally:
        ledger.close()


def _pulled(job: JobRow) -> int:
    out = Path(job.out_dir) if job.out_dir else None
    if out is None or not (out / "log.txt").is_file():
        raise ConfigError(f"{job.job_id}: no log yet ({job.status}); nothing was pulled"
                          + (f" into {out}" if out else ""), hint="`orchestrate status` shows where it is")
    status = (out / "status.json").read_text() if (out / "status.json").is_file() else None
    sys.stderr.write(_status_line(job, status, f"pulled copy in {out}") + "\n")
    sys.stdout.write((out / "log.txt").read_text(errors="replace"))
    return 0


def _from_host(t: Any, job: JobRow, job_dir: str, *, follow: bool) -> int:
    status = t.read_text(f"{job_dir}/status.json")
    sys.stderr.write(_status_line(job, status, "live host") + "\n")
    text = redact(t.read_text(f"{job_dir}/log.txt") or "")
    sys.stdout.write(text)
    sys.stdout.flush()
    seen = len(text)
    deadline = time.monotonic() + FOLLOW_MAX_S
    while follow and time.monotonic() < deadline:
        st = t.read_text(f"{job_dir}/status.json")
        text = redact(t.read_text(f"{job_dir}/log.txt") or "")
        if len(text) > seen:
            sys.stdout.write(text[seen:])
            sys.stdout.flush()
            seen = len(text)
        try:
            ended = st is not None and json.loads(st).get("exit_code") is not None
        except ValueError:
            ended = False
        if ended:
            sys.stderr.write(_status_line(job, st, "live host") + "\n")
            break
        time.sleep(FOLLOW_POLL_S)
    return 0
