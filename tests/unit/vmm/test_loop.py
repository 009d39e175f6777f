"""The control loop: requests served on their callers' threads one at a time, posted events,
idle work and work after an answer (the rest is exercised by every VMM test)."""

from __future__ import annotations

import threading
import time

import pytest

from pych.errors import InternalError
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


def test_work_after_an_answer_runs_once_the_caller_has_its_result():
    """``after_answer``: the hook runs after the request's result is the caller's and
    before the next request (on the loop's thread, or on the next caller's if that comes
    first); a request that failed still has its hooks run; outside a request the hook
    runs at once."""
    loop = ControlLoop()
    events: list[str] = []
    done = threading.Event()
    thread = threading.Thread(target=loop.run_loop)
    thread.start()

    answered = threading.Event()

    def request(lp):
        # were the hook run before the caller has the answer, it would wait here in vain
        lp.after_answer(lambda lp: events.append(f"hook answered={answered.wait(5)}"))
        events.append("request")
        return "answer"

    def failing(lp):
        lp.after_answer(lambda lp: (events.append("hook of the failed one"), done.set()))
        raise ValueError("refused")
    try:
        assert loop.call(request) == "answer"
        answered.set()
        assert loop.call(lambda lp: events.append("next request")) is None
        assert events == ["request", "hook answered=True", "next request"]
        with pytest.raises(ValueError):
            loop.call(failing)
        assert done.wait(5) and events[-1] == "hook of the failed one"
    finally:
        loop.request_exit(0)
        thread.join(5)
    outside: list[str] = []
    ControlLoop().after_answer(lambda lp: outside.append("now"))
    assert outside == ["now"]


def test_a_request_runs_on_its_callers_thread_and_never_beside_another():
    """No hand-off: ``call`` serves the request on the calling thread (the HTTP
    connection's), holding the VMM's lock, so requests from many threads and the loop's
    own tasks never overlap; a request made from inside one runs at once."""
    loop = ControlLoop()
    thread = threading.Thread(target=loop.run_loop)
    thread.start()
    inside, overlaps, ran_on = [0], [], []
    guard = threading.Lock()

    def work(lp, label):
        with guard:
            inside[0] += 1
            overlaps.append(inside[0])
        ran_on.append((label, threading.current_thread()))
        time.sleep(0.002)
        with guard:
            inside[0] -= 1

    def caller(i):
        for _ in range(20):
            loop.call(lambda lp: work(lp, f"caller{i}"))
            loop.post(lambda lp: work(lp, "posted"))
    callers = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    try:
        for c in callers:
            c.start()
        for c in callers:
            c.join(30)
        assert loop.call(lambda lp: lp.call(lambda lp: "nested")) == "nested"
        loop.call(lambda lp: None)          # whatever was posted has run by now
    finally:
        loop.request_exit(0)
        thread.join(5)
    assert max(overlaps) == 1 and len(overlaps) == 160
    by_caller = {label: t for label, t in ran_on if label != "posted"}
    assert by_caller == {f"caller{i}": callers[i] for i in range(4)}


def test_events_posted_before_a_request_run_before_it():
    loop = ControlLoop()
    thread = threading.Thread(target=loop.run_loop)
    order: list[str] = []
    release = threading.Event()
    thread.start()
    try:
        # the loop is held up in a task; meanwhile an event is posted, then a request made
        loop.post(lambda lp: release.wait(5))
        time.sleep(0.05)
        loop.post(lambda lp: order.append("event"))
        threading.Timer(0.05, release.set).start()
        loop.call(lambda lp: order.append("request"))
        assert order == ["event", "request"]
    finally:
        loop.request_exit(0)
        thread.join(5)


def test_once_the_loop_has_ended_requests_are_refused_and_a_running_one_is_waited_for():
    loop = ControlLoop()
    thread = threading.Thread(target=loop.run_loop)
    thread.start()
    started, finished = threading.Event(), []

    def slow(lp):
        started.set()
        time.sleep(0.2)
        finished.append(time.monotonic())
    request = threading.Thread(target=loop.call, args=(slow,))
    request.start()
    assert started.wait(5)
    loop.request_exit(3)
    thread.join(5)
    ended = time.monotonic()
    assert finished and finished[0] <= ended and loop.exit_code == 3
    with pytest.raises(InternalError, match="shutting down"):
        loop.call(lambda lp: None)
    request.join(5)


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


def test_with_an_answer_to_write_the_work_after_it_waits_until_answered():
    """``call(fn, answer_follows=True)``: the hook stays put while the caller writes its
    answer (the API server), and runs on the loop once :meth:`answered` says it is
    written."""
    loop = ControlLoop()
    thread = threading.Thread(target=loop.run_loop)
    thread.start()
    ran = threading.Event()
    try:
        loop.call(lambda lp: lp.after_answer(lambda lp: ran.set()), answer_follows=True)
        assert not ran.wait(0.3)                 # the answer is still being written
        loop.answered()
        assert ran.wait(5)
    finally:
        loop.request_exit(0)
        thread.join(5)
