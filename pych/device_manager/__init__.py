"""The device manager: the PCI segment, its devices, their ids and the device tree
(:mod:`.manager`); the PCI hot plug controller ``\\_SB_.PHPR`` with its register block, its
AML and the slot objects (:mod:`.hotplug`); ``vm.info``'s device tree (:mod:`.tree`); and the
device factories, one per device kind of the registry (:mod:`.factories`)."""
