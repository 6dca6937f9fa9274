"""What a change does to one service, in traffic terms, and what a reviewer must not miss.

`service_changes(old, new)` compares two model `Service` values of one
environment and answers short phrases ("canary v2 10% → 25%", "timeout 4s
→ 2s", "version v1 removed"); `service_warnings` flags risky steps (a
traffic shift over `MAX_STEP` points, a shortened timeout). Pure: model
values in, strings out.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

from compiler import model as m
from compiler.values import human_duration

MAX_STEP = 25  # percentage points of traffic one change may move without a warning

# Fields with a phrase of their own below; every other field is compared generically.
_SPECIAL = {"traffic", "timeout_ms", "retries", "versions", "endpoints", "spans", "name", "namespace", "routes"}
#: A route's fields compared one by one (its traffic has phrases of its own).
_ROUTE_FIELDS = ("match", "redirect", "direct_response", "rewrite", "timeout_ms", "retries", "headers", "cors", "fault", "mirror")
#: The values a route takes from its service when it leaves them out.
_INHERITED = {"timeout_ms", "retries", "headers", "cors", "fault", "mirror"}


def service_changes(old: m.Service, new: m.Service) -> list[str]:
    """Phrases for what differs between two versions of a service, in a fixed order."""
    phrases = list(_traffic(old.traffic, new.traffic))
    if old.timeout_ms != new.timeout_ms:
        phrases.append(f"timeout {_duration(old.timeout_ms)} → {_duration(new.timeout_ms)}")
    phrases += _retries(old.retries, new.retries)
    phrases += _versions(old, new)
    phrases += _routes(old, new)
    for f in dataclasses.fields(m.Service):
        if f.name not in _SPECIAL:
            phrases += _generic(_camel(f.name), getattr(old, f.name), getattr(new, f.name))
    phrases += _endpoints(old.endpoints, new.endpoints)
    return phrases


def describe_traffic(t: m.Traffic) -> str:
    if t.shape is m.TrafficShape.STABLE:
        return f"stable {t.stable}"
    if t.shape is m.TrafficShape.CANARY:
        return f"stable {t.stable} with canary {t.canary.version} {t.canary.weight}%"
    if t.shape is m.TrafficShape.SPLIT:
        return "split " + " / ".join(f"{w.version} {w.weight}%" for w in t.weights)
    return "no version routing"


def traffic_shift(old: m.Traffic, new: m.Traffic) -> int:
    """Percentage points of traffic that change destination (total variation distance)."""
    if old.shape is m.TrafficShape.NONE or new.shape is m.TrafficShape.NONE:
        return 0
    before, after = _shares(old), _shares(new)
    return sum(max(0, after.get(v, 0) - before.get(v, 0)) for v in after)


def service_warnings(old: m.Service, new: m.Service, env: str = "") -> list[tuple[str, str]]:
    """(code, message) pairs: `canary-step`, `timeout-shortened`, and `fault-in-prod` for a
    fault newly injected in an environment named prod."""
    warnings = []
    if env == "prod":
        warnings += [("fault-in-prod", f"{where} now injects a fault in prod ({_value(fault)}): real users get the "
                      "delays and errors") for where, fault in _new_faults(old, new)]
    shift = traffic_shift(old.traffic, new.traffic)
    if shift > MAX_STEP:
        change = next(_traffic(old.traffic, new.traffic))
        warnings.append(("canary-step", f"{change} moves {shift} points of traffic in one step (more than {MAX_STEP})"))
    if _shorter(old.timeout_ms, new.timeout_ms):
        warnings.append(("timeout-shortened", _shortened("timeout", old.timeout_ms, new.timeout_ms)
                         + ": requests that used to succeed may now time out"))
    old_try = old.retries.per_try_timeout_ms if old.retries else None
    new_try = new.retries.per_try_timeout_ms if new.retries else None
    if _shorter(old_try, new_try):
        warnings.append(("timeout-shortened", _shortened("per-try timeout", old_try, new_try)))
    return warnings


def _shortened(what: str, old: int | None, new: int) -> str:
    if old is None:
        return f"{what} set to {_duration(new)} where there was none"
    return f"{what} shortened {_duration(old)} → {_duration(new)}"


def _new_faults(old: m.Service, new: m.Service) -> list[tuple[str, m.Fault]]:
    """(where, fault) for each fault `new` injects that `old` did not, where it did not."""
    before = {r.name: r.fault for r in _named(old)}
    out = [("the service", new.fault)] if new.fault is not None and new.fault != old.fault else []
    out += [(f"route {r.name}", r.fault) for r in _named(new)
            if r.fault is not None and r.fault != new.fault and r.fault != before.get(r.name)]
    return out


# --- routes --------------------------------------------------------------------------------

def _named(svc: m.Service) -> list[m.Route]:
    """The routes the policy names (its canaries' header routes left out)."""
    return [r for r in svc.routes if r.source and r.name == r.source[-1]]


def _routes(old: m.Service, new: m.Service) -> list[str]:
    """Route changes by route name: added, removed, reordered, and what changed in each."""
    before, after = {r.name: r for r in _named(old)}, {r.name: r for r in _named(new)}
    out = [f"route {name} added ({_describe_route(r)})" for name, r in after.items() if name not in before]
    out += [f"route {name} removed" for name in before if name not in after]
    kept_before, kept_after = [n for n in before if n in after], [n for n in after if n in before]
    if kept_before != kept_after:
        out.append(f"routes reordered: {', '.join(kept_before)} → {', '.join(kept_after)}")
    for name in kept_after:
        a, b = before[name], after[name]
        if a.traffic is not None and b.traffic is not None:
            out += [f"route {name} {phrase}" for phrase in _traffic(a.traffic, b.traffic)]
        elif (a.traffic is None) != (b.traffic is None):
            out.append(f"route {name} {_action(a)} → {_action(b)}")
        for field in _ROUTE_FIELDS:
            x, y = getattr(a, field), getattr(b, field)
            if field in _INHERITED and x == getattr(old, field) and y == getattr(new, field):
                continue  # the service's value, reported once for the service
            label = f"route {name}.{_camel(field.removesuffix('_ms'))}"
            out += _durations(label, x, y) if field.endswith("_ms") else _generic(label, x, y)
    return out


def describe_match(match: m.RouteMatch) -> str:
    """`path prefix /api, GET|POST, header x-user present`; `every request` for none."""
    parts = [f"path {match.path.kind.value} {match.path.value}"] if match.path else []
    parts += ["|".join(match.methods)] if match.methods else []
    parts += [f"header {h.header} present" if h.kind is m.MatchKind.PRESENT else f"header {h.header} {h.kind.value} {h.value!r}"
              for h in match.headers]
    parts += [f"query {q.name} {q.kind.value} {q.value!r}" for q in match.query]
    return ", ".join(parts) or "every request"


def _action(r: m.Route) -> str:
    if r.redirect:
        return "redirect"
    return "direct response" if r.direct_response else "traffic"


def _describe_route(r: m.Route) -> str:
    what = describe_match(r.match)
    if r.redirect:
        return f"{what}: {describe_redirect(r.redirect)}"
    if r.direct_response:
        return f"{what}: answer {r.direct_response.status}"
    return f"{what}: {describe_traffic(r.traffic)}"


# --- traffic -------------------------------------------------------------------------------

def _traffic(old: m.Traffic, new: m.Traffic) -> Iterator[str]:
    if old.shape == new.shape == m.TrafficShape.CANARY and old.stable == new.stable \
            and old.canary.version == new.canary.version:
        if old.canary.weight != new.canary.weight:
            yield f"canary {new.canary.version} {old.canary.weight}% → {new.canary.weight}%{_step(new)}"
    elif old.shape is m.TrafficShape.CANARY and new.shape is m.TrafficShape.STABLE:
        if new.stable == old.canary.version:
            yield f"canary {new.stable} promoted to stable (was {old.canary.weight}%)"
        elif new.stable == old.stable:
            yield f"canary {old.canary.version} ended (was {old.canary.weight}%); all traffic to {new.stable}"
        else:
            yield f"traffic {describe_traffic(old)} → {describe_traffic(new)}"
    elif old.shape is m.TrafficShape.STABLE and new.shape is m.TrafficShape.CANARY and old.stable == new.stable:
        yield f"canary {new.canary.version} started at {new.canary.weight}%{_step(new)}"
    elif old.shape == new.shape == m.TrafficShape.CANARY and old.stable == new.stable:
        yield f"canary {old.canary.version} → {new.canary.version} at {new.canary.weight}%{_step(new)}"
    elif old.shape == new.shape == m.TrafficShape.SPLIT and [w.version for w in old.weights] == [w.version for w in new.weights]:
        moved = [f"{b.version} {a.weight}% → {b.weight}%" for a, b in zip(old.weights, new.weights) if a.weight != b.weight]
        if moved:
            yield "split " + ", ".join(moved)
    elif old.weights != new.weights or old.shape != new.shape:
        yield f"traffic {describe_traffic(old)} → {describe_traffic(new)}"
    if (old.match, old.match_version) != (new.match, new.match_version):
        yield f"canary match {_match(old)} → {_match(new)}"


def _step(t: m.Traffic) -> str:
    """`, step 2 of 4` where the canary's weight is a step of its schedule; `, halted` after a rollback."""
    plan = t.plan
    if plan is None:
        return ""
    if plan.halted:
        return f", halted ({plan.halted})"
    steps = plan.steps
    return f", step {steps.index(t.canary.weight) + 1} of {len(steps)}" if t.canary.weight in steps else ""


def _shares(t: m.Traffic) -> dict[str, int]:
    return {w.version: w.weight for w in t.weights}


def _match(t: m.Traffic) -> str:
    if not t.match:
        return "none"
    return " and ".join(f"{h.header} {h.kind.value} {h.value!r}" for h in t.match)


# --- other fields --------------------------------------------------------------------------

def _retries(old: m.Retries | None, new: m.Retries | None) -> list[str]:
    if old == new:
        return []
    if old is None or new is None:
        return [f"retries {_retry_text(old)} → {_retry_text(new)}"]
    out = []
    if old.attempts != new.attempts:
        out.append(f"retries {old.attempts} → {new.attempts} attempts")
    if old.per_try_timeout_ms != new.per_try_timeout_ms:
        out.append(f"per-try timeout {_duration(old.per_try_timeout_ms)} → {_duration(new.per_try_timeout_ms)}")
    if old.retry_on != new.retry_on:
        out.append(f"retry on {','.join(old.retry_on) or 'default'} → {','.join(new.retry_on) or 'default'}")
    return out


def _retry_text(r: m.Retries | None) -> str:
    return "none" if r is None else f"{r.attempts} attempts"


def _versions(old: m.Service, new: m.Service) -> list[str]:
    before, after = {v.name: v for v in old.versions}, {v.name: v for v in new.versions}
    out = [f"version {v} added" for v in sorted(set(after) - set(before))]
    out += [f"version {v} removed" for v in sorted(set(before) - set(after))]
    out += [f"version {v} labels {_labels(before[v].labels)} → {_labels(after[v].labels)}"
            for v in sorted(set(before) & set(after)) if before[v] != after[v]]
    return out


def _endpoints(old: m.Endpoints, new: m.Endpoints) -> list[str]:
    if old == new:
        return []
    groups = [("", old.unversioned, new.unversioned)]
    groups += [(f" {v}", old.of(v), new.of(v)) for v in sorted(set(dict(old.by_version)) | set(dict(new.by_version)))]
    out = []
    for label, a, b in groups:
        added = [f"+{x.host}:{x.port}" for x in b if x not in a]
        removed = [f"-{x.host}:{x.port}" for x in a if x not in b]
        if added or removed:
            out.append(f"endpoints{label} {' '.join(added + removed)}")
    return out


def _generic(label: str, old, new) -> list[str]:
    """`label old → new` for a changed value, descending into dataclasses field by field."""
    if old == new:
        return []
    if dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new) and type(old) is type(new):
        out = []
        for f in dataclasses.fields(old):
            a, b = getattr(old, f.name), getattr(new, f.name)
            if f.name.endswith("_ms"):
                out += _durations(f"{label}.{_camel(f.name[:-3])}", a, b)
            else:
                out += _generic(f"{label}.{_camel(f.name)}", a, b)
        return out
    return [f"{label} {_value(old)} → {_value(new)}"]


