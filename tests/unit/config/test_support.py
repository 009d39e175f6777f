"""pych.config.support: every field of every request body and every key of every ``pych``
option either works or is refused at once, naming the field and the value.

The walks below set each field (from docs/openapi.json, the API as pych documents it) and
each CLI key (from each model's declared keys) to a non-default value, send it the way a
client would (``vm.create`` through the VMM, the ``pych`` command line) and check the outcome
against the support table: a field the table says works is accepted (and its effect is
shown by its probe: effects.py, test_effects.py), a refused one is refused with its path and
value in the message.  A field or key that is in no table, or
that the walks cannot place, fails: nothing new can be silently ignored.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic_core import PydanticUndefined

from pych.api.dispatch import Dispatcher
from pych.api.routes import ROUTES
from pych.cli import main as cli
from pych.cli.main import CliError, build_parser, config_from_args
from pych.config import OptionError, VmConfig, support
from pych.config.base import CliModel, _grammar
from pych.config.devices import RATE_LIMITER_KEYS
from pych.config import options_page
from pych.config.support import SUPPORT, UnsupportedField, Works

from tests.unit.vmm.fakes import fake_vmm

REPO = Path(__file__).resolve().parents[3]
OPENAPI = json.loads((REPO / "docs" / "openapi.json").read_text())
SCHEMAS = OPENAPI["components"]["schemas"]
MiB = 1 << 20
READABLE = __file__          # a kernel/initramfs path vm.create can read

# --------------------------------------------------------------------------
# The request models and their fields, from the OpenAPI document


def _refs(schema: Any) -> list[str]:
    """The schema names ``schema`` refers to, directly or in anyOf/items."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return [schema["$ref"].rsplit("/", 1)[1]]
        return [name for value in schema.values() for name in _refs(value)]
    if isinstance(schema, list):
        return [name for value in schema for name in _refs(value)]
    return []


def request_models() -> dict[str, list[str]]:
    """Every schema reachable from a request body, with its properties."""
    queue = [name for path in OPENAPI["paths"].values() for op in path.values()
             for name in _refs(op.get("requestBody", {}))]
    found: dict[str, list[str]] = {}
    while queue:
        name = queue.pop(0)
        if name in found:
            continue
        found[name] = list(SCHEMAS[name].get("properties", {}))
        queue += _refs(SCHEMAS[name].get("properties", {}))
    return found


REQUEST_MODELS = request_models()
REACHED, REFUSED_WITH = options_page._walk()

# Bodies of endpoints that are not a VM or device configuration.
OTHER_BODIES = {"VmResize", "VmResizeZone", "VmResizeDisk", "VmRemoveDevice",
                "VmSnapshotConfig", "RestoreConfig", "RestoredNetConfig", "RestoredVfioConfig",
                "VmMemoryZoneUpdateData", "VmCoredumpData", "SendMigrationData",
                "ReceiveMigrationData"}


def model_named(name: str) -> type:
    import pych.config

    return getattr(pych.config, name)


def test_every_field_of_a_configuration_model_has_an_entry():
    """The table covers exactly the fields of every model a configuration reaches through
    fields that work, and no model it does not reach."""
    for model in REACHED:
        assert set(SUPPORT[model]) == set(model.model_fields), model.__name__
    assert set(SUPPORT) == set(REACHED)
    for (model, key) in support.CLI_KEYS:
        assert model in REACHED and (key in model.CLI_IGNORED_KEYS
                                     or key in RATE_LIMITER_KEYS.keys), (model, key)


def test_every_request_model_is_placed():
    """Each schema of a request body is a configuration model the table covers (directly or
    through the refused field that holds it), or the body of another endpoint."""
    names = {model.__name__ for model in (*REACHED, *REFUSED_WITH)}
    assert set(REQUEST_MODELS) == names | OTHER_BODIES
    for name, properties in REQUEST_MODELS.items():
        assert set(properties) == set(model_named(name).model_fields), name


# --------------------------------------------------------------------------
# Non-default values, and where each model goes in a vm.create body

BUCKET = {"size": 1000, "refill_time": 10}
# An instance of each model (JSON) that is valid where PLACES puts it.
MINIMAL: dict[str, Any] = {
    "CpusConfig": {"boot_vcpus": 2, "max_vcpus": 2},
    "CpuTopology": {"threads_per_core": 1, "cores_per_die": 1, "dies_per_package": 1,
                    "packages": 1},
    "CpuFeatures": {},
    "CpuAffinity": {"vcpu": 0, "host_cpus": [0]},
    "MemoryConfig": {"size": 256 * MiB},
    "MemoryZoneConfig": {"id": "z", "size": 256 * MiB},
    "PayloadConfig": {"kernel": READABLE},
    "PlatformConfig": {},
    "PciSegmentConfig": {},
    "NumaConfig": {"guest_numa_id": 0, "cpus": [0]},
    "NumaDistance": {"destination": 0, "distance": 10},
    "LandlockConfig": {"path": "/", "access": "r"},
    "RateLimitGroupConfig": {"id": "g", "rate_limiter_config": {"bandwidth": BUCKET}},
    "RateLimiterConfig": {"bandwidth": BUCKET},
    "TokenBucket": BUCKET,
    "DiskConfig": {"path": "/d"},
    "VirtQueueAffinity": {"queue_index": 0, "host_cpus": [0]},
    "NetConfig": {},
    "RngConfig": {"src": "/dev/urandom"},
    "BalloonConfig": {"size": 0},
    "FsConfig": {"tag": "t", "socket": "/s"},
    "PmemConfig": {"file": "/p"},
    "SerialConfig": {"mode": "Null"},
    "ConsoleConfig": {"mode": "Tty"},
    "DebugConsoleConfig": {"mode": "Off"},
    "DeviceConfig": {"path": "/sys/d"},
    "UserDeviceConfig": {"socket": "/u"},
    "VdpaConfig": {"path": "/dev/vhost-vdpa-0"},
    "GenericVhostUserConfig": {"socket": "/g", "queue_sizes": [256], "device_type": 26},
    "VsockConfig": {"cid": 3, "socket": "/v"},
    "RtcConfig": {},
    "TpmConfig": {"socket": "/t"},
}

