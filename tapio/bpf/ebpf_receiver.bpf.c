// The ebpf receiver's kernel side: process, file, TCP, OOM and signal events.
//
// Invariants:
// - Only tracepoint args-> fields and BPF helpers are read, never kernel
//   structs: the kernel headers on a node may not match the running kernel,
//   and struct reads then return wrong values silently.
// - Every event starts with `struct hdr`; its pid, tid, comm and cgroup id
//   are those of the task the event is about (the OOM victim, a socket's
//   owner), never of whatever task a softirq interrupted.
// - Every event goes through the one ring buffer `events`; a failed output
//   is counted in `counters[CNT_LOST + kind]`, an event refused by the
//   per-cgroup rate limit in `counters[CNT_RATE_LIMITED + kind]`.
// - Every pending-state map is an LRU hash, so a storm can evict entries
//   but never fill a map and stop tracking.
//
// - The event structs below are mirrored field by field in
//   tapio/receivers/ebpf/_decode.py; at start the compile helper reports
//   their field offsets as the compiler laid them out, and the agent refuses
//   to start on any difference.
//
// The user side compiles this file with -D flags choosing the event kinds
// (KIND_*), the tracepoints the kernel has (HAVE_*), the filters (FILTER_*)
// and sizes; see tapio/receivers/ebpf/_loader.py. It also replaces the one
// placeholder line `@PATH_FILTER@` (in the file section) with the generated
// path_allowed() function; a source without it is refused before compiling.

#include <uapi/linux/ptrace.h>

#define EV_EXEC 1
#define EV_EXIT 2
#define EV_OPEN 3
#define EV_TCP 4
#define EV_OOM 5
#define EV_SIGNAL 6

#define CNT_LOST 0
#define CNT_RATE_LIMITED 8
#define CNT_SLOTS 16

#define TCP_CONNECT 1
#define TCP_ACCEPT 2
#define TCP_CLOSE 3

// Kernel ABI numbers (defined here to keep kernel headers out of the build;
// the values are fixed by the Linux ABI)
#ifndef AF_INET
#define AF_INET 2          // include/linux/socket.h
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif
#ifndef IPPROTO_TCP
#define IPPROTO_TCP 6      // include/uapi/linux/in.h
#endif
#ifndef AT_FDCWD
#define AT_FDCWD -100      // include/uapi/linux/fcntl.h: open() is openat(AT_FDCWD, ...)
#endif
// signal numbers of x86-64 and arm64 (include/uapi/asm-generic/signal.h)
#define SIG_KILL 9
#define SIG_CHLD 17
#define SIG_CONT 18
#define SIG_STOP 19
#define SIG_TSTP 20
#define SIG_TTIN 21
#define SIG_TTOU 22
#define SIG_URG 23
#define SIG_WINCH 28
#define SIG_FIRST_RT 32    // real-time signals: no default action ends the process here

// TCP states as the kernel numbers them (include/net/tcp_states.h)
#define ST_ESTABLISHED 1
#define ST_SYN_SENT 2
#define ST_SYN_RECV 3
#define ST_CLOSE 7

#define PATH_SIZE 256
#define ARGV_SIZE 1024
#define ARG_LEN 256
#define MAX_ARGS 32

struct hdr {
    u64 ts;          // bpf_ktime_get_boot_ns()
    u64 cgroup_id;   // cgroup2 id of the task
    u32 kind;
    u32 pid;         // tgid
    u32 tid;
    u32 uid;
    char comm[16];
};

struct exec_event {
    struct hdr h;
    u32 ppid;
    u32 old_pid;
    u32 argv_len;
    u32 argc;
    u32 args_truncated;
    u32 pad;
    char filename[PATH_SIZE];
    char argv[ARGV_SIZE];
};

struct exit_event {
    struct hdr h;
    u64 start_ts;    // fork time, 0 when unknown
    u32 ppid;
    s32 exit_code;   // -1 when unknown
    s32 exit_signal; // 0 when not killed by a signal
    u32 pad;
};

struct open_event {
    struct hdr h;
    s64 ret;         // fd, or -errno
    s32 flags;
    u32 mode;
    s32 dfd;
    u32 pad;
    char path[PATH_SIZE];
};

