"""The device tree ``vm.info`` reports: one node per device the device manager placed, in the
shape of the API's :class:`~pych.config.DeviceNode`.

A virtio device is two nodes, as in the reference: the device (``_disk0``), whose parent is
its transport's PCI node (``_virtio-pci-_disk0``, with the BDF). A VFIO device is one PCI node.
The nodes are plain records, not the pydantic model: every boot places devices, and the
API's models (``pych.config.api``, ~30 ms to import here) are needed only by a request.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

VIRTIO_PCI_PREFIX = "_virtio-pci-"


class DeviceNode(NamedTuple):
    """One node: the fields of the API's ``DeviceNode`` that pych sets."""
    id: str
    parent: str | None = None
    pci_bdf: str | None = None
    children: tuple[str, ...] = ()


class DeviceTree:
    """Device id -> :class:`DeviceNode`, in the order the devices were placed. Not
    thread-safe: the device manager serialises changes under its own lock."""

    def __init__(self) -> None:
        self._nodes: dict[str, DeviceNode] = {}

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._nodes

    def __iter__(self) -> Iterator[str]:
        return iter(self._nodes)

    def get(self, node_id: str) -> DeviceNode | None:
        return self._nodes.get(node_id)

    def add_virtio(self, dev_id: str, bdf: str) -> None:
        """The virtio device ``dev_id`` and its transport's PCI node at ``bdf``."""
        pci_id = VIRTIO_PCI_PREFIX + dev_id
        self._nodes[dev_id] = DeviceNode(id=dev_id, parent=pci_id)
        self._nodes[pci_id] = DeviceNode(id=pci_id, pci_bdf=bdf, children=(dev_id,))

    def add_pci(self, dev_id: str, bdf: str) -> None:
        """A PCI device that is its own node (VFIO)."""
        self._nodes[dev_id] = DeviceNode(id=dev_id, pci_bdf=bdf)

    def remove(self, dev_id: str) -> None:
        """Drop the device ``dev_id`` and its parent PCI node, if it has one (virtio)."""
        node = self._nodes.pop(dev_id)
        if node.parent is not None:
            del self._nodes[node.parent]

    def to_json(self) -> dict[str, dict]:
        """``vm.info``'s ``device_tree``: each node as ``{"id", "resources", "children"}``
        followed by ``"parent"`` and ``"pci_bdf"`` when they are set."""
        return {node_id: _node_json(node) for node_id, node in self._nodes.items()}


def _node_json(node: DeviceNode) -> dict:
    out = {"id": node.id, "resources": [], "children": list(node.children)}
    if node.parent is not None:
        out["parent"] = node.parent
    if node.pci_bdf is not None:
        out["pci_bdf"] = node.pci_bdf
    return out
