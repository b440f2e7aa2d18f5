"""`vmm trace`: a KVM-aware tracer (python-ptrace) that shows what any VMM does with guest memory.

Nothing here imports python-ptrace (the ``trace`` extra): `vmm` must start without it."""

CATEGORIES = ("kvm", "memory", "exits")  # the event kinds --only selects