BASE = {"payload": {"kernel": READABLE}, "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 256 * MiB}, "serial": {"mode": "Off"},
        "platform": {"num_pci_segments": 2}}      # so pci_segment 1 exists


def _in(path: str, value: Any, **base: Any) -> dict[str, Any]:
    """A vm.create body with ``value`` at ``path`` (``disks[0]``, ``cpus.topology``)."""
    body = json.loads(json.dumps({**BASE, **base}))
    *parents, last = path.split(".")
    node = body
    for part in parents:
        name, index = _split(part)
        node = node.setdefault(name, [{}] if index is not None else {})
        if index is not None:
            node = node[index]
    name, index = _split(last)
    node[name] = [value] if index is not None else value
    return body


def _split(part: str) -> tuple[str, int | None]:
    match = re.fullmatch(r"(\w+)\[(\d+)\]", part)
    return (match[1], int(match[2])) if match else (part, None)


# Where each model goes (its path), and what else the body needs.
PLACES: dict[str, tuple[str, dict[str, Any]]] = {
    "CpusConfig": ("cpus", {}),
    "CpuTopology": ("cpus.topology", {}),
    "CpuFeatures": ("cpus.features", {}),
    "CpuAffinity": ("cpus.affinity[0]", {}),
    "MemoryConfig": ("memory", {}),
    "MemoryZoneConfig": ("memory.zones[0]", {"memory": {"size": 0,
                                                        "hotplug_method": "VirtioMem"}}),
    "PayloadConfig": ("payload", {}),
    "PlatformConfig": ("platform", {}),
    "PciSegmentConfig": ("pci_segments[0]", {}),
    "NumaConfig": ("numa[0]", {}),
    "NumaDistance": ("numa[0].distances[0]", {"numa": [{"guest_numa_id": 0, "cpus": [0]}]}),
    "LandlockConfig": ("landlock_rules[0]", {"landlock_enable": True}),
    "RateLimitGroupConfig": ("rate_limit_groups[0]", {}),
    "RateLimiterConfig": ("disks[0].rate_limiter_config", {"disks": [{"path": "/d"}]}),
    "TokenBucket": ("disks[0].rate_limiter_config.bandwidth",
                    {"disks": [{"path": "/d", "rate_limiter_config": {}}]}),
    "DiskConfig": ("disks[0]", {}),
    "VirtQueueAffinity": ("disks[0].queue_affinity[0]", {"disks": [{"path": "/d"}]}),
    "NetConfig": ("net[0]", {}),
    "RngConfig": ("rng", {}),
    "BalloonConfig": ("balloon", {}),
    "FsConfig": ("fs[0]", {}),
    "PmemConfig": ("pmem[0]", {}),
    "SerialConfig": ("serial", {}),
    "ConsoleConfig": ("console", {}),
    "DebugConsoleConfig": ("debug_console", {}),
    "DeviceConfig": ("devices[0]", {}),
    "UserDeviceConfig": ("user_devices[0]", {}),
    "VdpaConfig": ("vdpa[0]", {}),
    "GenericVhostUserConfig": ("generic_vhost_user[0]", {}),
    "VsockConfig": ("vsock", {}),
    "RtcConfig": ("rtc", {}),
    "TpmConfig": ("tpm", {}),
    "VmConfig": ("", {}),
}

