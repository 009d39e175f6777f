"""Snapshots of a VM (``vm.snapshot`` / ``vm.restore``): the format (:mod:`.format`) and the
helpers each device's ``state()`` / ``restore(state)`` pair uses (:mod:`.state`)."""
