import os
import threading
import time

from pych.threads import NamedThread, ThreadStarter, set_native_name


def _comm(tid: int) -> str:
    with open(f"/proc/self/task/{tid}/comm") as f:
        return f.read().strip()


def test_named_thread_is_named_for_the_kernel():
    seen = []
    ready, done = threading.Event(), threading.Event()

    def body():
        seen.append(threading.get_native_id())
        ready.set()
        done.wait(5)

    thread = NamedThread(target=body, name="vcpu3", daemon=True)
    thread.start()
    assert ready.wait(5)
    assert _comm(seen[0]) == "vcpu3"
    done.set()
    thread.join()


def test_long_names_are_cut_to_what_the_kernel_keeps():
    names = []

    def body():
        set_native_name("a-name-longer-than-fifteen-bytes")
        names.append(_comm(threading.get_native_id()))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert names == ["a-name-longer-t"]
    assert _comm(os.getpid()) != "a-name-longer-t"        # the main thread kept its name


def _run_on(starter: ThreadStarter, name: str):
    """Start a job through ``starter``; returns (its thread, what the job saw, release)."""
    seen: list = []
    ran, release = threading.Event(), threading.Event()

    def job():
        seen.append((threading.current_thread(), _comm(threading.get_native_id())))
        ran.set()
        release.wait(5)

    thread = starter.start(name, job)
    assert ran.wait(5)
    return thread, seen[0], release


def test_a_readied_thread_runs_the_job_under_its_name_and_start_does_not_start_one():
    starter = ThreadStarter("spare")
    starter.ready()
    spare = starter._spare[0]
    deadline = time.monotonic() + 5                 # NamedThread names itself once running
    while _comm(spare.native_id) != "spare" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert spare.is_alive() and _comm(spare.native_id) == "spare"
    thread, (current, comm), release = _run_on(starter, "vcpu1")
    assert thread is spare is current and thread.name == "vcpu1" and comm == "vcpu1"
    assert starter._spare is None               # replace_first=False: the caller readies
    release.set()
    thread.join(5)
    assert not thread.is_alive()
    starter.close()


def test_replace_first_readies_the_next_thread_before_the_job_runs():
    starter = ThreadStarter("spare", replace_first=True)
    starter.ready()
    first = starter._spare[0]
    thread, _, release = _run_on(starter, "vcpu1")
    assert thread is first and starter._spare is not None and starter._spare[0] is not first
    second, _, release2 = _run_on(starter, "vcpu2")
    assert second is not first and second.name == "vcpu2"
    release.set()
    release2.set()
    starter.close()


def test_without_a_ready_thread_start_starts_one_and_close_ends_the_spare():
    starter = ThreadStarter("spare")
    thread, (current, comm), release = _run_on(starter, "vcpu5")   # never readied
    assert current is thread and comm == "vcpu5"
    release.set()
    starter.ready()
    spare = starter._spare[0]
    starter.close()
    spare.join(5)
    assert not spare.is_alive()
    starter.ready()                             # closed: readies nothing
    assert starter._spare is None
    thread, _, release = _run_on(starter, "vcpu6")
    release.set()
    thread.join(5)
