# vmm: `make run` boots the default guest and prints its report; `make test` runs the selftests on
# this host and then inside each nested test kernel (6.12, 7.3). Both install what they need first.

VENV      := .venv
VMM       := $(VENV)/bin/vmm
RESULTS   := results
GUEST_SRC := $(wildcard guest/*.S)
GUEST_BIN := $(patsubst guest/%.S,guest/build/%.bin,$(GUEST_SRC))
BENCH_BIN := bench/build/exit_loop bench/build/attr_pager
KERNELS   := 6.12 7.3
SHELL     := /bin/bash

.PHONY: run test test-host test-nested lint guests bench bench-nested setup clean
.DELETE_ON_ERROR:

run: setup guests
	$(VMM) boot hello

# every part runs even when an earlier one failed; the exit status says whether any did
test: setup lint guests $(BENCH_BIN)
	@status=0; \
	$(MAKE) --no-print-directory test-host || status=1; \
	$(MAKE) --no-print-directory test-nested || status=1; \
	exit $$status

# results/host/{host.ktap,junit.xml,console.log}
test-host: setup guests $(BENCH_BIN)
	@mkdir -p $(RESULTS)/host
	@set -o pipefail; $(VMM) selftest --ktap $(RESULTS)/host/host.ktap --junitxml $(RESULTS)/host/junit.xml 2>&1 \
		| tee $(RESULTS)/host/console.log

# results/nested-<kernel>/{nested.ktap,nested-junit.xml,console.log} for each of $(KERNELS); the
# kernels run side by side (single-threaded TCG keeps one core each: 2 kernels in about the wall
# time of one), each run's own output in results/nested-<kernel>.out, its summary printed at the end
test-nested: setup guests
	@mkdir -p $(RESULTS); status=0; pids=; \
	for k in $(KERNELS); do \
		$(VMM) nested --kernel $$k --results $(RESULTS)/nested-$$k > $(RESULTS)/nested-$$k.out 2>&1 & pids="$$pids $$!"; \
	done; \
	for p in $$pids; do wait $$p || status=1; done; \
	for k in $(KERNELS); do \
		echo "=== nested $$k (full output: $(RESULTS)/nested-$$k.out)"; \
		grep -E '^(FAILED|ERROR) |^=+ .*(passed|failed).* =+$$|^nested: |^  (ktap|junit|console|kernel):' \
			$(RESULTS)/nested-$$k.out || tail -n 20 $(RESULTS)/nested-$$k.out; \
	done; exit $$status

bench: setup guests $(BENCH_BIN)
	@mkdir -p $(RESULTS)
	$(VMM) bench exits --json $(RESULTS)/bench-exits.json

# the benchmarks that need private memory, each inside a nested test kernel (VMM_BENCH_KERNEL, default
# 6.12): results/bench-nested{,-paging,-memslots}/ with JSON and the plots; tens of minutes under TCG
bench-nested: setup guests $(BENCH_BIN)
	scripts/bench-nested conversions
	scripts/bench-nested paging
	scripts/bench-nested memslots

# ruff (lint and format check) and mypy, as configured in pyproject.toml; `make test` runs it first
lint: setup
	$(VENV)/bin/ruff check vmm selftests
	$(VENV)/bin/ruff format --check vmm selftests
	$(VENV)/bin/mypy

# idempotent: installs only what is missing (QEMU too when the nested suite will run)
setup:
	@scripts/setup $(if $(filter test test-nested,$(MAKECMDGOALS)),--nested)

guests: $(GUEST_BIN)

# the same steps as vmm/guest/image.py assemble(): cpp, as, ld at 0x8000, objcopy to a flat binary
guest/build/%.bin: guest/%.S $(wildcard guest/include/*.h) guest/guest.ld
	@mkdir -p guest/build
	cd guest && cpp -nostdinc -undef -D__ASSEMBLY__ -Iinclude $*.S -o build/$*.s
	as --64 -o guest/build/$*.o guest/build/$*.s
	ld -nostdlib -static -T guest/guest.ld -o guest/build/$*.elf guest/build/$*.o
	objcopy -O binary guest/build/$*.elf $@

bench/build/exit_loop: bench/exit_loop.c bench/kvm_bench.h
	@mkdir -p bench/build
	cc -O2 -Wall -Wextra -o $@ $<

bench/build/attr_pager: bench/attr_pager.c bench/kvm_bench.h
	@mkdir -p bench/build
	cc -O2 -Wall -Wextra -pthread -o $@ $<

clean:
	rm -rf guest/build bench/build $(RESULTS)

# the conversion model long (>= 10,000 steps, 2-4 vCPUs racing the host's conversions) inside each
# nested test kernel, with a summary line and results/soak-<kernel>/summary.json per kernel; not
# part of `make test`; settings and timings in scripts/soak
.PHONY: soak
soak:
	@scripts/setup --nested
	@$(MAKE) --no-print-directory guests
	scripts/soak
