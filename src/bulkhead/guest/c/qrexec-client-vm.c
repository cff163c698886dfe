/* qrexec-client-vm: call a qrexec service in another qube, as Qubes' tool of that name.
 *
 *     qrexec-client-vm [options] TARGET SERVICE[+ARG] [LOCAL_PROGRAM [ARG...]]
 *
 * Without LOCAL_PROGRAM, this program's stdin goes to the service and the
 * service's stdout and stderr come out here.  With it, LOCAL_PROGRAM runs with
 * its stdin fed by the service's stdout and its stdout fed to the service's
 * stdin (its stderr stays ours).  dom0's policy decides whether the call goes
 * ahead; a refused call prints why and exits 126.  The exit code is the
 * service's (or LOCAL_PROGRAM's, if that failed).
 *
 * Why C in a Python project: this program starts once per call, and under TCG
 * a Python start costs 0.2-0.45 s, most of a small qvm-copy.  It does little:
 * it hands its three descriptors to the guest agent (bulkhead_guest/caller.py
 * documents the socket's protocol) and waits for the agent's answer; the agent
 * does the rest, and checks the request.  Statically linked: no dynamic loader
 * at each start, and no dependence on the template's libc matching the host's
 * that compiled it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define AGENT_SOCKET "/run/bulkhead/qrexec-agent.sock"
/* Longer than any request the agent takes (protocol.PAYLOAD_LIMIT[CALL]):
 * the agent answers a longer one with its own error. */
#define REQUEST_MAX 1024
#define ANSWER_MAX 4096

/* The pipe ends this program made for the agent: closed once the agent has its own
 * copies (else they would hold the pipes open), and in each child we fork. */
static int owned[4];
static int n_owned;

static void close_owned(int except)
{
    for (int k = 0; k < n_owned; k++)
        if (owned[k] != except)
            close(owned[k]);
}

static const char usage_text[] =
    "usage: qrexec-client-vm [options] TARGET SERVICE[+ARG] [LOCAL_PROGRAM [ARG...]]\n"
    "Options: -t/--filter-escape-chars-stdout, -T/--filter-escape-chars-stderr (escape\n"
    "characters in the service's output become \"_\"), --no-filter-escape-chars-stdout,\n"
    "--no-filter-escape-chars-stderr, --buffer-size=N (accepted for Qubes' compatibility).\n";

static void usage(const char *message)
{
    fprintf(stderr, "qrexec-client-vm: %s\n%s", message, usage_text);
    exit(2);
}

/* The whole of a write, or -1. */
static int write_all(int fd, const char *buf, size_t len)
{
    while (len) {
        ssize_t n = write(fd, buf, len);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Escape characters (control bytes but tab and newline, and DEL) as "_", as Qubes'
 * --filter-escape-chars-* do, so a service's output cannot drive our terminal. */
static void filter(char *buf, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)buf[i];
        if ((c < 32 && c != '\t' && c != '\n') || c == 127)
            buf[i] = '_';
    }
}

/* A pipe whose reading end a child copies, filtered, to fd; returns its writing end
 * and the child's pid in *pid. */
static int filtering_pipe(int fd, pid_t *pid)
{
    int p[2];
    if (pipe(p) < 0) {
        perror("qrexec-client-vm: pipe");
        exit(126);
    }
    *pid = fork();
    if (*pid < 0) {
        perror("qrexec-client-vm: fork");
        exit(126);
    }
    if (*pid == 0) {
        char buf[65536];
        close(p[1]);
        close_owned(fd);
        for (;;) {
            ssize_t n = read(p[0], buf, sizeof buf);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0)
                _exit(0);
            filter(buf, (size_t)n);
            if (write_all(fd, buf, (size_t)n) < 0)
                _exit(1);
        }
    }
    close(p[0]);
    owned[n_owned++] = p[1];
    return p[1];
}

/* Fork LOCAL_PROGRAM with its stdin and stdout on pipes; fds[0] reads what it writes
 * (the call's input), fds[1] writes what it reads (the service's output). */
static pid_t start_local(char **argv, int fds[2])
{
    int to_local[2], from_local[2];
    if (pipe(to_local) < 0 || pipe(from_local) < 0) {
        perror("qrexec-client-vm: pipe");
        exit(126);
    }
    pid_t pid = fork();
    if (pid < 0) {
        perror("qrexec-client-vm: fork");
        exit(126);
    }
    if (pid == 0) {
        dup2(to_local[0], 0);
        dup2(from_local[1], 1);
        close(to_local[0]);
        close(to_local[1]);
        close(from_local[0]);
        close(from_local[1]);
        execvp(argv[0], argv);
        fprintf(stderr, "qrexec-client-vm: cannot run %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    close(to_local[0]);
    close(from_local[1]);
    fds[0] = from_local[0];
    fds[1] = to_local[1];
    owned[n_owned++] = fds[0];
    owned[n_owned++] = fds[1];
    return pid;
}

/* Connect to the agent and send the request with fds[0..2] attached. */
static int send_request(const char *request, size_t len, const int fds[3])
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strcpy(addr.sun_path, AGENT_SOCKET);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&addr, sizeof addr) < 0)
        goto fail;
    union {
        char buf[CMSG_SPACE(3 * sizeof(int))];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = {.iov_base = (void *)request, .iov_len = len};
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1,
        .msg_control = control.buf, .msg_controllen = sizeof control.buf,
    };
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(3 * sizeof(int));
    memcpy(CMSG_DATA(cmsg), fds, 3 * sizeof(int));
    ssize_t n;
    do
        n = sendmsg(s, &msg, 0);
    while (n < 0 && errno == EINTR);
    if (n == (ssize_t)len)
        return s;
