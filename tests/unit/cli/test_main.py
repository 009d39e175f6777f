"""The ``pych`` command line: pych.cli.main."""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from pych.cli import main as cli
from pych.cli.main import (
    SUPPORTED_OPTIONS,
    CliError,
    build_parser,
    config_from_args,
    main,
)
from pych.config import ConfigError, DiskConfig, NetConfig, VmConfig, support

ALL_OPTIONS = frozenset(
    action.option_strings[-1].lstrip("-")
    for action in build_parser()._actions
    if action.option_strings and action.dest != "help"
)


@pytest.fixture
def kernel(tmp_path: Path) -> str:
    path = tmp_path / "vmlinux"
    path.write_bytes(b"\x7fELF")
    return str(path)


INITIAL_OPTIONS = frozenset(
    {
        "kernel",
        "initramfs",
        "cmdline",
        "cpus",
        "memory",
        "serial",
        "console",
        "api-socket",
        "event-monitor",
        "log-file",
        "v",
        "version",
    }
)


@pytest.fixture
def initial_support(monkeypatch: pytest.MonkeyPatch) -> None:
    """What pych supported first, so these tests survive SUPPORTED_OPTIONS growing."""
    monkeypatch.setattr(cli, "SUPPORTED_OPTIONS", INITIAL_OPTIONS)
    monkeypatch.setattr(cli, "SUPPORTED_CONSOLE_MODES", frozenset({"Off"}))


