#!/usr/bin/env python3
"""Regenerates the per-stage blocks of docs/stages.md (### `KIND` ... up to the
next heading) from `hone plugins --json`, so the reference matches the
descriptors the stages report. Blocks for kinds the file lacks are appended to
their family's section (## FAMILY:). Run from the repository root after
`cargo build`:

    python3 docs/gen_stage_tables.py            # rewrite docs/stages.md
    python3 docs/gen_stage_tables.py --check    # exit 1 if it is stale (CI)
"""
import json
import re
import subprocess
import sys

DOC = "docs/stages.md"


def ty(t):
    if isinstance(t, str):
        return {"Bool": "boolean"}.get(t, t.lower())
    (k, v), = t.items()
    if k == "Enum":
        return "one of " + ", ".join(f'"{x}"' for x in v)
    if k == "List":
        return "list of " + ty(v)
    if k == "Unsigned":
        lo, hi = v["min"], v["max"]
        if hi is not None:
            return f"non-negative integer from {lo} to {hi}"
        if lo > 0:
            return f"non-negative integer of at least {lo}"
        return "non-negative integer"
    return k.lower()


def default(c):
    if c["required"]:
        return "**required**"
    if c["default"] is None:
        return "unset"
    return "`" + json.dumps(c["default"], separators=(", ", ": ")) + "`"


def placement(p):
    if isinstance(p, dict):
        field = p["PerMember"]["members_field"]
        return f"PerMember (members from `{field}`)"
    return p


def kind(k):
    if isinstance(k, dict):
        (_, a), = k.items()
        name = {"Policy": "policy", "RewardModel": "reward-model", "Dataset": "dataset"}.get(a)
        return f"Artifact({name})" if name else "Artifact"
    return k


def ports(ps):
    return ", ".join(f"`{p['name']}`: {kind(p['kind'])}" for p in ps) or "—"


def block(s):
    lines = [f"### `{s['kind']}`", "", s["description"], ""]
    lines.append(f"- placement: {placement(s['placement'])}")
    lines.append(f"- inputs: {ports(s['inputs'])}")
    lines.append(f"- outputs: {ports(s['outputs'])}")
    if s["config"]:
        lines += ["", "| config | type | default | description |", "|---|---|---|---|"]
        for c in s["config"]:
            doc = c["doc"].replace("|", "\\|")
            lines.append(f"| `{c['name']}` | {ty(c['ty'])} | {default(c)} | {doc} |")
    else:
        lines += ["", "No config."]
    return "\n".join(lines) + "\n"


def main():
    out = subprocess.run(["./target/debug/hone", "plugins", "--json"], capture_output=True, text=True, check=True)
    stages = {s["kind"]: s for s in json.loads(out.stdout)}
    text = open(DOC).read()
    parts = re.split(r"(?m)^(?=#{2,3} )", text)
    seen = set()
    result = []
    for part in parts:
        m = re.match(r"### `([^`]+)`", part)
        if m and m.group(1) in stages:
            seen.add(m.group(1))
            result.append(block(stages[m.group(1)]) + "\n")
        else:
            result.append(part)
    for kind in sorted(set(stages) - seen):
        family = kind.split(".")[0]
        idx = max((i for i, p in enumerate(result) if p.startswith(f"### `{family}.")), default=None)
        if idx is None:  # a family section with no block yet
            idx = next((i for i, p in enumerate(result) if p.startswith(f"## {family}:")), None)
        if idx is None:
            print(f"no section for {kind}; add `## {family}: ...` first", file=sys.stderr)
            continue
        result.insert(idx + 1, block(stages[kind]) + "\n")
        # keep the family's blocks in kind order
    new = "".join(result).rstrip("\n") + "\n"
    if "--check" in sys.argv:
        if new != text:
            print(f"{DOC} is stale against `hone plugins --json`: run `python3 docs/gen_stage_tables.py`", file=sys.stderr)
            sys.exit(1)
        return
    open(DOC, "w").write(new)


if __name__ == "__main__":
    main()
