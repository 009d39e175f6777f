"""The soak: a real guest under pych through many hot plug cycles, watching pych for leaks.

Used by ``scripts/soak.py`` (``make soak``, ``make soak-long``) and, in a short variant, by
``tests/guest/test_soak.py``. One pych process boots the test guest (``--cpus boot=1,max=2``,
which keeps each cycle short where guest kernel code is emulated on few host cores) inside a
network namespace the soak creates and deletes, so the taps pych creates stay there. Each
cycle does one operation, in turn:

* ``disk``: ``vm.add-disk`` (always id ``soakdisk``), the guest sees ``/dev/vda`` and reads
  its first sector back, ``vm.remove-device``, the guest lets go and ejects it;
* ``net``: ``vm.add-net`` with a tap pych creates, the guest sees ``eth0``, removal, and the
  tap is gone from the namespace;
* ``cpu``: ``desired_vcpus`` 2, the guest onlines cpu1, then 1, the guest ejects it;
* ``memory``: 128 MiB more and back, with virtio-mem (grow, shrink) or ACPI (one DIMM
  plugged, then ejected live: hot plugged memory is onlined movable);

and every ``reboot_every`` cycles the VM reboots, in turn: ``reboot -f`` in the guest,
``vm.reboot``, and a re-creation through the API (``vm.shutdown``, ``vm.delete``,
``vm.create``, ``vm.boot``) that switches the memory hot plug method between virtio-mem and
ACPI. An ACPI boot has 32 DIMM slots (the memory manager's ``HOTPLUG_SLOTS``), none reused
within the boot, and a cycle plugs at most one DIMM: with a reboot at least every 32 cycles
no boot runs out of them, whatever the operations.

After every cycle the VM is back in its base shape (one vCPU, no hot plugged device, boot
RAM), which makes it a quiescent checkpoint: the soak samples pych's open fds
(``/proc/PID/fd``), threads (``/proc/PID/task``), RSS (``/proc/PID/status``: ``VmRSS``, and
its parts ``RssAnon``, pych's own heap, and ``RssShmem``, guest RAM) and KVM memory slots
(``vm.info``'s ``memslots``), and checks the guest's view against ``vm.info``: online and
present CPUs against ``cpus``, the PCI functions ``lspci`` lists against ``device_tree``'s
BDFs, and ``MemTotal`` against ``memory_actual_size`` (their difference, the kernel's own
reservation, must stay the same within a boot).

Pass criterion. After a warm-up of ``warmup`` cycles, at every checkpoint the fds, threads
and memslots equal exactly the first post-warm-up sample taken in the same *shape*, and
``RssAnon`` has grown by less than ``rss_bound_mib`` over that first sample. The shape is
the memory method plus the vCPU states of ``vm.info``: an ejected vCPU keeps its KVM fd for
reuse (as the reference does), so the first CPU cycle of a boot adds one fd for good, and
a virtio-mem VM has one more device (a worker thread, eventfds) than an ACPI one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pych.api.client import ApiClient
from tests.support.guest import PychGuest, mem_total_kib

MiB = 1 << 20
BOOT_RAM = 256 * MiB
STEP = 128 * MiB
VIRTIO_MEM = f"size={BOOT_RAM // MiB}M,hotplug_method=virtio-mem,hotplug_size=512M"
ACPI_HOTPLUG_SIZE = 1 << 30
OPERATIONS = ("cpu", "memory", "disk", "net")
REBOOTS = ("guest", "api", "recreate")
GUEST_WAIT = 300          # seconds the guest may take to act on one hot plug (a loaded host)
DISK_ID, NET_ID = "soakdisk", "soaknet"


class SoakError(Exception):
    """An operation failed or the guest and vm.info disagree."""


@dataclass
class Sample:
    cycle: int
    operation: str
    seconds: float
    rss_kib: int
    anon_kib: int
    shmem_kib: int
    fds: int
    threads: int
    memslots: int
    shape: str
    verdict: str = ""                 # "", "ok" or what grew, after the warm-up


@dataclass
class SoakResult:
    samples: list[Sample] = field(default_factory=list)
    baselines: dict[str, Sample] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    rss_bound_mib: float = 0
    warmup: int = 0
    boot_seconds: float = 0

    @property
    def passed(self) -> bool:
        return not self.failures and any(s.verdict == "ok" for s in self.samples)

    def add(self, s: Sample) -> None:
        """Record a checkpoint; after the warm-up, judge it against the first sample of its
        shape (fds, threads, memslots: equal) and the first after the warm-up (RssAnon:
        less than the bound above it)."""
        if s.cycle > self.warmup:
            base = self.baselines.setdefault(s.shape, s)
            first = next((x for x in self.samples if x.cycle > self.warmup), s)
            grew = [f"{what} {getattr(base, what)}->{getattr(s, what)}"
                    for what in ("fds", "threads", "memslots")
                    if getattr(s, what) != getattr(base, what)]
            if s.anon_kib - first.anon_kib > self.rss_bound_mib * 1024:
                grew.append(f"RssAnon +{(s.anon_kib - first.anon_kib) / 1024:.1f} MiB")
            if grew:
                self.failures.append(f"cycle {s.cycle} ({s.operation}, {s.shape}): "
                                     + ", ".join(grew))
                s.verdict = "GREW: " + ", ".join(grew)
            else:
                s.verdict = "ok (baseline)" if base is s else "ok"
        self.samples.append(s)

    def anon_growth_kib(self) -> int:
        after = [s for s in self.samples if s.cycle > self.warmup]
        if not after:
            return 0
        return max(s.anon_kib for s in after) - after[0].anon_kib

    def table(self) -> str:
        head = (f"{'cycle':>5} {'operation':<16} {'s':>5} {'VmRSS':>7} {'RssAnon':>7} "
                f"{'RssShm':>7} {'fds':>4} {'thr':>4} {'slots':>5}  shape / verdict")
        lines = [head, "-" * len(head)]
        for s in self.samples:
            lines.append(f"{s.cycle:>5} {s.operation:<16} {s.seconds:>5.0f} "
                         f"{s.rss_kib / 1024:>7.1f} {s.anon_kib / 1024:>7.1f} "
                         f"{s.shmem_kib / 1024:>7.1f} {s.fds:>4} {s.threads:>4} "
                         f"{s.memslots:>5}  {s.shape} {s.verdict}")
        lines.append("(RSS columns in MiB; RssAnon is pych's heap, RssShm guest RAM)")
        return "\n".join(lines)

    def summary(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        checked = sum(1 for s in self.samples if s.verdict)
        text = (f"soak {verdict}: {len(self.samples)} cycles, warm-up {self.warmup}, "
                f"{checked} checkpoints compared with their shape's baseline; RssAnon growth "
                f"after warm-up {self.anon_growth_kib() / 1024:.1f} MiB "
                f"(bound {self.rss_bound_mib:g} MiB)")
        return "\n".join([text, *(f"  - {f}" for f in self.failures)])


def proc_metrics(pid: int) -> dict[str, int]:
    """pych's host-side footprint: open fds, threads, and RSS and its parts in KiB."""
    with open(f"/proc/{pid}/status") as f:
        status = f.read()

    def kib(key: str) -> int:
        m = re.search(rf"^{key}:\s+(\d+) kB", status, re.M)
        return int(m.group(1)) if m else 0

    return {"fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": len(os.listdir(f"/proc/{pid}/task")),
            "rss_kib": kib("VmRSS"), "anon_kib": kib("RssAnon"), "shmem_kib": kib("RssShmem")}