def _durations(label: str, old: int | None, new: int | None) -> list[str]:
    return [] if old == new else [f"{label} {_duration(old)} → {_duration(new)}"]


def describe_fault(f: m.Fault) -> str:
    """`delay 2s 10%, abort 503 5%`."""
    parts = [f"delay {_duration(f.delay_ms)} {f.delay_percent:g}%"] if f.delay_ms is not None else []
    if f.abort_status is not None or f.abort_grpc_status is not None:
        parts.append(f"abort {f.abort_status or f.abort_grpc_status} {f.abort_percent:g}%")
    return ", ".join(parts)


def describe_redirect(r: m.Redirect) -> str:
    """`redirect 301 to scheme https, host shop.example.com, path /`."""
    parts = [f"{name} {value}" for name, value in (("scheme", r.scheme), ("host", r.host), ("port", r.port), ("path", r.path))
             if value is not None]
    return f"redirect {r.code} to {', '.join(parts)}"


def describe_mirror(mirror: m.Mirror) -> str:
    """`bookinfo/ratings v2 100%`: where the copies go, and how many."""
    return " ".join(x for x in (mirror.service, mirror.version, f"{mirror.percent:g}%") if x)


#: Values with a phrase of their own wherever they show.
_PHRASES = {m.Fault: describe_fault, m.Redirect: describe_redirect, m.Mirror: describe_mirror}


def _value(v) -> str:
    if v is None or v == ():
        return "none"
    if type(v) in _PHRASES:
        return _PHRASES[type(v)](v)
    if isinstance(v, str):
        return v
    if isinstance(v, tuple) and all(isinstance(x, tuple) and len(x) == 2 for x in v):
        return _labels(v)
    if isinstance(v, tuple):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if dataclasses.is_dataclass(v):
        fields = [(f.name, getattr(v, f.name)) for f in dataclasses.fields(v) if f.compare]
        shown = [f"{_camel(n.removesuffix('_ms'))}={_duration(x) if n.endswith('_ms') else _value(x)}"
                 for n, x in fields if x not in (None, ())]
        return "{" + ", ".join(shown) + "}"
    return str(v)


def _labels(pairs) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in pairs) + "}"


def _duration(ms: int | None) -> str:
    return "none" if ms is None else human_duration(ms)


def _shorter(old: int | None, new: int | None) -> bool:
    """A timeout set where there was none (unbounded) is shorter too."""
    return new is not None and (old is None or new < old)


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(w[:1].upper() + w[1:] for w in rest)
