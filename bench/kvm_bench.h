/*
 * What bench/exit_loop.c and bench/attr_pager.c share: the guest layout of vmm/guest/layout.py, the
 * ucall block, error handling, and the long-mode machine set-up (vmm/guest/x86.py's, as the kernel
 * selftests' processor.c does it). Static functions only: each program includes it once.
 */
#ifndef KVM_BENCH_H
#define KVM_BENCH_H
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/kvm.h>
#include <pthread.h>
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

/* vmm/guest/layout.py and ucall.py: vCPU n's block at UCALL_GPA + n * UCALL_SLOT, reached through GS */
#define UCALL_PORT 0xe0
#define UCALL_GPA  0x3000ull
#define UCALL_SLOT 64ull
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

	fprintf(stderr, "%s: ", program_invocation_short_name);
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

/* vCPU id's ucall block as vmm's runner decodes it: cmd, args beyond nargs zero, real-mode
 * (not UCALL_WIDE) arguments cut to their low 32 bits; dies on a malformed header */
static uint32_t read_ucall(const uint8_t *mem, unsigned id, uint64_t args[6])
{
	struct ucall uc;

	memcpy(&uc, mem + UCALL_GPA + id * UCALL_SLOT, sizeof(uc));
	uint32_t nargs = uc.header >> 8 & 0xff;
	uint64_t mask = uc.header & UCALL_WIDE ? ~0ull : 0xffffffffull;

	if (nargs > 6 || uc.header >> 17)
		die("vCPU %u: bad ucall header %#x", id, uc.header);
	for (unsigned i = 0; i < 6; i++)
		args[i] = i < nargs ? uc.args[i] & mask : 0;
	return uc.header & 0xff;
}

static double now(clockid_t clock)
{
	struct timespec ts;

	clock_gettime(clock, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* GDT: null, 64-bit code, data, 16-byte TSS descriptor (vmm/guest/x86.py) */
static void write_gdt(uint8_t *mem)
{
	uint64_t *gdt = (uint64_t *)(mem + GDT_GPA);

	gdt[0] = 0;
	gdt[1] = 0x00AF9B000000FFFFull;
	gdt[2] = 0x00CF93000000FFFFull;
	gdt[3] = 0x67 | ((TSS_GPA & 0xFFFFFF) << 16) | (0x89ull << 40) | (((TSS_GPA >> 24) & 0xFF) << 56);
	gdt[4] = TSS_GPA >> 32;
}

/* a vCPU in 64-bit mode on the page tables at pml4, flat segments, the supported CPUID, GS at
 * gs_base (its ucall block) */
static void enter_long_mode(int vcpu, struct kvm_cpuid2 *cpuid, uint64_t pml4, uint64_t gs_base)
{
	struct kvm_sregs sregs;

	xioctl(vcpu, KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2");
	xioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
	sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
	sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
	sregs.efer = EFER_LME | EFER_LMA;
	sregs.cr3 = pml4;
	sregs.cs = segment(SEL_CODE, 11, 1, 0);
	sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = segment(SEL_DATA, 3, 0, 0);
	sregs.gs.base = gs_base;
	sregs.tr = segment(SEL_TSS, 11, 0, 1);
	sregs.tr.base = TSS_GPA;
	sregs.tr.limit = 0x67;
	sregs.tr.g = 0;
	sregs.gdt.base = GDT_GPA;
	sregs.gdt.limit = 5 * 8 - 1;
	xioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
}

/* the flat guest image at IMAGE_GPA */
/* a vCPU in 16-bit real mode as vmm/guest/x86.py enter_real_mode: segments at 0, GS at gs_base */
static __attribute__((unused)) void enter_real_mode(int vcpu, uint64_t gs_base)
{
	struct kvm_sregs sregs;
	struct kvm_segment *segs[] = { &sregs.cs, &sregs.ds, &sregs.es, &sregs.fs, &sregs.ss };

	xioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
	for (unsigned i = 0; i < sizeof(segs) / sizeof(segs[0]); i++)
		segs[i]->base = 0, segs[i]->selector = 0;
	sregs.gs.base = gs_base;
	sregs.gs.selector = gs_base >> 4;
	xioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");
}

static void load_image(uint8_t *mem, const char *path)
{
	FILE *f = fopen(path, "rb");

	if (!f)
		die("%s: %s", path, strerror(errno));
	size_t len = fread(mem + IMAGE_GPA, 1, IMAGE_END - IMAGE_GPA, f);
	if (ferror(f) || len == 0 || !feof(f))
		die("%s: unreadable, empty or larger than %#llx bytes", path, IMAGE_END - IMAGE_GPA);
	fclose(f);
}

#endif
