"""The programs built on the library: the `vmm` CLI, doctor, the nested-kernel runner, benchmarks,
and the pytest plugins (fixtures, KTAP output). Nothing in vmm.kvm, vmm.memory or vmm.guest
imports from here."""
