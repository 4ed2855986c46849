"""Write .cog/openapi_schema.json from the Cog predictor, as the cog CLI would at build time.

    python scripts/cog_schema.py [--check]

coglet (Cog's HTTP server) validates inputs, and serves /openapi.json, only when this file
exists. The cog CLI writes it during `cog build`; without Docker we generate it from the
predictor with cog's own inspector. `--check` exits 1 when the committed file is stale.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCHEMA_PATH = REPO / ".cog" / "openapi_schema.json"
PREDICTOR = ("handler.cog_predictor", "Predictor")


def build_schema() -> dict:
    """The OpenAPI document for the predictor's inputs and output."""
    sys.path.insert(0, str(REPO))
    from cog._inspector import create_predictor

    info = create_predictor(*PREDICTOR)
    declared = _declared_inputs(info)
    properties, required, enums = {}, [], {}
    for name, field in sorted(info.inputs.items(), key=lambda item: item[1].order):
        prop: dict = {"title": name.replace("_", " ").title(), "x-order": field.order}
        json_type = field.type.json_type()
        if field.choices:
            enums[name] = {
                "title": name,
                "description": "An enumeration.",
                "enum": field.choices,
                **json_type,
            }
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop.update(json_type)
        if field.description:
            prop["description"] = field.description
        # Bounds as written in the predictor: the inspector keeps floats, and 2**64 - 1 as a
        # float is 2**64, one more than a seed can be.
        for key, bound in (("minimum", declared[name].ge), ("maximum", declared[name].le)):
            if bound is not None:
                prop[key] = bound
        optional = _optional(info, name)
        if optional:
            # OpenAPI's mark of an optional input. coglet's validator (JSON Schema) ignores it
            # and refuses an explicit null: leave an empty input out (README, Cog section).
            prop["nullable"] = True
        if field.default is not None:
            prop["default"] = field.default
        elif not optional:
            required.append(name)
        properties[name] = prop
    schemas = {
        "Input": {
            "title": "Input",
            "type": "object",
            "properties": properties,
            "required": required,
        },
        "Output": info.output.json_type(),
        **enums,
    }
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0"},
        "paths": {},
        "components": {"schemas": schemas},
    }


def _declared_inputs(info) -> dict:
    """The Input(...) declarations of the predictor's run(), by name (exact ge/le values)."""
    import inspect

    module = __import__(info.module_name, fromlist=[info.predictor_name])
    run = getattr(module, info.predictor_name).run
    return {name: p.default for name, p in inspect.signature(run).parameters.items()}


def _optional(info, name: str) -> bool:
    """An input whose type admits None (`int | None`) is optional; others need a default."""
    import inspect

    module = __import__(info.module_name, fromlist=[info.predictor_name])
    run = getattr(module, info.predictor_name).run
    parameter = inspect.signature(run).parameters[name]
    return "None" in str(parameter.annotation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed file is stale")
    args = parser.parse_args()
    text = json.dumps(build_schema(), indent=2, sort_keys=True) + "\n"
    if args.check:
        current = SCHEMA_PATH.read_text() if SCHEMA_PATH.exists() else ""
        if current != text:
            print(f"{SCHEMA_PATH} is stale: run python scripts/cog_schema.py", file=sys.stderr)
            raise SystemExit(1)
        return
    SCHEMA_PATH.parent.mkdir(exist_ok=True)
    SCHEMA_PATH.write_text(text)
    print(f"wrote {SCHEMA_PATH.relative_to(REPO)}")


if __name__ == "__main__":
    main()
