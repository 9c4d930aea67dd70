"""The HTTP plumbing the cloud provider clients share (vast.ai, RunPod, Lambda).

Money rules for API calls:
- Every call has a deadline (`deadline_s`, measured with time.monotonic()); nothing waits forever.
- Only idempotent calls are retried (reads, destroy, setting a state): a create that timed out
  may have succeeded, so it is never sent twice. The caller searches by label instead.
- 429 and 5xx replies and connection failures are retried with exponential backoff (honouring
  Retry-After when the server sends one), still within the deadline.
- Calls that stop billing (destroy, stop, terminate: `release=True`) get a much longer window
  (`release_deadline_s`, minutes: providers document rate windows of that order), honour
  Retry-After up to `release_max_backoff_s` and add jitter, so a 429 burst is ridden out; only then do they raise,
  and the caller hands the instance to reconciliation with a loud event.
- The API key never appears in an error or a log line: messages pass through `redact`.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

import httpx

from ..errors import ConfigError, ProviderError
from ..secrets import read_secret, redact

if TYPE_CHECKING:
    from ..config import HostConfig

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    deadline_s: float = 60.0          # total time one logical call may take, retries included
    attempt_timeout_s: float = 20.0   # one HTTP round trip
    max_attempts: int = 6
    backoff_s: float = 0.2            # first pause; doubles each attempt
    max_backoff_s: float = 5.0
    release_deadline_s: float = 600.0   # destroy/stop/terminate: keep trying this long
    release_max_backoff_s: float = 60.0  # ...with pauses up to this (Retry-After is honoured up to it)
    jitter_frac: float = 0.25            # release pauses get up to this fraction added at random


def release_policy(host: HostConfig, policy: RetryPolicy | None) -> RetryPolicy:
    """The host's retry policy: `release_retry_s` (a cloud host setting) bounds how long calls
    that stop billing are retried before they are handed over to reconciliation."""
    base = policy or RetryPolicy()
    total = host.release_retry_s
    if total is None or policy is not None:
        return base
    return replace(base, release_deadline_s=float(total))


def api_key_for(host: HostConfig, provider: str, default_env: str) -> str:
    """Read the provider's API key from the host's `api_key_env` / `api_key_file` (by reference only)."""
    env = host.api_key_env
    file = host.api_key_file
    if not env and not file:
        env = default_env
    return read_secret(env=env, file=file, what=f"{provider} API key")


class ApiClient:
    """One provider's HTTP API: base URL, auth header, retries for idempotent calls."""

    def __init__(self, provider: str, api_base: str, *, headers: dict[str, str] | None = None,
                 policy: RetryPolicy | None = None) -> None:
        if not api_base.startswith(("http://", "https://")):
            raise ConfigError(f"{provider}: api_base {api_base!r} is not an http(s) URL",
                              hint="use e.g. https://console.vast.ai or http://127.0.0.1:PORT")
        self.provider = provider
        self.api_base = api_base.rstrip("/")
        self.policy = policy or RetryPolicy()
        self._client = httpx.Client(base_url=self.api_base, headers=headers or {},
                                    timeout=self.policy.attempt_timeout_s, follow_redirects=False)

    def close(self) -> None:
        self._client.close()

    def request(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
                idempotent: bool | None = None, instance_id: str | None = None,
                accept_statuses: tuple[int, ...] = (), release: bool = False,
                retry_reply: Callable[[httpx.Response], bool] | None = None) -> httpx.Response:
        """Send one call; retry it only when `idempotent` (default: GET/DELETE).

        `release` marks a call that stops billing (see the module doc: minutes of retries).
        `retry_reply(resp)` says a 2xx reply is a transient failure in disguise (GraphQL's
        errors with HTTP 200): it is retried like a 5xx, and returned as is once retries end.
        Returns the response for 2xx and `accept_statuses`; raises ProviderError otherwise
        (the provider's own message, redacted, with the HTTP status)."""
        if idempotent is None:
            idempotent = method.upper() in ("GET", "DELETE", "HEAD")
        if release:
            idempotent = True
        pol = self.policy
        deadline = time.monotonic() + (pol.release_deadline_s if release else pol.deadline_s)
        attempt = 0
        t0 = time.monotonic()
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            timeout = max(0.5, min(pol.attempt_timeout_s, remaining))
            try:
                resp = self._client.request(method, path, json=json, params=params, timeout=timeout)
            except httpx.HTTPError as exc:
                what = type(exc).__name__
                if not idempotent:
                    raise ProviderError(
                        f"{self.provider}: {method} {path} got no reply ({what}); the call may have "
                        f"taken effect", provider=self.provider, instance_id=instance_id,
                        hint="the instance list is searched by label before anything is retried") from None
                if not self._may_retry(attempt, deadline, None, release):
                    raise self._gave_up(method, path, attempt, t0, f"{what}: {redact(str(exc))}",
                                        instance_id, None, release) from None
                self._pause(attempt, deadline, None, release)
                continue
            ok = resp.status_code < 300 or resp.status_code in accept_statuses
            if ok and not (retry_reply is not None and resp.status_code < 300 and retry_reply(resp)):
                return resp
            if ok:   # a transient failure inside a 2xx reply
                if idempotent and self._may_retry(attempt, deadline, resp, release):
                    log.info("%s: %s %s -> transient error in the reply, retrying", self.provider, method, path)
                    self._pause(attempt, deadline, resp, release)
                    continue
                return resp
            if resp.status_code in RETRY_STATUSES and idempotent and self._may_retry(attempt, deadline, resp, release):
                log.info("%s: %s %s -> HTTP %d, retrying", self.provider, method, path, resp.status_code)
                self._pause(attempt, deadline, resp, release)
                continue
            if release and resp.status_code in RETRY_STATUSES:
                raise self._gave_up(method, path, attempt, t0, f"HTTP {resp.status_code}: {error_detail(resp)}",
                                    instance_id, resp.status_code, release)
            raise self.error_for(resp, method, path, instance_id)

    def _gave_up(self, method: str, path: str, attempt: int, t0: float, last: str,
                 instance_id: str | None, status: int | None, release: bool) -> ProviderError:
        msg = (f"{self.provider}: {method} {path} failed after {attempt} attempts over "
               f"{time.monotonic() - t0:.0f} s ({last})")
        hint = None
        if release:
            hint = ("the instance may still bill: it is left to reconciliation "
                    "(run `orchestrate down --orphans`)")
        return ProviderError(redact(msg), provider=self.provider, instance_id=instance_id,
                             status=status, hint=hint)

    def error_for(self, resp: httpx.Response, method: str, path: str,
                  instance_id: str | None) -> ProviderError:
        detail = error_detail(resp)
        hint = None
        if resp.status_code in (401, 403):
            hint = "check the API key (api_key_env / api_key_file) and its permissions"
        return ProviderError(redact(f"{self.provider}: {method} {path} -> HTTP {resp.status_code}: {detail}"),
                             provider=self.provider, instance_id=instance_id,
                             status=resp.status_code, hint=hint)

    def _may_retry(self, attempt: int, deadline: float, resp: httpx.Response | None,
                   release: bool = False) -> bool:
        if not release and attempt >= self.policy.max_attempts:
            return False
        return time.monotonic() + self._delay(attempt, resp, release) < deadline

    def _delay(self, attempt: int, resp: httpx.Response | None, release: bool = False) -> float:
        pol = self.policy
        after = retry_after_s(resp) if resp is not None else None
        if after is not None:
            # The server said when to come back: then, not later (a billing-stopping call should
            # land as soon as it is allowed), up to the longer cap of those calls.
            cap = pol.release_max_backoff_s if release else pol.max_backoff_s
            return min(cap, max(pol.backoff_s, after))
        return min(pol.max_backoff_s, pol.backoff_s * (2 ** min(attempt - 1, 30)))

    def _pause(self, attempt: int, deadline: float, resp: httpx.Response | None, release: bool = False) -> None:
        delay = self._delay(attempt, resp, release)
        if release:   # many controllers released at once must not come back in lockstep
            delay += random.uniform(0.0, self.policy.jitter_frac * delay)
        time.sleep(max(0.0, min(delay, deadline - time.monotonic())))


