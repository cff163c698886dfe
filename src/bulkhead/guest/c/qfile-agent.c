/* qfile-agent FILE...: the sending end of qvm-copy.
 *
 * Run by qrexec-client-vm with stdout to the target's qubes.Filecopy and stdin
 * its status line.  Writes FILE... (directories recursively) in the file-copy
 * stream that bulkhead_guest/filecopy.py documents and unpacks:
 *
 *     MAGIC "BHFC1\n"
 *     entry:  u8 type (F file, D dir, L symlink) | u16 name length | u32 mode |
 *             u64 size (file data, or symlink target) | name | data
 *     end:    "E"
 *
 * then waits for the target's status ("OK" or what it refused).  C, as Qubes'
 * own qfile-agent, for the reason qrexec-client-vm.c gives: a Python start is
 * most of a small copy under TCG.  This end trusts nothing it reads either: the
 * target's status is printed with its escape characters made harmless.
 *
 * A file's bytes go by splice into the pipe the agent reads (the page cache's
 * pages themselves, up to the pipe's 1 MiB at once, so the agent wakes once a
 * MiB), else sendfile, else read and write.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAGIC "BHFC1\n"
#define MAX_NAME 4096          /* the receiver's limits (filecopy.MAX_NAME) */
#define SEND_MAX (1 << 20)     /* one splice: the pipe's size, as the agent widens it */
#define STATUS_MAX 8192

static char out_buf[65536];    /* entries' headers, names and link targets */
static size_t out_len;
static int target_gone;        /* the target stopped reading: its status says why */

static void fail(const char *path, const char *what)
{
    fprintf(stderr, "qvm-copy: %s: %s\n", path, what);
    exit(1);
}

static void flush_out(void)
{
    size_t done = 0;
    while (done < out_len && !target_gone) {
        ssize_t n = write(1, out_buf + done, out_len - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EPIPE)
            target_gone = 1;
        else if (n < 0)
            fail("writing to the target", strerror(errno));
        else
            done += (size_t)n;
    }
    out_len = 0;
}

static void put(const void *data, size_t len)
{
    if (out_len + len > sizeof out_buf)
        flush_out();
    if (len > sizeof out_buf) {   /* never: names and link targets are <= MAX_NAME */
        fail("an entry", "too long");
    }
    memcpy(out_buf + out_len, data, len);
    out_len += len;
}

static void put_le(uint64_t value, int bytes)
{
    uint8_t b[8];
    for (int k = 0; k < bytes; k++)
        b[k] = (uint8_t)(value >> (8 * k));
    put(b, (size_t)bytes);
}

static void entry(char kind, const char *name, mode_t mode, uint64_t size)
{
    size_t len = strlen(name);
    if (len > MAX_NAME)
        fail(name, "a name longer than the 4096 bytes the target takes");
    put(&kind, 1);
    put_le(len, 2);
    put_le(mode & 0777, 4);
    put_le(size, 8);
    put(name, len);
}

/* size bytes of in_fd to stdout; returns without error if the target went away. */
static void send_content(int in_fd, uint64_t size, const char *path)
{
    enum { SPLICE, SENDFILE, COPY } how = SPLICE;
    while (size && !target_gone) {
        size_t want = size < SEND_MAX ? (size_t)size : SEND_MAX;
        ssize_t n;
        if (how == SPLICE)
            n = splice(in_fd, NULL, 1, NULL, want, SPLICE_F_MORE);
        else if (how == SENDFILE)
            n = sendfile(1, in_fd, NULL, want);
        else {
            /* Through the entries' buffer and writer: empty here (flushed before). */
            n = read(in_fd, out_buf, want < sizeof out_buf ? want : sizeof out_buf);
            if (n > 0) {
                out_len = (size_t)n;
                flush_out();
            }
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EINVAL || errno == ENOSYS) && how != COPY) {
            how = how == SPLICE ? SENDFILE : COPY;   /* stdout not a pipe (a test's file) */
            continue;
        }
        if (n < 0 && errno == EPIPE) {
            target_gone = 1;
            return;
        }
        if (n < 0)
            fail(path, strerror(errno));
        if (n == 0)
            fail(path, "it shrank while being sent");
        size -= (uint64_t)n;
    }
}