@pytest.fixture
def everything_supported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend pych implements every option and field, to test how they parse."""
    monkeypatch.setattr(cli, "SUPPORTED_OPTIONS", ALL_OPTIONS)
    monkeypatch.setattr(cli, "SUPPORTED_CONSOLE_MODES", frozenset({"Off", "Tty", "Pty"}))
    monkeypatch.setattr(support, "check", lambda config: None)


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def config(*argv: str) -> VmConfig | None:
    return config_from_args(parse(*argv))


# --------------------------------------------------------------------------
# The parser


def test_multi_instance_options_take_several_values_and_repeat() -> None:
    args = parse("--disk", "path=a", "path=b", "--net", "tap=", "--disk", "path=c")
    assert args.disk == ["path=a", "path=b", "path=c"]
    assert args.net == ["tap="]


@pytest.mark.parametrize(
    "option",
    [
        "disk",
        "net",
        "fs",
        "pmem",
        "device",
        "memory-zone",
        "numa",
        "user-device",
        "vdpa",
        "generic-vhost-user",
        "rate-limit-group",
        "pci-segment",
        "landlock-rules",
    ],
)
def test_every_multi_instance_option(option: str) -> None:
    args = parse(f"--{option}", "a=1", "b=2", f"--{option}", "c=3")
    assert getattr(args, option.replace("-", "_")) == ["a=1", "b=2", "c=3"]


def test_single_options_cannot_repeat() -> None:
    with pytest.raises(CliError, match="argument --cpus: cannot be used multiple times"):
        parse("--cpus", "boot=1", "--cpus", "boot=2")


def test_rng_value_is_optional() -> None:
    assert parse("--rng").rng == ""
    assert parse("--rng", "src=/dev/random").rng == "src=/dev/random"
    assert parse().rng is None


def test_flags_and_counts() -> None:
    args = parse("-vvv", "--log-file", "/tmp/log", "--seccomp", "log", "--no-shutdown")
    assert args.v == 3
    assert args.log_file == "/tmp/log"
    assert args.seccomp == "log"
    assert args.no_shutdown is True
    assert parse("-V").version is True
    assert parse("--version").version is True
    assert parse().v is None


def test_option_equals_syntax() -> None:
    assert parse("--api-socket=/tmp/api.sock").api_socket == "/tmp/api.sock"


def test_no_abbreviations() -> None:
    with pytest.raises(CliError, match="unrecognized arguments: --mem"):
        parse("--mem", "size=1G")


def test_seccomp_values() -> None:
    with pytest.raises(CliError, match="invalid choice"):
        parse("--seccomp", "maybe")


def test_unknown_option() -> None:
    with pytest.raises(CliError, match="unrecognized arguments: --frobnicate"):
        parse("--frobnicate")


def test_kernel_and_initramfs_must_be_readable(kernel: str, tmp_path: Path) -> None:
    assert parse("--kernel", kernel).kernel == kernel
    with pytest.raises(CliError, match=r"argument --kernel: cannot read '/nonexistent/vmlinux'"):
        parse("--kernel", "/nonexistent/vmlinux")
    with pytest.raises(CliError, match=r"argument --initramfs: cannot read .*: Is a directory"):
        parse("--kernel", kernel, "--initramfs", str(tmp_path))


# --------------------------------------------------------------------------
# Supported options


def test_supported_options_are_real_options() -> None:
    assert isinstance(SUPPORTED_OPTIONS, frozenset)
    assert INITIAL_OPTIONS <= SUPPORTED_OPTIONS <= ALL_OPTIONS


def _unsupported_argv() -> list[list[str]]:
    """One command line per option pych does not implement, as the real parser takes it."""
    parser = cli.build_parser()
    argvs = []
    for name in sorted(ALL_OPTIONS - SUPPORTED_OPTIONS):
        action = next(a for a in parser._actions if f"--{name}" in a.option_strings
                      or (name == "v" and "-v" in a.option_strings))
        spelling = "-v" if name == "v" else f"--{name}"
        argvs.append([spelling] if action.nargs == 0 else [spelling, "x=1"])
    return argvs


@pytest.mark.parametrize("argv", _unsupported_argv(), ids=lambda argv: argv[0])
def test_every_option_pych_does_not_implement_is_refused_by_name(argv: list[str],
                                                                 kernel: str) -> None:
    """The real option set: each unimplemented option is one line naming it."""
    with pytest.raises(CliError, match=f"^{argv[0]} is not supported yet$"):
        config("--kernel", kernel, *argv)


@pytest.mark.usefixtures("initial_support")
def test_console_modes_other_than_off_are_rejected(kernel: str) -> None:
    with pytest.raises(CliError, match=r"^--console tty is not supported yet \(supported: off\)$"):
        config("--kernel", kernel, "--console", "tty")
    assert config("--kernel", kernel, "--console", "off").console.mode == "Off"


@pytest.mark.usefixtures("initial_support")
def test_omitted_console_follows_what_is_supported(
    kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert config("--kernel", kernel).console.mode == "Off"
    monkeypatch.setattr(cli, "SUPPORTED_CONSOLE_MODES", frozenset({"Off", "Tty"}))
    assert config("--kernel", kernel).console.mode == "Tty"  # the reference's default


# --------------------------------------------------------------------------
# Building the VM config


def test_no_payload_means_no_config() -> None:
    assert config() is None
    assert config("--api-socket", "/tmp/api.sock", "-v") is None


def test_vm_options_need_a_payload() -> None:
    with pytest.raises(CliError, match=r"^--cpus needs a payload: give --kernel or --firmware$"):
        config("--cpus", "boot=2")


def test_defaults(kernel: str) -> None:
    vm = config("--kernel", kernel)
    assert vm is not None
    assert vm.cpus.boot_vcpus == vm.cpus.max_vcpus == 1
    assert vm.cpus.max_phys_bits == 46
    assert vm.memory.size == 512 << 20
    assert vm.serial.mode == "Null"
    assert vm.rng.src == "/dev/urandom"
    assert vm.debug_console.iobase == 0xE9
    assert vm.payload is not None
    assert (vm.payload.kernel, vm.payload.cmdline, vm.payload.initramfs) == (kernel, None, None)


def test_supported_options(kernel: str) -> None:
    vm = config(
        "--kernel", kernel, "--initramfs", kernel, "--cmdline", "console=ttyS0 root=/dev/vda1 rw",
        "--cpus", "boot=2,max=4", "--memory", "size=1G,hotplug_size=2G",
        "--serial", "tty", "--console", "off",
    )  # fmt: skip
    assert vm is not None
    assert (vm.cpus.boot_vcpus, vm.cpus.max_vcpus) == (2, 4)
    assert vm.memory.size == 1073741824
    assert vm.memory.hotplug_size == 2 << 30
    assert vm.payload is not None
    assert vm.payload.cmdline == "console=ttyS0 root=/dev/vda1 rw"
    assert vm.payload.initramfs == kernel
    assert vm.serial.mode == "Tty"


def test_config_errors_surface(kernel: str) -> None:
    with pytest.raises(ConfigError, match=r"Max CPUs \(2\) lower than boot CPUs \(4\)"):
        config("--kernel", kernel, "--cpus", "boot=4,max=2")
    with pytest.raises(ConfigError, match=r"^--memory: invalid value '1x' for 'size'"):
        config("--kernel", kernel, "--memory", "size=1x")
    with pytest.raises(ConfigError, match=r"^--cpus: unknown key 'bot'"):
        config("--kernel", kernel, "--cpus", "bot=4")


@pytest.mark.usefixtures("everything_supported")
def test_every_vm_option(kernel: str, tmp_path: Path) -> None:
    vm = config(
        "--kernel", kernel,
        "--cpus", "boot=2",
        "--memory", "size=0,shared=on,hotplug_method=virtio-mem",
        "--memory-zone", "id=mem0,size=1G", "id=mem1,size=1G,hotplug_size=1G",
        "--disk", "path=/a", "path=/b,id=data",
        "--net", "tap=,mac=12:34:56:78:9a:bc", "--net", "tap=tap1",
        "--rng", "src=/dev/random",
        "--fs", "tag=myfs,socket=/tmp/fs.sock",
        "--pmem", "file=/tmp/pmem,size=2M",
        "--vsock", "cid=3,socket=/tmp/vsock",
        "--device", "path=/sys/bus/pci/devices/0000:01:00.0",
        "--user-device", "socket=/tmp/vfio-user",
        "--vdpa", "path=/dev/vhost-vdpa-0",
        "--generic-vhost-user", "socket=/tmp/gvu,queue_sizes=[256],device_type=fs",
        "--balloon", "size=128M",
        "--numa", "guest_numa_id=0,cpus=[0-1],memory_zones=[mem0,mem1]",
        "--platform", "num_pci_segments=2",
        "--pci-segment", "pci_segment=1",
        "--rate-limit-group", "id=g0,bw_size=1000,bw_refill_time=10",
        "--serial", "pty",
        "--console", "tty",
        "--debug-console", "off",
        "--rtc",
        "--tpm", "socket=/tmp/swtpm",
        "--landlock-rules", f"path={tmp_path},access=rw",
        "--landlock", "--pvpanic", "--watchdog",
    )  # fmt: skip
    assert vm is not None
    assert vm.disks == [DiskConfig(path="/a"), DiskConfig(path="/b", id="data")]
    assert vm.net == [NetConfig(tap=None, mac="12:34:56:78:9a:bc"), NetConfig(tap="tap1")]
    assert [zone.id for zone in vm.memory.zones or ()] == ["mem0", "mem1"]
    assert vm.rng.src == "/dev/random"
    assert vm.vsock is not None and vm.vsock.cid == 3
    assert vm.balloon is not None and vm.balloon.size == 128 << 20
    assert vm.rtc is not None
    assert vm.platform is not None and vm.platform.num_pci_segments == 2
    assert (vm.pvpanic, vm.watchdog, vm.landlock_enable) == (True, True, True)
    assert (vm.serial.mode, vm.console.mode) == ("Pty", "Tty")


@pytest.mark.usefixtures("everything_supported")
def test_net_defaults_from_the_cli(kernel: str) -> None:
    vm = config("--kernel", kernel, "--cpus", "boot=1", "--net", "tap=")
    assert vm is not None and vm.net is not None
    assert (vm.net[0].num_queues, vm.net[0].queue_size) == (2, 256)


@pytest.mark.usefixtures("everything_supported")
def test_duplicate_ids_from_the_cli(kernel: str) -> None:
    with pytest.raises(ConfigError, match="Identifier d is not unique"):
        config("--kernel", kernel, "--disk", "path=/a,id=d", "path=/b,id=d")


# --------------------------------------------------------------------------
# main()


@pytest.fixture
def vmm(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, argparse.Namespace]]:
    """A stand-in pych.cli.process whose run() records its arguments."""
    calls: list[tuple[Any, argparse.Namespace]] = []
    module = types.ModuleType("pych.cli.process")

    def run(config: VmConfig | None, args: argparse.Namespace, restore: Any = None) -> int:
        calls.append((config, args))
        return 7

    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pych.cli.process", module)
    import pych.cli

    monkeypatch.setattr(pych.cli, "process", module, raising=False)
    return calls


def test_main_runs_the_vmm(kernel: str, vmm: list[Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--kernel", kernel, "--api-socket", "/tmp/api.sock"]) == 7
    ((config, args),) = vmm
    assert isinstance(config, VmConfig)
    assert args.api_socket == "/tmp/api.sock"
    assert capsys.readouterr().err == ""


def test_main_without_payload_runs_the_vmm_without_config(vmm: list[Any]) -> None:
    assert main(["--api-socket", "/tmp/api.sock"]) == 7
    assert vmm[0][0] is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fs", "tag=a,socket=b"], "pych: error: --fs is not supported yet"),
        (["--kernel", "/nonexistent"], "pych: error: argument --kernel: cannot read"),
        (["--kernel", "KERNEL", "--cpus", "boot=3,max=2"], "pych: error: Max CPUs (2) lower"),
        (["--kernel", "KERNEL", "--memory", "size=1x"], "pych: error: --memory: invalid value"),
        (["--kernel", "KERNEL", "--cpus", "foo=1"], "pych: error: --cpus: unknown key 'foo'"),
        (["--bogus"], "pych: error: unrecognized arguments: --bogus"),
    ],
)
@pytest.mark.usefixtures("initial_support")
def test_main_reports_errors_on_one_line(
    argv: list[str], message: str, kernel: str, vmm: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [kernel if arg == "KERNEL" else arg for arg in argv]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(message)
    assert captured.err.count("\n") == 1
    assert not vmm


def test_main_version(capsys: pytest.CaptureFixture[str], vmm: list[Any]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("pych v")
    assert not vmm


def test_main_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    assert "--api-socket" in capsys.readouterr().out
    assert main([]) == 2  # like the reference: help on stderr
    assert "--kernel" in capsys.readouterr().err


def test_the_help_says_what_pych_does_with_each_option(capsys: pytest.CaptureFixture[str]) -> None:
    """Added when the help is shown (it needs the models; parsing does not)."""
    from pych.config import CpusConfig

    help_text = " ".join(build_parser().format_help().split())
    assert f"(default {CpusConfig.CLI_DEFAULT})" in help_text
    assert "--tpm TPM socket=<swtpm socket> [not supported by pych]" in help_text
    assert "Do not exit the VMM when the guest shuts down [not supported yet]" in help_text
    assert "HTTP API socket (UNIX domain socket): path=<path> or fd=<fd> " in help_text
    assert "fd=<fd> [not" not in help_text


def test_main_handles_keyboard_interrupt(monkeypatch: pytest.MonkeyPatch, vmm: list[Any]) -> None:
    def interrupted(config: Any, args: Any, restore: Any = None) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(sys.modules["pych.cli.process"], "run", interrupted)
    assert main(["--api-socket", "/tmp/api.sock"]) == 130