# Non-default values where the generic rule (below) would not give a valid one: (value,
# other fields of the same model it needs).
VALUES: dict[tuple[str, str], tuple[Any, dict[str, Any]]] = {
    ("VmConfig", "cpus"): ({"boot_vcpus": 1, "max_vcpus": 2}, {}),
    ("VmConfig", "payload"): ({"kernel": READABLE, "cmdline": "quiet"}, {}),
    ("VmConfig", "debug_console"): ({"mode": "Off", "iobase": None}, {}),
    ("VmConfig", "pci_segments"): ([{"pci_segment": 0}], {}),
    ("VmConfig", "serial"): ({"mode": "Null"}, {}),
    ("CpusConfig", "boot_vcpus"): (1, {}),
    ("CpusConfig", "max_vcpus"): (4, {}),
    ("CpusConfig", "topology"): ({"threads_per_core": 1, "cores_per_die": 2,
                                  "dies_per_package": 1, "packages": 1}, {}),
    ("CpusConfig", "features"): ({"amx": False}, {}),   # its one field: see CpuFeatures
    ("CpuTopology", "threads_per_core"): (2, {}),
    ("CpuTopology", "cores_per_die"): (2, {}),
    ("CpuTopology", "dies_per_package"): (2, {}),
    ("CpuTopology", "packages"): (2, {}),
    ("MemoryConfig", "size"): (512 * MiB, {}),
    ("MemoryConfig", "hotplug_size"): (1024 * MiB, {}),
    ("MemoryConfig", "hotplugged_size"): (128 * MiB, {"hotplug_size": 1024 * MiB,
                                                      "hotplug_method": "VirtioMem"}),
    ("MemoryConfig", "zones"): ([{"id": "z", "size": 256 * MiB}], {"size": 0}),
    ("MemoryZoneConfig", "size"): (512 * MiB, {}),
    ("MemoryZoneConfig", "hotplug_size"): (512 * MiB, {}),
    ("MemoryZoneConfig", "hotplugged_size"): (128 * MiB, {"hotplug_size": 512 * MiB}),
    ("PayloadConfig", "initramfs"): (READABLE, {}),
    ("PayloadConfig", "kernel"): (READABLE, {}),
    ("DiskConfig", "queue_size"): (256, {}),
    ("DiskConfig", "num_queues"): (2, {}),
    ("DiskConfig", "pci_device_id"): (5, {}),
    ("DiskConfig", "rate_limiter_config"): ({"bandwidth": BUCKET}, {}),
    ("DiskConfig", "rate_limit_group"): ("g", {}),
    ("PlatformConfig", "system_uuid"): ("4a3f8d6e-94d1-4c6b-8d2e-6f1f2a0b9c11", {}),
    ("DiskConfig", "vhost_user"): (True, {"path": None, "vhost_socket": "/s"}),
    ("DiskConfig", "vhost_socket"): ("/s", {"path": None, "vhost_user": True}),
    ("NetConfig", "ip"): ("192.168.1.1", {"mask": "255.255.255.0"}),
    ("NetConfig", "mask"): ("255.255.255.0", {"ip": "192.168.1.1"}),
    ("NetConfig", "mac"): ("12:34:56:78:9a:bc", {}),
    ("NetConfig", "host_mac"): ("12:34:56:78:9a:bd", {}),
    ("NetConfig", "mtu"): (1500, {}),
    ("NetConfig", "vhost_user"): (True, {"vhost_socket": "/s"}),
    ("NetConfig", "vhost_socket"): ("/s", {"vhost_user": True}),
    ("NetConfig", "vhost_mode"): ("Server", {"vhost_user": True, "vhost_socket": "/s"}),
    ("NetConfig", "queue_size"): (512, {}),
    ("NetConfig", "num_queues"): (4, {}),
    ("NetConfig", "fds"): ([7], {}),            # from JSON: -1, dropped by vm.create
    ("NetConfig", "rate_limiter_config"): ({"ops": BUCKET}, {}),
    ("NetConfig", "offload_csum"): (False, {"offload_tso": False, "offload_ufo": False}),
    ("NetConfig", "pci_device_id"): (5, {}),
    ("RngConfig", "src"): ("/dev/random", {}),
    ("RngConfig", "pci_device_id"): (5, {}),
    ("BalloonConfig", "size"): (64 * MiB, {}),
    ("BalloonConfig", "pci_device_id"): (5, {}),
    ("FsConfig", "queue_size"): (512, {}),
    ("FsConfig", "num_queues"): (2, {}),
    ("FsConfig", "pci_device_id"): (5, {}),
    ("PmemConfig", "size"): (2 * MiB, {}),
    ("PmemConfig", "pci_device_id"): (5, {}),
    ("VsockConfig", "cid"): (4, {}),
    ("VsockConfig", "pci_device_id"): (5, {}),
    ("ConsoleConfig", "pci_device_id"): (5, {}),
    ("DeviceConfig", "pci_device_id"): (5, {}),
    ("DeviceConfig", "x_exclude_mmap_bars"): ([1], {}),
    ("DebugConsoleConfig", "iobase"): (0x3F8, {}),
    ("PciSegmentConfig", "pci_segment"): (1, {}),
    ("PlatformConfig", "num_pci_segments"): (17, {}),       # 1 to 16 work
    ("LandlockConfig", "path"): ("/tmp", {}),
    ("LandlockConfig", "access"): ("rw", {}),
    ("VmConfig", "landlock_rules"): ([{"path": "/", "access": "r"}], {"landlock_enable": True}),
    ("MemoryConfig", "mergeable"): (True, {}),
    ("MemoryZoneConfig", "mergeable"): (True, {}),
    ("MemoryConfig", "hugepages"): (True, {}),
    ("MemoryZoneConfig", "hugepages"): (True, {}),
    ("MemoryConfig", "hugepage_size"): (2 * MiB, {"hugepages": True}),
    ("MemoryZoneConfig", "hugepage_size"): (2 * MiB, {"hugepages": True}),
}

# What else the vm.create body needs for a value (a field naming something elsewhere).
VM_EXTRA: dict[tuple[str, str], dict[str, Any]] = {
    ("DiskConfig", "rate_limit_group"): {"rate_limit_groups": [MINIMAL["RateLimitGroupConfig"]]},
}


def _schema_value(schema: dict[str, Any], default: Any) -> Any:
    """A valid non-default value for a property of this schema (the generic rule)."""
    if "anyOf" in schema:
        schema = next(s for s in schema["anyOf"] if s.get("type") != "null")
    if "$ref" in schema:
        return MINIMAL[schema["$ref"].rsplit("/", 1)[1]]
    if "enum" in schema:
        return next(value for value in schema["enum"] if value != default)
    if "const" in schema:
        return schema["const"]
    kind = schema.get("type")
    if kind == "boolean":
        return not default if isinstance(default, bool) else True
    if kind == "integer":
        value = default + 1 if isinstance(default, int) else max(schema.get("minimum", 1), 1)
        return min(value, schema.get("maximum", value))
    if kind == "string":
        return "/x"
    if kind == "array":
        return [_schema_value(schema["items"], None)]
    raise AssertionError(f"no value for {schema}")


def json_cases() -> list[tuple[str, str]]:
    return [(name, field) for name, properties in REQUEST_MODELS.items()
            if name not in OTHER_BODIES for field in properties]


def expected(name: str, field: str) -> tuple[str, str | None]:
    """("works", None), or ("refused", the path the refusal must name or lie under)."""
    model = model_named(name)
    path = PLACES[name][0]
    here = f"{path}.{field}".lstrip(".")
    if model in REFUSED_WITH:
        return "refused", None          # some enclosing field's path, checked below
    rule = SUPPORT[model][field]
    return ("works", None) if isinstance(rule, Works) else ("refused", here)


