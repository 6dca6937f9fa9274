"""`meshc canary` and `meshc promote`: delivery decisions written into git.

`run` is one run of each scheduled canary of an environment, decided from
Prometheus; `promote` carries releases from one environment to the next.

For each canary with `steps` in one environment: read its figures over the
analysis interval (`Prometheus`, `figures`), decide (`decide`), and write the
decision into `environments/<env>.yaml` as an override (`edit`), changing the
lines it must and no other, so the file's comments and layout stay and the git
diff is the decision. The caller commits it.

Decisions: *step* to the next weight; *promote* (the next step is 100, or there
is none): the canary version becomes stable and the canary goes; *roll back*:
weight 0 and `halted: <reason>`, which later runs leave alone; *hold*: too few
requests, a freeze window, Prometheus unreachable or its answer unusable, or a
halted canary. Missing data is a hold, never a rollback.

A promotion makes the version `--from` runs as stable `--to`'s canary at the
first step of its schedule (its stable where there is none, except in prod,
which it never sends all at once), and does nothing inside a freeze window.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime

import requests

from compiler import model as m
from compiler.errors import MeshcError
from compiler.targets.envoy.common import cluster_name

__all__ = ["Decision", "Figures", "Prometheus", "PrometheusError", "decide", "edit", "figures", "frozen"]


class PrometheusError(MeshcError):
    """Prometheus could not be asked, or answered something that is not a query result."""


@dataclass(frozen=True)
class Figures:
    requests: float  # over the interval
    success: float | None  # percent of non-5xx responses; None without requests
    p99_ms: float | None  # None without requests or buckets


@dataclass(frozen=True)
class Decision:
    action: str  # step | promote | rollback | hold
    weight: int | None  # the canary's weight after it (None: unchanged)
    reason: str


class Prometheus:
    """The HTTP API's instant queries: `/api/v1/query`."""

    def __init__(self, url: str, timeout: float = 10) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout

    def scalar(self, query: str) -> float | None:
        """The value of a one-series vector (summed if several); None for an empty vector or NaN."""
        try:
            response = requests.get(f"{self.url}/api/v1/query", params={"query": query}, timeout=self.timeout)
            body = response.json()
        except (requests.RequestException, ValueError) as exc:
            raise PrometheusError(f"Prometheus at {self.url} cannot be asked: {exc}") from None
        if response.status_code != 200 or body.get("status") != "success":
            raise PrometheusError(f"Prometheus at {self.url} answered {response.status_code}: "
                                  f"{body.get('error', body.get('status'))}")
        data = body.get("data") or {}
        if data.get("resultType") != "vector":
            raise PrometheusError(f"Prometheus answered a {data.get('resultType')!r}, not a vector, to {query}")
        values = []
        for series in data.get("result") or ():
            try:
                values.append(float(series["value"][1]))
            except (KeyError, IndexError, TypeError, ValueError):
                raise PrometheusError(f"Prometheus answered a series without a value to {query}") from None
        values = [v for v in values if not math.isnan(v)]
        return sum(values) if values else None


def figures(prometheus: Prometheus, source: str, svc: m.Service, interval_ms: int) -> Figures:
    """The canary version's figures over the interval, from Envoy's cluster statistics (proxies
    fed by meshc, tagged `cluster_name` as DESIGN says) or Istio's standard request metrics."""
    window = f"{max(1, interval_ms // 1000)}s"
    version = svc.traffic.canary.version
    if source == "envoy":
        port = svc.http_ports[0].number
        selector = f'cluster_name="{cluster_name(port, svc.fqdn, version)}"'
        total = f"sum(increase(envoy_cluster_upstream_rq_xx{{{selector}}}[{window}]))"
        errors = f'sum(increase(envoy_cluster_upstream_rq_xx{{{selector},envoy_response_code_class="5"}}[{window}]))'
        p99 = f"histogram_quantile(0.99, sum(rate(envoy_cluster_upstream_rq_time_bucket{{{selector}}}[{window}])) by (le))"
    else:
        selector = f'destination_service="{svc.fqdn}",destination_version="{version}",reporter="destination"'
        total = f"sum(increase(istio_requests_total{{{selector}}}[{window}]))"
        errors = f'sum(increase(istio_requests_total{{{selector},response_code=~"5.."}}[{window}]))'
        p99 = f"histogram_quantile(0.99, sum(rate(istio_request_duration_milliseconds_bucket{{{selector}}}[{window}])) by (le))"
    requests_ = prometheus.scalar(total) or 0.0
    failed = prometheus.scalar(errors) or 0.0
    success = None if requests_ <= 0 else max(0.0, 100.0 * (1 - min(failed, requests_) / requests_))
    return Figures(requests_, success, prometheus.scalar(p99) if requests_ > 0 else None)