struct tcp_event {
    struct hdr h;
    u64 sock;        // socket cookie (kernel address), joins connect/accept and close
    u64 start_ts;    // when the connection attempt (or the accept) began
    u32 event;       // TCP_CONNECT, TCP_ACCEPT or TCP_CLOSE
    u16 family;
    u16 sport;
    u16 dport;
    u16 owner_known;
    s32 oldstate;
    s32 newstate;
    u32 states_seen; // bitmask of the states the socket went through
    s64 fd;          // accept's returned fd (-1 otherwise)
    u8 saddr[16];
    u8 daddr[16];
};

struct oom_event {
    struct hdr h;    // the victim, taken at its own exit
    u64 mark_ts;     // when the kernel chose the victim
    u64 total_vm_kb;
    u64 anon_rss_kb;
    u64 file_rss_kb;
    u64 shmem_rss_kb;
    u64 pgtables_kb;
    u32 victim_uid;
    s32 oom_score_adj;
};

struct signal_event {
    struct hdr h;    // the sender
    s32 sig;
    s32 code;
    s32 result;
    u32 target_pid;
    s32 group;
    u32 pad;
    char target_comm[16];
};

union any_event {
    struct exec_event exec;
    struct exit_event exit;
    struct open_event open;
    struct tcp_event tcp;
    struct oom_event oom;
    struct signal_event sig;
};

struct exec_args {
    u32 len;
    u32 argc;
    u32 truncated;
    u32 pad;
    char buf[ARGV_SIZE + ARG_LEN];
};

struct proc_info {
    u64 start_ts;
    u32 ppid;
    u32 pad;
};

struct exit_info {
    s32 code;
    s32 sig;
};

struct sock_info {
    u64 start_ts;
    u64 cgroup_id;
    u32 pid;
    u32 tid;
    u32 uid;
    u32 event;       // TCP_CONNECT or TCP_ACCEPT
    u32 owner_known;
    u32 states_seen;
    char comm[16];
    u16 family;      // the passive side's tuple, for the accept event
    u16 sport;
    u16 dport;
    u16 pad;
    u8 saddr[16];
    u8 daddr[16];
};

struct comm_key {
    char comm[16];
};

struct peer_key {
    u16 family;
    u16 port;
    u8 addr[16];
};

struct oom_info {
    u64 mark_ts;
    u64 total_vm_kb;
    u64 anon_rss_kb;
    u64 file_rss_kb;
    u64 shmem_rss_kb;
    u64 pgtables_kb;
    u32 uid;
    s32 oom_score_adj;
};

struct rate_state {
    u64 window_start;
    u64 count;
};

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_PERCPU_ARRAY(counters, u64, CNT_SLOTS);
BPF_PERCPU_ARRAY(scratch, union any_event, 1);
BPF_PERCPU_ARRAY(args_scratch, struct exec_args, 1);
BPF_HASH(exec_argv, u32, struct exec_args, 4096);
BPF_TABLE("lru_hash", u32, struct proc_info, procs, MAX_TRACKED);
BPF_TABLE("lru_hash", u32, struct exit_info, exits, MAX_TRACKED);
BPF_TABLE("lru_hash", u64, struct sock_info, socks, MAX_TRACKED);
BPF_TABLE("lru_hash", struct peer_key, u64, passive, MAX_TRACKED);
BPF_TABLE("lru_hash", u32, struct oom_info, oom_victims, 1024);
BPF_TABLE("lru_hash", u64, struct rate_state, rates, MAX_TRACKED);
BPF_HASH(cgroup_filter, u64, u8, 4096);
BPF_HASH(comm_filter, struct comm_key, u8, 256);

BPF_TABLE("lru_hash", u32, int, fatal_sent, MAX_TRACKED);

// Signals whose default action ends the process (all but SIGCHLD, SIGCONT,
// SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU, SIGURG, SIGWINCH; no real-time ones).
static __always_inline int is_fatal_by_default(int sig) {
    if (sig <= 0 || sig >= SIG_FIRST_RT)
        return 0;
    return !(sig == SIG_CHLD || sig == SIG_CONT || sig == SIG_STOP || sig == SIG_TSTP || sig == SIG_TTIN
             || sig == SIG_TTOU || sig == SIG_URG || sig == SIG_WINCH);
}

