"""Scalar formats shared by validation, the model and the targets: durations and addresses."""

from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000}
# protobuf's Duration holds ±315,576,000,000 s; a snapshot beyond it is refused by Envoy and by serve.
# No traffic setting needs more than a year.
MAX_DURATION_MS = 366 * 24 * 3_600_000


def parse_duration(text: str) -> tuple[int | None, str | None]:
    """`"250ms"`, `"1.5s"`, `"2m"`, `"1h"` → (milliseconds, None), or (None, problem).

    Durations have millisecond precision and are at least 1ms, as Istio requires
    (`duration(self) >= duration('1ms')` in its CRDs).
    """
    m = _DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if not m:
        return None, f"{text!r} is not a duration; write a number and a unit: 250ms, 1.5s, 2m, 1h"
    number, unit = m.groups()
    exact = float(number) * _UNIT_MS[unit]
    ms = round(exact)
    if abs(exact - ms) > 1e-6:
        return None, f"{text!r} is finer than a millisecond"
    if ms < 1:
        return None, f"{text!r} is too short: durations must be at least 1ms"
    if ms > MAX_DURATION_MS:
        return None, f"{text!r} is too long: durations must be at most {MAX_DURATION_MS // 3_600_000:,}h"
    return ms, None


def duration_ms(text: str) -> int:
    """Milliseconds of a duration already validated by `parse_duration`."""
    ms, problem = parse_duration(text)
    if problem:
        raise ValueError(problem)
    return ms


def format_duration(ms: int) -> str:
    """Milliseconds → the protobuf-JSON form both Istio and Envoy read: `4s`, `0.250s`."""
    seconds, rest = divmod(ms, 1000)
    return f"{seconds}s" if not rest else f"{seconds}.{rest:03d}s"


def human_duration(ms: int) -> str:
    """Milliseconds → the shortest form a policy author would write: `250ms`, `1.5s`, `2m`."""
    if ms % 3_600_000 == 0:
        return f"{ms // 3_600_000}h"
    if ms % 60_000 == 0:
        return f"{ms // 60_000}m"
    return f"{ms / 1000:g}s" if ms >= 1000 else f"{ms}ms"


@lru_cache(maxsize=1 << 14)
def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def split_address(addr: str) -> tuple[str, int]:
    """`"10.0.1.4:9080"` or `"[::1]:80"` → (host, port). The address is already validated."""
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)
