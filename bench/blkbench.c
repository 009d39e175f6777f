/* blkbench: block device throughput and per-request latency, run inside the test guest by
 * bench/block.py (built there with gcc -static, handed to the guest on a small disk).
 *
 *   blkbench MODE DEVICE BLOCK_SIZE COUNT
 *
 * MODE is seqread, seqwrite or randread. Every request is one pread/pwrite of BLOCK_SIZE
 * bytes with O_DIRECT, so each goes to the device (no guest page cache, no read-ahead);
 * randread picks block-aligned offsets across the device with a fixed-seed xorshift, so
 * both VMMs see the same offsets. seqwrite ends with fdatasync (a virtio-blk flush), counted
 * in the time. Prints one line:
 *
 *   mode=seqread ops=N bytes=B seconds=S mean_us=M p50_us=P p99_us=Q
 *
 * Times come from CLOCK_MONOTONIC around each request (the guest's clock source).
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static void die(const char *what)
{
	perror(what);
	exit(1);
}

int main(int argc, char **argv)
{
	if (argc != 5) {
		fprintf(stderr, "usage: %s seqread|seqwrite|randread DEVICE BLOCK_SIZE COUNT\n", argv[0]);
		return 2;
	}
	const char *mode = argv[1];
	size_t bs = strtoul(argv[3], NULL, 0);
	long count = strtol(argv[4], NULL, 0);
	int writing = !strcmp(mode, "seqwrite");
	int random = !strcmp(mode, "randread");
	if (!writing && !random && strcmp(mode, "seqread"))
		return 2;

	int fd = open(argv[2], (writing ? O_WRONLY : O_RDONLY) | O_DIRECT);
	if (fd < 0)
		die(argv[2]);
	uint64_t size;
	if (ioctl(fd, BLKGETSIZE64, &size))
		die("BLKGETSIZE64");
	uint64_t blocks = size / bs;
	if (!random && (uint64_t)count > blocks)
		count = blocks;
	void *buf;
	if (posix_memalign(&buf, 4096, bs))
		die("posix_memalign");
	memset(buf, 0x5a, bs);
	double *lat = malloc(count * sizeof(double));
	if (!lat)
		die("malloc");

	uint64_t x = 88172645463325252ULL;
	double start = now();
	for (long i = 0; i < count; i++) {
		uint64_t block = i;
		if (random) {
			x ^= x << 13; x ^= x >> 7; x ^= x << 17;
			block = x % blocks;
		}
		double t = now();
		ssize_t n = writing ? pwrite(fd, buf, bs, block * bs) : pread(fd, buf, bs, block * bs);
		lat[i] = now() - t;
		if (n != (ssize_t)bs)
			die(writing ? "pwrite" : "pread");
	}
	if (writing && fdatasync(fd))
		die("fdatasync");
	double seconds = now() - start;

	qsort(lat, count, sizeof(double), cmp);
	double sum = 0;
	for (long i = 0; i < count; i++)
		sum += lat[i];
	printf("mode=%s ops=%ld bytes=%llu seconds=%.6f mean_us=%.1f p50_us=%.1f p99_us=%.1f\n",
	       mode, count, (unsigned long long)count * bs, seconds, sum / count * 1e6,
	       lat[count / 2] * 1e6, lat[(count * 99) / 100] * 1e6);
	return 0;
}