static __always_inline void count(u32 slot) {
    u64 *c = counters.lookup(&slot);
    if (c)
        *c += 1;
}

// True if the current task passes the task filters (not the agent itself,
// in a container's PID namespace, in the cgroup set, with a listed comm).
static __always_inline int task_allowed(u64 cgid, u32 tgid) {
#ifdef SELF_TGID
    if (tgid == SELF_TGID)
        return 0;
#endif
#ifdef FILTER_HOST_PIDNS_INO
    struct bpf_pidns_info ns = {};
    // succeeds only for tasks in the host's PID namespace
    if (bpf_get_ns_current_pid_tgid(FILTER_HOST_PIDNS_DEV, FILTER_HOST_PIDNS_INO, &ns, sizeof(ns)) == 0)
        return 0;
#endif
#ifdef FILTER_CGROUPS
    if (!cgroup_filter.lookup(&cgid))
        return 0;
#endif
#ifdef FILTER_COMMS
    struct comm_key ck = {};
    bpf_get_current_comm(&ck.comm, sizeof(ck.comm));
    if (!comm_filter.lookup(&ck))
        return 0;
#endif
    return 1;
}

#define NSEC_PER_SEC 1000000000ULL

// Fixed-window rate limit per cgroup: at most RATE_LIMIT events a second.
// One cgroup's tasks run on several CPUs at once, so the count is only ever
// changed with atomic adds (a plain += loses increments between CPUs and
// lets a storm past the limit). A window is started by whoever sees the old
// one expired: two CPUs doing so at once both reset it, which admits at
// most one extra event per CPU at the boundary.
static __always_inline int rate_ok(u64 cgid, u32 kind, u64 now) {
#if RATE_LIMIT > 0
    struct rate_state *r = rates.lookup(&cgid);
    if (!r) {
        struct rate_state fresh = {.window_start = now, .count = 0};
        rates.insert(&cgid, &fresh);  // BPF_NOEXIST: another CPU's entry wins
        r = rates.lookup(&cgid);
        if (!r)
            return 1;  // evicted at once by a storm of other cgroups
    }
    if (now - r->window_start >= NSEC_PER_SEC) {
        r->window_start = now;
        r->count = 0;
    }
    __sync_fetch_and_add(&r->count, 1);
    if (r->count > RATE_LIMIT) {
        count(CNT_RATE_LIMITED + kind);
        return 0;
    }
#endif
    return 1;
}

static __always_inline void fill_hdr(struct hdr *h, u32 kind, u64 now, u64 cgid) {
    u64 id = bpf_get_current_pid_tgid();
    h->ts = now;
    h->cgroup_id = cgid;
    h->kind = kind;
    h->pid = id >> 32;
    h->tid = (u32)id;
    h->uid = (u32)bpf_get_current_uid_gid();
    bpf_get_current_comm(&h->comm, sizeof(h->comm));
}

static __always_inline void emit(void *e, u32 size, u32 kind) {
    if (events.ringbuf_output(e, size, 0) != 0)
        count(CNT_LOST + kind);
}

static __always_inline union any_event *get_scratch(void) {
    int zero = 0;
    return scratch.lookup(&zero);
}

// ---------------------------------------------------------------- process

TRACEPOINT_PROBE(sched, sched_process_fork) {
    // runs in the parent: the parent's tgid is the child's ppid
    struct proc_info info = {};
    info.start_ts = bpf_ktime_get_boot_ns();
    info.ppid = bpf_get_current_pid_tgid() >> 32;
    u32 child = args->child_pid;
    procs.update(&child, &info);
    return 0;
}