def retry_after_s(resp: httpx.Response) -> float | None:
    """Retry-After in seconds (delta-seconds or an HTTP date); None when absent or unreadable."""
    value = (resp.headers.get("retry-after") or "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def error_detail(resp: httpx.Response) -> str:
    """The provider's own words from an error reply, whatever shape it has (short, one line)."""
    try:
        body = resp.json()
    except ValueError:
        return " ".join(resp.text.split())[:200] or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):   # Lambda: {"error": {"code", "message", "suggestion"}}
            text = " ".join(str(err.get(k)) for k in ("code", "message") if err.get(k))[:200]
            fields = field_errors_text(body.get("field_errors") or err.get("field_errors"))
            return f"{text} ({fields})" if fields else text
        for key in ("msg", "message", "error", "detail"):
            if body.get(key):
                return str(body[key])[:200]
        if isinstance(body.get("errors"), list) and body["errors"]:
            first = body["errors"][0]
            return str(first.get("message", first) if isinstance(first, dict) else first)[:200]
    return str(body)[:200]


def field_errors_text(fields: Any) -> str:
    """Lambda's invalid-parameter replies name the fields at fault in `field_errors`
    ({field: {"code", "message"}}); without them the message says only "invalid request"."""
    if not isinstance(fields, dict) or not fields:
        return ""
    parts = []
    for name, err in fields.items():
        msg = err.get("message") if isinstance(err, dict) else err
        parts.append(f"{name}: {msg}" if msg else str(name))
    return "; ".join(parts)[:300]


def json_body(resp: httpx.Response, provider: str) -> Any:
    try:
        return resp.json()
    except ValueError:
        raise ProviderError(f"{provider}: reply is not JSON (HTTP {resp.status_code}): "
                            f"{' '.join(resp.text.split())[:120]}", provider=provider,
                            status=resp.status_code) from None


def num(value: Any) -> float | None:
    """A numeric field; None for missing, null, non-numbers and the -1 'unknown' marker."""
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return None if f < 0 else f


def wait_until(predicate: Any, *, timeout_s: float, poll_s: float = 1.0, what: str = "condition") -> Any:
    """Call `predicate()` until it returns something truthy or the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise ProviderError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
