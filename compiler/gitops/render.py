"""A diff `Report` as text (a terminal), Markdown (a pull-request comment) or JSON (tools).

The Markdown starts with the hidden `MARKER` that `meshc comment` finds its
own comment by, keeps each environment in a collapsible <details> section,
and stays under `MARKDOWN_LIMIT` characters (GitHub refuses comments over
65,536): what does not fit is left out with a note saying what.
"""

from __future__ import annotations

import json

from compiler.gitops.diff import EnvDiff, Line, Report
from compiler.gitops.resources import Change, FieldChange, ResourceChange

MARKER = "<!-- meshc-diff -->"
MARKDOWN_LIMIT = 65_000
SIGN = {Change.ADDED: "+", Change.REMOVED: "-", Change.MODIFIED: "~"}
MAX_FIELDS = 30  # field changes shown per resource; the rest are counted
MAX_VALUE = 120  # characters of a value shown
MAX_LINES = 150  # summary lines (and warnings) in the Markdown; a comment must stay readable


def render(report: Report, fmt: str) -> str:
    return {"text": text, "markdown": markdown, "json": to_json}[fmt](report)


# --- text ----------------------------------------------------------------------------------

def text(report: Report) -> str:
    out = [f"meshc diff {report.base} → {report.head}", ""]
    if report.failed:
        return "\n".join(out + _failure_lines(report)) + "\n"
    if not report.changed:
        out.append("No environment changes.")
    for line in report.summary:
        out.append(f"  {line}")
    if report.warnings:
        out += ["", "Warnings:"] + [f"  ! {w}" for w in report.warnings]
    for env in report.environments:
        out += ["", _env_title(env)]
        for res in env.istio:
            out.append(f"  {SIGN[res.change]} {res.key}  ({res.file})")
            out += [f"      {_field(f)}" for f in res.fields[:MAX_FIELDS]]
            if len(res.fields) > MAX_FIELDS:
                out.append(f"      … {len(res.fields) - MAX_FIELDS} more field changes")
        out += [f"  {_envoy_line(res)}" for res in env.envoy]
    return "\n".join(out) + "\n"


def _failure_lines(report: Report) -> list[str]:
    out = []
    for name, errors in (("base", report.base_errors), ("head", report.head_errors)):
        if errors:
            label = report.base if name == "base" else report.head
            out.append(f"The {name} ({label}) does not compile:")
            out += [f"  {line}" for d in errors for line in d.render().splitlines()]
    return out


def _env_title(env: EnvDiff) -> str:
    if env.change is None:
        return f"{env.name}: no change"
    if env.change is not Change.MODIFIED:
        return f"{env.name}: environment {env.change.value}"
    counts = _counts(env.istio + env.envoy)
    return f"{env.name}: {counts}"


def _counts(resources: tuple[ResourceChange, ...]) -> str:
    parts = []
    for change in (Change.ADDED, Change.MODIFIED, Change.REMOVED):
        n = sum(1 for r in resources if r.change is change)
        if n:
            parts.append(f"{n} {change.value}")
    return ", ".join(parts) or "output bytes changed"


def _envoy_line(res: ResourceChange) -> str:
    """Envoy changes are summarised per resource: the Istio section above has the detail."""
    count = f" ({len(res.fields)} field{'s' * (len(res.fields) != 1)})" if res.fields else ""
    return f"{SIGN[res.change]} envoy {res.key}{count}"


def _field(f: FieldChange) -> str:
    if f.op == "add":
        return f"+ {f.path}: {_value(f.new)}"
    if f.op == "remove":
        return f"- {f.path} (was {_value(f.old)})"
    if f.op == "reorder":
        return f"~ {f.path}: order {_value(f.old)} → {_value(f.new)}"
    return f"~ {f.path}: {_value(f.old)} → {_value(f.new)}"


def _value(v) -> str:
    shown = v if isinstance(v, str) else json.dumps(v, sort_keys=True, separators=(", ", ": "))
    return shown if len(shown) <= MAX_VALUE else shown[: MAX_VALUE - 1] + "…"


# --- markdown ------------------------------------------------------------------------------

def markdown(report: Report, limit: int = MARKDOWN_LIMIT) -> str:
    head = [MARKER, "### meshc: what this change does", "",
            f"`{_md(report.base)}` → `{_md(report.head)}`", ""]
    if report.failed:
        return _cut("\n".join(head + _failure_md(report)) + "\n", limit)
    if not report.changed:
        head.append("**No environment changes.**")
    head += [f"- {_line_md(l)}" for l in report.summary[:MAX_LINES]]
    if len(report.summary) > MAX_LINES:
        head.append(f"- … and {len(report.summary) - MAX_LINES} more changes: run `meshc diff` for all of them")
    if report.warnings:
        head += ["", "> [!WARNING]"] + [f"> - {_line_md(w)}  " for w in report.warnings[:MAX_LINES]]
        if len(report.warnings) > MAX_LINES:
            head.append(f"> - … and {len(report.warnings) - MAX_LINES} more warnings")
    unchanged = [e.name for e in report.environments if e.change is None]
    if unchanged and report.changed:
        head += ["", f"Unchanged: {', '.join(unchanged)}."]
    doc = "\n".join(head) + "\n\n"
    sections = [_env_md(env) for env in report.environments if env.change is not None]
    return _fit(doc, sections, [e.name for e in report.environments if e.change is not None], limit)