#ifdef KIND_EXEC
#ifdef HAVE_EXECVE_ARGS
static __always_inline void stash_argv(const char *const *argv) {
    int zero = 0;
    struct exec_args *a = args_scratch.lookup(&zero);
    if (!a)
        return;
    u32 off = 0, argc = 0;
    a->truncated = 0;
    for (int i = 0; i < MAX_ARGS; i++) {
        const char *argp = NULL;
        if (bpf_probe_read_user(&argp, sizeof(argp), &argv[i]) != 0 || !argp)
            break;
        if (off >= ARGV_SIZE) {
            a->truncated = 1;
            break;
        }
        long n = bpf_probe_read_user_str(&a->buf[off & (ARGV_SIZE - 1)], ARG_LEN, argp);
        if (n <= 0)
            break;
        off += n;
        argc++;
    }
    if (off > ARGV_SIZE) {
        off = ARGV_SIZE;
        a->truncated = 1;
    }
    a->len = off;
    a->argc = argc;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    exec_argv.update(&tgid, a);
}

TRACEPOINT_PROBE(syscalls, sys_enter_execve) {
    stash_argv(args->argv);
    return 0;
}

#ifdef HAVE_EXECVEAT
TRACEPOINT_PROBE(syscalls, sys_enter_execveat) {
    stash_argv(args->argv);
    return 0;
}
#endif
#endif

TRACEPOINT_PROBE(sched, sched_process_exec) {
    u64 now = bpf_ktime_get_boot_ns();
    u64 cgid = bpf_get_current_cgroup_id();
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 key = args->pid;
    struct exec_args *a = exec_argv.lookup(&tgid);
    if (!task_allowed(cgid, tgid) || !rate_ok(cgid, EV_EXEC, now)) {
        if (a)
            exec_argv.delete(&tgid);
        return 0;
    }
    union any_event *u = get_scratch();
    if (!u)
        return 0;
    struct exec_event *e = &u->exec;
    fill_hdr(&e->h, EV_EXEC, now, cgid);
    e->old_pid = args->old_pid;
    struct proc_info *p = procs.lookup(&key);
    e->ppid = p ? p->ppid : 0;
    TP_DATA_LOC_READ_STR(e->filename, filename, PATH_SIZE);
    e->argv_len = 0;
    e->argc = 0;
    e->args_truncated = 0;
    if (a) {
        bpf_probe_read_kernel(e->argv, ARGV_SIZE, a->buf);
        e->argv_len = a->len;
        e->argc = a->argc;
        e->args_truncated = a->truncated;
        exec_argv.delete(&tgid);
    }
    emit(e, sizeof(*e), EV_EXEC);
    return 0;
}
#endif

#ifdef KIND_EXIT
TRACEPOINT_PROBE(syscalls, sys_enter_exit_group) {
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct exit_info *x = exits.lookup(&tgid);
    if (x) {
        x->code = args->error_code & 0xff;
    } else {
        struct exit_info fresh = {.code = args->error_code & 0xff, .sig = 0};
        exits.update(&tgid, &fresh);
    }
    return 0;
}

#ifdef HAVE_SIGNAL_DELIVER
TRACEPOINT_PROBE(signal, signal_deliver) {
    // a signal whose default action ends the process, delivered with no handler
    int sig = args->sig;
    if (args->sa_handler != 0 || !is_fatal_by_default(sig))
        return 0;
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (sig == SIG_KILL) {
        // a group exit shows as SIGKILL here; the signal sent says why
        int *sent = fatal_sent.lookup(&tgid);
        if (sent)
            sig = *sent;
    }
    fatal_sent.delete(&tgid);
    struct exit_info fresh = {.code = -1, .sig = sig};
    exits.update(&tgid, &fresh);
    return 0;
}
#endif
#endif

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 now = bpf_ktime_get_boot_ns();
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32, tid = (u32)id;
    u64 cgid = bpf_get_current_cgroup_id();
    union any_event *u;

#ifdef KIND_OOM
    // the OOM victim's own exit: its context, so pid, comm and cgroup are the victim's
    struct oom_info *o = oom_victims.lookup(&tid);
    if (o) {
        u = get_scratch();
        if (u && task_allowed(cgid, tgid)) {
            struct oom_event *e = &u->oom;
            fill_hdr(&e->h, EV_OOM, now, cgid);
            e->mark_ts = o->mark_ts;
            e->total_vm_kb = o->total_vm_kb;
            e->anon_rss_kb = o->anon_rss_kb;
            e->file_rss_kb = o->file_rss_kb;
            e->shmem_rss_kb = o->shmem_rss_kb;
            e->pgtables_kb = o->pgtables_kb;
            e->victim_uid = o->uid;
            e->oom_score_adj = o->oom_score_adj;
            emit(e, sizeof(*e), EV_OOM);
        }
        oom_victims.delete(&tid);
    }
