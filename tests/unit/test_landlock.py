"""pych.landlock: ``--landlock`` and ``--landlock-rules`` (rule parsing, the rules a
configuration gives, the kernel's sandbox in a child process, refusals by name)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pych import landlock
from pych.api.dispatch import Dispatcher
from pych.cli.main import build_parser, config_from_args
from pych.config import ConfigError, LandlockConfig, OptionError, VmConfig
from pych.landlock import READ, WRITE, Rule

REPO = Path(__file__).resolve().parents[2]


# --- rules: parsing ---------------------------------------------------------------------------
def test_access_is_r_w_or_both_as_the_reference():
    assert landlock.access_bits("r") == READ == 0b1101            # execute, read file, read dir
    assert landlock.access_bits("w") == WRITE
    assert landlock.access_bits("rw") == landlock.access_bits("wr") == READ | WRITE
    assert WRITE & landlock.TRUNCATE and WRITE & landlock.MAKE_SOCK and not WRITE & READ
    for bad, message in (("", "Access cannot be empty"), ("x", "Invalid access: x"),
                         ("rx", "Invalid access: x")):
        with pytest.raises(landlock.LandlockError, match=message):
            landlock.access_bits(bad)


def test_landlock_rules_parse_from_the_command_line(tmp_path):
    assert LandlockConfig.parse(f"path={tmp_path},access=rw").model_dump() == {
        "path": str(tmp_path), "access": "rw"}
    for text, message in (("path=/tmp", "path/access field missing"),
                          ("access=r", "path/access field missing"),
                          ("path=/tmp,access=rwx", "rwx")):
        with pytest.raises(OptionError, match=message):
            LandlockConfig.parse(text)
    args = build_parser().parse_args(["--kernel", __file__, "--landlock", "--landlock-rules",
                                      f"path={tmp_path},access=r", "path=/tmp,access=w"])
    config = config_from_args(args)
    assert config.landlock_enable and [(r.path, r.access) for r in config.landlock_rules] == [
        (str(tmp_path), "r"), ("/tmp", "w")]
    for rules, message in (([f"path={tmp_path / 'nope'},access=r"], "does not exist"),
                           ([f"path={tmp_path},access=x"], "Invalid access: x")):
        with pytest.raises((ConfigError, OptionError), match=message):
            config_from_args(build_parser().parse_args(
                ["--kernel", __file__, "--landlock", "--landlock-rules", *rules]))


# --- the rules of a configuration ---------------------------------------------------------------
def test_a_configuration_gives_its_paths_as_the_reference(tmp_path):
    for name in ("vmlinux", "initrd", "disk.img", "ro.img", "pmem", "zone"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "extra").mkdir()
    config = VmConfig.model_validate({
        "payload": {"kernel": str(tmp_path / "vmlinux"),
                    "initramfs": str(tmp_path / "initrd")},
        "memory": {"size": 0, "zones": [{"id": "z", "size": 1 << 20,
                                         "file": str(tmp_path / "zone"), "shared": True}]},
        "disks": [{"path": str(tmp_path / "disk.img")}],
        "pmem": [{"file": str(tmp_path / "pmem"), "discard_writes": True}],
        "serial": {"mode": "Socket", "socket": str(tmp_path / "s" / "serial.sock")},
        "console": {"mode": "Pty"},
        "vsock": {"cid": 3, "socket": str(tmp_path / "v" / "vsock.sock")},
        "landlock_enable": True,
        "landlock_rules": [{"path": str(tmp_path / "extra"), "access": "rw"}],
    })
    rules = {(r.path, r.access) for r in landlock.rules_for(config, str(tmp_path / "api.sock"))}
    assert {(str(tmp_path / "vmlinux"), "r"), (str(tmp_path / "initrd"), "r"),
            (str(tmp_path / "zone"), "rw"), (str(tmp_path / "disk.img"), "rw"),
            (str(tmp_path / "pmem"), "r"), ("/dev/urandom", "r"),
            (str(tmp_path / "s"), "rw"), (str(tmp_path / "v"), "rw"),
            ("/dev/pts", "rw"), ("/dev/ptmx", "rw"), (str(tmp_path), "w"),
            (str(tmp_path / "extra"), "rw"), ("/dev/kvm", "rw"), ("/proc/self", "rw"),
            } <= rules, rules
    # pych's own code is readable (modules are imported lazily), never writable
    code = str(Path(landlock.__file__).resolve().parents[1])
    assert (code, "r") in rules and not [r for r in rules if r[0] == code and "w" in r[1]]


def test_allowed_follows_paths_beneath_rules_and_symlinks(tmp_path):
    inside, outside = tmp_path / "in", tmp_path / "out"
    inside.mkdir()
    outside.mkdir()
    (inside / "f").write_bytes(b"x")
    (outside / "g").write_bytes(b"x")
    (inside / "link").symlink_to(outside / "g")
    rules = [Rule(str(inside), "rw"), Rule(str(outside / "g"), "r")]
    assert landlock.allowed(str(inside / "f"), "rw", rules)
    assert landlock.allowed(str(inside / "new.img"), "rw", rules)
    assert landlock.allowed(str(outside / "g"), "r", rules)
    assert not landlock.allowed(str(outside / "g"), "rw", rules)
    assert not landlock.allowed(str(inside / "link"), "rw", rules)     # the kernel sees g
    assert not landlock.allowed(str(tmp_path / "in2" / "f"), "r", rules)   # not a prefix


# --- the sandbox, for real, in a child process ---------------------------------------------------
CHILD = textwrap.dedent("""
    import json, os, sys, threading
    from pych import landlock
    allowed, outside, early = sys.argv[1:4]
    result = {"abi": landlock.abi_version()}
    if early == "thread":
        t = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)
        t.start()
    def attempt(path):
        try:
            with open(path) as f:
                return f.read()
        except OSError as e:
            return e.strerror
    try:
        landlock.restrict([landlock.Rule(allowed, "rw"), *landlock.own_rules()])
    except landlock.LandlockError as e:
        result["refused"] = str(e)
    else:
        result["inside"] = attempt(os.path.join(allowed, "f"))
        result["outside"] = attempt(os.path.join(outside, "g"))
        seen = {}
        t = threading.Thread(target=lambda: seen.update(outside=attempt(os.path.join(outside, "g"))))
        t.start(); t.join()
        result["thread"] = seen["outside"]
        with open(os.path.join(allowed, "new"), "w") as f:
            f.write("created")
        import pych.memory.hugepages       # imported lazily, after the sandbox
        result["import"] = "ok"
    print(json.dumps(result))
