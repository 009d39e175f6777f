"""Memory hot plug: pych vs QEMU (q35) on the same guest, same kernel, initramfs and cmdline.

For each VMM and method the test guest boots with 256 MiB (hot plugged memory onlined by
``memhp_default_state=online``) and gets SIZE (default 1 GiB) more:

* pych, ACPI DIMM: ``PUT vm.resize`` (``--memory size=256M,hotplug_size=2G``);
* pych, virtio-mem: ``PUT vm.resize`` (``hotplug_method=virtio-mem,hotplug_size=SIZE``);
* QEMU, pc-dimm: QMP ``object-add memory-backend-ram`` + ``device_add pc-dimm``;
* QEMU, virtio-mem-pci: QMP ``qom-set requested-size`` (device created at start with 0);
  each in a boot of its own.

Measured: the VMM-side time (the control request's round trip on a connection already open
and served once: API socket or QMP session) and the
guest-visible time (from sending the request until MemTotal has grown by SIZE, seen by a
shell loop of builtins already spinning in the guest). Also, without a guest, pych's memory
manager alone on a real KVM VM: the ACPI add's VMM-side cost without HTTP (goal < 5 ms).
Prints a table and saves a plot to docs/bench-hotplug.png.

``--kind disk``: PCI hot plug of a 4 MiB raw virtio-blk disk into the same guest (256 MiB,
no disk at boot), then its removal, per run under pych (``PUT vm.add-disk`` /
``vm.remove-device``), QEMU q35 (QMP ``blockdev-add`` + ``device_add virtio-blk-pci`` into a
``pcie-root-port`` / ``device_del``) and QEMU pc (the same on bus 0). VMM-side time as above;
guest-visible: until /sys/block/vda appears (or is gone), seen by a spinning shell loop;
the removal is requested once the guest has finished the add.

``--kind cpu``: a vCPU hot plug into the same guest booted with 1 of 2 vCPUs, per run under
pych (``PUT vm.resize {"desired_vcpus": 2}``) and QEMU q35 ``-smp 1,maxcpus=2`` (QMP
``device_add`` with the ids from ``query-hotpluggable-cpus``). VMM-side time as above;
guest-visible: until /sys/devices/system/cpu/cpu1 appears, then how long the user's
``echo 1 > .../cpu1/online`` takes. Also pych's ``vm_resize`` alone on a real KVM VM (paused
guest, no HTTP): request to GED interrupt (goal < 5 ms).

Each kind writes its own table to docs/benchmarks.md (``<!-- bench:hotplug-memory -->``,
``hotplug-disk``, ``hotplug-cpu``); every run boots each VMM afresh, who goes first rotating.

    .venv/bin/python bench/hotplug.py [--size 1G] [--runs 3]
    .venv/bin/python bench/hotplug.py --kind disk [--runs 3]
    .venv/bin/python bench/hotplug.py --kind cpu [--runs 3]
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from pych.api.client import ApiClient
from pych.config import VmConfig
from pych.devices.bus import Bus
from pych.hypervisor.kvm import Kvm
from pych.memory.manager import MemoryManager
from pych.memory.resize import resize_ram

# Run as `python bench/<name>.py`: the repository root goes on sys.path for the test
# harness (tests.support), which is not part of the installed pych package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.qmp import Qmp  # noqa: E402
from bench.report import Run, add_runs_argument, markdown_table, ratio, rotated, stat  # noqa: E402
from tests.support.guest import (  # noqa: E402
    READY, REPO, Console, PychGuest, Shell, guest_artifacts, guest_cmdline, qemu_command)

MiB = 1 << 20
BOOT = 256 * MiB
ONLINE = "memhp_default_state=online"
TIMEOUT = 900


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text}")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]


# --- the guest side -------------------------------------------------------------------------
def mem_total_kib(shell: Shell) -> int:
    rc, out = shell.run("grep MemTotal /proc/meminfo")
    if rc:
        raise RuntimeError(f"guest: {out}")
    return int(re.search(r"MemTotal:\s+(\d+) kB", out).group(1))


def timed_plug(shell: Shell, size: int, request) -> tuple[float, float]:
    """Start a guest loop waiting for MemTotal to grow by ``size``, then time ``request()``
    (the VMM-side time) and the wait for the loop's end (the guest-visible time)."""
    target = mem_total_kib(shell) + size // 1024
    return timed_guest_loop(
        shell, f"while read -r k v u < /proc/meminfo; [ $v -lt {target} ]; do :; done", request)