#endif

#ifdef HAVE_GROUP_DEAD
    int last = args->group_dead;
#else
    int last = tgid == tid;
#endif
    if (!last)
        return 0;
    struct proc_info *p = procs.lookup(&tgid);
    u64 start_ts = p ? p->start_ts : 0;
    u32 ppid = p ? p->ppid : 0;
    procs.delete(&tgid);
#ifdef KIND_EXIT
    struct exit_info *x = exits.lookup(&tgid);
    s32 code = x ? x->code : -1;
    s32 sig = x ? x->sig : 0;
    exits.delete(&tgid);
    if (!task_allowed(cgid, tgid) || !rate_ok(cgid, EV_EXIT, now))
        return 0;
    u = get_scratch();
    if (!u)
        return 0;
    struct exit_event *e = &u->exit;
    fill_hdr(&e->h, EV_EXIT, now, cgid);
    e->start_ts = start_ts;
    e->ppid = ppid;
    e->exit_code = code;
    e->exit_signal = sig;
    emit(e, sizeof(*e), EV_EXIT);
#endif
    return 0;
}

// ---------------------------------------------------------------- OOM

#ifdef KIND_OOM
TRACEPOINT_PROBE(oom, mark_victim) {
    // runs in the killer's context: keep only the tracepoint's victim fields
    struct oom_info info = {};
    info.mark_ts = bpf_ktime_get_boot_ns();
#ifdef HAVE_OOM_RSS
    info.total_vm_kb = args->total_vm;
    info.anon_rss_kb = args->anon_rss;
    info.file_rss_kb = args->file_rss;
    info.shmem_rss_kb = args->shmem_rss;
#endif
#ifdef HAVE_OOM_UID
    info.uid = args->uid;
#endif
#ifdef HAVE_OOM_PGTABLES
    info.pgtables_kb = args->pgtables;
#endif
#ifdef HAVE_OOM_SCORE_ADJ
    info.oom_score_adj = args->oom_score_adj;
#endif
    u32 victim = args->pid;
    oom_victims.update(&victim, &info);
    return 0;
}
#endif

// ---------------------------------------------------------------- signal

#if defined(HAVE_SIGNAL_GENERATE) && (defined(KIND_SIGNAL) || defined(KIND_EXIT))
TRACEPOINT_PROBE(signal, signal_generate) {
#ifdef KIND_EXIT
    // a fatal signal sent to a task without a handler reaches it as SIGKILL
    // (complete_signal), so remember the signal that was sent
    int fsig = args->sig;
    if (args->result == 0 && is_fatal_by_default(fsig)) {
        u32 target = args->pid;
        fatal_sent.update(&target, &fsig);
    }
#endif
#ifdef KIND_SIGNAL
    u64 now = bpf_ktime_get_boot_ns();
    u64 cgid = bpf_get_current_cgroup_id();
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (!task_allowed(cgid, tgid) || !rate_ok(cgid, EV_SIGNAL, now))
        return 0;
    union any_event *u = get_scratch();
    if (!u)
        return 0;
    struct signal_event *e = &u->sig;
    fill_hdr(&e->h, EV_SIGNAL, now, cgid);
    e->sig = args->sig;
    e->code = args->code;
    e->result = args->result;
    e->group = args->group;
    e->target_pid = args->pid;
    bpf_probe_read_kernel(e->target_comm, sizeof(e->target_comm), args->comm);
    emit(e, sizeof(*e), EV_SIGNAL);
#endif
    return 0;
}
#endif

// ---------------------------------------------------------------- pending calls

// What a syscall's exit needs from its entry (open's arguments, accept's
// address buffer), one per thread: a thread is inside one syscall at a time,
// and `call` says which. With task-local storage (HAVE_TASK_STORAGE) the slot
// lives in the thread itself: no hashing, no eviction, freed with the thread.
// Without it, an LRU hash keyed by pid_tgid, whose entry the exit deletes.
#define CALL_NONE 0
#define CALL_OPEN 1
#define CALL_ACCEPT 2

