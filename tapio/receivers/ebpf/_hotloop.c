/* The ebpf receiver's record writer, compiled: the TCP and open events of a drain.
 *
 * `_records.RecordWriter.write` calls `run` and writes in Python whatever
 * `run` stops at; built by scripts/setup.sh, optional (the Python loop is the
 * fallback and the reference this must equal byte for byte: tests run both).
 *
 * run(events, i, context, drain, id_pool, id_at) -> (stop, id_at)
 *   Writes events[i:] in order until the first one it does not write: any
 *   kind but TCP and open, a span needing ids beyond id_pool, or a value of
 *   a type other than the decoder gives. Returns that event's index (or
 *   len(events)) and the ids used so far. A piece missing from a cache is
 *   made by the writer's own Python method for it (the CX_FILL_* callables,
 *   which store it in the cache), as the Python loop makes it.
 *
 *   events:  `_decode.decode_drain` field tuples.
 *   context: the writer's caches, constant pieces and fill methods
 *            (`RecordWriter._fast_context`, order as CX_* below).
 *   drain:   (records or None, spans or None, container pieces by (pid, cgroup id),
 *            offset, tail of a TCP record, tail of an open record).
 *
 * The bytes are exactly those of the Python loop: the same pieces in the
 * same order (see _records.py). Field tags and the event layout's field
 * order are fixed here; `ASSUMES` lists the numbers taken from _decode and
 * _records so that the Python side refuses a helper that disagrees.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum {
    CX_COMMON, CX_LOCALS, CX_PEERS, CX_SHAPES, CX_PATHS, CX_ERRORS, CX_SEV_INFO,
    CX_LPORT, CX_PPORT, CX_DURATION, CX_SOCKET, CX_TCP_FD, CX_OPEN_FD, CX_OPEN_MODE, CX_EVENT_TEXT, CX_EMPTY,
    CX_FILL_SHARED, CX_FILL_LOCAL, CX_FILL_PEER, CX_FILL_SHAPE, CX_FILL_PATH, CX_FILL_ERROR, CX_COUNT
};
enum { DR_RECORDS, DR_SPANS, DR_CONTAINERS, DR_OFFSET, DR_TAIL_TCP, DR_TAIL_OPEN, DR_COUNT };

/* _decode: kinds, TCP sub-events and states, O_CREAT; field tuple lengths and indexes */
#define EV_OPEN 3
#define EV_TCP 4
#define TCP_CONNECT 1
#define TCP_ACCEPT 2
#define TCP_CLOSE 3
#define TCP_SYN_SENT 2
#define TCP_CLOSED 7
#define O_CREAT_FLAG 0100
#define TCP_FIELDS 20
#define OPEN_FIELDS 13
/* _records: span kinds and the error status code (opentelemetry/proto/trace/v1) */
#define SPAN_KIND_SERVER 2
#define SPAN_KIND_CLIENT 3
#define STATUS_CODE_ERROR 2
#define TAG_ATTR_LOG 0x32
#define TAG_ATTR_SPAN 0x4a

typedef struct {
    char *p;
    Py_ssize_t len, cap;
} Buf;

