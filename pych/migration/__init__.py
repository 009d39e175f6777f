"""Live migration: the stream (protocol), its two ends (sender, receiver) and the VM behind
them (vm_side). docs/snapshot.md, "Live migration"."""
