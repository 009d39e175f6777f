#!/usr/bin/env python3
"""Boot build/guest under QEMU (the reference VMM on PVM hosts) and exercise it.

Stdlib only.  Examples (from the repo root):
    guest/smoke-qemu.py                         # microvm, 256M, 2 vCPUs
    guest/smoke-qemu.py --machine q35 --smp 2,maxcpus=4
    guest/smoke-qemu.py --boot-only --runs 3    # just time boot to GUEST-READY

Watches for QEMU's "KVM internal error" (an instruction the host could not
emulate) and maps the guest RIP to a kernel symbol with build/guest/System.map.
Exit status 0 when every check passed.
"""
import argparse
import bisect
import json
import os
import socket
import tempfile
import re
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "build", "guest")

DEFAULT_COMMANDS = [
    "nproc",
    "lscpu",
    "free -h",
    "lspci",
    "lspci -k",
    "cat /proc/cpuinfo | head",
    "uname -a",
    "ls /sys/devices/system/cpu/",
    "cat /sys/devices/system/cpu/possible /sys/devices/system/cpu/online",
    "grep -c . /proc/interrupts",
]


class Guest:
    def __init__(self, argv, log):
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, bufsize=0)
        self.buf = b""
        self.pos = 0  # consumed up to here
        self.lock = threading.Condition()
        self.log = log
        self.eof = False
        threading.Thread(target=self._reader, daemon=True).start()

    def _reader(self):
        while True:
            data = self.proc.stdout.read1(65536) if hasattr(self.proc.stdout, "read1") \
                else os.read(self.proc.stdout.fileno(), 65536)
            with self.lock:
                if not data:
                    self.eof = True
                    self.lock.notify_all()
                    return
                self.buf += data
                if self.log:
                    self.log.write(data)
                    self.log.flush()
                self.lock.notify_all()

    def elapsed(self):
        return time.monotonic() - self.t0

    def expect(self, patterns, timeout):
        """Wait until one of the regexes (bytes) matches after self.pos.
        Returns (index, match); consumes through the match.  Raises on timeout/EOF
        or on a KVM internal error."""
        deadline = time.monotonic() + timeout
        regs = [re.compile(p) for p in patterns]
        kvm_err = re.compile(rb"KVM internal error\. Suberror: \d+")
        with self.lock:
            while True:
                for i, r in enumerate(regs):
                    m = r.search(self.buf, self.pos)
                    if m:
                        self.pos = m.end()
                        return i, m
                if kvm_err.search(self.buf, self.pos):
                    # give QEMU a moment to print the register dump
                    self.lock.wait(1.0)
                    raise EmulationFailure(self.buf[self.pos:].decode(errors="replace"))
                if self.eof:
                    raise RuntimeError("QEMU exited; last output:\n"
                                       + self.buf[-3000:].decode(errors="replace"))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timeout waiting for %r; last output:\n%s" % (
                        patterns, self.buf[-3000:].decode(errors="replace")))
                self.lock.wait(min(left, 1.0))

    def send(self, text):
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def run(self, cmd, timeout=120):
        """Run one shell command line; returns (output, exit status, seconds)."""
        t = time.monotonic()
        # The markers are split by quotes in the typed line, so the shell's echo
        # of the input (which may also be wrapped) never matches them.
        # One line only: typed-ahead lines would be echoed by the tty in the
        # middle of the command's output.
        self.send('echo "@@BE""GIN@@"; ' + cmd + '; echo "@@EN""D $?@@"\n')
        _, b = self.expect([rb"@@BEGIN@@\r?\n"], timeout)
        _, m = self.expect([rb"@@END (\d+)@@"], timeout)
        out = m.string[b.end():m.start()]
        text = out.decode(errors="replace").replace("\r", "")
        self.expect([rb"# "], 30)
        return text, int(m.group(1)), time.monotonic() - t

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class EmulationFailure(Exception):
    pass


def symbolize(text):
    """Map RIP=... of a QEMU register dump to the nearest System.map symbol."""
    m = re.search(r"RIP=([0-9a-f]{16})", text)
    smap = os.path.join(GUEST, "System.map")
    if not m or not os.path.exists(smap):
        return ""
    rip = int(m.group(1), 16)
    syms = []
    with open(smap) as f:
        for line in f:
            a, _, name = line.split()[:3]
            syms.append((int(a, 16), name))
    syms.sort()
    i = bisect.bisect_right(syms, (rip, "\uffff")) - 1
    if i < 0:
        return "RIP %#x: no symbol" % rip
    return "RIP %#x = %s+%#x" % (rip, syms[i][1], rip - syms[i][0])


