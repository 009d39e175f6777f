"""The VMM: one control loop that owns the VM and serialises every request onto it.

- :mod:`pych.vmm.loop`: the control loop (``call``, ``post``, ``run_loop``).
- :mod:`pych.vmm.vmm`: :class:`Vmm`, the VM's lifecycle and one method per API endpoint.
- :mod:`pych.vmm.state`: :class:`VmState`, the lifecycle's states and transitions.
- :mod:`pych.vmm.controllers`: what a request does before boot (edit the configuration) and
  at runtime (act on the VM, then record it).
- :mod:`pych.vmm.manager_errors`: the managers' errors as domain errors (:mod:`pych.errors`).
- :mod:`pych.vmm.serial_port`: the host end of ``--serial``, kept across reboots.

The process around it (command line, logging, signals, the API server) is
:mod:`pych.cli.process`.
"""

from pych.vmm.state import VmState
from pych.vmm.vmm import Vmm

__all__ = ["VmState", "Vmm"]
