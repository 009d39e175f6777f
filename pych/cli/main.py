"""The ``pych`` command: Cloud Hypervisor's command line, unchanged.

``pych --kernel vmlinux --cmdline "console=ttyS0" --cpus boot=2,max=4
--memory size=1G --api-socket /tmp/pych.sock`` builds the same
:class:`~pych.config.VmConfig` that ``cloud-hypervisor`` would from the same
arguments, then hands it to :func:`pych.cli.process.run`.  Without ``--kernel``
(or ``--firmware``) no VM is configured and the VMM waits for ``vm.create``.

Every option of the reference is *recognized*, so that its syntax is checked
and its help shown.  Options that configure the VM are all read, and the support
table (:mod:`pych.config.support`) refuses, on one line, any key and value pych does
not implement: ``pych: error: --tpm is not supported by pych: pych has no TPM
device``.  Of the options of the process itself, those not in
:data:`SUPPORTED_OPTIONS` fail with ``pych: error: --restore is not supported yet``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from pych import seccomp
from pych.cli import without_pydantic_plugins
from pych.config import rules
from pych.config.errors import ConfigError
from pych.config.grammar import OptionParserError

if TYPE_CHECKING:
    from pych.config import ConsoleConfig, RestoreConfig, VmConfig

__all__ = [
    "SUPPORTED_CONSOLE_MODES",
    "SUPPORTED_OPTIONS",
    "CliError",
    "build_parser",
    "config_from_args",
    "main",
]

# The options pych accepts, by their reference names ("v" is -v): every option that
# configures the VM (the support table, pych.config.support, then judges each key and value
# it gives) and the process options that work.  Everything else is rejected with one
# message.
SUPPORTED_OPTIONS: frozenset[str] = frozenset(
    {option.lstrip("-") for option in rules.CLI_OPTIONS}
    | {option.lstrip("-") for option, rule in rules.PROCESS_OPTIONS.items()
       if isinstance(rule, rules.Works)}
)

# The --console modes (JSON spelling) pych implements.  While "Tty" is not
# among them, an omitted --console means "off" instead of the reference's tty.
SUPPORTED_CONSOLE_MODES: frozenset[str] = frozenset({"Off", "Tty", "Pty", "File", "Socket", "Null"})

# Options that configure the VM and so need a payload (the reference's
# "vm-config" clap group, which requires "vm-payload").
_VM_OPTIONS = (
    "balloon",
    "cmdline",
    "console",
    "cpus",
    "debug-console",
    "device",
    "disk",
    "fs",
    "generic-vhost-user",
    "initramfs",
    "landlock",
    "landlock-rules",
    "memory",
    "memory-zone",
    "net",
    "numa",
    "pci-segment",
    "platform",
    "pmem",
    "pvpanic",
    "rate-limit-group",
    "rng",
    "rtc",
    "serial",
    "tpm",
    "user-device",
    "vdpa",
    "vsock",
    "watchdog",
)
_PAYLOAD_OPTIONS = ("kernel", "firmware")

# The options read with a configuration model, by argparse dest: the model's name in
# pych.config (imported only when a VM is configured on the command line).
_OPTION_MODELS: dict[str, str] = {
    "cpus": "CpusConfig", "memory": "MemoryConfig", "memory_zone": "MemoryZoneConfig",
    "rate_limit_group": "RateLimitGroupConfig", "disk": "DiskConfig", "net": "NetConfig",
    "rng": "RngConfig", "balloon": "BalloonConfig",
    "generic_vhost_user": "GenericVhostUserConfig", "fs": "FsConfig", "pmem": "PmemConfig",
    "serial": "SerialConfig", "console": "ConsoleConfig", "debug_console": "DebugConsoleConfig",
    "device": "DeviceConfig", "user_device": "UserDeviceConfig", "vdpa": "VdpaConfig",
    "vsock": "VsockConfig", "numa": "NumaConfig", "rtc": "RtcConfig",
    "pci_segment": "PciSegmentConfig", "platform": "PlatformConfig", "tpm": "TpmConfig",
    "landlock_rules": "LandlockConfig",
}  # fmt: skip

# The options whose help shows their model's CLI_DEFAULT.
_HELP_DEFAULTS = ("cpus", "memory", "rng")


class CliError(Exception):
    """A command line the user must fix; the message is one line for them."""


class _ArgumentParser(argparse.ArgumentParser):
    """Raises :class:`CliError` instead of printing usage and exiting.

    The help says what pych does with each option (``[not supported by pych]``, from the
    support table) and the defaults of the options read with a model: both come from the
    models, so they are added only when the help is shown — parsing needs no model, and a
    ``pych --api-socket`` does not import pydantic."""

    _described = False

    def error(self, message: str) -> NoReturn:
        raise CliError(message)

    def format_help(self) -> str:
        if not self._described:
            for action in self._actions:
                _describe(action)
            self._described = True
        return super().format_help()


def _option_name(action: argparse.Action) -> str | None:
    """The reference name of an option (``v`` for ``-v``); None for ``--help``."""
    if not action.option_strings or action.dest == "help":
        return None
    return "v" if action.option_strings == ["-v"] else action.option_strings[-1].lstrip("-")


def _describe(action: argparse.Action) -> None:
    """Complete an option's help: its model's default, and whether pych supports it."""
    name = _option_name(action)
    if name is None or action.help is None:
        return
    import pych.config
    from pych.config import support

    text = action.help
    if name in _HELP_DEFAULTS:
        text += f" (default {getattr(pych.config, _OPTION_MODELS[name]).CLI_DEFAULT})"
    if name not in SUPPORTED_OPTIONS:
        text += " [not supported yet]"
    elif support.option_refusal("-v" if name == "v" else f"--{name}") is not None:
        text += " [not supported by pych]"
    action.help = text


class _StoreOnce(argparse.Action):
    """Store a single-valued option; giving it twice is an error (as in clap)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if getattr(namespace, self.dest) is not None:
            raise argparse.ArgumentError(self, "cannot be used multiple times")
        setattr(namespace, self.dest, values)


