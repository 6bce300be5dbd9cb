/* xmig test-guest workload: dirties memory, writes checkable disk records and/or counts,
 * and prints one progress line per report interval on stdout (the serial console):
 *
 *   XMIG counter=C up_ms=T mem_pass=P mem_pages=N disk_seq=S cpu=K
 *
 * counter grows by one per work unit (a page dirtied, a disk record written, a block of
 * 4096 CPU iterations); disk_seq is the number of records the device has acknowledged.
 * Arguments are key=value (the init script passes the kernel's xmig.* parameters):
 *   workload=mem|disk|cpu|memdisk|idle  mem_mb=64  mem_rate=0 (MiB/s dirtied, 0 = flat out)
 *   disk=/dev/vda  disk_bs=4096 (record bytes, multiple of 512)  disk_mb=0 (area, 0 = all)
 *   disk_rate=0 (MiB/s, 0 = flat out)  report_ms=200  mem_fill=0 (1: rewrite whole pages)
 * Disk record k (bytes disk_bs, at offset (k mod records) * disk_bs, O_DIRECT) holds 64-bit
 * little-endian words: "XMIGREC1", k, disk_bs, then mix(k << 24 | i) for word i >= 3.
 * Memory: mem_mb MiB filled with mix(...) once (incompressible), then every pass rewrites
 * one 64-byte line per 4 KiB page, or with mem_fill=1 the whole page (a writer whose
 * dirtying costs CPU time, as a database's page writes do: a CPU quota then slows it).
 * Built static by xmig/guest/qemu/image.py. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define CHUNK_PAGES 64

static volatile uint64_t sink; /* keeps the CPU loop's result live */