fail:
    fprintf(stderr, "qrexec-client-vm: cannot reach the qrexec agent (%s): %s\n",
            AGENT_SOCKET, strerror(errno));
    exit(126);
}

/* Read the agent's answer: "E" + message + "\n" for each error, printed here, then
 * "X" + the exit code (i32, little endian).  126 if the agent never says. */
static int32_t read_answer(int s)
{
    char buf[ANSWER_MAX];
    size_t have = 0;
    int32_t code = 126;
    for (;;) {
        ssize_t n = read(s, buf + have, sizeof buf - have);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return code;
        have += (size_t)n;
        size_t used = 0;
        for (;;) {
            char *start = buf + used;
            size_t left = have - used;
            char *nl;
            if (left >= 1 && start[0] == 'E' && (nl = memchr(start, '\n', left))) {
                filter(start + 1, (size_t)(nl - start - 1));
                fprintf(stderr, "qrexec-client-vm: %.*s\n", (int)(nl - start - 1), start + 1);
                used += (size_t)(nl - start) + 1;
            } else if (left >= 5 && start[0] == 'X') {
                uint8_t *b = (uint8_t *)start + 1;
                code = (int32_t)((uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 |
                                 (uint32_t)b[3] << 24);
                used += 5;
            } else {
                break;
            }
        }
        memmove(buf, buf + used, have - used);
        have -= used;
        if (have == sizeof buf)
            have = 0;   /* an error line longer than the agent ever sends: drop it */
    }
}

int main(int argc, char **argv)
{
    int filt_out = 0, filt_err = 0;
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        const char *opt = argv[i];
        if (!strcmp(opt, "--")) {
            i++;
            break;
        } else if (!strcmp(opt, "-h") || !strcmp(opt, "--help")) {
            fputs(usage_text, stdout);
            return 0;
        } else if (!strncmp(opt, "--buffer-size", 13)) {
            if (!strchr(opt, '=') && i + 1 < argc)
                i++;
        } else if (!strcmp(opt, "-t") || !strcmp(opt, "--filter-escape-chars-stdout")) {
            filt_out = 1;
        } else if (!strcmp(opt, "-T") || !strcmp(opt, "--filter-escape-chars-stderr")) {
            filt_err = 1;
        } else if (!strcmp(opt, "--no-filter-escape-chars-stdout")) {
            filt_out = 0;
        } else if (!strcmp(opt, "--no-filter-escape-chars-stderr")) {
            filt_err = 0;
        } else {
            char message[128];
            snprintf(message, sizeof message, "unknown option %.64s", opt);
            usage(message);
        }
    }
    if (argc - i < 2)
        usage("TARGET and SERVICE are needed");
    const char *target = argv[i], *service = argv[i + 1];
    char **local = argc - i > 2 ? argv + i + 2 : NULL;

    char request[REQUEST_MAX];
    size_t tlen = strlen(target), slen = strlen(service);
    if (tlen + 1 + slen > sizeof request)
        usage("TARGET and SERVICE are too long");
    memcpy(request, target, tlen);
    request[tlen] = '\0';
    memcpy(request + tlen + 1, service, slen);

    int fds[3] = {0, 1, 2};
    pid_t child = -1, filters[2] = {-1, -1};
    if (local)
        child = start_local(local, fds);
    if (filt_out)
        fds[1] = filtering_pipe(fds[1], &filters[0]);
    if (filt_err)
        fds[2] = filtering_pipe(2, &filters[1]);

    int s = send_request(request, tlen + 1 + slen, fds);
    close_owned(-1);   /* the agent has its own copies now */
    int32_t code = read_answer(s);
    close(s);
    for (int f = 0; f < 2; f++)   /* their output ends once the agent lets go */
        if (filters[f] > 0)
            waitpid(filters[f], NULL, 0);
    if (child > 0) {
        int status;
        while (waitpid(child, &status, 0) < 0 && errno == EINTR)
            ;
        int local_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        if (local_code != 0)
            code = local_code;
    }
    return code >= 0 ? code & 0xFF : 126;
}