def _readable_file(path: str) -> str:
    """An argparse type: ``path`` must be a file this process can read."""
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot read {path!r}: {err.strerror}") from None
    return path


def _version() -> str:
    from importlib import metadata      # 20-40 ms to import: only for --version
    try:
        return metadata.version("pych")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The ``pych`` argument parser, with every option of the reference.

    Option values stay strings (``--disk`` gives a list of them); they become
    configuration in :func:`config_from_args`.  Defaults are all None/False so
    that an option's presence can be told apart from its default.  Errors
    raise :class:`CliError` rather than exiting.
    """
    parser = _ArgumentParser(
        prog="pych",
        description="Launch a pych VMM (Cloud Hypervisor compatible).",
        allow_abbrev=False,
    )

    def single(name: str, help_text: str, **kwargs: Any) -> None:
        parser.add_argument(
            f"--{name}", action=_StoreOnce, help=help_text, **kwargs
        )

    def multiple(name: str, help_text: str) -> None:
        parser.add_argument(
            f"--{name}",
            nargs="+",
            action="extend",
            metavar="CONFIG",
            help=help_text,
        )

    def flag(name: str, help_text: str) -> None:
        parser.add_argument(
            f"--{name}", action="store_true", default=None, help=help_text
        )

    single("api-socket", "HTTP API socket (UNIX domain socket): path=<path> or fd=<fd>")
    single("balloon", "size=<balloon_size>,deflate_on_oom=on|off,free_page_reporting=on|off,...")
    single("cmdline", "Kernel command line")
    single("console", "off|null|pty|tty|file=<path>|socket=<path>,iommu=on|off,id=...")
    single(
        "cpus",
        "boot=<boot_vcpus>,max=<max_vcpus>,topology=<threads>:<cores>:<dies>:<packages>,"
        "kvm_hyperv=on|off,max_phys_bits=<bits>,affinity=[<vcpu>@[<host cpus>],...],"
        "features=[amx],nested=on|off,core_scheduling=vm|vcpu|off",
    )
    single("debug-console", "off|pty|tty|file=<path>,iobase=<port in hex>")
    multiple("device", "VFIO device: path=<sysfs path>|fd=<fd>,iommu=on|off,id=...")
    multiple("disk", "path=<image>,readonly=on|off,direct=on|off,num_queues=<n>,queue_size=<n>,...")
    single("event-monitor", "Report events as JSON: path=<path> or fd=<fd>")
    single("firmware", "Firmware to load in an architecture specific way")
    multiple("fs", "virtio-fs: tag=<tag>,socket=<path>,num_queues=<n>,queue_size=<n>,id=...")
    multiple("generic-vhost-user", "device_type=<type>,socket=<path>,queue_sizes=[<n>,...],id=...")
    single("initramfs", "Initramfs image", type=_readable_file)
    single(
        "kernel",
        "Kernel (or PVH-capable firmware) to load, e.g. vmlinux or bzImage",
        type=_readable_file,
    )
    flag("landlock", "Enable Landlock")
    multiple("landlock-rules", "path=<path>,access=[rw]")
    single("log-file", "Log file (standard error if not given)")
    single("log-format", "Log line format")
    single(
        "memory",
        "size=<size>,mergeable=on|off,shared=on|off,hugepages=on|off,hugepage_size=<size>,"
        "hotplug_method=acpi|virtio-mem,hotplug_size=<size>,hotplugged_size=<size>,"
        "prefault=on|off,reserve=on|off,thp=on|off",
    )
    multiple("memory-zone", "id=<id>,size=<size>,file=<path>,shared=on|off,hotplug_size=<size>,...")
    multiple("net", "tap=<if>,ip=<ip>,mask=<mask>,mac=<mac>,fd=[<fd>,...],num_queues=<n>,...")
    flag("no-shutdown", "Do not exit the VMM when the guest shuts down")
    multiple("numa", "guest_numa_id=<id>,cpus=[...],distances=[<node>@<distance>,...],...")
    multiple(
        "pci-segment", "pci_segment=<id>,mmio32_aperture_weight=<w>,mmio64_aperture_weight=<w>"
    )
    single("platform", "num_pci_segments=<n>,iommu_segments=[...],system_uuid=<uuid>,...")
    multiple("pmem", "file=<path>,size=<size>,discard_writes=on|off,id=...")
    flag("pvpanic", "Enable the pvpanic device")
    multiple("rate-limit-group", "bw_size=<bytes>,bw_refill_time=<ms>,ops_size=<n>,...,id=<id>")
    single("restore", "source_url=<url>,prefault=on|off,...")
    # --rng and --rtc may be given bare: defaults.
    single(
        "rng",
        "src=<entropy source>,iommu=on|off,...",
        nargs="?",
        const="",
    )
    single("rtc", "iommu=on|off,id=<id>,...", nargs="?", const="")
    single(
        "seccomp",
        "Seccomp filter on vCPU threads: true (a forbidden system call stops the VM), false, "
        f"or log (allowed, logged by the kernel's audit) (default {seccomp.DEFAULT_MODE})",
        choices=("true", "false", "log"),
    )
    single("serial", "off|null|pty|tty|file=<path>|socket=<path> (default null)")
    single("tpm", "socket=<swtpm socket>")
    multiple("user-device", "socket=<path>,id=<id>,pci_segment=<n>,pci_device_id=<n>")
    parser.add_argument(
        "-v", action="count", default=None, help="More logging (repeat for more)"
    )
    multiple("vdpa", "path=<device>,num_queues=<n>,iommu=on|off,id=...")
    parser.add_argument(
        "-V",
        "--version",
        action="store_true",
        default=None,
        help="Print version",
    )
    single("vsock", "cid=<cid>,socket=<path>,iommu=on|off,id=...")
    flag("watchdog", "Enable the virtio watchdog")
    return parser


def _given_options(args: argparse.Namespace) -> list[str]:
    """The reference names of the options present on the command line."""
    return [dest.replace("_", "-") for dest, value in vars(args).items() if value is not None]


def _reject_unsupported(args: argparse.Namespace) -> None:
    for name in _given_options(args):
        if name not in SUPPORTED_OPTIONS:
            spelling = "-v" if name == "v" else f"--{name}"
            raise CliError(f"{spelling} is not supported yet")


def config_from_args(args: argparse.Namespace) -> VmConfig | None:
    """The VM configuration of a parsed command line, validated.

    Returns None when no payload (``--kernel``/``--firmware``) is given: the
    VMM then waits for ``vm.create``.  Raises :class:`CliError` for options
    pych does not support yet or VM options without a payload, and
    :class:`~pych.config.ConfigError` for invalid configuration.
    """
    _reject_unsupported(args)
    given = _given_options(args)
    if not any(name in given for name in _PAYLOAD_OPTIONS):
        for name in _VM_OPTIONS:
            if name in given:
                raise CliError(f"--{name} needs a payload: give --kernel or --firmware")
        return None
    return _vm_config(args)


def _vm_config(args: argparse.Namespace) -> VmConfig:
    """The VM options of a command line with a payload, read with their models (imported
    here: only a VM configured on the command line needs them)."""
    import pych.config
    from pych.config import (
        BalloonConfig,
        ConsoleConfig,
        CpusConfig,
        DebugConsoleConfig,
        DeviceConfig,
        DiskConfig,
        FsConfig,
        GenericVhostUserConfig,
        LandlockConfig,
        MemoryConfig,
        NetConfig,
        NumaConfig,
        PayloadConfig,
        PciSegmentConfig,
        PlatformConfig,
        PmemConfig,
        RateLimitGroupConfig,
        RngConfig,
        RtcConfig,
        SerialConfig,
        TpmConfig,
        UserDeviceConfig,
        VdpaConfig,
        VmConfig,
        VsockConfig,
        support,
    )

    def each(parse: Callable[[str], Any], values: Sequence[str] | None) -> list[Any] | None:
        return None if values is None else [parse(value) for value in values]

    def one(parse: Callable[[str], Any], value: str | None) -> Any:
        return None if value is None else parse(value)

    for dest, model in _OPTION_MODELS.items():
        value = getattr(args, dest)
        for text in value if isinstance(value, list) else () if value is None else (value,):
            support.check_cli_keys(getattr(pych.config, model), text)
    console = ConsoleConfig.parse(_or(args.console, _default_console(ConsoleConfig)))
    if console.mode not in SUPPORTED_CONSOLE_MODES:
        raise CliError(
            f"--console {console.mode.lower()} is not supported yet (supported: "
            f"{', '.join(sorted(mode.lower() for mode in SUPPORTED_CONSOLE_MODES))})"
        )
    config = VmConfig(
        cpus=CpusConfig.parse(_or(args.cpus, CpusConfig.CLI_DEFAULT)),
        memory=MemoryConfig.parse(
            _or(args.memory, MemoryConfig.CLI_DEFAULT), args.memory_zone or ()
        ),
        payload=PayloadConfig(
            firmware=args.firmware,
            kernel=args.kernel,
            cmdline=args.cmdline,
            initramfs=args.initramfs,
        ),
        rate_limit_groups=each(RateLimitGroupConfig.parse, args.rate_limit_group),
        disks=each(DiskConfig.parse, args.disk),
        net=each(NetConfig.parse, args.net),
        rng=RngConfig.parse(_or(args.rng, RngConfig.CLI_DEFAULT)),
        balloon=one(BalloonConfig.parse, args.balloon),
        generic_vhost_user=each(GenericVhostUserConfig.parse, args.generic_vhost_user),
        fs=each(FsConfig.parse, args.fs),
        pmem=each(PmemConfig.parse, args.pmem),
        serial=SerialConfig.parse(_or(args.serial, SerialConfig.CLI_DEFAULT)),
        console=console,
        debug_console=DebugConsoleConfig.parse(
            _or(args.debug_console, DebugConsoleConfig.CLI_DEFAULT)
        ),
        devices=each(DeviceConfig.parse, args.device),
        user_devices=each(UserDeviceConfig.parse, args.user_device),
        vdpa=each(VdpaConfig.parse, args.vdpa),
        vsock=one(VsockConfig.parse, args.vsock),
        pvpanic=bool(args.pvpanic),
        numa=each(NumaConfig.parse, args.numa),
        watchdog=bool(args.watchdog),
        rtc=one(RtcConfig.parse, args.rtc),
        pci_segments=each(PciSegmentConfig.parse, args.pci_segment),
        platform=one(PlatformConfig.parse, args.platform),
        tpm=one(TpmConfig.parse, args.tpm),
        landlock_enable=bool(args.landlock),
        landlock_rules=each(LandlockConfig.parse, args.landlock_rules),
    )
    try:
        config.validate()
    except support.UnsupportedField as err:
        raise CliError(err.cli_message()) from None
    return config


def _restore_from_args(args: argparse.Namespace,
                       config: VmConfig | None) -> RestoreConfig | None:
    """``--restore source_url=...``: the ``RestoreConfig``; it restores a whole VM, so it
    takes no payload or other VM option (the snapshot has the configuration)."""
    if args.restore is None:
        return None
    if config is not None:
        raise CliError("--restore cannot be combined with --kernel or --firmware: the "
                       "snapshot holds the VM's configuration")
    from pych.config import RestoreConfig, support
    support.check_cli_keys(RestoreConfig, args.restore)
    return RestoreConfig.parse(args.restore)


def _or(value: str | None, default: str) -> str:
    return default if value is None else value


def _default_console(console: type[ConsoleConfig]) -> str:
    """The reference's default (tty) once pych has it, else off."""
    return console.CLI_DEFAULT if "Tty" in SUPPORTED_CONSOLE_MODES else "off"


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pych``; returns the process exit status.

    A bad command line or configuration prints ``pych: error: <message>`` on
    one line and returns 2.
    """
    without_pydantic_plugins()
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit:  # --help printed the help (errors raise CliError)
            return 0
        if args.version:
            print(f"pych v{_version()}")
            return 0
        config = config_from_args(args)
        restore = _restore_from_args(args, config)
    except (CliError, ConfigError, OptionParserError) as err:
        print(f"pych: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130

    from pych.cli import process  # the VMM and KVM, not needed for --help

    try:
        return process.run(config, args, restore)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