def vm_create(body: dict[str, Any], monkeypatch) -> None:
    """``vm.create`` of ``body`` (JSON) as the API serves it: validated into a VmConfig the
    way the HTTP server does, then the VMM's vm_create.  As in a pych started with
    ``--landlock`` (which vm.create's landlock_enable needs: test_landlock_enable_needs_a
    _sandboxed_process) with a free huge page pool (which hugepages=on needs:
    tests/unit/memory/test_hugepages.py)."""
    monkeypatch.setattr("pych.landlock._domain", [])
    monkeypatch.setattr("pych.memory.hugepages.pool", lambda size: (1024, 1024, 0))
    vmm = fake_vmm(monkeypatch)
    try:
        vmm.vm_create(VmConfig.model_validate_json(json.dumps(body)))
    finally:
        vmm.close()


@pytest.mark.parametrize(("name", "field"), json_cases(), ids=lambda x: x)
def test_each_field_works_or_is_refused_at_vm_create(name, field, monkeypatch):
    model = model_named(name)
    schema = SCHEMAS[name]["properties"][field]
    default = model.model_fields[field].get_default(call_default_factory=True)
    if default is PydanticUndefined:      # required: differ from the minimal instance's
        default = MINIMAL.get(name, {}).get(field)
    if isinstance(default, tuple | list | dict) or hasattr(default, "model_dump"):
        default = json.loads(json.dumps(getattr(default, "model_dump", lambda **k: default)(
            mode="json")))
    value, extra = VALUES.get((name, field), (None, {}))
    if (name, field) not in VALUES:
        value = _schema_value(schema, default)
    path, base = PLACES[name]
    base = {**base, **VM_EXTRA.get((name, field), {})}
    instance = {**MINIMAL.get(name, {}), **extra, field: value}
    body = (_in(path, instance, **base) if path
            else json.loads(json.dumps({**BASE, **instance})))
    outcome, refused_path = expected(name, field)
    if outcome == "works":
        vm_create(body, monkeypatch)
        return
    with pytest.raises(UnsupportedField) as err:
        vm_create(body, monkeypatch)
    message = str(err.value)
    assert message.startswith(f"{err.value.path}=") and " is not supported by pych: " in message
    assert message.endswith(err.value.refused.reason)
    if refused_path is not None:
        assert err.value.path in (refused_path, f"{refused_path}[0]"), message
        assert err.value.model is model and err.value.field == field
    else:                               # refused with the field that holds this model
        holder, rule = REFUSED_WITH[model]
        assert err.value.refused is rule, message
        assert f"{path}.{field}".startswith(err.value.path), message


def test_a_field_in_no_table_would_fail(monkeypatch):
    """What the walks rely on: the check looks every field up in the table."""
    monkeypatch.setitem(support.SUPPORT, model_named("DiskConfig"),
                        {k: v for k, v in SUPPORT[model_named("DiskConfig")].items()
                         if k != "direct"})
    with pytest.raises(KeyError):
        support.check(VmConfig.model_validate({**BASE, "disks": [{"path": "/d"}]}))


# --------------------------------------------------------------------------
# What is accepted: the defaults, however they are written


def test_every_default_written_out_is_accepted(monkeypatch):
    """Every model present and every field at its default, nulls and empty lists written
    out (as vm.info's ``config`` and clients generated from the spec write them)."""
    def full(name: str, **fields: Any) -> dict[str, Any]:
        model = model_named(name)
        return model.model_validate({**MINIMAL[name], **fields}).model_dump(mode="json")

    body = {
        "cpus": full("CpusConfig"), "memory": full("MemoryConfig"),
        "payload": full("PayloadConfig"), "rate_limit_groups": [],
        "disks": [full("DiskConfig", rate_limiter_config={"bandwidth": None, "ops": None})],
        "net": [full("NetConfig", rate_limiter_config={"bandwidth": {"size": 0,
                                                                     "refill_time": 0}})],
        "rng": full("RngConfig"), "balloon": full("BalloonConfig"), "generic_vhost_user": [],
        "fs": [full("FsConfig")], "pmem": [full("PmemConfig")], "serial": full("SerialConfig"),
        "console": full("ConsoleConfig"),
        "debug_console": full("DebugConsoleConfig", iobase=0xE9),
        "devices": [full("DeviceConfig")], "user_devices": [], "vdpa": [],
        "vsock": full("VsockConfig"), "pvpanic": False, "iommu": False, "numa": [],
        "watchdog": False, "rtc": None, "pci_segments": [full("PciSegmentConfig")],
        "platform": full("PlatformConfig", tdx=False, sev_snp=False), "tpm": None,
        "landlock_enable": False, "landlock_rules": [],
    }
    assert set(body) == set(VmConfig.model_fields)
    body["memory"]["zones"] = None
    vm_create(body, monkeypatch)


