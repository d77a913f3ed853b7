/*
 * bench/flushclose.c: an LD_PRELOAD library that makes a program flush every regular file
 * it wrote to stable storage (fsync) as it closes it, through close() or fclose().
 *
 * bench/store.py runs DCMTK storescp under it ("storescp-fsync"): a C++ SCP that pays
 * one flush per received object, the cost dicomagent pays with storage.fsync on: the
 * file's data and size, and its directory entry where the file system's fsync writes a
 * new file's entry too (ext4 without a journal does). Each flush is counted in the file named by FLUSHCLOSE_COUNT (if set), so the
 * benchmark can check that the flushes happened.
 *
 * Built by bench/store.py: gcc -O2 -shared -fPIC -o flushclose.so flushclose.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static int count_fd = -2;        /* -2: not opened yet; -1: no counting */
static uint64_t flushed;

static int written_regular_file(int fd)
{
    struct stat st;
    int flags = fcntl(fd, F_GETFL);
    return flags >= 0 && (flags & O_ACCMODE) != O_RDONLY
           && fstat(fd, &st) == 0 && S_ISREG(st.st_mode);
}

static void flush(int fd)
{
    if (fd == count_fd || fsync(fd) != 0)
        return;
    flushed++;
    if (count_fd == -2) {
        const char *path = getenv("FLUSHCLOSE_COUNT");
        count_fd = path ? open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644) : -1;
    }
    if (count_fd >= 0) {
        char text[32];
        int length = snprintf(text, sizeof text, "%020llu\n", (unsigned long long) flushed);
        if (pwrite(count_fd, text, (size_t) length, 0) != length)
            count_fd = -1;
    }
}

int close(int fd)
{
    static int (*real_close)(int);
    if (!real_close)
        real_close = (int (*)(int)) dlsym(RTLD_NEXT, "close");
    if (fd >= 0 && written_regular_file(fd))
        flush(fd);
    return real_close(fd);
}

int fclose(FILE *stream)
{
    static int (*real_fclose)(FILE *);
    if (!real_fclose)
        real_fclose = (int (*)(FILE *)) dlsym(RTLD_NEXT, "fclose");
    int fd = fileno(stream);
    if (fd >= 0 && written_regular_file(fd)) {
        fflush(stream);
        flush(fd);
    }
    return real_fclose(stream);
}
