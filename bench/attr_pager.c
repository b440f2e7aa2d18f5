/*
 * attr_pager: the C reference for `vmm bench paging` (vmm/tools/bench/paging.py): demand paging on
 * memory attributes without Python in the way. A KVM_X86_SW_PROTECTED_VM gets a memfd memslot at
 * 4 GiB (no guest_memfd) whose attributes are all PRIVATE ("not present"): every first guest
 * access exits with KVM_EXIT_MEMORY_FAULT. A vCPU thread that gets one fetches the faulting unit
 * (4K or 2M) into the memfd with pwrite from an in-memory page source, sets the unit's attributes
 * to shared with KVM_SET_MEMORY_ATTRIBUTES and re-enters; a unit is fetched once (a vCPU faulting
 * on a unit another one is fetching waits for it; a fault on a unit already present re-enters).
 * The guest is guest/build/demand_paging.bin, as in vmm: each vCPU touches (writes) and checks
 * every page of its region; the machine is exit_loop.c's (same GDT, 2M identity page tables).
 *
 * usage: attr_pager GUEST.bin VCPUS PER_VCPU_BYTES FETCH_BYTES
 * prints one JSON line: {"vcpus", "pages", "faults", "fetches", "stale", "seconds", "pages_per_s",
 * "us_per_fault"}: the time from the first KVM_RUN to the last vCPU's DONE.
 *
 * usage: attr_pager --attributes CALLS N...
 * the cost of KVM_SET_MEMORY_ATTRIBUTES as attribute ranges grow: for each N, a fresh 1 GiB
 * memslot gets N private 4K pages 8K apart (2N ranges); one JSON line per N with the mean µs per
 * call while building, the median µs of CALLS single-page flips (a shared gap made private, then
 * shared again), the µs of one call making all 1 GiB shared, and a null ioctl's median
 * (KVM_CHECK_EXTENSION) as the reference.
 * The host's <linux/kvm.h> may predate memory attributes, so their numbers are defined here.
 *     cc -O2 -Wall -Wextra -pthread -o bench/build/attr_pager bench/attr_pager.c   (with bench/kvm_bench.h)
 */
#include "kvm_bench.h"

#define SLOT0_SIZE     (4ull << 20) /* vmm.machine.DEFAULT_MEM_SIZE */

#ifndef KVM_SET_MEMORY_ATTRIBUTES
struct kvm_memory_attributes {
	uint64_t address;
	uint64_t size;
	uint64_t attributes;
	uint64_t flags;
};
#define KVM_SET_MEMORY_ATTRIBUTES _IOW(KVMIO, 0xd2, struct kvm_memory_attributes)
#endif
#define VM_TYPE_SW_PROTECTED 1        /* KVM_X86_SW_PROTECTED_VM */
#define EXIT_MEMORY_FAULT 39          /* KVM_EXIT_MEMORY_FAULT */
#define ATTRIBUTE_PRIVATE (1ull << 3) /* KVM_MEMORY_ATTRIBUTE_PRIVATE */
#define DATA_GPA (1ull << 32)
#define SEED 0x5eedull

static int vm_fd, data_fd, nr_vcpus;
static uint8_t *slot0;
static uint8_t *source;
static uint64_t data_size, fetch;
static uint8_t *present, *inflight; /* one byte per unit */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t fetched = PTHREAD_COND_INITIALIZER;
static uint64_t faults, fetches, stale;

struct vcpu {
	unsigned id;
	int fd;
	struct kvm_run *run;
	pthread_t thread;
};

static void set_attributes(uint64_t gpa, uint64_t size, uint64_t attrs)
{
	struct kvm_memory_attributes a = { .address = gpa, .size = size, .attributes = attrs };

	while (ioctl(vm_fd, KVM_SET_MEMORY_ATTRIBUTES, &a) < 0)
		if (errno != EAGAIN && errno != EINTR)
			die("KVM_SET_MEMORY_ATTRIBUTES: %s", strerror(errno));
}

