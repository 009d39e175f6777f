"""The support table's entries (:class:`Works`, :class:`Refused`) and the tables of the
``pych`` command's options: which :class:`~pych.config.VmConfig` field each VM option fills
(:data:`CLI_OPTIONS`) and what each option of the process does (:data:`PROCESS_OPTIONS`).

They live apart from :mod:`pych.config.support` (the table of every field, keyed by the
models) because they need no model: the command line reads them to know its options before
any model — or pydantic — is imported, which a ``pych`` that only serves its API never does.
:mod:`pych.config.support` re-exports every name here; read it as part of that table.  (The
entries are NamedTuples rather than dataclasses for the same reason: ``dataclasses`` imports
``inspect``, ~10 ms of pych's start-up.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

__all__ = ["CLI_OPTIONS", "PROCESS_OPTIONS", "WORKS", "Entry", "Refused", "Works"]


class Works(NamedTuple):
    """pych honours the field.  ``note``: a caveat worth knowing (what a default that pych
    cannot refuse does not do, how pych's behaviour differs in detail)."""

    note: str = ""


class Refused(NamedTuple):
    """pych does not implement the field: any value but the defaults is refused.

    ``reason`` completes ``<field>=<value> is not supported by pych: <reason>``.  ``accepts``
    adds values that are accepted besides the field's default, ``null`` and ``[]`` (values
    that ask for nothing pych lacks); ``accepted`` says in words what is accepted, for the
    page (derived from the default if empty); ``note`` is a caveat about what is accepted.
    ``cli``: the command line spelling of the refusal's subject when it is not
    ``<option> <key>=<value>`` (a flag, a whole option, a key of another option), given the
    refused value.
    """

    reason: str
    accepts: Callable[[Any], bool] | None = None
    accepted: str = ""
    note: str = ""
    cli: Callable[[Any], str] | None = None

    def allows(self, value: Any, default: Any) -> bool:
        if value is None or value == [] or _same(value, default):
            return True
        return self.accepts is not None and self.accepts(value)


Entry = Works | Refused

WORKS = Works()


def _is_model(value: Any) -> bool:
    return hasattr(type(value), "model_dump")     # a pydantic model (no import needed to ask)


def _dump(value: Any) -> Any:
    """``value`` as the API writes it: models as their JSON, lists item by item."""
    if _is_model(value):
        return value.model_dump(mode="json", exclude_none=True)
    if isinstance(value, list):
        return [_dump(item) for item in value]
    return value


def _same(value: Any, default: Any) -> bool:
    if _is_model(value) or _is_model(default):
        return _dump(value) == _dump(default)
    return value == default and type(value) is type(default)


CLI_OPTIONS: Mapping[str, str] = {
    "--kernel": "payload.kernel",
    "--firmware": "payload.firmware",
    "--cmdline": "payload.cmdline",
    "--initramfs": "payload.initramfs",
    "--cpus": "cpus",
    "--memory": "memory",
    "--memory-zone": "memory.zones",
    "--disk": "disks",
    "--net": "net",
    "--rng": "rng",
    "--balloon": "balloon",
    "--fs": "fs",
    "--pmem": "pmem",
    "--vsock": "vsock",
    "--device": "devices",
    "--user-device": "user_devices",
    "--vdpa": "vdpa",
    "--generic-vhost-user": "generic_vhost_user",
    "--serial": "serial",
    "--console": "console",
    "--debug-console": "debug_console",
    "--numa": "numa",
    "--platform": "platform",
    "--pci-segment": "pci_segments",
    "--rate-limit-group": "rate_limit_groups",
    "--rtc": "rtc",
    "--tpm": "tpm",
    "--pvpanic": "pvpanic",
    "--watchdog": "watchdog",
    "--landlock": "landlock_enable",
    "--landlock-rules": "landlock_rules",
}
"""Every ``pych`` option that configures the VM, with the :class:`VmConfig` field it fills:
the support table (:data:`pych.config.support.SUPPORT`) decides what of it works."""

PROCESS_OPTIONS: Mapping[str, Entry] = {
    "--api-socket": WORKS,
    "--event-monitor": WORKS,
    "--log-file": WORKS,
    "-v": WORKS,
    "--version": WORKS,
    "--seccomp": Works("pych's own filter, installed on the vCPU threads"),
    "--log-format": Refused("pych writes its log lines in one format"),
    "--no-shutdown": Refused("pych exits when the guest powers off"),
    "--restore": Works("a pych snapshot (docs/snapshot.md): source_url=file:///<dir>, prefault, "
                       "net_fds, resume; memory_restore_mode=ondemand, vfio_fds, iommufd_fd "
                       "and zone_updates are refused"),
}
"""The options of the ``pych`` process itself (no VM configuration): the command line
accepts those that work and refuses the others (``--restore is not supported yet``)."""