static int buf_reserve(Buf *b, Py_ssize_t more) {
    if (b->len + more <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more)
        cap *= 2;
    char *p = PyMem_Realloc(b->p, cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static inline int put(Buf *b, const void *src, Py_ssize_t n) {
    if (buf_reserve(b, n) < 0)
        return -1;
    memcpy(b->p + b->len, src, n);
    b->len += n;
    return 0;
}

static inline int put_byte(Buf *b, unsigned char c) { return put(b, &c, 1); }

static inline int varint_to(unsigned char *out, uint64_t v) {
    int n = 0;
    while (v >= 0x80) {
        out[n++] = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    out[n++] = (unsigned char)v;
    return n;
}

static inline int put_varint(Buf *b, uint64_t v) {
    unsigned char tmp[10];
    return put(b, tmp, varint_to(tmp, v));
}

static inline int put_fixed64(Buf *b, unsigned char tag, uint64_t v) {
    unsigned char tmp[9];
    tmp[0] = tag;
    for (int k = 0; k < 8; k++)
        tmp[1 + k] = (unsigned char)(v >> (8 * k));
    return put(b, tmp, 9);
}

static inline int put_bytes(Buf *b, PyObject *o) { return put(b, PyBytes_AS_STRING(o), PyBytes_GET_SIZE(o)); }

/* tag, then heads[len(varint(v))] + varint(v): an int attribute's piece (`_records._int`) */
static int put_int_piece(Buf *b, unsigned char tag, PyObject *heads, uint64_t v) {
    unsigned char tmp[10];
    int n = varint_to(tmp, v);
    PyObject *head = PyList_GET_ITEM(heads, n);
    if (put_byte(b, tag) < 0 || put_bytes(b, head) < 0)
        return -1;
    return put(b, tmp, n);
}

/* a string AnyValue body: 0x2a len (0x0a len text) */
static int put_body(Buf *b, const char *text, Py_ssize_t n) {
    unsigned char inner[10];
    int k = varint_to(inner, (uint64_t)n);
    if (put_byte(b, 0x2a) < 0 || put_varint(b, (uint64_t)(1 + k + n)) < 0 || put_byte(b, 0x0a) < 0 || put(b, inner, k) < 0)
        return -1;
    return put(b, text, n);
}

/* 0x12 len payload as a new bytes object, appended to list */
static int append_item(PyObject *list, const char *payload, Py_ssize_t n) {
    unsigned char head[11];
    head[0] = 0x12;
    int k = 1 + varint_to(head + 1, (uint64_t)n);
    PyObject *item = PyBytes_FromStringAndSize(NULL, k + n);
    if (item == NULL)
        return -1;
    memcpy(PyBytes_AS_STRING(item), head, k);
    memcpy(PyBytes_AS_STRING(item) + k, payload, n);
    int rc = PyList_Append(list, item);
    Py_DECREF(item);
    return rc;
}

/* the group list of a container in records or spans, made when missing (dict order: first use) */
static PyObject *group_of(PyObject *groups, PyObject *container) {
    PyObject *list = PyDict_GetItemWithError(groups, container);
    if (list != NULL || PyErr_Occurred())
        return list;
    list = PyList_New(0);
    if (list == NULL)
        return NULL;
    int rc = PyDict_SetItem(groups, container, list);
    Py_DECREF(list);
    return rc < 0 ? NULL : list;
}

/* whether o is a tuple of at least n bytes objects */
static int pieces_ok(PyObject *o, Py_ssize_t n) {
    if (!PyTuple_CheckExact(o) || PyTuple_GET_SIZE(o) < n)
        return 0;
    for (Py_ssize_t k = 0; k < n; k++)
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(o, k)))
            return 0;
    return 1;
}

/* cache[key], or fill(*args) (which stores it) on a miss; key and args are consumed (args may be NULL: key is
 * the args). What fill returns is kept alive in `keep` until run returns. NULL with an exception set on an error,
 * NULL without one when the pieces are not a tuple of n bytes objects (the Python loop takes the event). */
static PyObject *piece(PyObject *cache, PyObject *key, PyObject *fill, PyObject *args, Py_ssize_t n, PyObject *keep) {
    if (key == NULL) {
        Py_XDECREF(args);
        return NULL;
    }
    PyObject *found = PyDict_GetItemWithError(cache, key);
    if (found == NULL && !PyErr_Occurred()) {
        found = PyObject_Call(fill, args ? args : key, NULL);
        if (found != NULL) {
            int rc = PyList_Append(keep, found);
            Py_DECREF(found);
            if (rc < 0)
                found = NULL;
        }
    }
    Py_DECREF(key);
    Py_XDECREF(args);
    if (found == NULL || !pieces_ok(found, n))
        return NULL;
    return found;
}

static int get_u64(PyObject *t, Py_ssize_t i, uint64_t *out) {
    PyObject *o = PyTuple_GET_ITEM(t, i);
    if (!PyLong_CheckExact(o))
        return -1;
    *out = PyLong_AsUnsignedLongLong(o);
    if (*out == (uint64_t)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return 0;
}

static int get_i64(PyObject *t, Py_ssize_t i, int64_t *out) {
    PyObject *o = PyTuple_GET_ITEM(t, i);
    if (!PyLong_CheckExact(o))
        return -1;
    *out = PyLong_AsLongLong(o);
    if (*out == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return 0;
}

/* v in lowercase hex without leading zeros ("0" for 0), as Python's b"%x"; returns the length */
static int hex_to(char *out, uint64_t v) {
    char tmp[16];
    int n = 0;
    do {
        tmp[n++] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    for (int k = 0; k < n; k++)
        out[k] = tmp[n - 1 - k];
    return n;
}

/* v in decimal, as Python's b"%d" */
static int dec_to(char *out, int64_t v) {
    char tmp[20];
    int n = 0, neg = v < 0;
    uint64_t u = neg ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    int k = 0;
    if (neg)
        out[k++] = '-';
    while (n)
        out[k++] = tmp[--n];
    return k;
}

static inline int same_bytes(PyObject *a, PyObject *b) {
    return a == b || (a != NULL && PyBytes_GET_SIZE(a) == PyBytes_GET_SIZE(b) && memcmp(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b), PyBytes_GET_SIZE(a)) == 0);
}

#define BYTES_AT(t, k) PyTuple_GET_ITEM((t), (k))

/* the last value looked up in a cache and what keyed it, kept while run runs (a drain mostly repeats them) */
typedef struct {
    int64_t a, b, c, d, e;
    PyObject *raw, *container, *value;
} Memo;

static PyObject *run(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *events, *cx, *dr, *pool;
    Py_ssize_t i, id_at;
    if (!PyArg_ParseTuple(args, "O!nO!O!O!n", &PyList_Type, &events, &i, &PyTuple_Type, &cx, &PyTuple_Type, &dr, &PyBytes_Type, &pool, &id_at))
        return NULL;
    if (PyTuple_GET_SIZE(cx) != CX_COUNT || PyTuple_GET_SIZE(dr) != DR_COUNT) {
        PyErr_SetString(PyExc_ValueError, "context or drain tuple of the wrong size");
        return NULL;
    }
    PyObject *common = PyTuple_GET_ITEM(cx, CX_COMMON), *locals = PyTuple_GET_ITEM(cx, CX_LOCALS), *peers = PyTuple_GET_ITEM(cx, CX_PEERS);
    PyObject *shapes = PyTuple_GET_ITEM(cx, CX_SHAPES), *paths = PyTuple_GET_ITEM(cx, CX_PATHS), *errors = PyTuple_GET_ITEM(cx, CX_ERRORS);
    PyObject *sev = PyTuple_GET_ITEM(cx, CX_SEV_INFO), *event_text = PyTuple_GET_ITEM(cx, CX_EVENT_TEXT), *empty = PyTuple_GET_ITEM(cx, CX_EMPTY);
    PyObject *lport_h = PyTuple_GET_ITEM(cx, CX_LPORT), *pport_h = PyTuple_GET_ITEM(cx, CX_PPORT), *duration_h = PyTuple_GET_ITEM(cx, CX_DURATION);
    PyObject *socket_h = PyTuple_GET_ITEM(cx, CX_SOCKET), *tcp_fd_h = PyTuple_GET_ITEM(cx, CX_TCP_FD), *open_fd_h = PyTuple_GET_ITEM(cx, CX_OPEN_FD);
    PyObject *open_mode_h = PyTuple_GET_ITEM(cx, CX_OPEN_MODE);
    PyObject *fill_shared = PyTuple_GET_ITEM(cx, CX_FILL_SHARED), *fill_local = PyTuple_GET_ITEM(cx, CX_FILL_LOCAL);
    PyObject *fill_peer = PyTuple_GET_ITEM(cx, CX_FILL_PEER), *fill_shape = PyTuple_GET_ITEM(cx, CX_FILL_SHAPE);
    PyObject *fill_path = PyTuple_GET_ITEM(cx, CX_FILL_PATH), *fill_error = PyTuple_GET_ITEM(cx, CX_FILL_ERROR);
    PyObject *records = PyTuple_GET_ITEM(dr, DR_RECORDS), *spans = PyTuple_GET_ITEM(dr, DR_SPANS), *containers = PyTuple_GET_ITEM(dr, DR_CONTAINERS);
    PyObject *tail_tcp = PyTuple_GET_ITEM(dr, DR_TAIL_TCP), *tail_open = PyTuple_GET_ITEM(dr, DR_TAIL_OPEN);
    PyObject *dicts[] = {common, locals, peers, shapes, paths, errors, containers};
    for (size_t k = 0; k < sizeof dicts / sizeof *dicts; k++)
        if (!PyDict_CheckExact(dicts[k]))
            goto bad_context;
    PyObject *fills[] = {fill_shared, fill_local, fill_peer, fill_shape, fill_path, fill_error};
    for (size_t k = 0; k < sizeof fills / sizeof *fills; k++)
        if (!PyCallable_Check(fills[k]))
            goto bad_context;
    PyObject *lists[] = {lport_h, pport_h, duration_h, tcp_fd_h, open_fd_h, open_mode_h};
    for (size_t k = 0; k < sizeof lists / sizeof *lists; k++)
        if (!PyList_CheckExact(lists[k]) || PyList_GET_SIZE(lists[k]) < 11)
            goto bad_context;
    if (!PyList_CheckExact(socket_h) || PyList_GET_SIZE(socket_h) < 17 || !PyTuple_CheckExact(event_text) || PyTuple_GET_SIZE(event_text) < 4)
        goto bad_context;
    for (Py_ssize_t k = 1; k < 4; k++)
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(event_text, k)))
            goto bad_context;
    if (!PyBytes_CheckExact(sev) || !PyBytes_CheckExact(tail_tcp) || !PyBytes_CheckExact(tail_open))
        goto bad_context;
    if ((records != Py_None && !PyDict_CheckExact(records)) || (spans != Py_None && !PyDict_CheckExact(spans)))
        goto bad_context;
    int64_t offset;
    {
        int overflow = 0;
        offset = PyLong_AsLongLongAndOverflow(PyTuple_GET_ITEM(dr, DR_OFFSET), &overflow);
        if (overflow || (offset == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return Py_BuildValue("nn", i, id_at); /* beyond int64: all in Python */
        }
    }
    const char *ids = PyBytes_AS_STRING(pool);
    Py_ssize_t ids_len = PyBytes_GET_SIZE(pool);
    PyObject *keep = PyList_New(0);
    if (keep == NULL)
        return NULL;

    Buf rec = {0}, sa = {0}, sp = {0}, text = {0};
    Py_ssize_t n_events = PyList_GET_SIZE(events);
    /* the container of the last (pid, cgroup id) and the records group of the last container */
    uint64_t last_pid = 0, last_cg = 0;
    PyObject *container = NULL, *group = NULL, *last_group_container = NULL;
    Memo m_shared = {0}, m_local = {0}, m_peer = {0}, m_path = {0};

    for (; i < n_events; i++) {
        PyObject *f = PyList_GET_ITEM(events, i);
        if (!PyTuple_CheckExact(f) || PyTuple_GET_SIZE(f) < 7)
            break;
        int64_t kind, tid, uid;
        if (get_i64(f, 2, &kind) < 0)
            break;
        Py_ssize_t want = kind == EV_TCP ? TCP_FIELDS : kind == EV_OPEN ? OPEN_FIELDS : -1;
        if (want < 0 || PyTuple_GET_SIZE(f) != want)
            break;
        uint64_t kts, cg, pid;
        PyObject *comm = PyTuple_GET_ITEM(f, 6);
        if (get_u64(f, 0, &kts) < 0 || get_u64(f, 1, &cg) < 0 || get_u64(f, 3, &pid) < 0 || get_i64(f, 4, &tid) < 0 || get_i64(f, 5, &uid) < 0 ||
            !PyBytes_CheckExact(comm))
            break;
        if (container == NULL || pid != last_pid || cg != last_cg) {
            PyObject *key = PyTuple_Pack(2, PyTuple_GET_ITEM(f, 3), PyTuple_GET_ITEM(f, 1));
            if (key == NULL)
                goto error;
            container = PyDict_GetItemWithError(containers, key);
            Py_DECREF(key);
            if (container == NULL) {
                if (PyErr_Occurred())
                    goto error;
                container = empty;
            }
            last_pid = pid;
            last_cg = cg;
        }
        PyObject *shared = m_shared.value;
        if (!(shared && m_shared.a == (int64_t)pid && m_shared.b == tid && m_shared.c == uid && m_shared.d == (int64_t)cg && m_shared.e == kind &&
              m_shared.container == container && same_bytes(m_shared.raw, comm))) {
            PyObject *pid_o = PyTuple_GET_ITEM(f, 3), *tid_o = PyTuple_GET_ITEM(f, 4), *uid_o = PyTuple_GET_ITEM(f, 5);
            PyObject *cg_o = PyTuple_GET_ITEM(f, 1), *kind_o = PyTuple_GET_ITEM(f, 2);
            PyObject *key = PyTuple_Pack(7, pid_o, tid_o, uid_o, comm, cg_o, kind_o, container);
            shared = piece(common, key, fill_shared, key ? PyTuple_Pack(7, kind_o, pid_o, tid_o, uid_o, comm, cg_o, container) : NULL, 2, keep);
            if (shared == NULL) {
                if (PyErr_Occurred())
                    goto error;
                break;
            }
            m_shared = (Memo){(int64_t)pid, tid, uid, (int64_t)cg, kind, comm, container, shared};
        }
        __int128 ts = (__int128)kts + offset;
        rec.len = 0;
        if ((ts != 0 && put_fixed64(&rec, 0x09, (uint64_t)ts) < 0) || put_bytes(&rec, sev) < 0)
            goto error;
        PyObject *tail;
        if (kind == EV_TCP) {
            uint64_t sock, start_ts;
            int64_t event, family, sport, dport, old, new_state, states, fd;
            PyObject *saddr = PyTuple_GET_ITEM(f, 18), *daddr = PyTuple_GET_ITEM(f, 19);
            if (get_u64(f, 7, &sock) < 0 || get_u64(f, 8, &start_ts) < 0 || get_i64(f, 9, &event) < 0 || get_i64(f, 10, &family) < 0 ||
                get_i64(f, 11, &sport) < 0 || get_i64(f, 12, &dport) < 0 || get_i64(f, 14, &old) < 0 || get_i64(f, 15, &new_state) < 0 ||
                get_i64(f, 16, &states) < 0 || get_i64(f, 17, &fd) < 0 || !PyBytes_CheckExact(saddr) || !PyBytes_CheckExact(daddr))
                break;
            if (event < 1 || event > 3 || sport < 0 || dport < 0 || states < 0)
                break;
            PyObject *family_o = PyTuple_GET_ITEM(f, 10);
            PyObject *local = m_local.value, *peer = m_peer.value;
            if (!(local && m_local.a == family && same_bytes(m_local.raw, saddr))) {
                local = piece(locals, PyTuple_Pack(2, family_o, saddr), fill_local, NULL, 2, keep);
                if (local == NULL)
                    goto miss;
                m_local = (Memo){family, 0, 0, 0, 0, saddr, NULL, local};
            }
            if (!(peer && m_peer.a == family && same_bytes(m_peer.raw, daddr))) {
                peer = piece(peers, PyTuple_Pack(2, family_o, daddr), fill_peer, NULL, 3, keep);
                if (peer == NULL)
                    goto miss;
                m_peer = (Memo){family, 0, 0, 0, 0, daddr, NULL, peer};
            }
            PyObject *shape = piece(shapes, PyTuple_Pack(4, PyTuple_GET_ITEM(f, 9), PyTuple_GET_ITEM(f, 14), PyTuple_GET_ITEM(f, 15), PyTuple_GET_ITEM(f, 16)),
                                    fill_shape, NULL, 2, keep);
            if (shape == NULL)
                goto miss;
            int failed = event == TCP_CONNECT && new_state == TCP_CLOSED;
            int with_span = spans != Py_None && (event == TCP_CLOSE || failed);
            if (with_span && id_at + 24 > ids_len)
                break; /* the Python loop draws the ids */
            /* "addr:port" as in a body and a span name */
            PyObject *paddr = BYTES_AT(peer, 2);
            Py_ssize_t peer_n = PyBytes_GET_SIZE(paddr);
            char peer_text[128];
            if (peer_n > 96)
                break;
            memcpy(peer_text, PyBytes_AS_STRING(paddr), peer_n);
            peer_text[peer_n++] = ':';
            peer_n += dec_to(peer_text + peer_n, dport);
            text.len = 0;
            PyObject *etext = PyTuple_GET_ITEM(event_text, event);
            if (put_bytes(&text, etext) < 0 || put(&text, peer_text, peer_n) < 0 || (failed && put(&text, " failed", 7) < 0) ||
                put_body(&rec, text.p, text.len) < 0)
                goto error;
            /* the attributes, written once per destination (log record, span) */
            __int128 duration = (__int128)kts - (__int128)start_ts;
            char sock_text[16];
            int sock_n = hex_to(sock_text, sock);
            sa.len = 0;
            for (int dest = 0; dest < 1 + with_span; dest++) {
                Buf *b = dest == 0 ? &rec : &sa;
                unsigned char tag = dest == 0 ? TAG_ATTR_LOG : TAG_ATTR_SPAN;
                if (put_bytes(b, BYTES_AT(shared, dest)) < 0 || put_bytes(b, BYTES_AT(local, dest)) < 0 ||
                    put_int_piece(b, tag, lport_h, (uint64_t)sport) < 0 || put_bytes(b, BYTES_AT(peer, dest)) < 0 ||
                    put_int_piece(b, tag, pport_h, (uint64_t)dport) < 0 || put_bytes(b, BYTES_AT(shape, dest)) < 0 ||
                    put_int_piece(b, tag, duration_h, duration > 0 ? (uint64_t)duration : 0) < 0 || put_byte(b, tag) < 0 ||
                    put_bytes(b, PyList_GET_ITEM(socket_h, sock_n)) < 0 || put(b, sock_text, sock_n) < 0 ||
                    (fd >= 0 && put_int_piece(b, tag, tcp_fd_h, (uint64_t)fd) < 0))
                    goto error;
            }
            if (with_span) {
                /* the span: ids, name, kind, start, end, the attributes written above, status */
                int outbound = (states >> TCP_SYN_SENT) & 1;
                const char *verb = outbound ? "tcp connect " : "tcp accept ";
                Py_ssize_t verb_n = (Py_ssize_t)strlen(verb);
                __int128 start = (__int128)start_ts + offset, end = ts > start ? ts : start;
                sp.len = 0;
                if (put(&sp, "\x0a\x10", 2) < 0 || put(&sp, ids + id_at, 16) < 0 || put(&sp, "\x12\x08", 2) < 0 || put(&sp, ids + id_at + 16, 8) < 0 ||
                    put_byte(&sp, 0x2a) < 0 || put_varint(&sp, (uint64_t)(verb_n + peer_n)) < 0 || put(&sp, verb, verb_n) < 0 ||
                    put(&sp, peer_text, peer_n) < 0 || put_byte(&sp, 0x30) < 0 || put_byte(&sp, outbound ? SPAN_KIND_CLIENT : SPAN_KIND_SERVER) < 0 ||
                    (start != 0 && put_fixed64(&sp, 0x39, (uint64_t)start) < 0) || (end != 0 && put_fixed64(&sp, 0x41, (uint64_t)end) < 0) ||
                    put(&sp, sa.p, sa.len) < 0 || (failed && put(&sp, "\x7a\x15\x12\x11" "connection failed" "\x18\x02", 23) < 0))
                    goto error;
                PyObject *span_group = group_of(spans, container);
                if (span_group == NULL || append_item(span_group, sp.p, sp.len) < 0)
                    goto error;
                if (put(&rec, "\x4a\x10", 2) < 0 || put(&rec, ids + id_at, 16) < 0 || put(&rec, "\x52\x08", 2) < 0 || put(&rec, ids + id_at + 16, 8) < 0)
                    goto error;
                id_at += 24;
            }
            tail = tail_tcp;
        } else {
            if (records == Py_None)
                continue; /* an open has no span */
            int64_t ret, flags;
            uint64_t mode;
            PyObject *raw = PyTuple_GET_ITEM(f, 12);
            if (get_i64(f, 7, &ret) < 0 || get_i64(f, 8, &flags) < 0 || get_u64(f, 9, &mode) < 0 || !PyBytes_CheckExact(raw))
                break;
            const char *rp = PyBytes_AS_STRING(raw);
            const char *nul = memchr(rp, 0, PyBytes_GET_SIZE(raw));
            Py_ssize_t cut_n = nul == NULL ? PyBytes_GET_SIZE(raw) : nul - rp;
            PyObject *found = m_path.value;
            if (!(found && m_path.a == flags && PyBytes_GET_SIZE(m_path.raw) == cut_n && memcmp(PyBytes_AS_STRING(m_path.raw), rp, cut_n) == 0)) {
                PyObject *cut = PyBytes_FromStringAndSize(rp, cut_n);
                if (cut == NULL)
                    goto error;
                found = piece(paths, PyTuple_Pack(2, cut, PyTuple_GET_ITEM(f, 8)), fill_path, NULL, 3, keep);
                if (found != NULL && PyList_Append(keep, cut) < 0)
                    found = NULL;
                Py_DECREF(cut);
                if (found == NULL)
                    goto miss;
                m_path = (Memo){flags, 0, 0, 0, 0, cut, NULL, found};
            }
            PyObject *err = NULL;
            if (ret < 0) {
                PyObject *ret_o = PyTuple_GET_ITEM(f, 7);
                Py_INCREF(ret_o); /* the key, consumed by piece */
                err = piece(errors, ret_o, fill_error, PyTuple_Pack(1, ret_o), 2, keep);
                if (err == NULL)
                    goto miss;
            }
            if (ret >= 0) {
                if (put_bytes(&rec, BYTES_AT(found, 2)) < 0)
                    goto error;
            } else {
                text.len = 0;
                if (put(&text, "open ", 5) < 0 || put_bytes(&text, BYTES_AT(found, 1)) < 0 || put(&text, ": ", 2) < 0 || put_bytes(&text, BYTES_AT(err, 1)) < 0 ||
                    put_body(&rec, text.p, text.len) < 0)
                    goto error;
            }
            if (put_bytes(&rec, BYTES_AT(shared, 0)) < 0 || put_bytes(&rec, BYTES_AT(found, 0)) < 0)
                goto error;
            if (ret >= 0 ? put_int_piece(&rec, TAG_ATTR_LOG, open_fd_h, (uint64_t)ret) < 0 : put_bytes(&rec, BYTES_AT(err, 0)) < 0)
                goto error;
            if ((flags & O_CREAT_FLAG) && put_int_piece(&rec, TAG_ATTR_LOG, open_mode_h, mode) < 0)
                goto error;
            tail = tail_open;
        }
        if (records == Py_None)
            continue;
        if (put_bytes(&rec, tail) < 0)
            goto error;
        if (container != last_group_container) {
            group = group_of(records, container);
            if (group == NULL)
                goto error;
            last_group_container = container;
        }
        if (append_item(group, rec.p, rec.len) < 0)
            goto error;
        continue;
    miss:
        if (PyErr_Occurred())
            goto error;
        break;
    }
    PyMem_Free(rec.p);
    PyMem_Free(sa.p);
    PyMem_Free(sp.p);
    PyMem_Free(text.p);
    Py_DECREF(keep);
    return Py_BuildValue("nn", i, id_at);
error:
    PyMem_Free(rec.p);
    PyMem_Free(sa.p);
    PyMem_Free(sp.p);
    PyMem_Free(text.p);
    Py_DECREF(keep);
    return NULL;
bad_context:
    PyErr_SetString(PyExc_TypeError, "context or drain tuple holds the wrong types");
    return NULL;
}

static PyMethodDef methods[] = {
    {"run", run, METH_VARARGS, "Write the TCP and open events of events[i:] whose pieces are cached; returns (stop, id_at)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_hotloop", "The ebpf receiver's compiled record writer (see _hotloop.c).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__hotloop(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* what this file takes as given; _records compares it with its own values before using run */
    PyObject *assumes = Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "EV_OPEN", EV_OPEN, "EV_TCP", EV_TCP, "TCP_CONNECT", TCP_CONNECT, "TCP_ACCEPT", TCP_ACCEPT,
        "TCP_CLOSE", TCP_CLOSE, "TCP_SYN_SENT", TCP_SYN_SENT, "TCP_CLOSED", TCP_CLOSED, "O_CREAT", O_CREAT_FLAG, "TCP_FIELDS", TCP_FIELDS,
        "OPEN_FIELDS", OPEN_FIELDS, "SPAN_KIND_SERVER", SPAN_KIND_SERVER, "SPAN_KIND_CLIENT", SPAN_KIND_CLIENT, "STATUS_CODE_ERROR", STATUS_CODE_ERROR,
        "T_ATTR_LOG", TAG_ATTR_LOG, "T_ATTR_SPAN", TAG_ATTR_SPAN, "CONTEXT", CX_COUNT);
    if (assumes == NULL || PyModule_AddObject(m, "ASSUMES", assumes) < 0) {
        Py_XDECREF(assumes);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