def test_kata_containers_body_is_accepted(monkeypatch):
    """The shape of the body Kata Containers' Go driver sends (defaults spelled out): two PCI
    segments, virtio-fs on segment 1."""
    body = {
        "cpus": {"boot_vcpus": 2, "max_vcpus": 4, "kvm_hyperv": False, "max_phys_bits": 46,
                 "topology": {"threads_per_core": 1, "cores_per_die": 4,
                              "dies_per_package": 1, "packages": 1}},
        "memory": {"size": 256 * MiB, "shared": True, "hotplug_method": "Acpi",
                   "hotplug_size": 1024 * MiB, "hugepages": False, "mergeable": False,
                   "prefault": False, "thp": True},
        "payload": {"kernel": READABLE, "cmdline": "console=hvc0", "initramfs": READABLE},
        "platform": {"num_pci_segments": 2, "iommu_segments": None},
        "disks": [{"path": "/d", "readonly": True, "direct": False, "num_queues": 2,
                   "queue_size": 1024, "vhost_user": False, "iommu": False, "pci_segment": 0,
                   "id": "_disk0", "rate_limiter_config": None}],
        "net": [{"mac": "12:34:56:78:9a:bc", "num_queues": 2, "queue_size": 256,
                 "vhost_user": False, "vhost_mode": "Client", "iommu": False,
                 "pci_segment": 0, "rate_limiter_config": {"bandwidth": None, "ops": None}}],
        "rng": {"src": "/dev/urandom", "iommu": False},
        "serial": {"mode": "Off"}, "console": {"mode": "Off", "iommu": False},
        "vsock": {"cid": 3, "socket": "/v", "iommu": False, "pci_segment": 0},
        "fs": [{"tag": "kataShared", "socket": "/s", "num_queues": 1, "queue_size": 1024,
                "pci_segment": 1}],
        "iommu": False, "watchdog": False, "pvpanic": False, "landlock_enable": False,
    }
    vm_create(body, monkeypatch)


# --------------------------------------------------------------------------
# Over the API: vm.create and vm.add-disk answer 400 before anything is built


def _request(vmm, endpoint: str, body: Any) -> tuple[int, list[str] | None]:
    dispatcher = Dispatcher(lambda fn: fn(vmm))
    response = dispatcher.respond("PUT", f"/api/v1/{endpoint}",
                                  json.dumps(body).encode(), [])
    return response.status, json.loads(response.body) if response.body else None


def test_vm_create_and_add_disk_refuse_over_the_api(monkeypatch):
    vmm = fake_vmm(monkeypatch)
    try:
        status, answer = _request(vmm, "vm.create", {**BASE, "disks": [
            {"path": "/a"}, {"path": "/b", "queue_affinity": [{"queue_index": 0,
                                                               "host_cpus": [0]}]}]})
        assert status == 400
        assert answer == ["Error from API", 'disks[1].queue_affinity[0]={"queue_index":0,'
                          '"host_cpus":[0]} is not supported by pych: pych does not pin a '
                          "disk's queues to host CPUs"]
        assert vmm.config is None
        assert _request(vmm, "vm.create", BASE)[0] == 204
        status, answer = _request(vmm, "vm.add-disk", {"path": "/b", "iommu": True})
        assert (status, answer[-1]) == (
            400, "disks[0].iommu=true is not supported by pych: pych has no virtual IOMMU")
        assert vmm.config.disks is None
        vmm.vm_boot()
        devices = vmm.vm.devices
        status, answer = _request(vmm, "vm.add-disk", {"path": "/b", "sparse": False})
        assert status == 400 and answer[-1].startswith(
            'disks[0].sparse=false is not supported by pych: pych does not preallocate')
        status, answer = _request(vmm, "vm.add-net", {"iommu": True})
        assert status == 400 and answer[-1].startswith("net[0].iommu=true is not supported")
        assert devices.calls == [] and vmm.config.disks is None and vmm.config.net is None
        assert _request(vmm, "vm.add-disk", {"path": "/b"})[0] == 200
    finally:
        vmm.close()


def test_a_memory_backing_pych_lacks_is_refused_at_create_not_at_boot(monkeypatch):
    vmm = fake_vmm(monkeypatch)
    monkeypatch.setattr("pych.memory.hugepages.pool", lambda size: (10, 10, 0))
    try:
        for memory, message in (
            ({"size": 0, "zones": [{"id": "z", "size": 256 * MiB, "host_numa_node": 0}]},
             "memory.zones[0].host_numa_node=0 is not supported by pych: "),
            # the host's pool (10 free) cannot back 256 MiB of 2 MiB pages
            ({"size": 256 * MiB, "hugepages": True, "hugepage_size": 2 * MiB},
             "--memory hugepages=on: the guest RAM needs 128 huge pages of 2 MiB, the host "
             "has 10 free"),
        ):
            status, answer = _request(vmm, "vm.create", {**BASE, "memory": memory})
            assert status == 400 and answer[-1].startswith(message), answer
            assert vmm.config is None
    finally:
        vmm.close()


def test_landlock_enable_needs_a_sandboxed_process(monkeypatch):
    """vm.create's landlock_enable is refused by name in a pych not started with
    --landlock: it could not sandbox the threads already running."""
    vmm = fake_vmm(monkeypatch)
    try:
        status, answer = _request(vmm, "vm.create", {**BASE, "landlock_enable": True})
        assert status == 400 and answer[-1].startswith(
            "landlock_enable=true is not supported by pych: "), answer
        assert vmm.config is None
        status, answer = _request(vmm, "vm.create", {
            **BASE, "landlock_rules": [{"path": "/", "access": "r"}]})
        assert status == 400 and "need landlock_enable" in answer[-1], answer
    finally:
        vmm.close()


# --------------------------------------------------------------------------
# The command line: every key of every option


def _cli_keys(model: type[CliModel]) -> dict[str, str | None]:
    """Every CLI key of ``model`` with the field it fills (None: it fills none)."""
    grammar = _grammar(model)
    keys: dict[str, str | None] = {}
    for name, cli_key in grammar.keys:
        keys[cli_key.key or name] = name
        if cli_key.deprecated is not None:
            keys[cli_key.deprecated] = name
    for group in grammar.groups:
        if group is RATE_LIMITER_KEYS:
            keys.update(dict.fromkeys(group.keys, "rate_limiter_config"))
        else:
            keys.update(dict.fromkeys(group.flags, "mode"))
            keys.update({key: key for key in group.keys})
    keys.update(dict.fromkeys(model.CLI_IGNORED_KEYS))
    return keys