def frozen(windows: list[dict], now: datetime) -> str | None:
    """The freeze window `now` is in, as `from → to`, or None."""
    from compiler.validate import instant  # windows passed `check_freeze`: each parses

    for window in windows:
        if instant(window["from"]) <= now < instant(window["to"]):
            return f"{window['from']} → {window['to']}"
    return None


def decide(plan: m.CanaryPlan, weight: int, found: Figures | None, hold: str | None = None) -> Decision:
    """The decision for a canary at `weight` (`found` None: not measured; `hold`: a reason to wait)."""
    if plan.halted:
        return Decision("hold", None, f"halted ({plan.halted}): a person changes it")
    if hold:
        return Decision("hold", None, hold)
    judged = []
    if plan.success_min is not None or plan.latency_p99_max_ms is not None:
        if found is None:
            return Decision("hold", None, "no figures")
        if found.requests < plan.min_requests:
            return Decision("hold", None, f"{found.requests:,.0f} requests < {plan.min_requests:,}")
        if plan.success_min is not None:
            if found.success is None:
                return Decision("hold", None, "no requests to judge")
            ok = found.success >= plan.success_min
            judged.append(f"success {found.success:.1f}% {'≥' if ok else '<'} {plan.success_min:g}%")
            if not ok:
                return Decision("rollback", 0, ", ".join(judged) + f", {found.requests:,.0f} requests")
        if plan.latency_p99_max_ms is not None:
            if found.p99_ms is None:
                return Decision("hold", None, "no latency figures")
            ok = found.p99_ms <= plan.latency_p99_max_ms
            judged.append(f"p99 {_ms(found.p99_ms)} {'≤' if ok else '>'} {plan.latency_p99_max_ms}ms")
            if not ok:
                return Decision("rollback", 0, ", ".join(judged) + f", {found.requests:,.0f} requests")
        judged.append(f"{found.requests:,.0f} requests")
    following = [s for s in plan.steps if s > weight]
    why = ", ".join(judged) or "no analysis"
    if not following or following[0] >= 100:
        return Decision("promote", 100, why)
    return Decision("step", following[0], why)


def _ms(value: float) -> str:
    return f"{value:.1f}ms" if value < 10 else f"{value:.0f}ms"


# --- writing the decision -------------------------------------------------------------------


def patch_of(decision: Decision, canary_version: str) -> dict:
    """What the decision sets in `spec.overrides[service]` (an overlay: null removes)."""
    if decision.action == "promote":
        return {"traffic": {"stable": canary_version, "canary": None}}
    if decision.action == "rollback":
        return {"traffic": {"canary": {"weight": 0, "halted": decision.reason}}}
    return {"traffic": {"canary": {"weight": decision.weight}}}


def edit(text: str, key: str, patch: dict) -> str:
    """`environments/<env>.yaml` with `patch` merged into `spec.overrides[key]`, the rest of the
    text as it was. Where every value the patch sets is already a scalar of the file, only
    those characters change (a step is a one-line diff); else the service's override entry
    is rewritten as one flow mapping, or added, and nothing outside it moves."""
    from ruamel.yaml import YAML

    doc = YAML().load(text)
    lines = text.splitlines(keepends=True)
    spec = doc["spec"]
    leaves = list(_leaves(patch, ("overrides", key)))
    if all(_scalar_at(spec, path) for path, _ in leaves):
        edits = []
        for path, value in leaves:
            parent = _node(spec, path[:-1])
            line, col = parent.lc.value(path[-1])
            edits.append((line, col, _scalar_end(lines[line], col, parent.fa.flow_style()), _yaml(value)))
        for line, col, end, new in sorted(edits, reverse=True):
            lines[line] = lines[line][:col] + new + lines[line][end:]
        return "".join(lines)
    overrides = spec.get("overrides")
    if isinstance(overrides, dict) and key in overrides:
        merged = _merge(_plain(overrides[key]), patch)
        line, col = overrides.lc.key(key)
        end = _block_end(lines, line, col)
        return "".join(lines[:line] + [" " * col + f"{key}: {_flow(merged)}\n"] + lines[end:])
    if isinstance(overrides, dict):
        if overrides.fa.flow_style() or not overrides:
            raise MeshcError("spec.overrides is a flow mapping: write it in block style for meshc canary to add to it")
        line, col = overrides.lc.key(next(iter(overrides)))
        return "".join(lines[:line] + [" " * col + f"{key}: {_flow(_merge({}, patch))}\n"] + lines[line:])
    if "overrides" in spec:
        raise MeshcError("spec.overrides is not a mapping")
    line, col = spec.lc.key(next(iter(spec)))
    entry = [" " * col + "overrides:\n", " " * (col + 2) + f"{key}: {_flow(_merge({}, patch))}\n"]
    return "".join(lines[:line] + entry + lines[line:])


