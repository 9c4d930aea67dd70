"""Generated scenes: made on the host by `python -m ngp_train synth`, cached by their spec."""
from __future__ import annotations

import json
import secrets
import shlex
from typing import TYPE_CHECKING

from ..errors import StagingError
from .common import check_remote, content_key, payload_cmd

if TYPE_CHECKING:
    from ..config import DatasetConfig
    from ..transport.base import Transport


def stage_generated(transport: Transport, dataset: DatasetConfig, scene: str, *, python: str,
                    payload_dir: str) -> str:
    gen = dataset.generate
    assert gen is not None
    spec = {"scene": scene, "size": gen.size, "seed": gen.seed, "kind": "generate"}
    base = f"{transport.root}/cache/datasets/{content_key(spec)}"
    scene_dir = f"{base}/{scene}"
    done = transport.read_text(f"{base}/.complete")
    if done is None:
        # Two runs (two controllers on one host) may generate the same scene at once: one makes
        # it under a lock on the host while the other waits, then finds `.complete`; the temp
        # directory is unique anyway, so nothing is ever generated into another's files.
        q = shlex.quote
        tmp = f"{base}/.tmp-{scene}-{secrets.token_hex(4)}"
        make = (f"if [ -f {q(base + '/.complete')} ]; then exit 0; fi; rm -rf {q(tmp)} && "
                + payload_cmd(python, payload_dir,
                              f"ngp_train synth --out {q(tmp)} --scene {q(scene)} "
                              f"--size {int(gen.size)} --seed {int(gen.seed)}")
                + f" && rm -rf {q(scene_dir)} && mv {q(tmp)} {q(scene_dir)}"
                + f" && printf %s {q(json.dumps(spec))} > {q(base + '/.complete')}"
                + f" || {{ rc=$?; rm -rf {q(tmp)}; exit $rc; }}")
        cmd = (f"mkdir -p {q(base)} && if command -v flock >/dev/null 2>&1; then "
               f"flock -w 1800 {q(base + '/.lock')} bash -c {q(make)}; else bash -c {q(make)}; fi")
        res = transport.run(cmd, check=False, timeout_s=1800)
        if res.exit_code != 0:
            raise StagingError(f"generating scene {scene!r} on the host failed (exit {res.exit_code}): "
                               f"{(res.stderr or res.stdout).strip()[-300:]}")
    check_remote(transport, scene_dir, python=python, payload_dir=payload_dir)
    return scene_dir