# (option, key): the option text with that key at a non-default value, and the other
# options the command line needs.
CLI_CASES: dict[tuple[str, str], tuple[str, list[str]]] = {}


def _cli(option: str, key_texts: dict[str, str], base: str = "",
         extra: list[str] | None = None) -> None:
    for key, text in key_texts.items():
        option_text = f"{base},{text}" if base else text
        CLI_CASES[option, key] = (option_text, extra or [])


_cli("--cpus", {"boot": "boot=2", "max": "max=4", "topology": "topology=1:2:1:1",
                "kvm_hyperv": "kvm_hyperv=on", "max_phys_bits": "max_phys_bits=40",
                "affinity": "affinity=[0@[0]]", "features": "features=[amx]",
                "nested": "nested=off", "core_scheduling": "core_scheduling=vcpu",
                "profile": "profile=Host"}, base="boot=2")
_cli("--memory", {"size": "size=1G", "mergeable": "mergeable=on",
                  "hotplug_method": "hotplug_method=virtio-mem",
                  "hotplug_size": "hotplug_size=1G",
                  "hotplugged_size": "hotplug_method=virtio-mem,hotplug_size=1G,"
                                     "hotplugged_size=128M",
                  "shared": "shared=on", "hugepages": "hugepages=on",
                  "hugepage_size": "hugepages=on,hugepage_size=2M", "prefault": "prefault=on",
                  "reserve": "reserve=on", "thp": "thp=off", "file": "file=/dev/shm/x"},
     base="size=256M")
_cli("--memory-zone", {"id": "id=z", "size": "size=512M", "file": "file=/f",
                       "shared": "shared=on", "hugepages": "hugepages=on",
                       "hugepage_size": "hugepages=on,hugepage_size=2M",
                       "host_numa_node": "host_numa_node=0", "hotplug_size": "hotplug_size=1G",
                       "hotplugged_size": "hotplug_size=1G,hotplugged_size=128M",
                       "prefault": "prefault=on", "reserve": "reserve=on",
                       "mergeable": "mergeable=on"},
     base="id=z,size=256M", extra=["--memory", "size=0,hotplug_method=virtio-mem"])
_cli("--disk", {"path": "path=/e", "readonly": "readonly=on", "direct": "direct=on",
                "num_queues": "num_queues=2", "queue_size": "queue_size=256",
                "vhost_user": "vhost_user=on", "socket": "socket=/s",
                "rate_limit_group": "rate_limit_group=g",
                **{key: f"{key}=100,{key.split('_')[0]}_refill_time=10"
                   if not key.endswith("refill_time") else f"{key}=10"
                   for key in RATE_LIMITER_KEYS.keys},
                "_disable_io_uring": "_disable_io_uring=on", "_disable_aio": "_disable_aio=on",
                "serial": "serial=s0", "queue_affinity": "queue_affinity=[0@[0]]",
                "backing_files": "backing_files=on", "sparse": "sparse=off",
                "image_type": "image_type=qcow2", "lock_granularity": "lock_granularity=full",
                "id": "id=d0", "iommu": "iommu=on", "pci_segment": "pci_segment=1",
                "pci_device_id": "pci_device_id=5"}, base="path=/d")
CLI_CASES["--disk", "vhost_user"] = ("vhost_user=on,socket=/s", [])
CLI_CASES["--disk", "socket"] = ("socket=/s,vhost_user=on", [])
_cli("--net", {"tap": "tap=t0", "ip": "ip=192.168.1.1,mask=255.255.255.0",
               "mask": "mask=255.255.255.0,ip=192.168.1.1", "mac": "mac=12:34:56:78:9a:bc",
               "host_mac": "host_mac=12:34:56:78:9a:bd", "mtu": "mtu=1500",
               "num_queues": "num_queues=4", "queue_size": "queue_size=512",
               "vhost_user": "vhost_user=on,socket=/s", "socket": "socket=/s,vhost_user=on",
               "vhost_mode": "vhost_mode=server,vhost_user=on,socket=/s", "fd": "fd=[7]",
               **{key: f"{key}=100" for key in RATE_LIMITER_KEYS.keys},
               "offload_tso": "offload_tso=off", "offload_ufo": "offload_ufo=off",
               "offload_csum": "offload_csum=off,offload_tso=off,offload_ufo=off",
               "id": "id=n0", "iommu": "iommu=on", "pci_segment": "pci_segment=1",
               "pci_device_id": "pci_device_id=5"})
_PCI = {"id": "id=x0", "iommu": "iommu=on", "pci_segment": "pci_segment=1",
        "pci_device_id": "pci_device_id=5"}
_cli("--rng", {"src": "src=/dev/random", **_PCI})
_cli("--balloon", {"size": "size=64M", "deflate_on_oom": "deflate_on_oom=on",
                   "free_page_reporting": "free_page_reporting=on", **_PCI}, base="size=0")
_cli("--fs", {"tag": "tag=t2", "socket": "socket=/s2", "num_queues": "num_queues=2",
              "queue_size": "queue_size=512",
              **{k: v for k, v in _PCI.items() if k != "iommu"}}, base="tag=t,socket=/s")
_cli("--pmem", {"file": "file=/p", "size": "size=2M", "discard_writes": "discard_writes=on",
                **_PCI}, base="file=/p")
_cli("--vsock", {"cid": "cid=4", "socket": "socket=/v2", **_PCI}, base="cid=3,socket=/v")
_cli("--device", {"path": "path=/sys/e", "fd": "fd=5",
                  "x_nv_gpudirect_clique": "x_nv_gpudirect_clique=1",
                  "x_exclude_mmap_bars": "x_exclude_mmap_bars=[1]", **_PCI}, base="path=/sys/d")
