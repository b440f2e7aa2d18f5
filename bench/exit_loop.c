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
 *     cc -O2 -Wall -Wextra -o bench/build/exit_loop bench/exit_loop.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* the guest physical layout of vmm/cpu.py */
#define GDT_GPA        0x1000ull
#define TSS_GPA        0x2000ull
#define IMAGE_GPA      0x8000ull
#define IMAGE_END      0x100000ull
#define SYSTEM_GPA     0x100000ull /* PML4, PDPT, PD, then the stack */
#define STACK_SIZE     0x4000ull
#define HUGE_PAGE_SIZE (2ull << 20)
#define DEFAULT_MEM    (4ull << 20) /* vmm.machine.DEFAULT_MEM_SIZE */

#define PTE_PRESENT (1ull << 0)
#define PTE_WRITE   (1ull << 1)
#define PTE_LARGE   (1ull << 7)
#define CR0_PE (1ull << 0)
#define CR0_MP (1ull << 1)
#define CR0_ET (1ull << 4)
#define CR0_NE (1ull << 5)
#define CR0_WP (1ull << 16)
#define CR0_PG (1ull << 31)
#define CR4_PAE (1ull << 5)
#define CR4_OSFXSR (1ull << 9)
#define CR4_OSXMMEXCPT (1ull << 10)
#define EFER_LME (1ull << 8)
#define EFER_LMA (1ull << 10)
#define SEL_CODE 0x08
#define SEL_DATA 0x10
#define SEL_TSS  0x18

/* vmm/guest/layout.py and ucall.py */
#define UCALL_PORT 0xe0
#define UCALL_GPA  0x3000ull
#define UCALL_WIDE (1u << 16)
#define REAL_STACK_TOP 0x7000ull
#define UCALL_SYNC 1
#define UCALL_ABORT 2
#define UCALL_PRINT 3
#define UCALL_DONE 4

struct ucall {
	uint32_t header; /* cmd | nargs << 8 | UCALL_WIDE */
	uint32_t pad;
	uint64_t args[6];
};

static void die(const char *fmt, ...)
{
	va_list ap;

	fputs("exit_loop: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static int xioctl(int fd, unsigned long req, void *arg, const char *name)
{
	int ret = ioctl(fd, req, arg);

	if (ret < 0)
		die("%s: %s", name, strerror(errno));
	return ret;
}

static struct kvm_segment segment(uint16_t selector, uint8_t type, int code, int system)
{
	struct kvm_segment s = {
		.base = 0, .limit = 0xffffffff, .selector = selector, .type = type, .present = 1,
		.dpl = 0, .db = code ? 0 : 1, .s = system ? 0 : 1, .l = code ? 1 : 0, .g = 1,
	};
	return s;
}

/* KVM_GET_SUPPORTED_CPUID, growing the buffer on E2BIG (as vmm.system.Kvm.supported_cpuid) */
static struct kvm_cpuid2 *supported_cpuid(int kvm)
{
	for (uint32_t nent = 64; nent <= 4096; nent *= 2) {
		struct kvm_cpuid2 *c = calloc(1, sizeof(*c) + nent * sizeof(c->entries[0]));

		if (!c)
			die("out of memory");
		c->nent = nent;
		if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, c) == 0)
			return c;
		if (errno != E2BIG)
			die("KVM_GET_SUPPORTED_CPUID: %s", strerror(errno));
		free(c);
	}
	die("KVM_GET_SUPPORTED_CPUID: too many entries");
	return NULL;
}

static double now(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

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

	/* the flat image at IMAGE_GPA */
	FILE *f = fopen(image_path, "rb");
	if (!f)
		die("%s: %s", image_path, strerror(errno));
	size_t len = fread(mem + IMAGE_GPA, 1, IMAGE_END - IMAGE_GPA, f);
	if (ferror(f) || len == 0 || !feof(f))
		die("%s: unreadable, empty or larger than %#llx bytes", image_path, IMAGE_END - IMAGE_GPA);
	fclose(f);

	/* GDT: null, 64-bit code, data, 16-byte TSS descriptor */
	uint64_t *gdt = (uint64_t *)(mem + GDT_GPA);
	gdt[0] = 0;
	gdt[1] = 0x00AF9B000000FFFFull;
	gdt[2] = 0x00CF93000000FFFFull;
	gdt[3] = 0x67 | ((TSS_GPA & 0xFFFFFF) << 16) | (0x89ull << 40) | (((TSS_GPA >> 24) & 0xFF) << 56);
	gdt[4] = TSS_GPA >> 32;

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
	xioctl(vcpu, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2");
	free(cpuid);

	struct kvm_sregs sregs;
	xioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
	if (real) {
		/* as vmm/guest/x86.py enter_real_mode: segments at 0, GS at the ucall block */
		struct kvm_segment *segs[] = { &sregs.cs, &sregs.ds, &sregs.es, &sregs.fs, &sregs.ss };

		for (unsigned i = 0; i < sizeof(segs) / sizeof(segs[0]); i++)
			segs[i]->base = 0, segs[i]->selector = 0;
		sregs.gs.base = UCALL_GPA;
		sregs.gs.selector = UCALL_GPA >> 4;
		stack_top = REAL_STACK_TOP;
	} else {
		sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
		sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
		sregs.efer = EFER_LME | EFER_LMA;
		sregs.cr3 = pml4;
		sregs.cs = segment(SEL_CODE, 11, 1, 0);
		sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = segment(SEL_DATA, 3, 0, 0);
		sregs.gs.base = UCALL_GPA;
		sregs.tr = segment(SEL_TSS, 11, 0, 1);
		sregs.tr.base = TSS_GPA;
		sregs.tr.limit = 0x67;
		sregs.tr.g = 0;
		sregs.gdt.base = GDT_GPA;
		sregs.gdt.limit = 5 * 8 - 1;
	}
	xioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");

	/* entry registers: rdi = vCPU id, rsi = #vCPUs, rdx = first free GPA, rcx = arg, r8 = slot end */
	struct kvm_regs regs = {
		.rip = IMAGE_GPA, .rsp = stack_top, .rflags = 0x2,
		.rdi = 0, .rsi = 1, .rdx = real ? IMAGE_END : stack_top, .rcx = syncs, .r8 = mem_size,
	};
	xioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");

	/* the measured loop: KVM_RUN, decode the exit, read the ucall block, dispatch */
	uint64_t exits = 0, seen = 0;
	struct ucall uc;
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
		memcpy(&uc, mem + UCALL_GPA, sizeof(uc));
		uint32_t cmd = uc.header & 0xff, nargs = uc.header >> 8 & 0xff;
		uint64_t mask = uc.header & UCALL_WIDE ? ~0ull : 0xffffffffull;
		if (nargs > 6)
			die("bad ucall header %#x", uc.header);
		if (cmd == UCALL_SYNC) {
			if (nargs != 2 || (uc.args[0] & mask) != 1 || (uc.args[1] & mask) != seen)
				die("SYNC %" PRIu64 ": got stage %" PRIu64 " value %" PRIu64, seen, uc.args[0], uc.args[1]);
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
