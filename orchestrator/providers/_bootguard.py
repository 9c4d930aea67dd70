"""The boot guard: a dead-man's switch installed at create time, before SSH exists.

The on-host watchdog (remote_payload) only starts with the pipeline. A controller that dies
earlier (during boot, set-up or staging) would leave the instance billing until the next
`orchestrate` command. Where the provider runs a start-up command in the instance (vast.ai's
`onstart`), we install this guard there:

- once a job's `heartbeat` exists under the work root, the pipeline's watchdog is in charge and
  the guard exits;
- otherwise set-up activity is the heartbeat: while files under the work root keep changing
  (payload pushed, dataset downloading, environment recorded) or a process working in it runs
  (a long bootstrap, e.g. building tiny-cuda-nn), the controller is taken to be alive;
- when nothing under the root changed for `idle_timeout_s` (or the root never appeared), the
  guard runs the provider's self-stop command, once.
"""
from __future__ import annotations

import shlex


def root_expr(root: str) -> str:
    """A shell word for the work root, with a leading ~ turned into $HOME."""
    if root == "~" or root.startswith("~/"):
        return '"$HOME"' + shlex.quote(root[1:]) if len(root) > 1 else '"$HOME"'
    return shlex.quote(root)


def boot_guard_script(stop_command: str, *, root: str, idle_timeout_s: float, poll_s: float = 5.0) -> str:
    """A one-line shell command that starts the guard detached and returns at once. The root
    travels in an environment variable so the guard's own command line does not mention it
    (it looks for other processes that do)."""
    idle = max(1, int(round(idle_timeout_s)))
    poll = max(1, int(round(poll_s)))
    body = (f"R=$ORCHESTRATE_GUARD_ROOT; sleep {idle}; "
            f"while :; do "
            f"ls \"$R\"/jobs/*/heartbeat >/dev/null 2>&1 && exit 0; "
            f"[ -n \"$(find \"$R\" -newermt '{idle} seconds ago' -print -quit 2>/dev/null)\" ] || "
            f"pgrep -f -- \"$R\" >/dev/null 2>&1 || "
            f"{{ echo \"orchestrate boot guard: no set-up activity for {idle} s; stopping\"; {stop_command}; exit 0; }}; "
            f"sleep {poll}; done")
    return (f"ORCHESTRATE_GUARD_ROOT={root_expr(root)} nohup sh -c {shlex.quote(body)} "
            f'>>"$HOME"/orchestrate-boot-guard.log 2>&1 </dev/null &')
