/*
 * hog — the memory hog of the nbdswap VM end-to-end test.
 *
 * Allocates more anonymous memory than the guest has, so the kernel must swap
 * to /dev/nbd0, fills it with 4 KiB pages whose content is a pure function of
 * (page index, generation), and verifies every byte. The mix of page kinds is
 * the one a swap device sees: zero pages, sparse pages (a few non-zero bytes),
 * compressible text, incompressible pseudo-random data. Every non-zero page
 * carries its index, so a block served at the wrong offset is caught too.
 *
 * Round 1 writes and verifies all pages (generation 0). Round 2 rewrites about
 * a quarter of them with generation 1 (a page may change kind, e.g. zero ->
 * random), then verifies everything again: stale data fails the check.
 *
 * Usage: hog [MiB]   (default 256). Last line: "HOG PASS ..." (exit 0) or
 * "HOG FAIL page=... offset=..." (exit 1). Built with gcc -O2 -static.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#define PAGE 4096
#define MAGIC 0x6e62647377617021ULL /* "nbdswap!" */

enum kind { ZERO, SPARSE, TEXT, RANDOM };
static const char *const kind_name[] = {"zero", "sparse", "text", "random"};

static uint64_t mix(uint64_t x) /* splitmix64 finalizer */
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static uint64_t xorshift(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

static uint64_t seed_of(uint64_t idx, unsigned gen)
{
	return mix(idx ^ ((uint64_t)gen << 48) ^ MAGIC) | 1; /* xorshift needs != 0 */
}

/* 1/8 zero, 1/8 sparse, 3/8 text, 3/8 random. */
static enum kind kind_of(uint64_t idx, unsigned gen)
{
	static const enum kind table[8] = {ZERO, SPARSE, TEXT, TEXT, TEXT, RANDOM, RANDOM, RANDOM};
	return table[mix(seed_of(idx, gen)) & 7];
}

/* Write the expected content of page idx at generation gen into p. */
static void fill(uint8_t *p, uint64_t idx, unsigned gen)
{
	static const char *const words[] = {
		"swap ", "page ", "block ", "kernel ", "memory ", "the ", "of ", "nbd ",
		"tier ", "compress ", "cold ", "hot ", "disk ", "ram ", "\n", "42 ",
	};
	uint64_t s = seed_of(idx, gen), stamp = idx ^ MAGIC ^ ((uint64_t)gen << 56);
	size_t off, n;

	switch (kind_of(idx, gen)) {
	case ZERO:
		memset(p, 0, PAGE);
		break;
	case SPARSE:
		memset(p, 0, PAGE);
		memcpy(p + (xorshift(&s) % (PAGE / 8)) * 8, &stamp, 8);
		for (n = 0; n < 3; n++)
			p[xorshift(&s) % PAGE] = (uint8_t)(xorshift(&s) | 1);
		break;
	case TEXT:
		n = (size_t)snprintf((char *)p, PAGE, "page %llu gen %u: ", (unsigned long long)idx, gen);
		for (off = n; off < PAGE; off += n) {
			const char *w = words[xorshift(&s) & 15];
			n = strlen(w);
			if (n > PAGE - off)
				n = PAGE - off;
			memcpy(p + off, w, n);
		}
		break;
	case RANDOM:
		memcpy(p, &stamp, 8);
		for (off = 8; off < PAGE; off += 8) {
			uint64_t r = xorshift(&s);
			memcpy(p + off, &r, 8);
		}
		break;
	}
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Verify all pages; returns the number of bad pages, reports the first few. */
static size_t verify(const uint8_t *mem, const uint8_t *gens, size_t pages, int round,
		     size_t *first_page, size_t *first_off)
{
	static uint8_t want[PAGE];
	size_t bad = 0;

	for (size_t i = 0; i < pages; i++) {
		const uint8_t *got = mem + i * PAGE;
		fill(want, i, gens[i]);
		if (memcmp(got, want, PAGE) == 0)
			continue;
		size_t off = 0;
		while (got[off] == want[off])
			off++;
		if (bad++ < 8)
			printf("HOG MISMATCH round=%d page=%zu offset=%zu kind=%s gen=%u want=0x%02x got=0x%02x\n",
			       round, i, off, kind_name[kind_of(i, gens[i])], gens[i], want[off], got[off]);
		if (bad == 1) {
			*first_page = i;
			*first_off = off;
		}
	}
	fflush(stdout);
	return bad;
}

int main(int argc, char **argv)
{
	long mib = argc > 1 ? strtol(argv[1], NULL, 10) : 256;
	if (mib <= 0) {
		fprintf(stderr, "usage: hog [MiB]\n");
		return 2;
	}
	size_t pages = (size_t)mib * (1024 * 1024 / PAGE), rewritten = 0, bad, bad_page = 0, bad_off = 0;
	uint8_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
			    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	uint8_t *gens = calloc(pages, 1);
	if (mem == MAP_FAILED || !gens) {
		perror("hog: allocation");
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	double t0 = now();
	printf("HOG start mib=%ld pages=%zu\n", mib, pages);

	for (size_t i = 0; i < pages; i++)
		fill(mem + i * PAGE, i, 0);
	printf("HOG round=1 written secs=%.1f\n", now() - t0);
	if ((bad = verify(mem, gens, pages, 1, &bad_page, &bad_off)) != 0)
		goto fail;
	printf("HOG round=1 verified secs=%.1f\n", now() - t0);

	/* Round 2: new generation for ~1/4 of the pages, in a scattered order. */
	for (size_t i = 0; i < pages; i++) {
		size_t j = (i * 40503) % pages; /* 40503 is odd: a permutation for power-of-2 page counts */
		if ((mix(j ^ 0x5bd1e995) & 3) == 0 && gens[j] == 0) {
			gens[j] = 1;
			fill(mem + j * PAGE, j, 1);
			rewritten++;
		}
	}
	printf("HOG round=2 rewritten=%zu secs=%.1f\n", rewritten, now() - t0);
	if ((bad = verify(mem, gens, pages, 2, &bad_page, &bad_off)) != 0)
		goto fail;

	printf("HOG PASS pages=%zu rewritten=%zu mib=%ld secs=%.1f\n", pages, rewritten, mib, now() - t0);
	return 0;
fail:
	printf("HOG FAIL page=%zu offset=%zu bad_pages=%zu secs=%.1f\n", bad_page, bad_off, bad, now() - t0);
	return 1;
}
