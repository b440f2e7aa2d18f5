# vmm: `make run` boots the default guest and prints its report; `make test` runs the selftests on
# this host and then inside the nested test kernel. Both install what they need first.

VENV      := .venv
VMM       := $(VENV)/bin/vmm
RESULTS   := results
GUEST_SRC := $(wildcard guest/*.S)
GUEST_BIN := $(patsubst guest/%.S,guest/build/%.bin,$(GUEST_SRC))
BENCH_BIN := bench/build/exit_loop

.PHONY: run test test-host test-nested lint guests bench setup clean
.DELETE_ON_ERROR:

run: setup guests
	$(VMM) boot hello

test: setup lint guests $(BENCH_BIN)
	@mkdir -p $(RESULTS); status=0; \
	$(VMM) selftest --ktap $(RESULTS)/host.ktap --junitxml $(RESULTS)/host-junit.xml || status=1; \
	$(VMM) nested || status=1; \
	exit $$status

test-host: setup guests $(BENCH_BIN)
	@mkdir -p $(RESULTS)
	$(VMM) selftest --ktap $(RESULTS)/host.ktap --junitxml $(RESULTS)/host-junit.xml

test-nested: setup guests
	$(VMM) nested

bench: setup guests $(BENCH_BIN)
	@mkdir -p $(RESULTS)
	$(VMM) bench exits --json $(RESULTS)/bench-exits.json

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
guest/build/%.bin: guest/%.S guest/include/vmm.h guest/guest.ld
	@mkdir -p guest/build
	cd guest && cpp -nostdinc -undef -D__ASSEMBLY__ -Iinclude $*.S -o build/$*.s
	as --64 -o guest/build/$*.o guest/build/$*.s
	ld -nostdlib -static -T guest/guest.ld -o guest/build/$*.elf guest/build/$*.o
	objcopy -O binary guest/build/$*.elf $@

$(BENCH_BIN): bench/exit_loop.c
	@mkdir -p bench/build
	cc -O2 -Wall -Wextra -o $@ $<

clean:
	rm -rf guest/build bench/build $(RESULTS)