def wait_until(probe: Callable[[], object], done: Callable[[object], bool], timeout: float,
               what: str, interval: float = 1.0):
    """Poll ``probe()`` until ``done(value)``; returns the value, raises SoakError on
    timeout (never fails on speed alone within ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise SoakError(f"timed out after {timeout:.0f} s waiting for {what}: last {value!r}")
        time.sleep(interval)


class Soak:
    """Boot the guest, run ``cycles`` cycles, sample and check after each (see the module)."""

    def __init__(self, workdir: Path, *, cycles: int, warmup: int = 8, reboot_every: int = 8,
                 rss_bound_mib: float = 16, seccomp: str | None = None,
                 operations: tuple[str, ...] = OPERATIONS, reboots: tuple[str, ...] = REBOOTS,
                 progress: Callable[[str], None] = print):
        if not 1 <= reboot_every <= 32:
            raise ValueError("reboot_every must be 1..32 (an ACPI boot has 32 DIMM slots)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cycles = cycles
        self.warmup = warmup
        self.reboot_every = reboot_every
        self.operations = operations
        self.reboots = reboots
        self.seccomp = seccomp
        self.progress = progress
        self.result = SoakResult(rss_bound_mib=rss_bound_mib, warmup=warmup)
        self.netns = f"pych-soak-{os.getpid()}"
        self.disk = self.workdir / "disk.raw"
        self.guest: PychGuest | None = None
        self.api: ApiClient | None = None
        self.method = "VirtioMem"
        self.mem_offset_kib: int | None = None     # memory_actual_size - MemTotal, this boot
        self._reboots_done = 0

    # --- set-up and teardown ------------------------------------------------------------------
    def __enter__(self) -> "Soak":
        self.disk.write_bytes(b"".join(hashlib.sha256(i.to_bytes(4, "little")).digest()
                                       for i in range(MiB // 32)))
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        extra = ["--seccomp", self.seccomp] if self.seccomp else []
        g = PychGuest(self.workdir / "vm", cpus="boot=1,max=2", memory=VIRTIO_MEM,
                      cmdline_extra="memhp_default_state=online_movable", extra_args=extra)
        g.args = ["ip", "netns", "exec", self.netns, *g.args]
        self.guest = g
        g.start()
        self.result.boot_seconds = g.wait_ready()
        self.api = ApiClient(g.api_path, timeout=120)
        self._after_boot()
        return self

    def __exit__(self, *exc) -> None:
        if self.api is not None:
            self.api.close()
        if self.guest is not None:
            self.guest.stop()
        subprocess.run(["ip", "netns", "del", self.netns], check=False)

    # --- the run ------------------------------------------------------------------------------
    def run(self) -> SoakResult:
        for cycle in range(1, self.cycles + 1):
            operation = self.operations[(cycle - 1) % len(self.operations)]
            started = time.monotonic()
            label = operation
            try:
                getattr(self, f"_{operation}")()
                if cycle % self.reboot_every == 0:
                    kind = self.reboots[self._reboots_done % len(self.reboots)]
                    self._reboot(kind)
                    label += f"+{kind}"
                self._check_guest_view()
            except SoakError as e:
                self.result.failures.append(f"cycle {cycle} ({label}): {e}")
                self.progress(f"cycle {cycle} ({label}) FAILED: {e}")
                break
            self._sample(cycle, label, time.monotonic() - started)
        return self.result

    def _sample(self, cycle: int, label: str, seconds: float) -> None:
        self._alive()
        info = self.vm_info()
        m = proc_metrics(self.guest.proc.pid)
        shape = f"{self.method}:{'/'.join(c['state'][0] for c in info['cpus'])}"
        self.result.add(Sample(cycle, label, seconds, m["rss_kib"], m["anon_kib"], m["shmem_kib"],
                               m["fds"], m["threads"], info["memslots"], shape))
        self.progress(self.result.table().splitlines()[-2])

    # --- plumbing -----------------------------------------------------------------------------
    def _alive(self) -> None:
        if self.guest.proc.poll() is not None:
            raise SoakError(f"pych exited ({self.guest.proc.returncode}): {self.guest.pych_log()}")

    def vm_info(self) -> dict:
        status, body = self.api.get("vm.info")
        if status != 200:
            raise SoakError(f"vm.info answered {status}: {body!r}")
        return json.loads(body)

    def put(self, endpoint: str, body=None, expect: tuple[int, ...] = (200, 204)) -> bytes:
        self._alive()
        status, answer = self.api.put(endpoint, body)
        if status not in expect:
            raise SoakError(f"{endpoint} {json.dumps(body)} answered {status}: {answer!r}")
        return answer

    def guest_wait(self, condition: str, what: str) -> None:
        """Poll a shell condition in the guest once a second, in one guest command."""
        rc, out = self.guest.run(
            f"i=0; until {condition}; do [ $i -ge {GUEST_WAIT} ] && break; sleep 1; "
            f"i=$((i+1)); done; {condition}", timeout=GUEST_WAIT + 120)
        if rc != 0:
            raise SoakError(f"the guest never saw {what} ({condition}): {out}")

    def _wait_removed(self, dev_id: str) -> None:
        wait_until(self.vm_info, lambda i: dev_id not in i["device_tree"]
                   and not i["devices_pending_removal"], GUEST_WAIT, f"{dev_id} to be ejected")

    def _after_boot(self) -> None:
        """A new boot: record the guest's base MemTotal and the kernel's reservation."""
        info = self.vm_info()
        self.mem_offset_kib = info["memory_actual_size"] // 1024 - mem_total_kib(self.guest)

    # --- operations ---------------------------------------------------------------------------
    def _disk(self) -> None:
        answer = json.loads(self.put("vm.add-disk", {"path": str(self.disk), "id": DISK_ID}))
        if answer.get("id") != DISK_ID:
            raise SoakError(f"vm.add-disk answered {answer}")
        self.guest_wait("[ -e /sys/block/vda ]", "the hot-added disk")
        rc, out = self.guest.run("dd if=/dev/vda bs=512 count=1 2>/dev/null | md5sum")
        expected = hashlib.md5(self.disk.read_bytes()[:512]).hexdigest()
        if rc != 0 or out.split()[:1] != [expected]:
            raise SoakError(f"the guest read {out!r} from the disk, expected {expected}")
        self.put("vm.remove-device", {"id": DISK_ID})
        self.guest_wait("[ ! -e /sys/block/vda ]", "the disk go")
        self._wait_removed(DISK_ID)

    def _net(self) -> None:
        self.put("vm.add-net", {"id": NET_ID})
        self.guest_wait("[ -e /sys/class/net/eth0 ]", "the hot-added NIC")
        self.put("vm.remove-device", {"id": NET_ID})
        self.guest_wait("[ ! -e /sys/class/net/eth0 ]", "the NIC go")
        self._wait_removed(NET_ID)
        wait_until(self._taps, lambda taps: not taps, 30, "pych's tap to disappear")

    def _taps(self) -> list[str]:
        out = subprocess.run(["ip", "-n", self.netns, "-o", "link", "show"], capture_output=True,
                             text=True, check=True).stdout
        return re.findall(r"^\d+: (vmtap\d+)", out, re.M)

    def _cpu(self) -> None:
        self.put("vm.resize", {"desired_vcpus": 2})
        self._wait_vcpus(["present", "present"])
        # vm.info says "present" once the guest evaluated _STA; sysfs follows a moment later
        self.guest_wait("[ -e /sys/devices/system/cpu/cpu1/online ]", "cpu1")
        rc, out = self.guest.run(
            "echo 1 > /sys/devices/system/cpu/cpu1/online; cat /sys/devices/system/cpu/online",
            timeout=GUEST_WAIT + 120)
        if (rc, out) != (0, "0-1"):
            raise SoakError(f"the guest did not online cpu1: {out!r}")
        self.put("vm.resize", {"desired_vcpus": 1})
        self._wait_vcpus(["present", "ejected"])

    def _wait_vcpus(self, states: list[str]) -> None:
        wait_until(lambda: [c["state"] for c in self.vm_info()["cpus"]],
                   lambda s: s == states, GUEST_WAIT, f"vCPU states {states}")

    def _memory(self) -> None:
        base = self.vm_info()["memory_actual_size"]
        for desired in (base + STEP, base):
            self.put("vm.resize", {"desired_ram": desired})
            expected = desired // 1024 - self.mem_offset_kib
            wait_until(lambda: mem_total_kib(self.guest), lambda kib: kib == expected,
                       GUEST_WAIT, f"MemTotal {expected} kB", interval=2)
            wait_until(self.vm_info, lambda i: i["memory_actual_size"] == desired
                       and self._memory_settled(i), GUEST_WAIT, f"{desired} bytes plugged")

    @staticmethod
    def _memory_settled(info: dict) -> bool:
        hp = info.get("memory_hotplug", {})
        if hp.get("method") == "VirtioMem":
            return all(d["plugged_size"] == d["requested_size"] for d in hp["virtio_mem"])
        return all(d["state"] == "acknowledged" for d in hp.get("dimms", []))

    # --- reboots ------------------------------------------------------------------------------
    def _reboot(self, kind: str) -> None:
        start = len(self.guest.console.buf)
        if kind == "guest":
            self.guest.console.send("reboot -f\n")
        elif kind == "api":
            self.put("vm.reboot")
        else:
            self._recreate()
        self._reboots_done += 1
        self.guest.wait_ready(start=start)
        self._after_boot()

    def _recreate(self) -> None:
        """Tear the VM down and create it again through the API with the other memory hot
        plug method (the serial socket, and so the console, stays)."""
        config = self.vm_info()["config"]
        memory = config["memory"]
        memory.pop("hotplugged_size", None)
        if self.method == "VirtioMem":
            memory.update(hotplug_method="Acpi", hotplug_size=ACPI_HOTPLUG_SIZE)
            self.method = "Acpi"
        else:
            memory.update(hotplug_method="VirtioMem", hotplug_size=512 * MiB)
            self.method = "VirtioMem"
        self.put("vm.shutdown")
        self.put("vm.delete")
        self.put("vm.create", config)
        self.put("vm.boot")

    # --- the guest's view against vm.info -----------------------------------------------------
    def _check_guest_view(self) -> None:
        rc, out = self.guest.run("cat /sys/devices/system/cpu/online "
                                 "/sys/devices/system/cpu/present; lspci -n; "
                                 "grep MemTotal /proc/meminfo")
        info = self.vm_info()
        if rc != 0:
            raise SoakError(f"guest view: {out}")
        lines = out.splitlines()
        present = [c["id"] for c in info["cpus"] if c["state"] == "present"]
        expected_cpus = "0" if present == [0] else f"0-{present[-1]}"
        if lines[:2] != [expected_cpus, expected_cpus]:
            raise SoakError(f"guest CPUs online/present {lines[:2]}, vm.info {info['cpus']}")
        guest_bdfs = {f"0000:{bdf}"
                      for bdf in re.findall(r"^([0-9a-f]{2}:[0-9a-f]{2}\.\d) ", out, re.M)}
        guest_bdfs.discard("0000:00:00.0")                           # the host bridge
        tree_bdfs = {n["pci_bdf"] for n in info["device_tree"].values() if n.get("pci_bdf")}
        if guest_bdfs != tree_bdfs:
            raise SoakError(f"guest PCI functions {sorted(guest_bdfs)}, device_tree "
                            f"{sorted(tree_bdfs)}")
        total = int(re.search(r"MemTotal:\s+(\d+) kB", out).group(1))
        if info["memory_actual_size"] // 1024 - total != self.mem_offset_kib:
            raise SoakError(f"guest MemTotal {total} kB, vm.info memory_actual_size "
                            f"{info['memory_actual_size']}: the difference moved from "
                            f"{self.mem_offset_kib} kB")


def save_plot(result: SoakResult, path: Path) -> bool:
    """RSS (and its heap part), fds and threads per cycle to ``path``; False without
    matplotlib (the table is the result; the plot is a picture of it)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cycles = [s.cycle for s in result.samples]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(cycles, [s.rss_kib / 1024 for s in result.samples], label="VmRSS")
    axes[0].plot(cycles, [s.anon_kib / 1024 for s in result.samples], label="RssAnon (pych heap)")
    axes[0].plot(cycles, [s.shmem_kib / 1024 for s in result.samples], label="RssShmem (guest RAM)")
    axes[0].set_ylabel("MiB")
    axes[0].legend(loc="upper left", fontsize="small")
    axes[1].step(cycles, [s.fds for s in result.samples], where="mid")
    axes[1].set_ylabel("open fds")
    axes[2].step(cycles, [s.threads for s in result.samples], where="mid", label="threads")
    axes[2].step(cycles, [s.memslots for s in result.samples], where="mid", label="KVM memslots")
    axes[2].set_ylabel("count")
    axes[2].legend(loc="upper left", fontsize="small")
    axes[2].set_xlabel("cycle")
    reboots = [s.cycle for s in result.samples if "+" in s.operation]
    for ax in axes:
        ax.axvline(result.warmup + 0.5, color="grey", linestyle=":", linewidth=1)
        for cycle in reboots:
            ax.axvline(cycle, color="tab:red", alpha=0.25, linewidth=3)
        ax.grid(alpha=0.3)
    fig.suptitle(f"pych soak: {len(result.samples)} cycles, "
                 f"{'PASS' if result.passed else 'FAIL'}\n(dotted: end of warm-up; red: reboots, "
                 f"every third re-creating the VM with the other memory hot plug method)",
                 fontsize="medium")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
