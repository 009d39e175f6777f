"""pych's own OpenAPI document, generated from the route table and the pydantic models.

``python -m pych.api.openapi > docs/openapi.json`` (``make openapi``) writes it; a unit test
checks the committed file is what this module generates, and compares it with Cloud
Hypervisor's spec where that is at hand.  The contract test generates its requests from it.

Each route of :data:`pych.api.routes.ROUTES` is one operation: its body model is the
request body, its response model the ``200`` body, its empty status an answer without body,
and every error, whatever its status (:data:`pych.api.errors.STATUS`), is the error chain:
a JSON array of strings, outermost first.  Schemas are pydantic's JSON Schema of each model
(OpenAPI 3.1 uses JSON Schema 2020-12) as pych validates it, for responses too: pych writes
them from the same models, leaving out unset optionals (its serializer, which shapes the
output like serde's, would hide every field from pydantic's serialization schema).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from http import HTTPStatus
from typing import Any

from pydantic.json_schema import JsonSchemaMode, models_json_schema

import pych
from pych.api.errors import STATUS
from pych.api.routes import API_ROOT, ROUTES, Route

REF_TEMPLATE = "#/components/schemas/{model}"
ERROR_RESPONSE = {"$ref": "#/components/responses/Error"}


def _error_description() -> str:
    by_status: dict[int, list[str]] = defaultdict(list)
    for error, status in STATUS.items():
        # a class named by its module ("pydantic.ValidationError") or the class itself
        by_status[status].append(error.rpartition(".")[2] if isinstance(error, str)
                                 else error.__name__)
    lines = [f"- {status} {HTTPStatus(status).phrase}: {', '.join(names)}"
             for status, names in sorted(by_status.items())]
    return ("The error chain, outermost first (\"Error from API\", or \"Failed to deserialize "
            "JSON\" for a body that does not validate, then what went wrong). Statuses by "
            "error:\n" + "\n".join(lines) + "\n- 404 Not Found also for an unknown path, 405 "
            "Method Not Allowed for a wrong method, 411/413 for a body without Content-Length "
            "or over 4 MiB; any other failure is 500.")


def _operation(route: Route, refs: dict[tuple[Any, JsonSchemaMode], Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {"operationId": route.endpoint, "summary": route.remote.help}
    notes = []
    if not route.implemented:
        notes.append(f"pych does not implement this endpoint yet: once the body is valid it "
                     f"answers 500 [\"Error from API\", \"{route.endpoint} is not supported by "
                     f"pych yet\"].")
    if route.fds:
        notes.append("File descriptors may come with the request (SCM_RIGHTS on the UNIX "
                     "socket).")
    if notes:
        operation["description"] = " ".join(notes)
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[route.body, "validation"]}},
        }
    responses: dict[str, Any] = {}
    if route.response is not None:
        responses["200"] = {
            "description": f"Success: a {route.response.__name__}",
            "content": {"application/json": {"schema": refs[route.response, "validation"]}},
        }
    if not route.always_body:
        responses[str(int(route.empty_status))] = {"description": "Success, without a body"}
    responses["default"] = ERROR_RESPONSE
    operation["responses"] = responses
    return operation


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of pych's API."""
    models = dict.fromkeys(model for route in ROUTES for model in (route.body, route.response)
                           if model is not None)
    refs, schemas = models_json_schema([(model, "validation") for model in models],
                                       ref_template=REF_TEMPLATE)
    components = dict(schemas.get("$defs", {}))
    components["ErrorChain"] = {
        "type": "array", "items": {"type": "string"}, "minItems": 1,
        "description": "An error chain, outermost first.",
    }
    paths: dict[str, Any] = {}
    for route in ROUTES:
        paths[f"/{route.endpoint}"] = {route.method.lower(): _operation(route, refs)}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pych API",
            "version": pych.__version__,
            "description": "pych's REST API on its UNIX socket (--api-socket): Cloud "
                           "Hypervisor's API as pych implements it. Generated from "
                           "pych/api/routes.py by `python -m pych.api.openapi`.",
        },
        "servers": [{"url": f"http://localhost{API_ROOT}"}],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(components.items())),
            "responses": {
                "Error": {
                    "description": _error_description(),
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/ErrorChain"}}},
                },
            },
        },
    }


def render() -> str:
    """The document as ``docs/openapi.json`` holds it."""
    return json.dumps(document(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