struct pending_call {
    u64 ptr;         // open's filename or accept's upeer_sockaddr (user addresses)
    u32 call;        // CALL_*
    s32 flags;
    u32 mode;
    s32 dfd;
};

#ifdef HAVE_TASK_STORAGE
BPF_TASK_STORAGE(pending_calls, struct pending_call);

static __always_inline struct pending_call *pending_slot(int create) {
    struct task_struct *t = (struct task_struct *)bpf_get_current_task_btf();
    return pending_calls.task_storage_get(t, 0, create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}

static __always_inline void pending_set(struct pending_call *c) {
    struct pending_call *slot = pending_slot(1);
    if (slot)
        *slot = *c;
}

// Take the thread's pending call of the given kind into *out; 0 if there is none.
static __always_inline int pending_take(u32 call, struct pending_call *out) {
    struct pending_call *slot = pending_slot(0);
    if (!slot || slot->call != call)
        return 0;
    *out = *slot;
    slot->call = CALL_NONE;
    return 1;
}
#else
BPF_TABLE("lru_hash", u64, struct pending_call, pending_calls, MAX_TRACKED);

static __always_inline void pending_set(struct pending_call *c) {
    u64 id = bpf_get_current_pid_tgid();
    pending_calls.update(&id, c);
}

static __always_inline int pending_take(u32 call, struct pending_call *out) {
    u64 id = bpf_get_current_pid_tgid();
    struct pending_call *slot = pending_calls.lookup(&id);
    if (!slot)
        return 0;
    int found = slot->call == call;
    if (found)
        *out = *slot;
    pending_calls.delete(&id);
    return found;
}
#endif

// ---------------------------------------------------------------- file

#ifdef KIND_OPEN
// path_allowed(const char *p): 1 if an opened path passes filters.path_prefixes
// and filters.exclude_path_prefixes; generated by _loader.path_filter_source
// as straight-line byte compares, and put in place of this line:
@PATH_FILTER@

// Tasks the filters drop never leave a pending call, so their opens cost a
// filter check and nothing else.
static __always_inline void open_enter(const char *filename, int flags, u32 mode, int dfd) {
    u64 id = bpf_get_current_pid_tgid();
    if (!task_allowed(bpf_get_current_cgroup_id(), id >> 32))
        return;
    struct pending_call c = {.ptr = (u64)filename, .call = CALL_OPEN, .flags = flags, .mode = mode, .dfd = dfd};
    pending_set(&c);
}

static __always_inline void open_exit(long ret) {
    struct pending_call call = {};
    if (!pending_take(CALL_OPEN, &call))
        return;
    union any_event *u = get_scratch();
    if (!u)
        return;
    struct open_event *e = &u->open;
    // read at exit: the syscall has faulted the string in by now
    if (bpf_probe_read_user_str(e->path, PATH_SIZE, (const char *)call.ptr) <= 0)
        e->path[0] = 0;
    if (!path_allowed(e->path))
        return;
    u64 now = bpf_ktime_get_boot_ns();
    u64 cgid = bpf_get_current_cgroup_id();
    if (!rate_ok(cgid, EV_OPEN, now))
        return;
    fill_hdr(&e->h, EV_OPEN, now, cgid);
    e->ret = ret;
    e->flags = call.flags;
    e->mode = call.mode;
    e->dfd = call.dfd;
    emit(e, sizeof(*e), EV_OPEN);
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat) {
    open_enter(args->filename, args->flags, args->mode, args->dfd);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_openat) {
    open_exit(args->ret);
    return 0;
}

#ifdef HAVE_SYS_OPEN
TRACEPOINT_PROBE(syscalls, sys_enter_open) {
    open_enter(args->filename, args->flags, args->mode, AT_FDCWD);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_open) {
    open_exit(args->ret);
    return 0;
}
#endif
#endif

// ---------------------------------------------------------------- TCP

#ifdef KIND_TCP
// Written straight into reserved ring space (no scratch copy); addresses are
// read from where they are (the tracepoint's fields or the socket's entry)
// only for the events that are emitted. addr_len is 4 (IPv4) or 16.
static __always_inline void emit_tcp(struct sock_info *s, u64 sk, u32 event, u64 now,
                                     int oldstate, int newstate, s64 fd,
                                     u16 family, u16 sport, u16 dport,
                                     const u8 *saddr, const u8 *daddr, int addr_len) {
    if (!rate_ok(s->cgroup_id, EV_TCP, now))
        return;
    struct tcp_event *e = events.ringbuf_reserve(sizeof(struct tcp_event));
    if (!e) {
        count(CNT_LOST + EV_TCP);
        return;
    }
    e->h.ts = now;
    e->h.cgroup_id = s->cgroup_id;
    e->h.kind = EV_TCP;
    e->h.pid = s->pid;
    e->h.tid = s->tid;
    e->h.uid = s->uid;
    __builtin_memcpy(e->h.comm, s->comm, 16);
    e->sock = sk;
    e->start_ts = s->start_ts;
    e->event = event;
    e->family = family;
    e->sport = sport;
    e->dport = dport;
    e->owner_known = s->owner_known;
    e->oldstate = oldstate;
    e->newstate = newstate;
    e->states_seen = s->states_seen;
    e->fd = fd;
    __builtin_memset(e->saddr, 0, 16);
    __builtin_memset(e->daddr, 0, 16);
    if (addr_len == 4) {
        bpf_probe_read_kernel(e->saddr, 4, saddr);
        bpf_probe_read_kernel(e->daddr, 4, daddr);
    } else {
        bpf_probe_read_kernel(e->saddr, 16, saddr);
        bpf_probe_read_kernel(e->daddr, 16, daddr);
    }
    events.ringbuf_submit(e, 0);
}

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != IPPROTO_TCP)
        return 0;
    u64 sk = (u64)args->skaddr;
    int oldstate = args->oldstate, newstate = args->newstate;
    u16 family = args->family;
    u64 now;  // read only where used: most transitions emit nothing

    if (newstate == ST_SYN_SENT) {
        // inside connect(): process context, so the current task owns the socket
        now = bpf_ktime_get_boot_ns();
        u64 id = bpf_get_current_pid_tgid();
        u64 cgid = bpf_get_current_cgroup_id();
        if (!task_allowed(cgid, id >> 32))
            return 0;
        struct sock_info s = {};
        s.start_ts = now;
        s.cgroup_id = cgid;
        s.pid = id >> 32;
        s.tid = (u32)id;
        s.uid = (u32)bpf_get_current_uid_gid();
        s.event = TCP_CONNECT;
        s.owner_known = 1;
        s.states_seen = (1 << oldstate) | (1 << newstate);
        bpf_get_current_comm(&s.comm, sizeof(s.comm));
        socks.update(&sk, &s);
        return 0;
    }

    if (oldstate == ST_SYN_RECV && newstate == ST_ESTABLISHED) {
        // passive open, usually in softirq: the owner is learned at accept()
        now = bpf_ktime_get_boot_ns();
        struct sock_info s = {};
        s.start_ts = now;
        s.event = TCP_ACCEPT;
        s.states_seen = (1 << ST_SYN_RECV) | (1 << ST_ESTABLISHED);
        s.family = family;
        s.sport = args->sport;
        s.dport = args->dport;
        if (family == AF_INET) {
            __builtin_memcpy(s.saddr, args->saddr, 4);
            __builtin_memcpy(s.daddr, args->daddr, 4);
        } else {
            __builtin_memcpy(s.saddr, args->saddr_v6, 16);
            __builtin_memcpy(s.daddr, args->daddr_v6, 16);
        }
        socks.update(&sk, &s);
        struct peer_key k = {};
        k.family = family;
        k.port = args->dport;
        __builtin_memcpy(k.addr, s.daddr, 16);
        passive.update(&k, &sk);
        return 0;
    }

    struct sock_info *s = socks.lookup(&sk);
    if (!s)
        return 0;
    if (oldstate >= 0 && oldstate < 32)
        s->states_seen |= 1 << oldstate;
    if (newstate >= 0 && newstate < 32)
        s->states_seen |= 1 << newstate;
    const u8 *saddr = family == AF_INET ? (const u8 *)args->saddr : (const u8 *)args->saddr_v6;
    const u8 *daddr = family == AF_INET ? (const u8 *)args->daddr : (const u8 *)args->daddr_v6;
    int alen = family == AF_INET ? 4 : 16;
    if (oldstate == ST_SYN_SENT && newstate == ST_ESTABLISHED) {
        now = bpf_ktime_get_boot_ns();
        emit_tcp(s, sk, TCP_CONNECT, now, oldstate, newstate, -1, family, args->sport, args->dport, saddr, daddr, alen);
        return 0;
    }
    if (newstate == ST_CLOSE) {
        now = bpf_ktime_get_boot_ns();
        if (oldstate == ST_SYN_SENT) {
            // a failed connect: reported as a connect that ended in CLOSE
            emit_tcp(s, sk, TCP_CONNECT, now, oldstate, newstate, -1, family, args->sport, args->dport, saddr, daddr, alen);
        } else if (s->owner_known) {
            emit_tcp(s, sk, TCP_CLOSE, now, oldstate, newstate, -1, family, args->sport, args->dport, saddr, daddr, alen);
        }
        if (s->event == TCP_ACCEPT) {
            struct peer_key k = {};
            k.family = family;
            k.port = args->dport;
            __builtin_memcpy(k.addr, s->daddr, 16);
            passive.delete(&k);
        }
        socks.delete(&sk);
    }
    return 0;
}

