"""The device tree ``vm.info`` reports: a node per device, in placement order, serialised in
the shape clients have always read (the API's DeviceNode)."""

from __future__ import annotations

import json

from pych.config import DeviceNode
from pych.device_manager.tree import DeviceTree


def test_a_virtio_device_is_two_nodes_and_a_vfio_device_one():
    tree = DeviceTree()
    tree.add_virtio("_disk0", "0000:00:02.0")
    tree.add_pci("_vfio1", "0000:00:03.0")
    assert list(tree) == ["_disk0", "_virtio-pci-_disk0", "_vfio1"]
    assert tree.get("_disk0").parent == "_virtio-pci-_disk0"
    assert tree.get("_virtio-pci-_disk0").children == ("_disk0",)
    assert "_vfio1" in tree and tree.get("nope") is None


def test_the_json_has_the_same_keys_in_the_same_order():
    tree = DeviceTree()
    tree.add_virtio("_disk0", "0000:00:02.0")
    tree.add_pci("_vfio1", "0000:00:03.0")
    assert json.dumps(tree.to_json()) == (
        '{"_disk0": {"id": "_disk0", "resources": [], "children": [], '
        '"parent": "_virtio-pci-_disk0"}, '
        '"_virtio-pci-_disk0": {"id": "_virtio-pci-_disk0", "resources": [], '
        '"children": ["_disk0"], "pci_bdf": "0000:00:02.0"}, '
        '"_vfio1": {"id": "_vfio1", "resources": [], "children": [], '
        '"pci_bdf": "0000:00:03.0"}}')
    for node in tree.to_json().values():                  # what vm.info's model accepts
        assert DeviceNode.model_validate(node).model_dump(exclude_none=True) == node


def test_placing_devices_needs_no_api_model():
    """Every boot places devices: the tree must not import the API's models (pydantic)."""
    import subprocess
    import sys
    code = ("import sys; from pych.device_manager.tree import DeviceTree; "
            "t = DeviceTree(); t.add_virtio('_rng0', '0000:00:01.0'); t.to_json(); "
            "print('pych.config.api' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def test_removing_a_device_drops_its_pci_node_too():
    tree = DeviceTree()
    tree.add_virtio("_disk0", "0000:00:02.0")
    tree.add_virtio("_net1", "0000:00:03.0")
    tree.add_pci("_vfio2", "0000:00:04.0")
    tree.remove("_disk0")
    tree.remove("_vfio2")
    assert list(tree) == ["_net1", "_virtio-pci-_net1"]
