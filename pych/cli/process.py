"""The ``pych`` process: logging, signals, seccomp, the API server and the VMM's control loop.

:func:`pych.cli.main.main` parses the command line and hands the VM configuration (or None:
wait for ``vm.create``) and the parsed arguments to :func:`run`.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
import sys

from pych import seccomp
from pych.cli.options import ApiSocketOption, EventMonitorOption
from pych.config.errors import ConfigError
from pych.errors import VmmError
from pych.threads import set_native_name
from pych.event_monitor import EventMonitor
from pych.cpu.kick import install_kick_handler
from pych.vmm import Vmm

log = logging.getLogger(__name__)


def run(config, args: argparse.Namespace, restore=None) -> int:
    """``pych``'s main: boot ``config`` or restore the snapshot of ``restore`` (a
    ``RestoreConfig``, ``--restore``; if given), serve the API, return the exit code."""
    _setup_logging(args)
    set_native_name("pych")          # the main thread: the control loop (vCPUs are vcpu<N>)
    install_kick_handler()
    monitor_opt = _parse(getattr(args, "event_monitor", None), EventMonitorOption)
    api_opt = _parse(getattr(args, "api_socket", None), ApiSocketOption)
    try:
        monitor = EventMonitor(monitor_opt.path, monitor_opt.fd) if monitor_opt else None
    except OSError as e:
        print(f"pych: error: --event-monitor: {e.strerror}: {monitor_opt.path}", file=sys.stderr)
        return 1
    vmm = Vmm(event_monitor=monitor)
    server = None

    def on_signal(signum, _frame):
        log.warning("received signal %d: shutting down", signum)
        vmm.post(lambda v: v.exit(0))

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    def on_seccomp_violation(_message):
        # already reported on stderr, one line naming the call (pych.seccomp)
        vmm.post(lambda v: v.exit(1))

    seccomp.configure(getattr(args, "seccomp", None) or seccomp.DEFAULT_MODE,
                      on_violation=on_seccomp_violation)        # vCPU threads install it
    try:
        vmm.events.emit("vmm", "starting")
        if config is not None and config.landlock_enable:
            if (status := _landlock(config, api_opt)) is not None:
                return status
        elif restore is not None:
            snapshot = _snapshot_config(restore)
            if snapshot is not None and snapshot[1].landlock_enable:
                source, restored = snapshot
                if (status := _landlock(restored, api_opt, source)) is not None:
                    return status
        if api_opt is not None:
            from pych.api.http import ApiServer
            try:
                server = ApiServer(functools.partial(vmm.call, answer_follows=True),
                                   path=api_opt.path, fd=api_opt.fd,
                                   after_response=vmm.answered)
                server.start()
            except (OSError, ValueError, RuntimeError) as e:
                print(f"pych: error: --api-socket: {e}", file=sys.stderr)
                return 1
        if config is not None:
            try:
                def create_and_boot(v: Vmm) -> None:
                    v.vm_create(config)
                    v.vm_boot()
                vmm.call(create_and_boot)
            except ConfigError as e:
                print(f"pych: error: {e}", file=sys.stderr)
                return 2
            except VmmError as e:
                print(f"pych: error: {': '.join(e.messages[1:] or e.messages)}", file=sys.stderr)
                return 1
        elif restore is not None:
            try:
                fds = [fd for net in restore.net_fds or () for fd in net.fds or ()]
                vmm.call(lambda v: v.vm_restore(restore, fds))
            except VmmError as e:
                print(f"pych: error: {': '.join(e.messages)}", file=sys.stderr)
                return 1
        elif server is None:
            print("pych: error: nothing to do: give --kernel or --api-socket", file=sys.stderr)
            return 2
        return vmm.run_loop()
    finally:
        if server is not None:
            server.close()
        vmm.close()


def _snapshot_config(restore):
    """``(directory, configuration)`` of the snapshot ``--restore`` names, or None when it
    cannot be read (``vm_restore`` then says why)."""
    from pych.config import VmConfig
    from pych.snapshot import format as snapshot_format

    try:
        source = snapshot_format.directory_of(restore.source_url)
        manifest = snapshot_format.read_manifest(source)
        return source, VmConfig.model_validate(manifest["config"])
    except Exception:           # noqa: BLE001 - reported by vm_restore, with its words
        return None


def _landlock(config, api_opt, snapshot=None) -> int | None:
    """``--landlock`` (or a snapshot taken under it): sandbox the process to what
    ``config`` names, and the snapshot directory ``snapshot`` read-only, before any thread
    starts (the API server's, the vCPUs', the devices'), so every thread is inside.  A
    configuration that is not valid is left to ``vm.create`` to report; returns the exit
    status if the sandbox cannot be set up."""
    from pych import landlock

    try:
        config.model_copy(deep=True).validate()
    except ConfigError:
        return None
    try:
        rules = landlock.rules_for(config, api_opt.path if api_opt is not None else None)
        if snapshot is not None:
            rules.append(landlock.Rule(str(snapshot), "r", "the snapshot restored"))
        landlock.restrict(rules)
    except landlock.LandlockError as e:
        print(f"pych: error: --landlock: {e}", file=sys.stderr)
        return 1
    log.info("landlock: pych is sandboxed to %d paths", len(rules))
    return None


def _setup_logging(args: argparse.Namespace) -> None:
    """``-v`` (info), ``-vv`` (debug), to ``--log-file`` or standard error."""
    level = {0: logging.WARNING, 1: logging.INFO, 2: logging.DEBUG}.get(min(args.v or 0, 2))
    handler: logging.Handler
    if getattr(args, "log_file", None):
        handler = logging.FileHandler(args.log_file)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pych: %(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)


def _parse(value: str | None, option):
    """A process option's command-line text parsed with ``option.parse``; None if absent."""
    return None if value is None else option.parse(value)
