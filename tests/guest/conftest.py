import tempfile
from pathlib import Path

import pytest

from tests.support.guest import PychGuest
from tests.support.netns import network_namespace


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "tests/guest/" in str(item.fspath):
            item.add_marker(pytest.mark.guest)


@pytest.fixture(scope="module")
def guest_factory(request):
    """Boot guests for a test module; every guest is stopped when the module ends."""
    started: list[PychGuest] = []
    base = Path(tempfile.mkdtemp(prefix=f"pych-{request.module.__name__.split('.')[-1]}-"))

    def boot(name: str = "vm", wait: bool = True, **kwargs) -> PychGuest:
        g = PychGuest(base / f"{name}{len(started)}", **kwargs)
        started.append(g)
        g.start()
        if wait:
            g.wait_ready()
        return g

    yield boot
    for g in started:
        g.stop()


@pytest.fixture(scope="module")
def netns(request):
    """A network namespace named by the module's ``NETNS`` (taps and packets stay in it);
    deleted when the module ends."""
    with network_namespace(request.module.NETNS) as name:
        yield name
