import os
import sys

import pytest

HAVE_KVM = os.access("/dev/kvm", os.R_OK | os.W_OK)


def pytest_collection_modifyitems(config, items):
    if HAVE_KVM:
        return
    skip = pytest.mark.skip(reason="/dev/kvm is absent: guest tests cannot run on this machine")
    guest_items = [i for i in items if "guest" in i.keywords]
    for item in guest_items:
        item.add_marker(skip)
    if guest_items:
        print(f"\n*** WARNING: /dev/kvm is absent: skipping {len(guest_items)} guest tests ***\n",
              file=sys.stderr)
