import os
import threading

from pych.threads import NamedThread, set_native_name


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
