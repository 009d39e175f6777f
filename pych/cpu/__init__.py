"""vCPUs: the CPU manager (:mod:`.manager`), the CPU hot plug controller ``\\_SB_.PRES`` with
its register block and AML (:mod:`.hotplug`), and the vCPU threads around ``KVM_RUN``
(:mod:`.vcpu`)."""