static int by_name(const struct dirent **a, const struct dirent **b)
{
    return strcmp((*a)->d_name, (*b)->d_name);
}

static void send_one(const char *path, const char *name)
{
    struct stat st;
    if (target_gone)
        return;
    if (lstat(path, &st) < 0)
        fail(path, strerror(errno));
    if (S_ISLNK(st.st_mode)) {
        char link[MAX_NAME + 1];
        ssize_t n = readlink(path, link, sizeof link);
        if (n < 0)
            fail(path, strerror(errno));
        if (n > MAX_NAME)
            fail(path, "a symlink target longer than the 4096 bytes the target takes");
        entry('L', name, 0777, (uint64_t)n);
        put(link, (size_t)n);
    } else if (S_ISDIR(st.st_mode)) {
        struct dirent **children;
        entry('D', name, st.st_mode, 0);
        int count = scandir(path, &children, NULL, by_name);
        if (count < 0)
            fail(path, strerror(errno));
        for (int k = 0; k < count; k++) {
            const char *child = children[k]->d_name;
            if (strcmp(child, ".") && strcmp(child, "..")) {
                char *child_path, *child_name;
                if (asprintf(&child_path, "%s/%s", path, child) < 0 ||
                    asprintf(&child_name, "%s/%s", name, child) < 0)
                    fail(path, "out of memory");
                send_one(child_path, child_name);
                free(child_path);
                free(child_name);
            }
            free(children[k]);
        }
        free(children);
    } else if (S_ISREG(st.st_mode)) {
        int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0)
            fail(path, strerror(errno));
        if (fstat(fd, &st) < 0)
            fail(path, strerror(errno));
        if (!S_ISREG(st.st_mode))
            fail(path, "it changed while being sent");
        entry('F', name, st.st_mode, (uint64_t)st.st_size);
        flush_out();
        send_content(fd, (uint64_t)st.st_size, path);
        close(fd);
    } else {
        fail(path, "not a regular file, directory or symlink");
    }
}

/* The name a FILE argument is sent under: its last component (of the real path, for
 * "." and ".."). */
static char *name_of(const char *path)
{
    char *copy = strdup(path);
    if (!copy)
        fail(path, "out of memory");
    size_t len = strlen(copy);
    while (len > 1 && copy[len - 1] == '/')
        copy[--len] = '\0';
    char *base = strrchr(copy, '/');
    base = base ? base + 1 : copy;
    if (!*base || !strcmp(base, ".") || !strcmp(base, "..")) {
        char *real = realpath(path, NULL);
        if (!real)
            fail(path, strerror(errno));
        free(copy);
        copy = real;
        base = strrchr(copy, '/');
        base = base ? base + 1 : copy;
        if (!*base)
            fail(path, "the root folder cannot be sent by name");
    }
    return base;   /* inside copy, kept till the end */
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fputs("usage: qfile-agent FILE...\n", stderr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);   /* a target that stops reading: EPIPE, then its status */
    fcntl(1, F_SETPIPE_SZ, SEND_MAX);   /* fails on a non-pipe: a smaller pipe only costs turns */
    put(MAGIC, strlen(MAGIC));
    for (int k = 1; k < argc; k++)
        send_one(argv[k], name_of(argv[k]));
    put("E", 1);
    flush_out();
    close(1);

    char status[STATUS_MAX + 1];
    size_t have = 0;
    for (;;) {
        ssize_t n = read(0, status + have, STATUS_MAX - have);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0 || (have += (size_t)n) == STATUS_MAX)
            break;
    }
    while (have && (status[have - 1] == '\n' || status[have - 1] == ' ' ||
                    status[have - 1] == '\r' || status[have - 1] == '\t'))
        have--;
    if (have == 2 && !memcmp(status, "OK", 2))
        return 0;
    for (size_t k = 0; k < have; k++) {   /* another qube's words: no escapes */
        unsigned char c = (unsigned char)status[k];
        if (c < 32 || c == 127)
            status[k] = '_';
    }
    status[have] = '\0';
    fprintf(stderr, "qvm-copy: the target refused the transfer: %s\n",
            have ? status : "no answer (refused by policy, or it failed)");
    return 1;
}
