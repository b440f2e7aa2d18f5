/*
 * exit_loop: the reference for `vmm bench exits` (vmm/tools/bench/exits.py). A minimal C VMM that
 * runs the same guest as vmm's Python run loop (guest/build/bench_exits.bin) with the same machine:
 * one memfd-backed memslot at GPA 0, the flat image at 0x8000, long mode with 2M identity page
 * tables, a GDT and the supported CPUID, set up as vmm/guest/x86.py (and the kernel selftests'
 * processor.c) do, and GS at vCPU 0's ucall block. Then it runs KVM_RUN in a loop and dispatches
 * the guest's ucalls exactly as vmm/guest/runner.py does: an OUT to port 0xe0 is a ucall whose
 * 64-byte block {u32 header, u64 args[6] at 8} is read from guest memory at UCALL_GPA; SYNC is
 * counted (and its counter checked), DONE stops.
 *
 * usage: exit_loop [--real] [--floor] GUEST.bin SYNCS [MEM_BYTES]
 *   --real   start the guest in 16-bit real mode (GS selector 0x300) instead of long mode
 *   --floor  the guest makes SYNCS bare OUTs to the port and then HLTs (guest/bench_floor*.S):
 *            count the exits and read nothing, the physical floor of a PIO exit on this host
 * prints one JSON line: {"exits": SYNCS + 1, "syncs": ..., "seconds": ..., "us_per_exit": ...,
 * "cpu_seconds": ..., "cpu_us_per_exit": ...}: the time of the KVM_RUN loop only (first entry to
 * the DONE exit), wall clock (CLOCK_MONOTONIC) and this thread's CPU time (CLOCK_THREAD_CPUTIME_ID,
 * guest time included; less disturbed by other load on the host).
 *
 * Only classic KVM ioctls are used, so any <linux/kvm.h> since 2.6.x builds it (6.1 or 6.12 alike):
 *     cc -O2 -Wall -Wextra -o bench/build/exit_loop bench/exit_loop.c   (with bench/kvm_bench.h)
 */
#include "kvm_bench.h"

#define DEFAULT_MEM    (4ull << 20) /* vmm.machine.DEFAULT_MEM_SIZE */

int main(int argc, char **argv)
{
	int real = 0, floor = 0;

	while (argc > 1 && argv[1][0] == '-' && argv[1][1] == '-') {
		if (!strcmp(argv[1], "--real"))
			real = 1;
		else if (!strcmp(argv[1], "--floor"))
			floor = 1;
		else
			break;
		argv++, argc--;
	}
	if (argc < 3 || argc > 4) {
		fprintf(stderr, "usage: exit_loop [--real] [--floor] GUEST.bin SYNCS [MEM_BYTES]\n");
		return 2;
	}
	const char *image_path = argv[1];
	uint64_t syncs = strtoull(argv[2], NULL, 0);
	uint64_t mem_size = argc > 3 ? strtoull(argv[3], NULL, 0) : DEFAULT_MEM;

	if (mem_size % HUGE_PAGE_SIZE || mem_size < SYSTEM_GPA + 3 * 4096 + STACK_SIZE || mem_size > (1ull << 30))
		die("memory size must be a multiple of 2 MiB between 2 MiB and 1 GiB");

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm: %s", strerror(errno));
	int vm = xioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM");

	/* slot 0: a memfd mapped shared, as vmm.memory does */
	int memfd = memfd_create("exit_loop", MFD_CLOEXEC);
	if (memfd < 0 || ftruncate(memfd, mem_size) < 0)
		die("memfd: %s", strerror(errno));
	uint8_t *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	if (mem == MAP_FAILED)
		die("mmap guest memory: %s", strerror(errno));
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = mem_size, .userspace_addr = (uintptr_t)mem,
	};
	xioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");

	load_image(mem, image_path);
	write_gdt(mem);

	/* identity page tables: PML4 -> PDPT -> PD of 2M leaves over the slot */
	uint64_t pml4 = SYSTEM_GPA, pdpt = pml4 + 4096, pd = pdpt + 4096;
	((uint64_t *)(mem + pml4))[0] = pdpt | PTE_PRESENT | PTE_WRITE;
	((uint64_t *)(mem + pdpt))[0] = pd | PTE_PRESENT | PTE_WRITE;
	for (uint64_t addr = 0; addr < mem_size; addr += HUGE_PAGE_SIZE)
		((uint64_t *)(mem + pd))[addr / HUGE_PAGE_SIZE] = addr | PTE_PRESENT | PTE_WRITE | PTE_LARGE;
	uint64_t stack_top = pd + 4096 + STACK_SIZE;

	/* the vCPU and its run page */
	int vcpu = xioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
	int run_size = xioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run: %s", strerror(errno));
	struct kvm_cpuid2 *cpuid = supported_cpuid(kvm);
	if (real) {
		xioctl(vcpu, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2");
		enter_real_mode(vcpu, UCALL_GPA);
		stack_top = REAL_STACK_TOP;
	} else {
		enter_long_mode(vcpu, cpuid, pml4, UCALL_GPA);
	}
	free(cpuid);

	/* entry registers: rdi = vCPU id, rsi = #vCPUs, rdx = first free GPA, rcx = arg, r8 = slot end */
	struct kvm_regs regs = {
		.rip = IMAGE_GPA, .rsp = stack_top, .rflags = 0x2,
		.rdi = 0, .rsi = 1, .rdx = real ? IMAGE_END : stack_top, .rcx = syncs, .r8 = mem_size,
	};
	xioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");

	/* the measured loop: KVM_RUN, decode the exit, read the ucall block, dispatch */
	uint64_t exits = 0, seen = 0, args[6];
	double start = now(CLOCK_MONOTONIC), cpu_start = now(CLOCK_THREAD_CPUTIME_ID);
	for (;;) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			die("KVM_RUN: %s", strerror(errno));
		}
		if (floor && run->exit_reason == KVM_EXIT_HLT) {
			exits++;
			break;
		}
		if (run->exit_reason != KVM_EXIT_IO || run->io.port != UCALL_PORT ||
		    run->io.direction != KVM_EXIT_IO_OUT)
			die("unexpected exit %u (io port %#x)", run->exit_reason, run->io.port);
		exits++;
		if (floor) {
			seen++;
			continue;
		}
		uint32_t cmd = read_ucall(mem, 0, args);
		if (cmd == UCALL_SYNC) {
			if (args[0] != 1 || args[1] != seen)
				die("SYNC %" PRIu64 ": got stage %" PRIu64 " value %" PRIu64, seen, args[0], args[1]);
			seen++;
		} else if (cmd == UCALL_DONE) {
			break;
		} else {
			die("unexpected ucall %u", cmd);
		}
	}
	double cpu_seconds = now(CLOCK_THREAD_CPUTIME_ID) - cpu_start;
	double seconds = now(CLOCK_MONOTONIC) - start;

	if (seen != syncs)
		die("guest synced %" PRIu64 " times, expected %" PRIu64, seen, syncs);
	printf("{\"exits\": %" PRIu64 ", \"syncs\": %" PRIu64 ", \"seconds\": %.6f, \"us_per_exit\": %.4f, "
	       "\"cpu_seconds\": %.6f, \"cpu_us_per_exit\": %.4f}\n",
	       exits, seen, seconds, seconds * 1e6 / exits, cpu_seconds, cpu_seconds * 1e6 / exits);
	munmap(run, run_size);
	munmap(mem, mem_size);
	close(vcpu);
	close(memfd);
	close(vm);
	close(kvm);
	return 0;
}
