"""orchestrate: the controller that runs Instant-NGP experiments on rented GPU hosts.

The controller never imports torch; the payload packages (`remote_payload`, `ngp_train`)
are pushed to the host and run there.
"""
from __future__ import annotations

__version__ = "0.1.0"