/* the page-in: fetch once, then make present */
static void page_in(uint64_t gpa)
{
	uint64_t unit = (gpa - DATA_GPA) / fetch, off = unit * fetch;

	pthread_mutex_lock(&lock);
	faults++;
	if (present[unit]) {
		stale++;
		pthread_mutex_unlock(&lock);
		return;
	}
	if (inflight[unit]) {
		while (!present[unit])
			pthread_cond_wait(&fetched, &lock);
		pthread_mutex_unlock(&lock);
		return;
	}
	inflight[unit] = 1;
	pthread_mutex_unlock(&lock);
	if (pwrite(data_fd, source + off, fetch, off) != (ssize_t)fetch)
		die("pwrite: %s", strerror(errno));
	set_attributes(DATA_GPA + off, fetch, 0);
	pthread_mutex_lock(&lock);
	present[unit] = 1;
	inflight[unit] = 0;
	fetches++;
	pthread_cond_broadcast(&fetched);
	pthread_mutex_unlock(&lock);
}

static void *vcpu_loop(void *arg)
{
	struct vcpu *v = arg;
	struct kvm_run *run = v->run;
	uint64_t args[6];

	for (;;) {
		if (ioctl(v->fd, KVM_RUN, 0) < 0) {
			if (errno == EINTR)
				continue;
			if (errno == EFAULT && run->exit_reason == EXIT_MEMORY_FAULT) {
				uint64_t *mf = (uint64_t *)run->padding; /* flags, gpa, size */

				if (mf[1] < DATA_GPA || mf[1] >= DATA_GPA + data_size)
					die("memory fault outside the paged range at %#" PRIx64, mf[1]);
				page_in(mf[1]);
				continue;
			}
			die("KVM_RUN: %s (exit %u)", strerror(errno), run->exit_reason);
		}
		if (run->exit_reason != KVM_EXIT_IO || run->io.port != UCALL_PORT)
			die("unexpected exit %u", run->exit_reason);
		uint32_t cmd = read_ucall(slot0, v->id, args);
		if (cmd == UCALL_DONE)
			return NULL;
		if (cmd != UCALL_SYNC)
			die("guest ucall %u (assert failed? args %#" PRIx64 " %#" PRIx64 ")", cmd, args[3], args[4]);
	}
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static double median(double *v, int n)
{
	qsort(v, n, sizeof(*v), cmp_double);
	return v[n / 2];
}

static int attribute_costs(int argc, char **argv)
{
	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	int calls = atoi(argv[2]);
	uint64_t span = 1ull << 30;

	if (kvm < 0 || calls < 1)
		die("usage: attr_pager --attributes CALLS N... (and /dev/kvm)");
	double *flips = malloc(2 * calls * sizeof(double)), *nulls = malloc(calls * sizeof(double));
	uint8_t *mem = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (!flips || !nulls || mem == MAP_FAILED)
		die("out of memory");
	for (int a = 3; a < argc; a++) {
		uint64_t n = strtoull(argv[a], NULL, 0);
		if (n < 1 || n > span / 8192)
			die("N must be 1 to %" PRIu64, span / 8192);
		vm_fd = xioctl(kvm, KVM_CREATE_VM, (void *)(uintptr_t)VM_TYPE_SW_PROTECTED, "KVM_CREATE_VM");
		struct kvm_userspace_memory_region r = {
			.slot = 0, .guest_phys_addr = DATA_GPA, .memory_size = span, .userspace_addr = (uintptr_t)mem,
		};
		xioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r, "KVM_SET_USER_MEMORY_REGION");
		double t0 = now(CLOCK_MONOTONIC);
		for (uint64_t i = 0; i < n; i++)
			set_attributes(DATA_GPA + 2 * i * 4096, 4096, ATTRIBUTE_PRIVATE);
		double build = (now(CLOCK_MONOTONIC) - t0) / n;
		for (int k = 0; k < calls; k++) {
			uint64_t gpa = DATA_GPA + (2 * ((uint64_t)k * 7919 % n) + 1) * 4096;
			double t1 = now(CLOCK_MONOTONIC);
			set_attributes(gpa, 4096, ATTRIBUTE_PRIVATE);
			double t2 = now(CLOCK_MONOTONIC);
			set_attributes(gpa, 4096, 0);
			double t3 = now(CLOCK_MONOTONIC);
			ioctl(vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_USER_MEMORY);
			double t4 = now(CLOCK_MONOTONIC);
			flips[2 * k] = t2 - t1;
			flips[2 * k + 1] = t3 - t2;
			nulls[k] = t4 - t3;
		}
		double t5 = now(CLOCK_MONOTONIC);
		set_attributes(DATA_GPA, span, 0);
		double clear = now(CLOCK_MONOTONIC) - t5;
		printf("{\"ranges\": %" PRIu64 ", \"private_pages\": %" PRIu64 ", \"us_per_call_building\": %.3f, "
		       "\"us_per_call\": %.3f, \"us_clear_1g\": %.3f, \"us_null_ioctl\": %.3f}\n",
		       2 * n, n, build * 1e6, median(flips, 2 * calls) * 1e6, clear * 1e6, median(nulls, calls) * 1e6);
		fflush(stdout);
		close(vm_fd);
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc > 3 && !strcmp(argv[1], "--attributes"))
		return attribute_costs(argc, argv);
	if (argc != 5) {
		fprintf(stderr, "usage: %s GUEST.bin VCPUS PER_VCPU_BYTES FETCH_BYTES\n", argv[0]);
		return 2;
	}
	nr_vcpus = atoi(argv[2]);
	uint64_t per = strtoull(argv[3], NULL, 0);
	fetch = strtoull(argv[4], NULL, 0);
	data_size = per * nr_vcpus;
	if (nr_vcpus < 1 || nr_vcpus > 64 || (fetch != 4096 && fetch != HUGE_PAGE_SIZE) || !per || per % fetch ||
	    data_size > (1ull << 30))
		die("bad arguments: 1-64 vCPUs, fetch 4096 or 2M, regions whole fetch units, 1 GiB at most");

	int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm: %s", strerror(errno));
	vm_fd = xioctl(kvm, KVM_CREATE_VM, (void *)(uintptr_t)VM_TYPE_SW_PROTECTED, "KVM_CREATE_VM(SW_PROTECTED)");

	int memfd = memfd_create("attr_pager", MFD_CLOEXEC);
	if (memfd < 0 || ftruncate(memfd, SLOT0_SIZE) < 0)
		die("memfd: %s", strerror(errno));
	slot0 = mmap(NULL, SLOT0_SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
	data_fd = memfd_create("attr_pager-data", MFD_CLOEXEC);
	if (data_fd < 0 || ftruncate(data_fd, data_size) < 0)
		die("memfd: %s", strerror(errno));
	uint8_t *data = mmap(NULL, data_size, PROT_READ | PROT_WRITE, MAP_SHARED, data_fd, 0);
	if (slot0 == MAP_FAILED || data == MAP_FAILED)
		die("mmap guest memory: %s", strerror(errno));
	struct kvm_userspace_memory_region r0 = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = SLOT0_SIZE, .userspace_addr = (uintptr_t)slot0,
	};
	struct kvm_userspace_memory_region r1 = {
		.slot = 1, .guest_phys_addr = DATA_GPA, .memory_size = data_size, .userspace_addr = (uintptr_t)data,
	};
	xioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r0, "KVM_SET_USER_MEMORY_REGION");
	xioctl(vm_fd, KVM_SET_USER_MEMORY_REGION, &r1, "KVM_SET_USER_MEMORY_REGION");

	/* the page source: vmm.guest.demand.pattern's checked u64s, 0xab elsewhere */
	source = malloc(data_size);
	present = calloc(data_size / fetch, 1);
	inflight = calloc(data_size / fetch, 1);
	if (!source || !present || !inflight)
		die("out of memory");
	memset(source, 0xab, data_size);
	for (uint64_t off = 0; off < data_size; off += 4096) {
		((uint64_t *)(source + off))[0] = (DATA_GPA + off) ^ SEED;
		((uint64_t *)(source + off))[511] = (DATA_GPA + off + 0xff8) ^ SEED;
	}
	set_attributes(DATA_GPA, data_size, ATTRIBUTE_PRIVATE);

	load_image(slot0, argv[1]);
	write_gdt(slot0);

	/* PML4 -> PDPT; PDPT[0] -> PD of slot 0, PDPT[4] -> PD of the data slot (2M leaves) */
	uint64_t pml4 = SYSTEM_GPA, pdpt = pml4 + 4096, pd0 = pdpt + 4096, pd4 = pd0 + 4096;
	((uint64_t *)(slot0 + pml4))[0] = pdpt | PTE_PRESENT | PTE_WRITE;
	((uint64_t *)(slot0 + pdpt))[0] = pd0 | PTE_PRESENT | PTE_WRITE;
	((uint64_t *)(slot0 + pdpt))[4] = pd4 | PTE_PRESENT | PTE_WRITE;
	for (uint64_t a = 0; a < SLOT0_SIZE; a += HUGE_PAGE_SIZE)
		((uint64_t *)(slot0 + pd0))[a / HUGE_PAGE_SIZE] = a | PTE_PRESENT | PTE_WRITE | PTE_LARGE;
	for (uint64_t a = 0; a < data_size; a += HUGE_PAGE_SIZE)
		((uint64_t *)(slot0 + pd4))[a / HUGE_PAGE_SIZE] = (DATA_GPA + a) | PTE_PRESENT | PTE_WRITE | PTE_LARGE;

	/* the guest's parameter block (vmm.guest.demand.params_gpa / write_params) */
	uint64_t params = SLOT0_SIZE - 2 * 4096;
	uint64_t block[6] = { DATA_GPA, per, SEED, 0 /* SWEEP */, 1 /* write */, 1 /* check */ };
	memcpy(slot0 + params, block, sizeof(block));

	int run_size = xioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE");
	struct kvm_cpuid2 *cpuid = supported_cpuid(kvm);
	struct vcpu *vcpus = calloc(nr_vcpus, sizeof(*vcpus));
	for (int i = 0; i < nr_vcpus; i++) {
		struct vcpu *v = &vcpus[i];

		v->id = i;
		v->fd = xioctl(vm_fd, KVM_CREATE_VCPU, (void *)(uintptr_t)i, "KVM_CREATE_VCPU");
		v->run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
		if (v->run == MAP_FAILED)
			die("mmap kvm_run: %s", strerror(errno));
		enter_long_mode(v->fd, cpuid, pml4, UCALL_GPA + i * UCALL_SLOT);
		uint64_t stack_top = pd4 + 4096 + (i + 1) * STACK_SIZE;
		struct kvm_regs regs = {
			.rip = IMAGE_GPA, .rsp = stack_top, .rflags = 0x2, .rdi = i, .rsi = nr_vcpus,
			.rdx = pd4 + 4096 + nr_vcpus * STACK_SIZE, .rcx = params, .r8 = SLOT0_SIZE,
		};
		xioctl(v->fd, KVM_SET_REGS, &regs, "KVM_SET_REGS");
	}
	free(cpuid);

	double start = now(CLOCK_MONOTONIC);
	for (int i = 0; i < nr_vcpus; i++)
		if (pthread_create(&vcpus[i].thread, NULL, vcpu_loop, &vcpus[i]))
			die("pthread_create failed");
	for (int i = 0; i < nr_vcpus; i++)
		pthread_join(vcpus[i].thread, NULL);
	double seconds = now(CLOCK_MONOTONIC) - start;

	if (fetches != data_size / fetch)
		die("%" PRIu64 " fetches, expected %" PRIu64, fetches, data_size / fetch);
	if (memcmp(data, source, data_size))
		die("guest memory differs from the page source");
	uint64_t pages = data_size / 4096;
	printf("{\"vcpus\": %d, \"pages\": %" PRIu64 ", \"faults\": %" PRIu64 ", \"fetches\": %" PRIu64
	       ", \"stale\": %" PRIu64 ", \"seconds\": %.6f, \"pages_per_s\": %.1f, \"us_per_fault\": %.3f}\n",
	       nr_vcpus, pages, faults, fetches, stale, seconds, pages / seconds,
	       seconds * 1e6 * nr_vcpus / (faults ? faults : 1));
	return 0;
}
