"""The control loop's idle work and work after an answer (the rest of the loop is exercised
by every VMM test)."""

from __future__ import annotations

import threading
import time

from pych.vmm import loop as loop_module
from pych.vmm.loop import ControlLoop


def test_idle_work_runs_once_after_a_quiet_poll_interval_on_the_loop(monkeypatch):
    monkeypatch.setattr(loop_module, "IDLE_POLL_MS", 100)
    loop = ControlLoop()
    ran: list[tuple[float, threading.Thread]] = []
    loop.when_idle(lambda lp: ran.append((time.monotonic(), threading.current_thread())))
    thread = threading.Thread(target=loop.run_loop)
    started = time.monotonic()
    thread.start()
    try:
        # busy: a request every 20 ms for 0.4 s keeps the idle work waiting
        while time.monotonic() - started < 0.4:
            loop.call(lambda lp: None)
            busy_until = time.monotonic()
            time.sleep(0.02)
        assert ran == []
        deadline = busy_until + 5
        while not ran and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(ran) == 1
        when, on = ran[0]
        assert when - busy_until >= 0.09 and on is thread
        time.sleep(0.3)
        assert len(ran) == 1                      # once
    finally:
        loop.request_exit(0)
        thread.join(5)


def test_failed_idle_work_is_logged_and_the_loop_goes_on(monkeypatch, caplog):
    monkeypatch.setattr(loop_module, "IDLE_POLL_MS", 20)
    loop = ControlLoop()
    loop.when_idle(lambda lp: 1 / 0)
    thread = threading.Thread(target=loop.run_loop)
    thread.start()
    try:
        time.sleep(0.2)
        assert loop.call(lambda lp: "alive") == "alive"
        assert "VMM task failed" in caplog.text
    finally:
        loop.request_exit(0)
        thread.join(5)


def test_work_after_an_answer_runs_on_the_loop_once_the_caller_has_its_result():
    """``after_answer``: the hook runs on the loop's thread, after the request's result is
    the caller's and before the loop's next request; a request that failed still has its
    hooks run; outside a request the hook runs at once."""
    loop = ControlLoop()
    events: list[str] = []
    done = threading.Event()
    thread = threading.Thread(target=loop.run_loop)
    thread.start()

    answered = threading.Event()

    def request(lp):
        # were the hook run before the caller has the answer, it would wait here in vain
        lp.after_answer(lambda lp: events.append(
            f"hook on loop={threading.current_thread() is thread} answered={answered.wait(5)}"))
        events.append("request")
        return "answer"

    def failing(lp):
        lp.after_answer(lambda lp: (events.append("hook of the failed one"), done.set()))
        raise ValueError("refused")
    try:
        assert loop.call(request) == "answer"
        answered.set()
        assert loop.call(lambda lp: events.append("next request")) is None
        assert events == ["request", "hook on loop=True answered=True", "next request"]
        try:
            loop.call(failing)
        except ValueError:
            pass
        assert done.wait(5) and events[-1] == "hook of the failed one"
    finally:
        loop.request_exit(0)
        thread.join(5)
    outside: list[str] = []
    ControlLoop().after_answer(lambda lp: outside.append("now"))
    assert outside == ["now"]


def test_the_vmm_prepares_every_runtime_request_model_once_a_vm_runs():
    """The hot plug, resize and removal endpoints' models (bodies and answers) are the
    ones :func:`_prepare_runtime_requests` builds, and building them completes them."""
    import pych.config
    from pych.api.routes import ROUTES
    from pych.vmm.vmm import RUNTIME_REQUEST_MODELS, _prepare_runtime_requests

    runtime = [r for r in ROUTES if r.implemented and r.method == "PUT"
               and r.endpoint.startswith(("vm.resize", "vm.add-", "vm.remove-"))]
    assert len(runtime) >= 10
    wanted = {m.name for r in runtime for m in (r.body_model, r.response_model) if m}
    assert wanted == set(RUNTIME_REQUEST_MODELS)
    _prepare_runtime_requests(None)
    assert all(getattr(pych.config, name).__pydantic_complete__
               for name in RUNTIME_REQUEST_MODELS)


def test_idle_work_can_be_run_at_once_without_a_loop():
    loop = ControlLoop()
    ran: list[int] = []
    loop.when_idle(lambda lp: ran.append(1))
    loop.when_idle(lambda lp: ran.append(2))
    loop.run_idle_work()
    loop.run_idle_work()
    assert ran == [1, 2]