def _leaves(patch: dict, prefix: tuple):
    for k, v in patch.items():
        if isinstance(v, dict):
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _node(node, path: tuple):
    for k in path:
        node = node[k]
    return node


def _scalar_at(spec, path: tuple) -> bool:
    node = spec
    for k in path[:-1]:
        if not isinstance(node, dict) or k not in node:
            return False
        node = node[k]
    return isinstance(node, dict) and path[-1] in node and not isinstance(node[path[-1]], (dict, list))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _merge(base: dict, patch: dict) -> dict:
    out = dict(base)
    for k, v in patch.items():
        out[k] = _merge(out.get(k) if isinstance(out.get(k), dict) else {}, v) if isinstance(v, dict) else v
    return out


def _block_end(lines: list[str], line: int, col: int) -> int:
    """The line after a block mapping entry whose key starts at (line, col): its deeper lines follow."""
    end = line + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > col):
        end += 1
    while end - 1 > line and not lines[end - 1].strip():
        end -= 1  # blank lines after it belong to what follows
    return end


def _scalar_end(line: str, col: int, flow: bool) -> int:
    """Where a plain or quoted scalar starting at `col` ends on its line."""
    if line[col:col + 1] in ('"', "'"):
        quote, i = line[col], col + 1
        while i < len(line) and line[i] != quote:
            i += 2 if line[i] == "\\" and quote == '"' else 1
        return i + 1
    stops = ",}]" if flow else ""
    i = col
    while i < len(line) and line[i] not in "\r\n" + stops and not (line[i] == "#" and line[i - 1] in " \t"):
        i += 1
    return col + len(line[col:i].rstrip())


def _flow(value) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    return _yaml(value)


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str) and value and all(c.isalnum() or c in "-_./" for c in value) and not value[0].isdigit():
        return value
    return json.dumps(str(value), ensure_ascii=False)


# --- one run ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    path: str  # environments/<env>.yaml
    before: str
    after: str
    verdicts: tuple[str, ...]
    rolled_back: bool
    changes: tuple[tuple[str, str], ...] = ()  # (verdict, the file after it), each decision that changes it


def run(source, env: str, services: tuple[str, ...], prometheus_url: str | None, now: datetime) -> Run:
    """Decide every scheduled canary of `env` (or of `services`) and the file that says so.

    Raises MeshcError when the repository does not compile, or a canary needs figures and the
    environment names no Prometheus."""
    result = _compiled(source, env)
    path, text, spec = _environment(source, env)
    metrics = spec.get("metrics") or {}
    url, kind = prometheus_url or metrics.get("prometheus"), metrics.get("source", "envoy")
    mesh = result.meshes[env]
    chosen = [s for s in mesh.services if s.traffic.canary and s.traffic.plan and s.traffic.plan.steps
              and (not services or s.key in services)]
    missing = sorted(set(services) - {s.key for s in chosen})
    if missing:
        raise MeshcError(f"no canary with steps in {env}: {', '.join(missing)}")
    freeze = frozen(spec.get("freeze") or [], now)
    verdicts, after, rolled_back, changes = [], text, False, []
    for svc in chosen:
        plan, weight = svc.traffic.plan, svc.traffic.canary.weight
        hold, found = (f"freeze window {freeze}" if freeze else None), None
        if hold is None and not plan.halted and (plan.success_min is not None or plan.latency_p99_max_ms is not None):
            if not url:
                raise MeshcError(f"{svc.key}'s canary has an analysis, and {env} names no Prometheus: "
                                 "set spec.metrics or give --prometheus")
            try:
                found = figures(Prometheus(url), kind, svc, plan.interval_ms or 300_000)
            except PrometheusError as exc:
                hold = str(exc)
        decision = decide(plan, weight, found, hold)
        verdicts.append(f"{env} · {svc.key}: {_verdict(decision, weight, svc.traffic.canary.version)} ({decision.reason})")
        if decision.action != "hold":
            after = edit(after, svc.key, patch_of(decision, svc.traffic.canary.version))
            changes.append((verdicts[-1], after))
        rolled_back = rolled_back or decision.action == "rollback"
    _still_compiles(source, path, text, after, env)
    return Run(path, text, after, tuple(verdicts), rolled_back, tuple(changes))