// An accept whose caller passes no address buffer cannot be joined with its
// socket (see accept_exit), so it leaves no pending call; nor does one of a
// task the filters drop.
static __always_inline void accept_enter(u64 uaddr) {
    if (uaddr == 0 || !task_allowed(bpf_get_current_cgroup_id(), bpf_get_current_pid_tgid() >> 32))
        return;
    struct pending_call c = {.ptr = uaddr, .call = CALL_ACCEPT};
    pending_set(&c);
}

#ifdef HAVE_ACCEPT4
TRACEPOINT_PROBE(syscalls, sys_enter_accept4) {
    accept_enter((u64)args->upeer_sockaddr);
    return 0;
}
#endif
#ifdef HAVE_ACCEPT
TRACEPOINT_PROBE(syscalls, sys_enter_accept) {
    accept_enter((u64)args->upeer_sockaddr);
    return 0;
}
#endif

static __always_inline void accept_exit(long ret) {
    struct pending_call call = {};
    if (!pending_take(CALL_ACCEPT, &call) || ret < 0)
        return;
    u64 uaddr = call.ptr;
    u64 id = bpf_get_current_pid_tgid();
    u64 cgid = bpf_get_current_cgroup_id();
    // the peer address accept() wrote back: sockaddr_in or sockaddr_in6
    u8 sa[28] = {};
    if (bpf_probe_read_user(sa, sizeof(sa), (void *)uaddr) != 0)
        return;
    struct peer_key k = {};
    k.family = sa[0] | (sa[1] << 8);
    k.port = (sa[2] << 8) | sa[3];
    if (k.family == AF_INET)
        __builtin_memcpy(k.addr, &sa[4], 4);
    else if (k.family == AF_INET6)
        __builtin_memcpy(k.addr, &sa[8], 16);
    else
        return;
    u64 *skp = passive.lookup(&k);
    if (!skp)
        return;
    u64 sk = *skp;
    passive.delete(&k);
    struct sock_info *s = socks.lookup(&sk);
    if (!s)
        return;
    s->cgroup_id = cgid;
    s->pid = id >> 32;
    s->tid = (u32)id;
    s->uid = (u32)bpf_get_current_uid_gid();
    s->owner_known = 1;
    bpf_get_current_comm(&s->comm, sizeof(s->comm));
    u64 now = bpf_ktime_get_boot_ns();
    emit_tcp(s, sk, TCP_ACCEPT, now, ST_SYN_RECV, ST_ESTABLISHED, ret, s->family, s->sport, s->dport, s->saddr, s->daddr, 16);
}

#ifdef HAVE_ACCEPT4
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) {
    accept_exit(args->ret);
    return 0;
}
#endif
#ifdef HAVE_ACCEPT
TRACEPOINT_PROBE(syscalls, sys_exit_accept) {
    accept_exit(args->ret);
    return 0;
}
#endif
#endif