def _failure_md(report: Report) -> list[str]:
    out = []
    for name, errors in (("base", report.base_errors), ("head", report.head_errors)):
        if errors:
            label = report.base if name == "base" else report.head
            out += [f"**The {name} (`{_md(label)}`) does not compile:**", "", "```"]
            out += [line for d in errors for line in d.render().splitlines()]
            out += ["```", ""]
    return out


def _line_md(line: Line) -> str:
    where = [", ".join(f"**{_md(e)}**" for e in line.envs)] if line.envs else []
    where += [f"`{_md(line.service)}`"] if line.service else []
    return f"{' · '.join(where)}: {_prose(line.text)}" if where else _prose(line.text)


def _env_md(env: EnvDiff) -> tuple[str, list[str]]:
    """(the section's opening, one block per resource); the caller closes it."""
    title = f"<details><summary><b>{env.name}</b>: {_env_title(env).split(': ', 1)[1]}</summary>\n\n"
    blocks = []
    for res in env.istio:
        block = [f"- `{SIGN[res.change]} {_md(res.key)}` in `{res.file}`"]
        block += [f"  - `{_md(_field(f))}`" for f in res.fields[:MAX_FIELDS]]
        if len(res.fields) > MAX_FIELDS:
            block.append(f"  - … {len(res.fields) - MAX_FIELDS} more field changes")
        blocks.append("\n".join(block) + "\n")
    blocks += [f"- `{_md(_envoy_line(res))}`\n" for res in env.envoy]
    return title, blocks


def _fit(doc: str, sections: list[tuple[str, list[str]]], names: list[str], limit: int) -> str:
    """Append sections while they fit, leaving room for the note about what did not."""
    reserve = 400 + 20 * len(names)
    left_out: list[str] = []
    for name, (title, blocks) in zip(names, sections):
        close = "\n</details>\n\n"
        if len(doc) + len(title) + len(close) > limit - reserve:
            left_out.append(f"{name} (all {len(blocks)} resources)")
            continue
        doc += title
        shown = 0
        for block in blocks:
            if len(doc) + len(block) + len(close) > limit - reserve:
                break
            doc += block
            shown += 1
        if shown < len(blocks):
            doc += f"- … {len(blocks) - shown} more resources left out\n"
            left_out.append(f"{name} ({len(blocks) - shown} of {len(blocks)} resources)")
        doc += close
    if left_out:
        doc += (f"**Left out to fit a GitHub comment:** {'; '.join(left_out)}. "
                "Run `meshc diff` locally for the full diff.\n")
    return doc


def _cut(doc: str, limit: int) -> str:
    if len(doc) <= limit:
        return doc
    note = "\n```\n\n**Left out to fit a GitHub comment:** the rest of the diagnostics.\n"
    return doc[: limit - len(note)] + note


def _md(s: str) -> str:
    """Text for inside a code span: only a backtick could end it."""
    return s.replace("`", "'")


def _prose(s: str) -> str:
    """Text for outside code: policy values (a regex match, a header) must not become HTML."""
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("`", "'")


# --- json ----------------------------------------------------------------------------------

def to_json(report: Report) -> str:
    doc = {
        "base": report.base,
        "head": report.head,
        "changed": report.changed,
        "failed": report.failed,
        "changedInputs": list(report.changed_inputs),
        "summary": [_line_json(l) for l in report.summary],
        "warnings": [_line_json(w) for w in report.warnings],
        "environments": [_env_json(e) for e in report.environments],
        "errors": {"base": [_diag_json(d) for d in report.base_errors],
                   "head": [_diag_json(d) for d in report.head_errors]},
    }
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False, default=str) + "\n"


def _line_json(line: Line) -> dict:
    out = {"environments": list(line.envs), "service": line.service or None, "text": line.text}
    if line.code:
        out["code"] = line.code
    return out


def _env_json(env: EnvDiff) -> dict:
    return {"name": env.name, "change": env.change.value if env.change else None,
            "istio": [_res_json(r) for r in env.istio], "envoy": [_res_json(r) for r in env.envoy]}


def _res_json(res: ResourceChange) -> dict:
    return {"key": res.key, "file": res.file, "change": res.change.value,
            "fields": [{"path": f.path, "op": f.op, "old": f.old, "new": f.new} for f in res.fields]}


def _diag_json(d) -> dict:
    span = d.span
    return {"code": d.code, "message": d.message, "severity": d.severity.value,
            "path": span.path if span else None, "line": span.line if span else None,
            "col": span.col if span else None, "rendered": d.render()}