_cli("--user-device", {"socket": "socket=/u", **{k: v for k, v in _PCI.items()
                                                  if k != "iommu"}}, base="socket=/u")
_cli("--vdpa", {"path": "path=/dev/v", "num_queues": "num_queues=2", **_PCI},
     base="path=/dev/v")
_cli("--generic-vhost-user", {
    "socket": "socket=/g2,queue_sizes=[256],device_type=fs",
    "queue_sizes": "socket=/g,queue_sizes=[512],device_type=fs",
    "device_type": "socket=/g,queue_sizes=[256],device_type=net",
    "virtio_id": "socket=/g,queue_sizes=[256],virtio_id=net",
    **{k: f"socket=/g,queue_sizes=[256],device_type=fs,{v}" for k, v in _PCI.items()
       if k != "iommu"}})
for _option, _default in (("--serial", "null"), ("--console", "tty")):
    _cli(_option, {"off": "off", "null": "null", "pty": "pty", "tty": "tty",
                   "file": "file=/tmp/pych-test-serial", "socket": "socket=/tmp/pych-test-sock",
                   **({} if _option == "--serial" else
                      {k: f"tty,{v}" for k, v in _PCI.items()})})
_cli("--debug-console", {"off": "off", "null": "null", "pty": "pty", "tty": "tty",
                         "file": "file=/tmp/pych-debug", "iobase": "off,iobase=0x3f8"})
_cli("--numa", {"guest_numa_id": "guest_numa_id=0", "cpus": "cpus=[0]",
                "distances": "distances=[0@10]", "memory_zones": "memory_zones=[z]",
                "pci_segments": "pci_segments=[0]", "device_id": "device_id=d"},
     base="guest_numa_id=0")
_cli("--platform", {"num_pci_segments": "num_pci_segments=17",      # 1 to 16 work
                    "iommu_segments": "iommu_segments=[0]",
                    "iommu_address_width": "iommu_address_width=48",
                    "system_serial_number": "system_serial_number=S",
                    "serial_number": "serial_number=S",
                    "system_uuid": "system_uuid=4a3f8d6e-94d1-4c6b-8d2e-6f1f2a0b9c11",
                    "uuid": "uuid=4a3f8d6e-94d1-4c6b-8d2e-6f1f2a0b9c11", "oem_strings": "oem_strings=[a]",
                    "system_manufacturer": "system_manufacturer=M",
                    "system_product_name": "system_product_name=P",
                    "system_version": "system_version=V", "system_family": "system_family=F",
                    "system_sku_number": "system_sku_number=K",
                    "chassis_asset_tag": "chassis_asset_tag=A", "iommufd": "iommufd=on",
                    "iommufd_fd": "iommufd_fd=5", "vfio_p2p_dma": "vfio_p2p_dma=off"})
_cli("--pci-segment", {"pci_segment": "pci_segment=1",
                       "mmio32_aperture_weight": "mmio32_aperture_weight=2",
                       "mmio64_aperture_weight": "mmio64_aperture_weight=2"})
_cli("--rate-limit-group", {key: f"id=g,bw_size=1,bw_refill_time=1,{key}=5"
                            for key in (*RATE_LIMITER_KEYS.keys, "id")})
_cli("--rtc", {**_PCI})
_cli("--tpm", {"socket": "socket=/t"})
_cli("--landlock-rules", {"path": "path=/,access=r", "access": "path=/,access=rw"})
for _key in ("path", "access"):                     # rules sandbox nothing without it
    CLI_CASES["--landlock-rules", _key] = (CLI_CASES["--landlock-rules", _key][0],
                                           ["--landlock"])

CLI_CASES["--disk", "rate_limit_group"] = (
    "path=/d,rate_limit_group=g", ["--rate-limit-group", "id=g,bw_size=1,bw_refill_time=1"])

CLI_MODELS = {option: support._field_path(path) for option, path in support.CLI_OPTIONS.items()}


def _option_model(option: str) -> type[CliModel] | None:
    model, field = CLI_MODELS[option]
    subs = support._models_of_annotation(model.model_fields[field].annotation)
    return subs[0] if subs else None


def test_every_key_of_every_option_has_a_case():
    declared = {(option, key) for option in support.CLI_OPTIONS
                if (model := _option_model(option)) is not None
                for key in _cli_keys(model)}
    assert set(CLI_CASES) == declared


def test_every_option_of_the_parser_is_in_a_table():
    """Each option ``pych`` parses configures the VM (CLI_OPTIONS: the table judges its keys)
    or the process (PROCESS_OPTIONS: works or refused); SUPPORTED_OPTIONS follows."""
    parser_options = {action.option_strings[-1] for action in build_parser()._actions
                      if action.option_strings and action.dest != "help"}
    assert parser_options == set(support.CLI_OPTIONS) | set(support.PROCESS_OPTIONS)
    assert cli.SUPPORTED_OPTIONS == (
        {option.lstrip("-") for option in support.CLI_OPTIONS}
        | {option.lstrip("-") for option, rule in support.PROCESS_OPTIONS.items()
           if isinstance(rule, Works)})


@pytest.fixture
def kernel(tmp_path: Path) -> str:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF")
    return str(path)


def _run(argv: list[str]) -> VmConfig | None:
    return config_from_args(build_parser().parse_args(argv))


# Keys whose case sets a refused field to a value it accepts (the default).
CLI_ACCEPTED = {("--debug-console", "off")}
# Keys whose value implies a field that is refused first: (option, key) -> that field's key.
CLI_IMPLIES = {("--platform", "iommufd_fd"): "iommufd"}


