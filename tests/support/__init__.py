"""The test harness, kept out of the pych package (the wheel ships product code only).

* :mod:`.guest`: the test guest under pych (or QEMU) driven over its serial console;
  :mod:`.hotplug`, :mod:`.netns`, :mod:`.vsock`: hot plug waits, network namespaces and the
  host end of vsock for the guest tests; :mod:`.microguest`: a few-instruction PVH guest;
* :mod:`.fuzz` and :mod:`.soak`: the API fuzzer (``make fuzz``) and the hot plug soak
  (``make soak``), with short variants in tests/guest/; :mod:`.uds_requests`: a ``requests``
  session over the API's Unix socket (for schemathesis);
* :mod:`.fakes`: test doubles for what devices and managers are handed (interrupts, MSI-X,
  ioeventfds, KVM memory slots, the event monitor); :mod:`.virtio`: the driver side of a
  virtqueue and a device harness; :mod:`.machines`: a DeviceManager on those fakes and a
  stand-in for a booted VM around the managers a test built; :mod:`.host`: host-side checks
  (OFD locks).

Also used by scripts/ and bench/, which put the repository root on ``sys.path``.
"""
