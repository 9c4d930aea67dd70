"""`orchestrate down [INSTANCE | --all] [--orphans] [--yes]`: release what the ledger says is open.

INSTANCE is a provider instance id or a ledger row number (see `orchestrate status`). The
provider client for a row is built from the host entry of the run's experiments file (or
`--config`); local rows need no file. `--orphans` also asks the cloud providers for instances
with our label that no live run will release (orchestrator.run.reconcile).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

from ..config import ExperimentsConfig, HostConfig
from ..errors import ConfigError, OrchestratorError
from ..ledger import InstanceRow, Ledger
from ..providers.base import Provider
from ..run.provisioning import release
from . import add_json_flag, confirm, is_tty, money


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("down", help="stop/destroy instances the ledger says are open",
                       description="Stop paying: destroy the named instance, or every open one with --all.")
    p.add_argument("instance", nargs="?", default=None, help="instance id or ledger row number")
    p.add_argument("--all", action="store_true", help="every open instance in the ledger")
    p.add_argument("--orphans", action="store_true",
                   help="also destroy labelled cloud instances no live run will release")
    p.add_argument("--any-controller", action="store_true",
                   help="with --orphans: also instances labelled by runs this ledger does not know "
                        "(another machine's controller may be using them)")
    p.add_argument("--config", type=Path, default=None,
                   help="experiments file for provider settings (default: the run's own file)")
    p.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    add_json_flag(p)
    p.set_defaults(func=main)


def _config_for(path: Path | None) -> Any | None:
    if path is None or not path.is_file():
        return None
    from ..config import load_config
    return load_config(path)


def _provider_for(row: InstanceRow, ledger: Ledger, cli_config: ExperimentsConfig | None
                  ) -> tuple[Provider, HostConfig]:
    """The provider of a ledger row, with its host entry (from the experiments file at hand, or
    rebuilt from the row when no file has it)."""
    from ..providers import make_provider
    config = cli_config
    if config is None:
        run = ledger.run(row.run_id) or {}
        try:
            config = _config_for(Path(run.get("config_path") or "")) if run.get("config_path") else None
        except OrchestratorError:
            config = None
    host = config.hosts.get(row.host_name) if config is not None else None
    if host is None:
        if row.provider in ("ssh", "slurm"):
            raise ConfigError(f"instance {row.instance_id}: the host {row.host_name!r} is not in any "
                              "experiments file at hand", hint="pass --config experiments.yaml")
        host = HostConfig(name=row.host_name, provider=row.provider, gpu=row.gpu)
    provider = make_provider(host)
    if row.provider == "slurm":      # its scheduler is reached through the login node
        from ..run.slurm_login import bind_login
        bind_login(provider, host)
    return provider, host


class UsageError(OrchestratorError):
    """A command line that says nothing to do: the CLI's usage exit code, as argparse's."""
    exit_code = 64


def main(args: argparse.Namespace) -> int:
    if not args.instance and not args.all and not args.orphans:
        raise UsageError("say what to stop: an INSTANCE, --all, or --orphans",
                         hint="`orchestrate status` lists open instances")
    if args.any_controller and not args.orphans:
        raise UsageError("--any-controller goes with --orphans")
    cli_config = _config_for(args.config)
    if args.config is not None and cli_config is None:
        raise ConfigError(f"--config {args.config}: no such file")
    ledger = Ledger.open()
    try:
        rows = ledger.instances(open_only=True)
        if args.instance:
            rows = [r for r in rows if r.instance_id == args.instance or str(r.row_id) == args.instance]
            if not rows:
                raise ConfigError(f"no open instance {args.instance!r} in the ledger",
                                  hint="`orchestrate status` lists open instances")
        elif not args.all:
            rows = []
        if rows and not args.yes:
            listing = ", ".join(f"{r.provider}:{r.instance_id or '(intent)'}" for r in rows)
            if not is_tty():
                raise ConfigError(f"would release {listing}; not on a terminal",
                                  hint="pass --yes to confirm")
            if not confirm(f"release {listing}?"):
                return 1
        report: list[dict[str, Any]] = []
        failed = 0
        for r in rows:
            entry = {"row_id": r.row_id, "provider": r.provider, "instance_id": r.instance_id,
                     "host": r.host_name}
            if not r.instance_id:
                ledger.set_instance_state(r.row_id, "failed", note="intent without an instance id; "
                                          "closed by `down` (use --orphans to search the provider)")
                entry["result"] = "closed (no instance was recorded)"
            else:
                try:
                    provider, host = _provider_for(r, ledger, cli_config)
                    ok = release(provider, r.instance_id, r.row_id, ledger=ledger, destroy=True,
                                 run_id=r.run_id, job_id=r.job_id, host=host)
                except OrchestratorError as exc:
                    ok, entry["error"] = False, str(exc)
                entry["result"] = "destroyed" if ok else "FAILED"
                failed += 0 if ok else 1
            entry["cost"] = ledger.instance_cost(r.row_id)
            report.append(entry)
        if args.orphans:
            if importlib.util.find_spec("orchestrator.run.reconcile") is None:
                raise ConfigError("--orphans is not available in this build")
            result = _down_orphans(args, ledger, cli_config, report)
            if result is None:
                return 1
            failed += result
    finally:
        ledger.close()
    if args.json:
        sys.stdout.write(json.dumps({"released": report}, indent=2) + "\n")
    elif not report:
        sys.stdout.write("nothing open\n")
    else:
        for e in report:
            cost = f" (cost {money(e['cost'])})" if "cost" in e else ""
            err = f": {e['error']}" if e.get("error") else ""
            sys.stdout.write(f"{e['provider']} {e['instance_id']}: {e['result']}{cost}{err}\n")
    return 1 if failed else 0


def _down_orphans(args: argparse.Namespace, ledger: Ledger, cli_config: Any | None,
                  report: list[dict[str, Any]]) -> int | None:
    """Show every orphan and why it is believed orphaned, ask (as --all does), then destroy
    exactly what was shown. The failure count, or None when the user said no."""
    from ..run.reconcile import close_vanished, destroy_orphan, find_orphans, providers_for
    provs = providers_for(cli_config, ledger)
    found = [(p, o) for p in provs.values() for o in find_orphans(ledger, [p], any_controller=args.any_controller)]
    if found and not args.yes:
        listing = "; ".join(f"{o.provider}:{o.info.instance_id} ({o.reason})" for _, o in found)
        if not is_tty():
            raise ConfigError(f"would destroy {len(found)} orphan(s): {listing}; not on a terminal",
                              hint="pass --yes to confirm")
        for _, o in found:
            sys.stderr.write(f"  {o.provider} {o.info.instance_id} {o.info.label}: {o.reason}\n")
        if not confirm(f"destroy these {len(found)} orphan(s)?"):
            sys.stderr.write("nothing destroyed\n")
            return None
    failed = 0
    for provider, orphan in found:
        td = destroy_orphan(ledger, provider, orphan)
        report.append({"provider": orphan.provider, "instance_id": orphan.info.instance_id,
                       "reason": orphan.reason,
                       "result": "destroyed" if td.destroyed else f"FAILED: {td.error}"})
        failed += 0 if td.destroyed else 1
    close_vanished(ledger, list(provs.values()))
    return failed