def _compiled(source, *envs: str):
    from compiler.pipeline import compile_source

    result = compile_source(source, envs=list(envs))
    if not result.ok:
        raise MeshcError("the repository does not compile:\n" + "\n".join(d.render() for d in result.diagnostics if d.is_error))
    return result


def _environment(source, env: str) -> tuple[str, str, dict]:
    """(path, text, spec) of the environment's file."""
    from compiler.diagnostics import Diagnostics
    from compiler.load import parse

    path = next(p for p in source.environment_paths() if p.rsplit("/", 1)[-1].split(".")[0] == env)
    return path, source.files[path].decode(), parse(path, source.files[path], Diagnostics()).data["spec"]


def _still_compiles(source, path: str, before: str, after: str, env: str) -> None:
    """A written decision must compile; if it would not, that is a bug here, never the user's: say so."""
    if after == before:
        return
    try:
        _compiled(type(source)({**source.files, path: after.encode()}), env)
    except MeshcError as err:
        raise MeshcError(f"meshc would write an environment that does not compile: {err}") from None


def _verdict(decision: Decision, weight: int, version: str) -> str:
    if decision.action == "step":
        return f"step {weight}% → {decision.weight}%"
    if decision.action == "promote":
        return f"promote {version} to stable (canary {weight}% → 100%)"
    if decision.action == "rollback":
        return f"roll back {weight}% → 0%"
    return f"hold at {weight}%"


# --- promotion --------------------------------------------------------------------------------


def promote(source, from_env: str, to_env: str, services: tuple[str, ...], now: datetime) -> Run:
    """Carry each service's release from `from_env` to `to_env`: the version `from_env` runs as
    stable becomes `to_env`'s canary at the first step of its schedule, or its stable where it
    has none. Never a jump to 100% in prod; nothing inside a `to_env` freeze window.

    Raises MeshcError for what cannot be promoted (a version `to_env` does not define, prod
    without a schedule, the repository not compiling)."""
    result = _compiled(source, from_env, to_env)
    path, text, spec = _environment(source, to_env)
    freeze = frozen(spec.get("freeze") or [], now)
    if freeze:
        raise MeshcError(f"{to_env} is frozen ({freeze}): nothing is promoted into it")
    source_mesh, target_mesh = result.meshes[from_env], result.meshes[to_env]
    keys = services or tuple(s.key for s in source_mesh.services if s.traffic.stable)
    verdicts, after, changes = [], text, []
    for key in keys:
        here, there = source_mesh.service(key), target_mesh.service(key)
        if here is None or there is None or here.traffic.stable is None:
            raise MeshcError(f"{key}: not a service with a stable version in both {from_env} and {to_env}")
        release = here.traffic.stable
        if there.version(release) is None:
            raise MeshcError(f"{key}: {to_env} defines no version {release!r} to promote")
        if release in (there.traffic.stable, there.traffic.canary.version if there.traffic.canary else None):
            verdicts.append(f"{to_env} · {key}: runs {release} already")
            continue
        plan = there.traffic.plan
        if plan and plan.steps and plan.steps[0] < 100:
            patch = {"traffic": {"stable": there.traffic.stable,
                                 "canary": {"version": release, "weight": plan.steps[0], "halted": None}}}
            verdicts.append(f"{to_env} · {key}: canary {release} at {plan.steps[0]}% (from {from_env}; step 1 of {len(plan.steps)})")
        elif to_env == "prod":
            raise MeshcError(f"{key}: prod has no schedule for a canary below 100%: promoting {release} would send it "
                             "all of prod's traffic at once; give its canary `steps`")
        else:
            patch = {"traffic": {"stable": release, "canary": None}}
            verdicts.append(f"{to_env} · {key}: stable {there.traffic.stable} → {release} (from {from_env}; no schedule)")
        after = edit(after, key, patch)
        changes.append((verdicts[-1], after))
    _still_compiles(source, path, text, after, to_env)
    return Run(path, text, after, tuple(verdicts), False, tuple(changes))