static uint64_t mix(uint64_t x) { /* splitmix64 finaliser */
    x += 0x9E3779B97F4A7C15ULL;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static const char *arg(int argc, char **argv, const char *key, const char *dflt) {
    size_t n = strlen(key);
    for (int i = 1; i < argc; i++)
        if (strncmp(argv[i], key, n) == 0 && argv[i][n] == '=') return argv[i] + n + 1;
    return dflt;
}

/* Work allowed by a rate limit at time t; a backlog is capped at 0.1 s of work. */
static int behind(double rate, double t0, double t, uint64_t *done_units, double unit) {
    if (rate <= 0) return 1;
    double allowed = rate * (t - t0) / unit;
    double floor_ = allowed - rate * 0.1 / unit;
    if ((double)*done_units < floor_) *done_units = (uint64_t)floor_;
    return (double)*done_units < allowed;
}

int main(int argc, char **argv) {
    const char *wl = arg(argc, argv, "workload", "idle");
    int do_mem = !strcmp(wl, "mem") || !strcmp(wl, "memdisk");
    int do_disk = !strcmp(wl, "disk") || !strcmp(wl, "memdisk");
    int do_cpu = !strcmp(wl, "cpu");
    uint64_t mem_pages = (uint64_t)atol(arg(argc, argv, "mem_mb", "64")) * (1 << 20) / PAGE;
    double mem_rate = atof(arg(argc, argv, "mem_rate", "0")) * (1 << 20);
    int words = atoi(arg(argc, argv, "mem_fill", "0")) ? PAGE / 8 : 8;
    const char *disk = arg(argc, argv, "disk", "/dev/vda");
    uint64_t bs = (uint64_t)atol(arg(argc, argv, "disk_bs", "4096"));
    uint64_t disk_mb = (uint64_t)atol(arg(argc, argv, "disk_mb", "0"));
    double disk_rate = atof(arg(argc, argv, "disk_rate", "0")) * (1 << 20);
    double report_s = atof(arg(argc, argv, "report_ms", "200")) / 1000.0;
    setvbuf(stdout, NULL, _IOLBF, 0);

    unsigned char *mem = NULL;
    if (do_mem && mem_pages) {
        mem = mmap(NULL, mem_pages * PAGE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        if (mem == MAP_FAILED) { printf("XMIG error mmap %lu pages\n", (unsigned long)mem_pages); return 1; }
        uint64_t *w = (uint64_t *)mem;
        for (uint64_t i = 0; i < mem_pages * (PAGE / 8); i++) w[i] = mix(i);
    } else do_mem = 0;

    int fd = -1;
    uint64_t nrec = 0;
    uint64_t *rec = NULL;
    if (do_disk) {
        if (bs < 512 || bs % 512) { printf("XMIG error disk_bs %lu\n", (unsigned long)bs); return 1; }
        fd = open(disk, O_WRONLY | O_DIRECT);
        if (fd < 0) { printf("XMIG error open %s\n", disk); return 1; }
        off_t size = lseek(fd, 0, SEEK_END);
        if (disk_mb && (off_t)(disk_mb << 20) < size) size = (off_t)(disk_mb << 20);
        nrec = (uint64_t)size / bs;
        if (!nrec || posix_memalign((void **)&rec, PAGE, bs)) { printf("XMIG error disk size\n"); return 1; }
    }
    printf("XMIG start workload=%s mem_pages=%lu disk_records=%lu disk_bs=%lu\n", wl,
           (unsigned long)(do_mem ? mem_pages : 0), (unsigned long)nrec, (unsigned long)bs);

    uint64_t counter = 0, pass = 1, page = 0, pages_done = 0, seq = 0, cpu = 0, acc = 1;
    uint64_t mem_units = 0, disk_units = 0;
    double t0 = now_s(), next_report = t0;
    for (;;) {
        double t = now_s();
        if (t >= next_report) {
            printf("XMIG counter=%lu up_ms=%lu mem_pass=%lu mem_pages=%lu disk_seq=%lu cpu=%lu\n",
                   (unsigned long)counter, (unsigned long)(t * 1000), (unsigned long)pass,
                   (unsigned long)pages_done, (unsigned long)seq, (unsigned long)cpu);
            next_report = t + report_s;
        }
        int worked = 0;
        if (do_mem && behind(mem_rate, t0, t, &mem_units, (double)CHUNK_PAGES * PAGE)) {
            for (int k = 0; k < CHUNK_PAGES; k++) {
                uint64_t *line = (uint64_t *)(mem + page * PAGE + (words == 8 ? (pass % 64) * 64 : 0));
                for (int j = 0; j < words; j++) line[j] = mix(pass << 40 ^ page << 8 ^ (uint64_t)j);
                if (++page == mem_pages) { page = 0; pass++; }
            }
            pages_done += CHUNK_PAGES;
            counter += CHUNK_PAGES;
            mem_units++;
            worked = 1;
        }
        if (do_disk && behind(disk_rate, t0, t, &disk_units, (double)bs)) {
            rec[0] = 0x3143455247494D58ULL; /* "XMIGREC1" */
            rec[1] = seq;
            rec[2] = bs;
            for (uint64_t i = 3; i < bs / 8; i++) rec[i] = mix(seq << 24 | i);
            if (pwrite(fd, rec, bs, (off_t)((seq % nrec) * bs)) != (ssize_t)bs) {
                printf("XMIG error pwrite seq=%lu\n", (unsigned long)seq);
                return 1;
            }
            seq++;
            counter++;
            disk_units++;
            worked = 1;
        }
        if (do_cpu) {
            for (int k = 0; k < 4096; k++) acc = mix(acc);
            cpu++;
            counter++;
            sink = acc;
            worked = 1;
        }
        if (!worked) {
            double wake = next_report, due;
            if (do_mem && mem_rate > 0) {
                due = t0 + (double)mem_units * CHUNK_PAGES * PAGE / mem_rate;
                if (due < wake) wake = due;
            }
            if (do_disk && disk_rate > 0) {
                due = t0 + (double)disk_units * (double)bs / disk_rate;
                if (due < wake) wake = due;
            }
            double d = wake - t;
            if (d > 0) {
                struct timespec ts = {(time_t)d, (long)((d - (double)(time_t)d) * 1e9)};
                nanosleep(&ts, NULL);
            }
        }
    }
}