""")


def child(tmp_path: Path, early: str = "") -> dict:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir(exist_ok=True)
    outside.mkdir(exist_ok=True)
    (allowed / "f").write_text("inside")
    (outside / "g").write_text("outside")
    r = subprocess.run([sys.executable, "-c", CHILD, str(allowed), str(outside), early],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_the_kernel_sandboxes_the_process_and_its_later_threads(tmp_path):
    result = child(tmp_path)
    assert result["abi"] >= landlock.ABI, "this host's kernel offers no Landlock ABI 3"
    assert result == {"abi": result["abi"], "inside": "inside", "outside": "Permission denied",
                      "thread": "Permission denied", "import": "ok"}
    assert (tmp_path / "allowed" / "new").read_text() == "created"


def test_a_process_that_already_runs_threads_is_not_sandboxed(tmp_path):
    result = child(tmp_path, early="thread")
    assert result["refused"] == ("--landlock must be applied before pych starts any thread "
                                 "(2 threads run)")


# --- hot plug under the sandbox ---------------------------------------------------------------
def test_a_device_outside_the_sandbox_is_refused_by_name(tmp_path, monkeypatch):
    from tests.unit.vmm.fakes import fake_vmm

    (tmp_path / "in").mkdir()
    monkeypatch.setattr(landlock, "_domain", [Rule(str(tmp_path / "in"), "rw")])
    vmm = fake_vmm(monkeypatch)
    dispatcher = Dispatcher(lambda fn: fn(vmm))

    def put(endpoint, body):
        response = dispatcher.respond("PUT", f"/api/v1/{endpoint}", json.dumps(body).encode(),
                                      [])
        return response.status, json.loads(response.body) if response.body else None

    try:
        assert put("vm.create", {"payload": {"kernel": __file__},
                                 "landlock_enable": True})[0] == 204
        status, answer = put("vm.add-disk", {"path": str(tmp_path / "out.img")})
        assert status == 400 and answer[-1] == (
            f"vm.add-disk: disk {tmp_path / 'out.img'} is outside pych's Landlock sandbox "
            "(--landlock allows the VM configuration's paths and --landlock-rules; start "
            "pych with --landlock-rules path=<it or its directory>,access=rw to hot plug it)")
        assert vmm.config.disks is None
        status, answer = put("vm.add-pmem", {"file": str(tmp_path / "in" / "p")})
        assert status == 204, answer
    finally:
        vmm.close()
