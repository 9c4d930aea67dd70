"""Errors raised by ngp_train.

    NgpError                 base; `str(err)` is one line a user can act on
     ├── DatasetError        the data directory is not a usable NeRF-synthetic scene
     ├── ConfigError         a training/rendering option is invalid (bad backend, device, ...)
     └── SnapshotError       a snapshot is missing, corrupt or from an incompatible model
"""
from __future__ import annotations


class NgpError(Exception):
    """Base of every error ngp_train raises on purpose."""


class DatasetError(NgpError):
    """The data directory is not a usable NeRF-synthetic (Blender) scene."""


class ConfigError(NgpError):
    """An option passed to training or rendering is invalid."""


class SnapshotError(NgpError):
    """A snapshot cannot be loaded."""
