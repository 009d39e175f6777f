"""Host network backends for virtio-net."""
