"""`vmm trace`: a KVM-aware tracer (python-ptrace) that shows what any VMM does with guest memory."""
