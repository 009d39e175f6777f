"""Every field and CLI key the support table says works has a probe of its effect
(tests/unit/config/effects.py), and each probe passes: a value pych silently ignored would
fail its probe."""

from __future__ import annotations

import pytest

from pych.config import support
from pych.config.support import SUPPORT, Works

from tests.unit.config import effects
from tests.unit.config.effects import PROBES, ShownBy, _cli_cases
from tests.unit.config.test_support import CLI_CASES, _cli_keys, _option_model


def works_fields() -> list[str]:
    return sorted(f"{model.__name__}.{field}" for model, table in SUPPORT.items()
                  for field, rule in table.items() if isinstance(rule, Works))


FIELD_PROBES = sorted(key for key in PROBES if not key.startswith("--"))
CLI_PROBES = sorted(key for key in PROBES if key.startswith("--"))
VALUE_OPTIONS = {option for option in support.CLI_OPTIONS if _option_model(option) is None
                 and support.option_refusal(option) is None}


def test_every_field_that_works_has_a_probe():
    assert sorted(set(works_fields()) - set(FIELD_PROBES)) == []
    assert sorted(set(FIELD_PROBES) - set(works_fields())) == []


def test_every_cli_key_that_works_has_a_probe():
    """Each key whose case test_support accepts (option not refused, field Works) and each
    option that takes a value of its own (``--kernel``, ``--pvpanic``)."""
    accepted = {f"{option} {key}" for option, key in CLI_CASES
                if support.option_refusal(option) is None
                and (field := _cli_keys(_option_model(option))[key]) is not None
                and (_option_model(option), key) not in support.CLI_KEYS
                and isinstance(SUPPORT[_option_model(option)][field], Works)}
    assert accepted == {f"{option} {key}" for option, key in _cli_cases()}
    assert set(CLI_PROBES) == accepted | VALUE_OPTIONS


# Fields whose value is what pych does whatever it is given (the table's note says so): their
# probe shows pych's behaviour is the value's, and passes with the value dropped too.
ALWAYS_SO = {
    "MemoryConfig.shared",              # guest RAM is always a memfd mapped shared
    "PlatformConfig.vfio_p2p_dma",      # off: only guest RAM is mapped for DMA
    "DiskConfig.disable_io_uring",      # one I/O engine: preadv/pwritev
    "DiskConfig.disable_aio",
    "DiskConfig.lock_granularity",      # the whole image is always locked
    "DiskConfig.backing_files",         # qemu-storage-daemon always follows them
    # Determined by max_vcpus and the other parts (their product must be max_vcpus, or the
    # configuration is refused): the APIC ids of the second package's vCPUs show it.
    "CpuTopology.packages",
}


@pytest.mark.parametrize("key", [k for k in FIELD_PROBES if not isinstance(PROBES[k], ShownBy)])
def test_probe(key, tmp_path, monkeypatch):
    """The field's probe passes; and, run with the field set back to its default on the way
    to the VM (as a pych that ignored it would), it fails: the probe can tell."""
    (tmp_path / "given").mkdir()
    PROBES[key](tmp_path / "given", monkeypatch)
    if getattr(PROBES[key], "nothing_to_honour", False):
        return
    (tmp_path / "dropped").mkdir()
    monkeypatch.setattr(effects, "IGNORED", {key})
    if key in ALWAYS_SO:
        PROBES[key](tmp_path / "dropped", monkeypatch)
        return
    with pytest.raises((Exception, pytest.fail.Exception)):   # an assertion, or the build
        PROBES[key](tmp_path / "dropped", monkeypatch)


def _by_option() -> dict[str, list[str]]:
    options: dict[str, list[str]] = {}
    for key in CLI_PROBES:
        options.setdefault(key.split(" ")[0], []).append(key)
    return options


@pytest.mark.parametrize("option", sorted(_by_option()))
def test_cli_probes(option, tmp_path):
    """The probes of one option's keys (one test per option: they are quick)."""
    failed = []
    for key in _by_option()[option]:
        work = tmp_path / key.replace(" ", "_")
        work.mkdir()
        with pytest.MonkeyPatch.context() as monkeypatch:
            try:
                PROBES[key](work, monkeypatch)
            except Exception as e:          # noqa: BLE001 - reported below, key by key
                failed.append(f"{key}: {type(e).__name__}: {e}")
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("key", [k for k in FIELD_PROBES if isinstance(PROBES[k], ShownBy)])
def test_a_field_shown_in_a_guest_names_a_test_that_exists(key):
    assert PROBES[key].exists(), PROBES[key].test


def test_a_probe_fails_when_its_field_is_ignored(tmp_path, monkeypatch):
    """The probes can fail: with ``direct`` dropped on the way to the disk, its probe does."""
    from pych.device_manager import factories

    real = factories.VirtioBlock
    monkeypatch.setattr(factories, "VirtioBlock",
                        lambda *args, **kw: real(*args, **{**kw, "direct": False}))
    with pytest.raises(AssertionError):
        PROBES["DiskConfig.direct"](tmp_path, monkeypatch)


def test_a_cli_probe_fails_when_its_key_is_dropped(tmp_path, monkeypatch):
    """A key the command line dropped (the field left at its default) fails its probe."""
    from pych.cli import main

    real = main.config_from_args

    def dropping(args):
        config = real(args)
        config.disks[0].__dict__["direct"] = False
        return config

    monkeypatch.setattr(main, "config_from_args", dropping)
    with pytest.raises(AssertionError):
        PROBES["--disk direct"](tmp_path, monkeypatch)
