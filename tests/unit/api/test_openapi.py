"""docs/openapi.json: generated from the route table, committed, and compared with Cloud
Hypervisor's spec where that sits beside the repository (``../shared/spec``, as in CI)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pych.api import openapi
from pych.api.routes import ROUTES

REPO = Path(__file__).resolve().parents[3]
DOCUMENT = REPO / "docs" / "openapi.json"
REFERENCE = REPO.parent / "shared" / "spec" / "cloud-hypervisor.yaml"


def test_the_committed_document_is_what_the_generator_writes():
    assert DOCUMENT.read_text() == openapi.render(), (
        "docs/openapi.json is not what pych/api/openapi.py generates: run `make openapi`")


def test_every_route_is_an_operation_with_its_models():
    doc = json.loads(DOCUMENT.read_text())
    assert set(doc["paths"]) == {f"/{route.endpoint}" for route in ROUTES}
    for route in ROUTES:
        (method, operation), = doc["paths"][f"/{route.endpoint}"].items()
        assert method == route.method.lower()
        body = operation.get("requestBody")
        if route.body is None:
            assert body is None, route.endpoint
        else:
            schema = body["content"]["application/json"]["schema"]
            assert schema == {"$ref": f"#/components/schemas/{route.body.__name__}"}
        responses = operation["responses"]
        if route.response is not None:
            schema = responses["200"]["content"]["application/json"]["schema"]
            assert schema == {"$ref": f"#/components/schemas/{route.response.__name__}"}
        assert (str(route.empty_status) in responses) != route.always_body, route.endpoint
        assert responses["default"] == {"$ref": "#/components/responses/Error"}
        assert ("not implement" in operation.get("description", "")) != route.implemented
    error = doc["components"]["responses"]["Error"]["content"]["application/json"]["schema"]
    assert doc["components"]["schemas"][error["$ref"].rsplit("/", 1)[1]]["items"] == {
        "type": "string"}


def test_schemathesis_reads_every_operation():
    schemathesis = pytest.importorskip("schemathesis")
    schema = schemathesis.openapi.from_path(DOCUMENT)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert sorted(f"{op.method.upper()} {op.path}" for op in operations) == sorted(
        f"{route.method} /{route.endpoint}" for route in ROUTES)


# --------------------------------------------------------------------------
# Against Cloud Hypervisor's spec

# Operations only one side has: {"PUT /vm.x": reason}.
EXPECTED_OPERATION_DIFFERENCES: dict[str, str] = {}

# Request body schemas (and the schemas nested in them) whose property names differ, keyed
# by the reference's schema name: (only in the reference, only in pych, why).
EXPECTED_SCHEMA_DIFFERENCES: dict[str, tuple[set[str], set[str], str]] = {
    "CpusConfig": (set(), {"profile"},
                   "the reference's serde field (CPU profile), shown in vm.info, not in its spec"),
    "DeviceConfig": (set(), {"fd"},
                     "a VFIO cdev fd: the reference's serde field; JSON numbers become -1, the "
                     "fd itself comes with SCM_RIGHTS"),
    "DiskConfig": (set(), {"disable_aio", "disable_io_uring"},
                   "the reference's test knobs (_disable_aio, _disable_io_uring), serde "
                   "fields shown in vm.info"),
    "FsConfig": (set(), {"iommu"},
                 "every PCI device has the reference's flattened PciDeviceCommonConfig; the "
                 "spec lists iommu for some devices only"),
    "GenericVhostUserConfig": (set(), {"iommu"},
                               "PciDeviceCommonConfig's iommu, as for FsConfig"),
    "UserDeviceConfig": (set(), {"iommu"}, "PciDeviceCommonConfig's iommu, as for FsConfig"),
    "VmAddUserDevice": (set(), {"id", "iommu"},
                        "vm.add-user-device takes UserDeviceConfig, which the reference's "
                        "code deserializes; its spec's VmAddUserDevice lists fewer fields"),
    "NetConfig": (set(), {"fds"},
                  "tap fds: the reference's serde field; JSON numbers become -1, the fds "
                  "themselves come with SCM_RIGHTS"),
    "PlatformConfig": ({"serial_number", "uuid"}, {"iommufd_fd"},
                       "serial_number and uuid are accepted as aliases of "
                       "system_serial_number and system_uuid (the schema names a field "
                       "once); iommufd_fd is the reference's serde field for the CLI's fd"),
    "RestoreConfig": (set(), {"iommufd_fd", "net_fds", "vfio_fds"},
                      "the reference's serde fields for descriptors passed with the request"),
    "ReceiveMigrationData": (set(), {"iommufd_fd", "vfio_fds"},
                             "the reference's serde fields for descriptors passed with the "
                             "request"),
    "SendMigrationData": (set(), {"preserve_source"},
                          "the reference's serde field (keep the source VM after a local "
                          "migration), not in its spec"),
}


def _resolve(doc: dict, schema: dict) -> tuple[str | None, dict]:
    name = None
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        schema = doc["components"]["schemas"][name]
    return name, schema


def _objects(doc: dict, schema: dict) -> list[tuple[str | None, dict]]:
    """The object schemas (with properties) a schema stands for: through $ref, anyOf/oneOf/
    allOf (pych's optionals are anyOf [X, null]), array items and map values."""
    name, schema = _resolve(doc, schema)
    if "properties" in schema:
        return [(name, schema)]
    found = []
    for key in ("anyOf", "oneOf", "allOf"):
        for choice in schema.get(key, ()):
            found += _objects(doc, choice)
    if isinstance(schema.get("items"), dict):
        found += _objects(doc, schema["items"])
    if isinstance(schema.get("additionalProperties"), dict):
        found += _objects(doc, schema["additionalProperties"])
    return found


def _differences(reference: dict, own: dict) -> tuple[dict[str, str], dict[str, Any]]:
    """Operations only one side has, and property-name differences of every request body
    schema, walked down through the properties both sides have."""
    def operations(doc: dict) -> set[str]:
        return {f"{method.upper()} {path}" for path, item in doc["paths"].items()
                for method in item if method in ("get", "put", "post", "patch", "delete")}

    ops = {op: "only in the reference" for op in operations(reference) - operations(own)}
    ops |= {op: "only in pych" for op in operations(own) - operations(reference)}
    schemas: dict[str, Any] = {}
    seen: set[tuple[str, str | None]] = set()

    def walk(ref_schema: dict, own_schema: dict, where: str) -> None:
        ref_objects, own_objects = _objects(reference, ref_schema), _objects(own, own_schema)
        if len(ref_objects) != 1 or len(own_objects) != 1:
            if ref_objects != own_objects:
                schemas[where] = ("shape", [n for n, _ in ref_objects],
                                  [n for n, _ in own_objects])
            return
        (ref_name, ref_object), (own_name, own_object) = ref_objects[0], own_objects[0]
        key = ref_name or where
        if (key, own_name) in seen:
            return
        seen.add((key, own_name))
        ref_props, own_props = set(ref_object["properties"]), set(own_object["properties"])
        if ref_props != own_props:
            schemas[key] = (ref_props - own_props, own_props - ref_props)
        for prop in sorted(ref_props & own_props):
            walk(ref_object["properties"][prop], own_object["properties"][prop],
                 f"{key}.{prop}")

    for path, item in own["paths"].items():
        for method, operation in item.items():
            ref_operation = reference["paths"].get(path, {}).get(method)
            if ref_operation is None:
                continue
            ref_body, own_body = ref_operation.get("requestBody"), operation.get("requestBody")
            if (ref_body is None) != (own_body is None):
                schemas[f"{method.upper()} {path}"] = ("body", ref_body is None, own_body is None)
            elif ref_body is not None:
                walk(ref_body["content"]["application/json"]["schema"],
                     own_body["content"]["application/json"]["schema"], path)
    return ops, schemas


def test_the_document_differs_from_cloud_hypervisors_spec_only_where_named():
    if not REFERENCE.exists():
        pytest.skip(f"Cloud Hypervisor's spec is not beside the repository ({REFERENCE}); "
                    "CI has it")
    yaml = pytest.importorskip("yaml")
    reference = yaml.safe_load(REFERENCE.read_text())
    operations, schemas = _differences(reference, json.loads(DOCUMENT.read_text()))
    assert all(EXPECTED_OPERATION_DIFFERENCES.values())
    assert all(why for *_, why in EXPECTED_SCHEMA_DIFFERENCES.values())
    assert operations.keys() == EXPECTED_OPERATION_DIFFERENCES.keys(), (
        f"operations differ: {operations}; name each in EXPECTED_OPERATION_DIFFERENCES")
    expected = {name: (ref_only, own_only)
                for name, (ref_only, own_only, _) in EXPECTED_SCHEMA_DIFFERENCES.items()}
    assert schemas == expected, (
        "request body schemas differ from the reference's other than named in "
        "EXPECTED_SCHEMA_DIFFERENCES (reference-only, pych-only properties): "
        f"{ {k: v for k, v in schemas.items() if expected.get(k) != v} }")
