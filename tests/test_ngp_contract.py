"""The contract modules: standard library only, and the values the code really uses."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["ngp_train/contract.py", "remote_payload/contract.py"])
def test_contract_modules_import_only_the_standard_library(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names <= {"__future__"}, names
    # and importing them pulls in no torch/numpy
    mod = path[:-3].replace("/", ".")
    code = f"import sys, {mod}; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_scene_names_are_the_generators() -> None:
    from ngp_train import contract, synth

    assert contract.SCENES[0] == "default"
    assert tuple(synth._BUILDERS) == contract.SCENES
    assert synth.SCENES is contract.SCENES


def test_trainer_validates_against_the_contract() -> None:
    from ngp_train.errors import ConfigError
    from ngp_train.train import TrainConfig, check_config

    for b in ("auto", "torch", "tcnn"):
        check_config(TrainConfig(backend=b))
    with pytest.raises(ConfigError, match="backend must be auto, torch, tcnn"):
        check_config(TrainConfig(backend="jax"))
    with pytest.raises(ConfigError, match="device must be auto, cpu, cuda"):
        check_config(TrainConfig(device="tpu"))


def test_field_and_tcnn_backend_do_not_import_each_other() -> None:
    for path, other in (("ngp_train/field.py", "tcnn_backend"), ("ngp_train/tcnn_backend.py", "field")):
        tree = ast.parse((ROOT / path).read_text())
        top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
        assert "field_config" in top and other not in top, (path, top)


def test_payload_exit_codes_and_phases_come_from_the_contract() -> None:
    from remote_payload import contract as c
    from remote_payload import errors, status
    from remote_payload.stage.errors import NoMirror

    assert [errors.BadData.exit_code, errors.TrainFailed.exit_code, errors.OutOfMemory.exit_code,
            errors.Interrupted.exit_code, errors.StageFailed.exit_code, errors.AlreadyRunning.exit_code,
            errors.BadUsage.exit_code, NoMirror.exit_code] == [2, 3, 4, 5, 6, 7, 64, 3]
    assert status.PHASES is c.PHASES
    assert tuple(status.Status.__dataclass_fields__) == c.STATUS_KEYS
    assert set(c.END_PHASES) <= set(c.PHASES)


def test_train_options_are_the_trainconfig_fields_with_their_kinds() -> None:
    """Every TrainConfig field without a key of its own is settable under `train:`, with the kind
    its annotation says; the payload's --train-option accepts exactly these."""
    import dataclasses

    from ngp_train.contract import TRAIN_OPTIONS
    from ngp_train.train import TrainConfig
    from remote_payload.pipeline import _NOT_OPTIONS

    fields = {f.name: f.type for f in dataclasses.fields(TrainConfig) if f.name not in _NOT_OPTIONS}
    assert set(TRAIN_OPTIONS) == set(fields)
    want = {"int": "int", "float": "num", "str": "str", "bool": "bool"}
    for name, annotation in fields.items():
        base = str(annotation).split("|")[0].strip()
        assert TRAIN_OPTIONS[name][0] == want[base], name


def test_the_controller_reads_every_status_key_the_payload_writes() -> None:
    """The controller's reading of status.json (run.payload.RemoteStatus) and the payload's record
    (remote_payload.status.Status) are the two sides of one contract: the same keys."""
    from orchestrator.run.payload import RemoteStatus
    from remote_payload.contract import STATUS_KEYS

    assert set(RemoteStatus.__dataclass_fields__) == set(STATUS_KEYS)
    written = '{"phase": "train", "step": 3, "total_steps": 9, "loss": 0.5, "psnr": 20.0, "eta_s": 4.0, ' \
              '"updated_at": "2026-01-01T00:00:00Z", "pid": 42, "exit_code": null, "error": null}'
    got = RemoteStatus.parse(written)
    assert got is not None and (got.phase, got.step, got.total_steps, got.pid, got.exit_code) == ("train", 3, 9, 42, None)