# --- pych -----------------------------------------------------------------------------------
def open_client(g: PychGuest) -> ApiClient:
    """A client whose connection is open and has been served once (``vmm.ping``), as the
    peer's QMP session is before its timed command: the timed round trip is the request's
    alone, not the connection's set-up (the server accepting it and handing it a thread)."""
    client = ApiClient(g.api_path)
    status, body = client.get("vmm.ping")
    if status != 200:
        raise RuntimeError(f"vmm.ping: {status} {body!r}")
    return client


def bench_pych(memory: str, size: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as d:
        g = PychGuest(Path(d), memory=memory, cmdline_extra=ONLINE)
        try:
            g.start()
            g.wait_ready(TIMEOUT)
            client = open_client(g)

            def resize():
                status, body = client.put("vm.resize", {"desired_ram": BOOT + size})
                if status != 204:
                    raise RuntimeError(f"vm.resize: {status} {body!r}")

            return timed_plug(g.shell, size, resize)
        finally:
            g.stop()


def pych_manager_resize(size: int, method: str, runs: int) -> list[float]:
    """The memory manager's resize alone, on a real KVM VM without a guest (seconds)."""
    kvm = Kvm()
    times = []
    try:
        for _ in range(runs):
            memory = {"size": BOOT, "hotplug_size": size if method == "VirtioMem" else 2 * size,
                      "hotplug_method": method}
            config = VmConfig.model_validate({"payload": {"kernel": "/k"}, "memory": memory})
            vm = kvm.create_vm()
            manager = MemoryManager(config.memory, vm, Bus("mmio"), notify=lambda event: None)
            try:
                manager.create_boot_memory()        # with virtio-mem, its device too
                t0 = time.perf_counter()
                resize_ram(config.memory, BOOT + size, manager)
                times.append(time.perf_counter() - t0)
            finally:
                vm.close()
                manager.close()
    finally:
        kvm.close()
    return times


# --- QEMU -----------------------------------------------------------------------------------
def bench_qemu(size: int, method: str) -> tuple[float, float]:
    """One q35 boot per method: a pc-dimm add, or a virtio-mem-pci grow, of ``size``."""
    with tempfile.TemporaryDirectory() as d:
        qmp_path = str(Path(d) / "qmp.sock")
        maxmem = (BOOT + 2 * size) // MiB + 1024        # the pc-dimm and virtio-mem's region
        cmd = qemu_command(guest_artifacts(), machine="q35",
                           memory=f"{BOOT // MiB}M,slots=4,maxmem={maxmem}M",
                           cmdline=guest_cmdline(ONLINE))
        cmd += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
        if method == "virtio-mem-pci":
            cmd += ["-object", f"memory-backend-ram,id=vmem0,size={size}",
                    "-device", "virtio-mem-pci,id=vm0,memdev=vmem0,requested-size=0"]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
        try:
            console = Console(p.stdout.fileno(), p.stdin.fileno())
            console.expect(READY, TIMEOUT)
            shell = Shell(console)
            shell.prepare()
            qmp = Qmp(qmp_path)
            try:
                def pc_dimm():
                    qmp.execute("object-add", **{"qom-type": "memory-backend-ram",
                                                 "id": "mem1", "size": size})
                    qmp.execute("device_add", driver="pc-dimm", id="dimm1", memdev="mem1")

                def virtio_mem():
                    qmp.execute("qom-set", path="/machine/peripheral/vm0",
                                property="requested-size", value=size)

                return timed_plug(shell, size, pc_dimm if method == "pc-dimm" else virtio_mem)
            finally:
                qmp.close()
        finally:
            p.kill()
            p.wait()


def guest_table(results: dict[tuple[str, str], list[tuple[float, float]]],
                peers: dict[str, str]) -> str:
    """Rows of (VMM, operation): VMM-side ms and guest-visible s, median (min–max), and
    pych's guest-visible time over its peer's (``peers``: pych's name -> the peer's)."""
    rows = []
    for (name, op), times in results.items():
        guest = [t[1] for t in times]
        peer = results.get((peers.get(name, ""), op))
        vmm_side = [t[0] * 1000 for t in times]
        rows.append([name, op, stat(vmm_side, ".2f") if any(vmm_side) else "—", stat(guest),
                     ratio(guest, [t[1] for t in peer]) if peer else "—"])
    return markdown_table(["VMM", "operation", "VMM-side (ms)", "guest-visible (s)",
                           "guest-visible / peer"], rows)


# --- PCI disk hot plug (--kind disk) ----------------------------------------------------------
DISK_SIZE = 4 * MiB
GUEST_DISK = "/sys/block/vda"           # the guests boot without a disk: the added one is vda
# The guest's hot plug work goes on after /sys/block/vda appears: acpiphp then checks every
# slot of the bridge (pych, bus 0: the 29 empty slots, ~150 ms here, traced at each config
# access) and a removal requested meanwhile waits behind it. The removal is timed on a guest
# that has finished the add, the same wait for every VMM.
ADD_SETTLE_S = 3.0


def timed_until(shell: Shell, condition: str, request) -> tuple[float, float]:
    """Start a guest loop of builtins spinning until the shell test ``condition`` holds, then
    time ``request()`` (the VMM-side time) and the wait for the loop's end (guest-visible)."""
    return timed_guest_loop(shell, f"until {condition}; do :; done", request)


def timed_guest_loop(shell: Shell, loop: str, request) -> tuple[float, float]:
    """Have the guest's shell run ``loop`` (a loop of builtins that ends once the request
    has had its effect) and wait until it says it has started, so that the loop is running
    and the console quiet; then time ``request()`` (the VMM-side time) and the wait for the
    loop's end (the guest-visible time). Without the wait, the request met the guest
    reading the line from its UART (an exit per character and register, which a VMM
    handles meanwhile: in pych, Python taking the GIL from the thread serving the
    request)."""
    tag = uuid.uuid4().hex[:12]
    console = shell.console
    start = len(console.buf)
    console.send(f"printf '%s-%s\\n' {tag} start; {loop}; printf '%s-%s\\n' {tag} done\n")
    started = console.expect(f"{tag}-start".encode(), TIMEOUT, start)
    t0 = time.perf_counter()
    request()
    vmm_side = time.perf_counter() - t0
    console.expect(f"{tag}-done".encode(), TIMEOUT, started.end())
    return vmm_side, time.perf_counter() - t0


def add_and_remove_disk(shell: Shell, add, remove) -> dict[str, tuple[float, float]]:
    """Time ``add()`` until the guest has /sys/block/vda, then, once the guest has finished
    the add (:data:`ADD_SETTLE_S`), ``remove()`` until it is gone."""
    added = timed_until(shell, f"[ -e {GUEST_DISK} ]", add)
    time.sleep(ADD_SETTLE_S)
    return {"add": added, "remove": timed_until(shell, f"[ ! -e {GUEST_DISK} ]", remove)}


def bench_pych_disk(image: Path) -> dict[str, tuple[float, float]]:
    """pych: ``PUT vm.add-disk`` (the guest's acpiphp finds it in slot 2 of bus 0), then
    ``PUT vm.remove-device``."""
    with tempfile.TemporaryDirectory() as d:
        g = PychGuest(Path(d), memory=f"size={BOOT // MiB}M")
        try:
            g.start()
            g.wait_ready(TIMEOUT)
            client = open_client(g)

            def put(endpoint, body, expected):
                status, reply = client.put(endpoint, body)
                if status != expected:
                    raise RuntimeError(f"{endpoint}: {status} {reply!r}")

            return add_and_remove_disk(
                g.shell, lambda: put("vm.add-disk", {"path": str(image), "id": "bench"}, 200),
                lambda: put("vm.remove-device", {"id": "bench"}, 204))
        finally:
            g.stop()


def bench_qemu_disk(image: Path, machine: str) -> dict[str, tuple[float, float]]:
    """QEMU: QMP ``blockdev-add`` + ``device_add virtio-blk-pci``, then ``device_del``.

    ``q35``: the disk goes into an empty ``pcie-root-port`` (q35's root bus takes no hot
    plug); QEMU 7.2 drives hot plug on root ports with ACPI by default, so the guest's
    acpiphp handles it as it does pych's, one bridge further down. ``pc``: ACPI hot plug
    on bus 0, pych's own layout."""
    with tempfile.TemporaryDirectory() as d:
        qmp_path = str(Path(d) / "qmp.sock")
        cmd = qemu_command(guest_artifacts(), machine=machine, memory=f"{BOOT // MiB}M")
        cmd += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
        device = {"driver": "virtio-blk-pci", "id": "vd1", "drive": "disk1"}
        if machine == "q35":
            cmd += ["-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1"]
            device["bus"] = "rp1"
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
        try:
            console = Console(p.stdout.fileno(), p.stdin.fileno())
            console.expect(READY, TIMEOUT)
            shell = Shell(console)
            shell.prepare()
            qmp = Qmp(qmp_path)
            try:
                def add():
                    qmp.execute("blockdev-add", **{"driver": "raw", "node-name": "disk1",
                                                   "file": {"driver": "file",
                                                            "filename": str(image)}})
                    qmp.execute("device_add", **device)

                return add_and_remove_disk(shell, add, lambda: qmp.execute("device_del", id="vd1"))
            finally:
                qmp.close()
        finally:
            p.kill()
            p.wait()


def main_disk(runs: int, no_write: bool) -> int:
    """Each run boots the guest under pych, QEMU q35 and QEMU pc, who goes first rotating."""
    run = Run("hotplug-disk", f"bench/hotplug.py --kind disk --runs {runs}", runs)
    vmms = {"pych (bus 0)": bench_pych_disk,
            "QEMU q35 (pcie-root-port)": lambda image: bench_qemu_disk(image, "q35"),
            "QEMU pc (bus 0)": lambda image: bench_qemu_disk(image, "pc")}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {
        (name, op): [] for name in vmms for op in ("add", "remove")}
    with tempfile.TemporaryDirectory() as d:
        image = Path(d) / "disk.raw"
        image.write_bytes(bytes(DISK_SIZE))
        for i in run.runs_range():
            for name in rotated(list(vmms), i):
                for op, times in vmms[name](image).items():
                    results[(name, op)].append(times)
                    print(f"run {i + 1}: {name} {op}: VMM-side {times[0] * 1000:.2f} ms, "
                          f"guest-visible {times[1]:.1f} s", flush=True)
    run.write(guest_table(results, {"pych (bus 0)": "QEMU q35 (pcie-root-port)"}),
              no_write=no_write)
    return 0


# --- CPU hot plug (--kind cpu) -----------------------------------------------------------------
NEW_CPU = "/sys/devices/system/cpu/cpu1"    # the guests boot with 1 of 2 vCPUs: the added one


def add_and_online_cpu(shell: Shell, add) -> dict[str, tuple[float, float]]:
    """Time ``add()`` until the guest has cpu1 in sysfs, then the user's ``echo 1 > online``
    (no VMM part: its VMM-side time is 0)."""
    times = {"add": timed_until(shell, f"[ -e {NEW_CPU} ]", add)}
    t0 = time.perf_counter()
    rc, out = shell.run(f"echo 1 > {NEW_CPU}/online", timeout=TIMEOUT)
    if rc:
        raise RuntimeError(f"guest: onlining cpu1 failed: {out}")
    times["online"] = (0.0, time.perf_counter() - t0)
    return times


def bench_pych_cpu() -> dict[str, tuple[float, float]]:
    """pych: ``PUT vm.resize {"desired_vcpus": 2}`` (boot=1,max=2); VMM-side: its round trip."""
    with tempfile.TemporaryDirectory() as d:
        g = PychGuest(Path(d), cpus="boot=1,max=2", memory=f"size={BOOT // MiB}M")
        try:
            g.start()
            g.wait_ready(TIMEOUT)
            client = open_client(g)

            def resize():
                status, body = client.put("vm.resize", {"desired_vcpus": 2})
                if status != 204:
                    raise RuntimeError(f"vm.resize: {status} {body!r}")

            return add_and_online_cpu(g.shell, resize)
        finally:
            g.stop()


def bench_qemu_cpu() -> dict[str, tuple[float, float]]:
    """QEMU q35 ``-smp 1,maxcpus=2``: QMP ``device_add`` of the CPU that
    ``query-hotpluggable-cpus`` lists as free, with its socket/core/thread ids."""
    with tempfile.TemporaryDirectory() as d:
        qmp_path = str(Path(d) / "qmp.sock")
        cmd = qemu_command(guest_artifacts(), machine="q35", memory=f"{BOOT // MiB}M",
                           smp="1,maxcpus=2")
        cmd += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
        try:
            console = Console(p.stdout.fileno(), p.stdin.fileno())
            console.expect(READY, TIMEOUT)
            shell = Shell(console)
            shell.prepare()
            qmp = Qmp(qmp_path)
            try:
                free = [c for c in qmp.execute("query-hotpluggable-cpus") if "qom-path" not in c]
                return add_and_online_cpu(shell, lambda: qmp.execute(
                    "device_add", driver=free[0]["type"], id="cpu1", **free[0]["props"]))
            finally:
                qmp.close()
        finally:
            p.kill()
            p.wait()


def pych_vm_cpu_resize(runs: int) -> list[tuple[float, float]]:
    """pych's resize path alone, in process, on a real KVM VM without HTTP: the test guest's
    VM (boot=1,max=2) is booted and paused at once (the guest does not run), then
    ``Vmm.vm_resize(desired_vcpus=2)``: creating and configuring vCPU 1, starting its thread,
    the GED interrupt, the configuration update. Before it, the VMM's idle work, which a
    running pych's control loop does once quiet after the boot (preparing the runtime
    requests' models). Returns (until the GED interrupt was raised,
    until vm_resize returned) per run, in seconds."""
    from pych.cli.main import build_parser, config_from_args
    from pych.config import VmResize
    from pych.cpu.vcpu import install_kick_handler
    from pych.vmm import Vmm

    install_kick_handler()
    art = guest_artifacts()
    args = build_parser().parse_args([
        "--kernel", str(art["vmlinux"]), "--initramfs", str(art["initramfs.cpio"]),
        "--cmdline", guest_cmdline(), "--cpus", "boot=1,max=2",
        "--memory", f"size={BOOT // MiB}M", "--serial", "off", "--console", "off"])
    times = []
    for _ in range(runs):
        vmm = Vmm()
        try:
            vmm.vm_create(config_from_args(args))
            vmm.vm_boot()
            vmm.vm_pause()
            vmm.run_idle_work()     # what pych's control loop does once quiet after a boot
            cpus = vmm.vm.cpus
            raised: list[float] = []
            notify = cpus.notify
            cpus.notify = lambda event: (notify(event), raised.append(time.perf_counter()))
            t0 = time.perf_counter()
            vmm.vm_resize(VmResize(desired_vcpus=2))
            done = time.perf_counter()
            times.append((raised[0] - t0, done - t0))
        finally:
            vmm.close()
    return times


def main_cpu(runs: int, no_write: bool) -> int:
    """The guest-less measurement ``runs`` times, then each run boots the guest under pych
    and QEMU q35, who goes first rotating."""
    run = Run("hotplug-cpu", f"bench/hotplug.py --kind cpu --runs {runs}", runs)
    alone = pych_vm_cpu_resize(runs)
    vmms = {"pych": bench_pych_cpu, "QEMU q35": bench_qemu_cpu}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {
        (name, op): [] for name in vmms for op in ("add", "online")}
    for i in run.runs_range():
        for name in rotated(list(vmms), i):
            for op, times in vmms[name]().items():
                results[(name, op)].append(times)
                print(f"run {i + 1}: {name} {op}: VMM-side {times[0] * 1000:.2f} ms, "
                      f"guest-visible {times[1]:.1f} s", flush=True)
    body = guest_table(results, {"pych": "QEMU q35"})
    pych_add = [t[0] for t in results[("pych", "add")]]
    qemu_add = [t[0] for t in results[("QEMU q35", "add")]]
    ged = [t[0] * 1000 for t in alone]
    whole = [t[1] * 1000 for t in alone]
    body += (f"\n\nVMM-side add, pych / QEMU: {ratio(pych_add, qemu_add)}. pych's "
             f"`Vmm.vm_resize` alone, real KVM VM, paused guest ({runs} runs): request → GED "
             f"interrupt {stat(ged, '.2f')} ms (goal < 5 ms); whole call {stat(whole, '.2f')} ms.")
    run.write(body, no_write=no_write)
    return 0


# --- report ---------------------------------------------------------------------------------
def plot(rows: list[tuple[str, float, float]], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [r[0] for r in rows]
    fig, (vmm_ax, guest_ax) = plt.subplots(1, 2, figsize=(10, 4))
    vmm_ax.barh(names, [r[1] * 1000 for r in rows])
    vmm_ax.set_xlabel("VMM-side time (ms)")
    guest_ax.barh(names, [r[2] for r in rows])
    guest_ax.set_xlabel("until the guest's MemTotal shows it (s)")
    guest_ax.set_yticks([])
    fig.suptitle("Memory hot plug, same guest (this host's nested KVM)")
    fig.tight_layout()
    fig.savefig(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_runs_argument(ap)
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="memory to add (K/M/G)")
    ap.add_argument("--kind", choices=("memory", "disk", "cpu"), default="memory",
                    help="what to hot plug: memory (default), a PCI disk (virtio-blk) or a vCPU")
    args = ap.parse_args()
    if args.kind == "disk":
        return main_disk(args.runs, args.no_write)
    if args.kind == "cpu":
        return main_cpu(args.runs, args.no_write)
    size = args.size
    if size % (128 * MiB):
        ap.error("--size must be a multiple of 128M")
    run = Run("hotplug-memory", f"bench/hotplug.py --kind memory --runs {args.runs}", args.runs)
    manager = {method: pych_manager_resize(size, method, args.runs)
               for method in ("Acpi", "VirtioMem")}
    vmms = {
        "pych ACPI DIMM": lambda: bench_pych(f"size={BOOT // MiB}M,hotplug_size={2 * size}", size),
        "pych virtio-mem": lambda: bench_pych(f"size={BOOT // MiB}M,hotplug_method=virtio-mem,"
                                              f"hotplug_size={size}", size),
        "QEMU q35 pc-dimm": lambda: bench_qemu(size, "pc-dimm"),
        "QEMU q35 virtio-mem-pci": lambda: bench_qemu(size, "virtio-mem-pci"),
    }
    results: dict[tuple[str, str], list[tuple[float, float]]] = {
        (name, "add"): [] for name in vmms}
    for i in run.runs_range():
        for name in rotated(list(vmms), i):         # each its own boot
            times = vmms[name]()
            results[(name, "add")].append(times)
            print(f"run {i + 1}: {name}: VMM-side {times[0] * 1000:.2f} ms, guest-visible "
                  f"{times[1]:.1f} s", flush=True)
    body = guest_table(results, {"pych ACPI DIMM": "QEMU q35 pc-dimm",
                                 "pych virtio-mem": "QEMU q35 virtio-mem-pci"})
    body += (f"\n\n{size // MiB} MiB added to a {BOOT // MiB} MiB guest, each VMM and method "
             "in its own boot. pych's memory manager alone, real KVM VM, no guest "
             f"({args.runs} runs): ACPI {stat([t * 1000 for t in manager['Acpi']], '.3f')} ms "
             f"(goal < 5 ms), virtio-mem {stat([t * 1000 for t in manager['VirtioMem']], '.3f')} "
             "ms.")
    run.write(body, no_write=args.no_write)
    rows = [(name, statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts))
            for (name, _), ts in results.items()]
    out = REPO / "docs" / "bench-hotplug.png"
    if args.no_write:                    # --no-write leaves docs/ alone, plots too
        return 0
    try:
        plot(rows, out)
        print(f"plot: {out}")
    except ImportError:
        print("matplotlib missing: no plot (make bench installs it)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