def qemu_argv(a):
    with open(a.cmdline) as f:
        cmdline = f.read().strip()
    if a.append:
        cmdline += " " + a.append
    machine = "microvm,acpi=on" if a.machine == "microvm" else a.machine
    qmp = ["-qmp", "unix:%s,server=on,wait=off" % a.qmp_path] if a.qmp_path else []
    return ["qemu-system-x86_64"] + qmp + [ "-M", machine, "-enable-kvm",
            "-cpu", "host,-arch-capabilities,-cx16", "-m", a.mem, "-smp", a.smp,
            "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-kernel", a.kernel, "-initrd", a.initrd, "-append", cmdline] + a.qemu_extra


def qmp_command(path, command):
    """Run one QMP command (e.g. system_powerdown = the ACPI power button)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(path)
        f = s.makefile("rw")
        f.readline()  # greeting
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}) + "\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    break
        return reply


def one_run(a, log):
    argv = qemu_argv(a)
    print("+ " + " ".join(repr(x) if " " in x else x for x in argv), flush=True)
    g = Guest(argv, log)
    ok = True
    try:
        g.expect([rb"GUEST-READY[^\n]*"], a.timeout)
        t_ready = g.elapsed()
        g.expect([rb"# "], 60)
        t_prompt = g.elapsed()
        print("GUEST-READY after %.1f s wall, shell prompt after %.1f s" % (t_ready, t_prompt),
              flush=True)
        result = {"ready": t_ready, "prompt": t_prompt}
        if a.boot_only:
            g.send("poweroff -f\n")
            g.proc.wait(timeout=60)
            return ok, result
        for cmd in a.command or DEFAULT_COMMANDS:
            out, rc, dt = g.run(cmd)
            print("=== %s  (exit %d, %.1f s)\n%s" % (cmd, rc, dt, out.rstrip()), flush=True)
            ok &= rc == 0
        counts = []
        for i in range(a.pipelines):
            out, rc, dt = g.run("ls / | wc -l")
            counts.append((out.strip(), rc, round(dt, 1)))
        good = len({c[0] for c in counts}) <= 1 and all(c[1] == 0 for c in counts)
        print("pipelines `ls / | wc -l` x%d: %s -> %s" % (a.pipelines, counts,
                                                         "OK" if good else "FAILED"), flush=True)
        ok &= good
        if a.cpu_online:
            out, rc, dt = g.run("echo 1 | tee /sys/devices/system/cpu/cpu1/online; "
                                "cat /sys/devices/system/cpu/online")
            print("=== cpu1 online (exit %d, %.1f s)\n%s" % (rc, dt, out.rstrip()), flush=True)
        t = time.monotonic()
        if a.power_button:
            qmp_command(a.qmp_path, "system_powerdown")
            how = "ACPI power button (QMP system_powerdown)"
        else:
            g.send("poweroff -f\n")
            how = "poweroff -f"
        rc = g.proc.wait(timeout=120)
        print("%s: QEMU exited with %d after %.1f s" % (how, rc, time.monotonic() - t),
              flush=True)
        ok &= rc == 0
        return ok, result
    except EmulationFailure as e:
        print("EMULATION FAILURE:\n" + str(e)[-4000:], flush=True)
        print(symbolize(str(e)), flush=True)
        return False, {}
    except Exception as e:  # timeout, early exit
        print("FAILED: %s" % e, flush=True)
        return False, {}
    finally:
        g.kill()


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--machine", default="microvm", help="microvm (with acpi=on), q35, pc")
    p.add_argument("--mem", default="256M")
    p.add_argument("--smp", default="2")
    p.add_argument("--kernel", default=os.path.join(GUEST, "vmlinux"))
    p.add_argument("--initrd", default=os.path.join(GUEST, "initramfs.cpio"))
    p.add_argument("--cmdline", default=os.path.join(GUEST, "cmdline"),
                   help="file holding the kernel command line")
    p.add_argument("--append", default="", help="extra kernel parameters")
    p.add_argument("--timeout", type=float, default=300, help="seconds to GUEST-READY")
    p.add_argument("--pipelines", type=int, default=10)
    p.add_argument("--command", action="append", help="guest command (repeatable)")
    p.add_argument("--cpu-online", action="store_true",
                   help="also run: echo 1 | tee /sys/devices/system/cpu/cpu1/online")
    p.add_argument("--boot-only", action="store_true")
    p.add_argument("--power-button", action="store_true",
                   help="end with the ACPI power button instead of poweroff -f")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--log", help="write the raw console output here")
    p.add_argument("qemu_extra", nargs="*", help="extra QEMU arguments (after --)")
    a = p.parse_args()
    a.qmp_path = None
    if a.power_button:
        a.qmp_path = os.path.join(tempfile.mkdtemp(prefix="pych-smoke-"), "qmp.sock")
    log = open(a.log, "ab") if a.log else None
    results, all_ok = [], True
    for _ in range(a.runs):
        ok, r = one_run(a, log)
        all_ok &= ok
        if r:
            results.append(r)
    if a.runs > 1 and results:
        print("GUEST-READY wall times: " + " / ".join("%.1f" % r["ready"] for r in results))
    print("RESULT: " + ("PASS" if all_ok else "FAIL"))
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
