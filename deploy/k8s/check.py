#!/usr/bin/env python3
"""Offline checks of the omoi chart, with Helm's own SDK (helm-python-sdk).

    check.py lint                 lint (strict) and render the default values
                                  and every examples/*.yaml into OUT_DIR
                                  (default deploy/k8s/.rendered)
    check.py render-json OUT [--set-json JSON]
                                  render the default values (deep-merged with
                                  JSON) as a JSON list of manifests, for the
                                  pods test

kubernetes-validate, checkov and yamllint run on the rendered files from
.ci/run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import helm_python as helm

CHART = Path(__file__).resolve().parent
NAMESPACE = "omoi"
RELEASE = "omoi"


def value_sets() -> list[tuple[str, dict | None]]:
    sets: list[tuple[str, dict | None]] = [("default", None)]
    for example in sorted((CHART / "examples").glob("*.yaml")):
        sets.append((example.stem, helm.values_from_yaml(example.read_text())))
    return sets


def render(values: dict | None) -> dict[str, str]:
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema(values)
    return chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)


def documents(manifests: dict[str, str]) -> list[str]:
    out = []
    for path in sorted(manifests):
        if path.endswith("NOTES.txt"):
            continue
        for doc in manifests[path].split("\n---"):
            if doc.strip() and any(not line.startswith("#") and line.strip() for line in doc.splitlines()):
                out.append(doc.strip("\n-") + "\n")
    return out


def lint(out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for name, values in value_sets():
        report = helm.lint(str(CHART), values, strict=True, namespace=NAMESPACE)
        problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
        problems += [{"severity": 3, "path": "", "error": e} for e in report.get("errors", []) or []]
        for p in problems:
            print(f"lint {name}: {p.get('path', '')}: {p.get('error')}")
        failures += len(problems)
        docs = documents(render(values))
        target = out_dir / f"{name}.yaml"
        target.write_text("---\n".join(docs))
        print(f"rendered {name}: {len(docs)} manifests -> {target}")
    return 1 if failures else 0


def merge(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


def render_json(out: Path, overrides: dict) -> int:
    chart = helm.Chart.load(str(CHART))
    values = merge(chart.values, overrides)
    docs = []
    for doc in documents(render(values)):
        docs.append(helm.values_from_yaml(doc))
    out.write_text(json.dumps(docs))
    return 0


def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "lint":
        return lint(Path(argv[1]) if len(argv) > 1 else CHART / ".rendered")
    if len(argv) >= 2 and argv[0] == "render-json":
        overrides = {}
        if len(argv) >= 4 and argv[2] == "--set-json":
            overrides = json.loads(argv[3])
        return render_json(Path(argv[1]), overrides)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
