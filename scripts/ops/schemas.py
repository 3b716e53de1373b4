"""Local JSON schemas for kubeconform, built from registry-distributed artifacts (run by install.sh).

``k8s SRC OUT``
    Copies one Kubernetes version of ``kubernetes-validate``'s ``*-local-strict`` schemas (PyPI) and
    rewrites their references (``/api/_definitions.json#/...``, resolved by kubernetes-validate's own
    loader) into absolute ``file://`` URIs, which kubeconform's JSON-schema compiler follows.
    kubeconform location template: ``OUT/{{ .ResourceKind }}{{ .KindSuffix }}.json``.

``crds OUT CRD.yaml...``
    Converts every served version of each CustomResourceDefinition into a strict JSON schema
    (objects with declared properties get ``additionalProperties: false`` unless they preserve
    unknown fields; ``nullable`` becomes a ``null`` type), written as
    ``OUT/<group>/<kind>_<version>.json`` (kubeconform: ``OUT/{{ .Group }}/{{ .ResourceKind }}_{{
    .ResourceAPIVersion }}.json``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

REF_PREFIX = '"/api/_definitions.json#'


def convert_k8s(src: Path, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    target = '"' + (out / "_definitions.json").resolve().as_uri() + "#"
    count = 0
    for path in sorted(src.glob("*.json")):
        text = path.read_text(encoding="utf-8").replace(REF_PREFIX, target)
        (out / path.name).write_text(text, encoding="utf-8")
        count += 1
    if not (out / "_definitions.json").exists():
        raise SystemExit(f"{src}: no _definitions.json (not a kubernetes-validate schema directory?)")
    return count


def strict(schema: Any) -> Any:
    """A copy of an OpenAPI v3 (structural) schema as strict JSON schema."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    preserve = out.get("x-kubernetes-preserve-unknown-fields") is True
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


def convert_crds(out: Path, files: list[Path]) -> list[Path]:
    written: list[Path] = []
    for path in files:
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            group, kind = spec["group"], spec["names"]["kind"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                schema = version.get("schema", {}).get("openAPIV3Schema")
                if schema is None:
                    raise SystemExit(f"{path}: {kind} {version['name']} has no openAPIV3Schema")
                converted = strict(schema)
                props = converted.setdefault("properties", {})
                props["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
                props["kind"] = {"type": "string", "enum": [kind]}
                props.setdefault("metadata", {"type": "object"})
                converted["additionalProperties"] = False
                target = out / group / f"{kind.lower()}_{version['name']}.json"
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(json.dumps(converted, indent=1, sort_keys=True), encoding="utf-8")
                written.append(target)
    return written


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[0] == "k8s":
        count = convert_k8s(Path(argv[1]), Path(argv[2]))
        print(f"schemas.py: {count} Kubernetes schemas in {argv[2]}", file=sys.stderr)
        return 0
    if len(argv) >= 3 and argv[0] == "crds":
        written = convert_crds(Path(argv[1]), [Path(p) for p in argv[2:]])
        print(f"schemas.py: {len(written)} CRD version schemas in {argv[1]}", file=sys.stderr)
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
