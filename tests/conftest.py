"""Shared pytest options and markers.

`--run-slow` and `--run-gpu` opt into the slow and CUDA-only tests (nerfbaselines' pattern).
A `gpu` test is skipped unless CUDA is really there, checked by calling
`torch.cuda.is_available()`, not by referencing it.
"""
from __future__ import annotations

import os
import shutil

import pytest

# A `local` host's first estimate times training steps on this machine (estimate/local.py), a
# few seconds per fresh ORCHESTRATE_HOME; the tests that run jobs through the CLI would each pay
# it and see machine-dependent estimates. The probe's own tests turn it back on.
os.environ.setdefault("ORCHESTRATE_LOCAL_PROBE", "0")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")
    parser.addoption("--run-gpu", action="store_true", help="run tests marked gpu (needs CUDA)")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    run_slow = config.getoption("--run-slow")
    run_gpu = config.getoption("--run-gpu") and _cuda_available()
    have_sshd = shutil.which("sshd") is not None or shutil.which("/usr/sbin/sshd") is not None
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(pytest.mark.skip(reason="slow: pass --run-slow"))
        if "gpu" in item.keywords and not run_gpu:
            item.add_marker(pytest.mark.skip(reason="gpu: pass --run-gpu on a machine with CUDA"))
        if "sshd" in item.keywords and not have_sshd:
            item.add_marker(pytest.mark.skip(reason="sshd not installed (apt-get install openssh-server)"))
