"""Exports the JSON Schema of every event type (envelope + payload) to shared/schemas/.

`python -m shared.schema_export` rewrites the files; `--check` exits 1 when a checked-in file differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from shared.events import CUSTOM_TYPE_PREFIX, EVENT_TYPES, CloudEvent, CustomEngagement, Payload

SCHEMA_DIR = Path(__file__).parent / "schemas"


def exported_schemas() -> dict[str, str]:
    models: dict[str, type[Payload]] = {}
    for event_type, versions in EVENT_TYPES.items():
        for version, model in versions.items():
            models[f"{event_type}.v{version}.json"] = model
    models[f"{CUSTOM_TYPE_PREFIX}any.v1.json"] = CustomEngagement
    out: dict[str, str] = {}
    for filename, model in sorted(models.items()):
        schema: dict[str, Any] = CloudEvent[model].model_json_schema(mode="validation")  # type: ignore[valid-type]
        schema["$id"] = f"urn:loyalty:schema:{filename.removesuffix('.json')}"
        schema["title"] = f"{filename.removesuffix('.json')} (CloudEvents 1.0)"
        out[filename] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def main(argv: list[str]) -> int:
    schemas = exported_schemas()
    if "--check" in argv:
        stale = [
            name
            for name, text in schemas.items()
            if not (SCHEMA_DIR / name).is_file() or (SCHEMA_DIR / name).read_text() != text
        ]
        extra = [p.name for p in SCHEMA_DIR.glob("*.json") if p.name not in schemas]
        for name in stale + extra:
            print(f"stale schema: shared/schemas/{name}", file=sys.stderr)
        return 1 if stale or extra else 0
    SCHEMA_DIR.mkdir(exist_ok=True)
    for old in SCHEMA_DIR.glob("*.json"):
        if old.name not in schemas:
            old.unlink()
    for name, text in schemas.items():
        (SCHEMA_DIR / name).write_text(text)
    print(f"wrote {len(schemas)} schemas to {SCHEMA_DIR}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
