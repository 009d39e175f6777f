"""Guest memory: the RAM map devices use (:mod:`.guest_memory`), where RAM goes
(:mod:`.layout`), memory zones and their backing (:mod:`.zones`), the memory manager of one
boot (:mod:`.manager`), the ACPI memory hot plug controller ``\\_SB_.MHPC`` with its register
block and AML (:mod:`.hotplug`), and the rules of ``vm.resize`` / ``vm.resize-zone`` for RAM
(:mod:`.resize`)."""