@pytest.mark.parametrize(("option", "key"), sorted(CLI_CASES), ids=lambda x: x)
def test_each_cli_key_works_or_is_refused_on_one_line(option, key, kernel):
    text, extra = CLI_CASES[option, key]
    model = _option_model(option)
    field = _cli_keys(model)[key]
    argv = ["--kernel", kernel, *(["--cpus", "boot=2"] if option != "--cpus" else []),
            *(["--platform", "num_pci_segments=2"] if option != "--platform" else []),
            *extra, option, text]                     # pci_segment=1 exists
    whole = support.option_refusal(option)
    try:
        config = _run(argv)
    except (CliError, OptionError) as err:
        message = str(err)
    else:
        assert config is not None
        assert whole is None and (model, key) not in support.CLI_KEYS
        rule = SUPPORT[model][field]
        assert isinstance(rule, Works) or (option, key) in CLI_ACCEPTED, (option, key)
        return
    assert "\n" not in message and " is not supported by pych: " in message, message
    if whole is not None:
        assert message == f"{option} is not supported by pych: {whole.reason}"
        return
    named = support._cli_key(model, field) if field is not None else key
    named = CLI_IMPLIES.get((option, key), named)
    subject = message.split(" is not supported by pych: ")[0]
    assert subject.startswith(f"{option} {named}") or subject.startswith(f"{option} {key}"), (
        message)
    rule = SUPPORT[model][field] if field is not None else None
    if isinstance(rule, Works):           # refused for a field of the model it holds
        assert support._models_of_annotation(model.model_fields[field].annotation), message


def test_refused_cli_keys_are_one_line_from_main(kernel, capsys, monkeypatch):
    monkeypatch.setattr("pych.cli.main.sys.argv", ["pych"])
    for argv, line in (
        (["--disk", "path=/d,queue_affinity=[0@[0]]"],
         "pych: error: --disk queue_affinity is not supported by pych: pych does not pin a "
         "disk's queues"),
        (["--net", "tap=,bw_size=1000"],
         "pych: error: --net bw_size=1000 is not supported by pych: a rate limiter bucket "
         "needs both bw_size and bw_refill_time above 0"),
        (["--memory", "size=1G,file=/dev/shm/x"],
         "pych: error: --memory file=/dev/shm/x is not supported by pych: it has no effect"),
        (["--tpm", "socket=/t"],
         "pych: error: --tpm is not supported by pych: pych has no TPM device"),
        (["--watchdog"],
         "pych: error: --watchdog is not supported by pych: pych has no virtio-watchdog "
         "device"),
        (["--cpus", "boot=1,features=[amx]"],
         "pych: error: --cpus features=[amx] is not supported by pych: pych does not ask"),
        (["--firmware", kernel],
         f"pych: error: --firmware {kernel} is not supported by pych: pych boots a kernel"),
        (["--restore", "source_url=file:///s"],
         "pych: error: --restore cannot be combined with --kernel or --firmware"),
    ):
        assert cli.main(["--kernel", kernel, *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(line), err


def test_help_marks_refused_options(capsys):
    assert cli.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Enable the virtio watchdog [not supported by pych]" in text
    assert "[not supported" not in text.split("--disk", 1)[1].split("--event-monitor")[0]


def test_pych_remote_refuses_dropped_keys_too(capsys):
    from pych.cli import remote

    status = remote.main(["--api-socket", "/nonexistent", "add-disk",
                          "path=/d,bw_size=100"])
    err = capsys.readouterr().err
    assert status != 0 and "--disk bw_size=100 is not supported by pych" in err, err


# --------------------------------------------------------------------------
# The other request bodies


def test_other_bodies_are_whole_endpoints():
    """Resize and removal work field by field (tests/unit/vmm); the rest are bodies of
    endpoints pych does not implement, refused as a whole (500, tests/unit/api)."""
    by_body = {route.body.__name__: route for route in ROUTES if route.body is not None}
    implemented = {name for name in OTHER_BODIES if name in by_body
                   and by_body[name].implemented}
    assert implemented == {"VmResize", "VmResizeZone", "VmResizeDisk", "VmRemoveDevice",
                           "VmSnapshotConfig", "RestoreConfig", "SendMigrationData",
                           "ReceiveMigrationData"}
    # the migration bodies' refused fields: one table, each a field of its body
    for endpoint, fields in support.ENDPOINT_REFUSALS.items():
        route = next(route for route in ROUTES if route.endpoint == endpoint)
        assert set(fields) <= set(route.body.model_fields), endpoint
    # restore's fields: tests/unit/vmm/test_snapshot.py; its sub-bodies: net_fds works, the
    # others are refused with their field (vmm)
    for name in OTHER_BODIES - implemented - {"RestoredNetConfig", "RestoredVfioConfig",
                                              "VmMemoryZoneUpdateData"}:
        holders = [route for route in ROUTES if route.body is not None
                   and (route.body.__name__ == name
                        or name in _refs(SCHEMAS[route.body.__name__]))]
        assert holders and not any(route.implemented for route in holders), name


# --------------------------------------------------------------------------
# The page


def test_the_options_page_is_current():
    committed = (REPO / "docs" / "options.md").read_text()
    assert committed == options_page.markdown(), (
        "docs/options.md is stale: python -m pych.config.options_page > docs/options.md")


def test_the_page_lists_every_field_and_key():
    page = options_page.markdown()
    for model in (*REACHED, *REFUSED_WITH):
        for field in model.model_fields:
            assert f"`{field}`" in page, (model.__name__, field)
        if issubclass(model, CliModel):
            for key in _cli_keys(model):
                assert f"`{key}" in page, (model.__name__, key)
    for option in (*support.CLI_OPTIONS, *support.PROCESS_OPTIONS):
        assert f"`{option}`" in page


def test_the_module_prints_the_page():
    result = subprocess.run([sys.executable, "-m", "pych.config.options_page"], cwd=REPO,
                            capture_output=True, text=True, check=True,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.stdout == options_page.markdown()
