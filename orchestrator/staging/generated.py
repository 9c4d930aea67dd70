"""Generated scenes: made on the host by `python -m ngp_train synth`, cached by their spec."""
from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING

from ..errors import StagingError
from .common import check_remote, content_key, payload_cmd

if TYPE_CHECKING:
    from ..config import DatasetConfig
    from ..transport.base import Transport


def stage_generated(transport: "Transport", dataset: "DatasetConfig", scene: str, *, python: str,
                    payload_dir: str) -> str:
    gen = dataset.generate
    assert gen is not None
    spec = {"scene": scene, "size": gen.size, "seed": gen.seed, "kind": "generate"}
    base = f"{transport.root}/cache/datasets/{content_key(spec)}"
    scene_dir = f"{base}/{scene}"
    done = transport.read_text(f"{base}/.complete")
    if done is None:
        tmp = f"{base}/.tmp-{scene}"
        cmd = (f"rm -rf {shlex.quote(tmp)} && mkdir -p {shlex.quote(base)} && "
               + payload_cmd(python, payload_dir,
                             f"ngp_train synth --out {shlex.quote(tmp)} --scene {shlex.quote(scene)} "
                             f"--size {int(gen.size)} --seed {int(gen.seed)}")
               + f" && rm -rf {shlex.quote(scene_dir)} && mv {shlex.quote(tmp)} {shlex.quote(scene_dir)}")
        res = transport.run(cmd, check=False, timeout_s=1800)
        if res.exit_code != 0:
            raise StagingError(f"generating scene {scene!r} on the host failed (exit {res.exit_code}): "
                               f"{(res.stderr or res.stdout).strip()[-300:]}")
        transport.write_text(f"{base}/.complete", json.dumps(spec))
    check_remote(transport, scene_dir, python=python, payload_dir=payload_dir)
    return scene_dir
