/* The ebpf receiver's drain path, compiled: checking a drain's records, and writing its TCP and open events.
 *
 * `_records.RecordWriter` calls these when the module is built (scripts/setup.sh builds it; optional:
 * the Python path is the fallback and the reference this must equal byte for byte, and tests run both).
 *
 * scan(raws, layout) -> (events, keys, kinds, bad)
 *   What `_decode.decode_drain` accepts, without decoding: `events` the records it accepts (the bytes
 *   themselves, in order), `keys` {(pid, cgroup id): events}, `kinds` {kind: events}, `bad` the
 *   records it refuses (the caller asks `_decode.parse_event` why).
 *
 * ring_read(producer, consumer, data, size, limit) -> (records, bad_length)
 *   `_ringbuf.RingBuffer.read` over the map's two mappings (consumer page; producer page and data
 *   area, `data` bytes in): the committed records in order (at most `limit`), stopping at one still
 *   BUSY, skipping DISCARDed ones, then the consumer position published once (a release store).
 *   Positions and headers are read with acquire loads. A length beyond the data area stops the read
 *   without publishing anything and is returned as bad_length (else -1) for the caller to raise.
 *
 * run(events, i, context, drain, id_pool, id_at) -> (stop, id_at)
 *   Writes events[i:] (records `scan` accepted) in order until the first one it does not write: any
 *   kind but TCP and open, or a span needing ids beyond id_pool. Returns that event's index (or
 *   len(events)) and the ids used so far. A piece missing from a cache is made by the writer's own
 *   Python method for it (the CX_FILL_* callables, which store it in the cache) from the values
 *   `_decode` would give, so the caches hold what the Python loop puts there.
 *
 *   context: the writer's caches, constant pieces, fill methods and the layout (order as CX_* below).
 *   drain:   (records or None, spans or None, container pieces by (pid, cgroup id), offset,
 *            tail of a TCP record, tail of an open record).
 *
 * Fields are read at the offsets `_decode`'s layouts give (`layout`, order as LY_* below), little-endian
 * (x86-64, arm64). The bytes are exactly those of the Python loop: the same pieces in the same order
 * (see _records.py). `ASSUMES` lists the numbers taken from _decode and _records, and each field's
 * struct code, so that the Python side refuses a helper that disagrees.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

enum {
    CX_COMMON, CX_LOCALS, CX_PEERS, CX_SHAPES, CX_PATHS, CX_ERRORS, CX_SEV_INFO,
    CX_LPORT, CX_PPORT, CX_DURATION, CX_SOCKET, CX_TCP_FD, CX_OPEN_FD, CX_OPEN_MODE, CX_EVENT_TEXT, CX_EMPTY,
    CX_FILL_SHARED, CX_FILL_LOCAL, CX_FILL_PEER, CX_FILL_SHAPE, CX_FILL_PATH, CX_FILL_ERROR, CX_LAYOUT, CX_COUNT
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
/* the layout tuple: record sizes by kind, then field offsets (codes as LAYOUT_CODES says) */
enum {
    LY_SIZE_EXEC, LY_SIZE_EXIT, LY_SIZE_OPEN, LY_SIZE_TCP, LY_SIZE_OOM, LY_SIZE_SIGNAL,
    LY_TS, LY_CGROUP, LY_KIND, LY_PID, LY_TID, LY_UID, LY_COMM,
    LY_SOCK, LY_START_TS, LY_EVENT, LY_FAMILY, LY_SPORT, LY_DPORT, LY_OLD, LY_NEW, LY_STATES, LY_FD, LY_SADDR, LY_DADDR,
    LY_RET, LY_FLAGS, LY_MODE, LY_PATH, LY_COUNT
};
/* the struct code of each field from LY_TS on: how it is read here */
#define LAYOUT_CODES "QQIIII16sQQIHHHiiIq16s16sqiI256s"
#define COMM_SIZE 16
#define ADDR_SIZE 16
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

static inline uint64_t rd64(const char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}
static inline uint32_t rd32(const char *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}
static inline uint16_t rd16(const char *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* the layout tuple as offsets; -1 when it is not what is expected */
static int read_layout(PyObject *layout, Py_ssize_t *out) {
    if (!PyTuple_CheckExact(layout) || PyTuple_GET_SIZE(layout) != LY_COUNT) {
        PyErr_SetString(PyExc_TypeError, "layout: a tuple of sizes and offsets expected");
        return -1;
    }
    for (Py_ssize_t k = 0; k < LY_COUNT; k++) {
        out[k] = PyLong_AsSsize_t(PyTuple_GET_ITEM(layout, k));
        if (out[k] < 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "layout: negative size or offset");
            return -1;
        }
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

#define BYTES_AT(t, k) PyTuple_GET_ITEM((t), (k))

/* the last value looked up in a cache and what keyed it, kept while run runs (a drain mostly repeats them) */
typedef struct {
    int64_t a, b, c, d, e;
    char raw[16];
    PyObject *container, *value;
} Memo;

#define SHAPE_MEMO 8

/* the pieces of an address (cache keyed by (family, address bytes)), from the memo when it is the last one */
static PyObject *address_piece(Memo *memo, PyObject *cache, PyObject *fill, uint16_t family, const char *addr, Py_ssize_t n, PyObject *keep) {
    if (memo->value && memo->a == family && memcmp(memo->raw, addr, ADDR_SIZE) == 0)
        return memo->value;
    PyObject *found = piece(cache, Py_BuildValue("(ky#)", (unsigned long)family, addr, (Py_ssize_t)ADDR_SIZE), fill, NULL, n, keep);
    if (found != NULL) {
        *memo = (Memo){family, 0, 0, 0, 0, {0}, NULL, found};
        memcpy(memo->raw, addr, ADDR_SIZE);
    }
    return found;
}

/* counts[key] += n */
static int count_into(PyObject *counts, PyObject *key, Py_ssize_t n) {
    if (key == NULL)
        return -1;
    PyObject *was = PyDict_GetItemWithError(counts, key);
    Py_ssize_t now = n;
    if (was != NULL)
        now += PyLong_AsSsize_t(was);
    else if (PyErr_Occurred()) {
        Py_DECREF(key);
        return -1;
    }
    PyObject *v = PyLong_FromSsize_t(now);
    int rc = v == NULL ? -1 : PyDict_SetItem(counts, key, v);
    Py_XDECREF(v);
    Py_DECREF(key);
    return rc;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *raws, *layout;
    if (!PyArg_ParseTuple(args, "O!O", &PyList_Type, &raws, &layout))
        return NULL;
    Py_ssize_t ly[LY_COUNT];
    if (read_layout(layout, ly) < 0)
        return NULL;
    for (int k = 0; k < 6; k++)
        if (ly[LY_SIZE_EXEC + k] < ly[LY_CGROUP] + 8 || ly[LY_SIZE_EXEC + k] < ly[LY_PID] + 4 || ly[LY_SIZE_EXEC + k] < ly[LY_KIND] + 4) {
            PyErr_SetString(PyExc_ValueError, "layout: a record size smaller than its header");
            return NULL;
        }
    PyObject *events = PyList_New(0), *keys = PyDict_New(), *kinds = PyDict_New(), *bad = PyList_New(0);
    Py_ssize_t by_kind[7] = {0};
    uint64_t run_pid = 0, run_cg = 0;
    Py_ssize_t run_n = 0;
    if (events == NULL || keys == NULL || kinds == NULL || bad == NULL)
        goto error;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(raws); i++) {
        PyObject *raw = PyList_GET_ITEM(raws, i);
        int ok = 0;
        uint32_t kind = 0;
        if (PyBytes_CheckExact(raw)) {
            const char *p = PyBytes_AS_STRING(raw);
            Py_ssize_t n = PyBytes_GET_SIZE(raw);
            for (uint32_t k = 1; k <= 6; k++)
                if (n == ly[LY_SIZE_EXEC + k - 1])
                    kind = k;
            if (kind && n >= ly[LY_KIND] + 4 && rd32(p + ly[LY_KIND]) == kind) {
                ok = kind != EV_TCP || (n >= ly[LY_EVENT] + 4 && rd32(p + ly[LY_EVENT]) >= TCP_CONNECT && rd32(p + ly[LY_EVENT]) <= TCP_CLOSE);
            }
        }
        if (!ok) {
            if (PyList_Append(bad, raw) < 0)
                goto error;
            continue;
        }
        if (PyList_Append(events, raw) < 0)
            goto error;
        const char *p = PyBytes_AS_STRING(raw);
        uint64_t pid = rd32(p + ly[LY_PID]), cg = rd64(p + ly[LY_CGROUP]);
        by_kind[kind]++;
        if (run_n && (pid != run_pid || cg != run_cg)) {
            if (count_into(keys, Py_BuildValue("(KK)", (unsigned long long)run_pid, (unsigned long long)run_cg), run_n) < 0)
                goto error;
            run_n = 0;
        }
        run_pid = pid;
        run_cg = cg;
        run_n++;
    }
    if (run_n && count_into(keys, Py_BuildValue("(KK)", (unsigned long long)run_pid, (unsigned long long)run_cg), run_n) < 0)
        goto error;
    for (int k = 1; k <= 6; k++)
        if (by_kind[k] && count_into(kinds, PyLong_FromLong(k), by_kind[k]) < 0)
            goto error;
    return Py_BuildValue("(NNNN)", events, keys, kinds, bad);
error:
    Py_XDECREF(events);
    Py_XDECREF(keys);
    Py_XDECREF(kinds);
    Py_XDECREF(bad);
    return NULL;
}

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
    Py_ssize_t ly[LY_COUNT];
    if (read_layout(PyTuple_GET_ITEM(cx, CX_LAYOUT), ly) < 0)
        return NULL;
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
    /* every field read lies inside a record of its kind's size */
    Py_ssize_t tcp_size = ly[LY_SIZE_TCP], open_size = ly[LY_SIZE_OPEN];
    Py_ssize_t tcp_ends[] = {ly[LY_COMM] + COMM_SIZE, ly[LY_SOCK] + 8, ly[LY_START_TS] + 8, ly[LY_EVENT] + 4, ly[LY_FAMILY] + 2, ly[LY_SPORT] + 2,
                             ly[LY_DPORT] + 2, ly[LY_OLD] + 4, ly[LY_NEW] + 4, ly[LY_STATES] + 4, ly[LY_FD] + 8, ly[LY_SADDR] + ADDR_SIZE,
                             ly[LY_DADDR] + ADDR_SIZE, ly[LY_TS] + 8, ly[LY_CGROUP] + 8, ly[LY_KIND] + 4, ly[LY_PID] + 4, ly[LY_TID] + 4, ly[LY_UID] + 4};
    for (size_t k = 0; k < sizeof tcp_ends / sizeof *tcp_ends; k++)
        if (tcp_ends[k] > tcp_size || (k >= 13 && tcp_ends[k] > open_size))
            goto bad_context;
    if (ly[LY_COMM] + COMM_SIZE > open_size || ly[LY_RET] + 8 > open_size || ly[LY_FLAGS] + 4 > open_size || ly[LY_MODE] + 4 > open_size ||
        ly[LY_PATH] > open_size)
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
    Memo m_shared = {0}, m_local = {0}, m_peer = {0}, m_path = {0}, m_shape[SHAPE_MEMO] = {{0}};
    PyObject *m_path_cut = NULL;
    int shape_next = 0;

    for (; i < n_events; i++) {
        PyObject *raw = PyList_GET_ITEM(events, i);
        if (!PyBytes_CheckExact(raw))
            break;
        const char *p = PyBytes_AS_STRING(raw);
        Py_ssize_t size = PyBytes_GET_SIZE(raw);
        uint32_t kind = size >= ly[LY_KIND] + 4 ? rd32(p + ly[LY_KIND]) : 0;
        if (!((kind == EV_TCP && size == tcp_size) || (kind == EV_OPEN && size == open_size)))
            break;
        uint64_t kts = rd64(p + ly[LY_TS]), cg = rd64(p + ly[LY_CGROUP]);
        uint32_t pid = rd32(p + ly[LY_PID]), tid = rd32(p + ly[LY_TID]), uid = rd32(p + ly[LY_UID]);
        const char *comm = p + ly[LY_COMM];
        if (container == NULL || pid != last_pid || cg != last_cg) {
            PyObject *key = Py_BuildValue("(kK)", (unsigned long)pid, (unsigned long long)cg);
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
        if (!(shared && m_shared.a == pid && m_shared.b == tid && m_shared.c == uid && m_shared.d == (int64_t)cg && m_shared.e == kind &&
              m_shared.container == container && memcmp(m_shared.raw, comm, COMM_SIZE) == 0)) {
            PyObject *key = Py_BuildValue("(kkky#KkO)", (unsigned long)pid, (unsigned long)tid, (unsigned long)uid, comm, (Py_ssize_t)COMM_SIZE,
                                          (unsigned long long)cg, (unsigned long)kind, container);
            PyObject *fill_args = key ? Py_BuildValue("(OOOOOOO)", PyTuple_GET_ITEM(key, 5), PyTuple_GET_ITEM(key, 0), PyTuple_GET_ITEM(key, 1),
                                                      PyTuple_GET_ITEM(key, 2), PyTuple_GET_ITEM(key, 3), PyTuple_GET_ITEM(key, 4), container) : NULL;
            if (key != NULL && fill_args == NULL) {
                Py_DECREF(key);
                goto error;
            }
            shared = piece(common, key, fill_shared, fill_args, 2, keep);
            if (shared == NULL)
                goto miss;
            m_shared = (Memo){pid, tid, uid, (int64_t)cg, kind, {0}, container, shared};
            memcpy(m_shared.raw, comm, COMM_SIZE);
        }
        __int128 ts = (__int128)kts + offset;
        rec.len = 0;
        if ((ts != 0 && put_fixed64(&rec, 0x09, (uint64_t)ts) < 0) || put_bytes(&rec, sev) < 0)
            goto error;
        PyObject *tail;
        if (kind == EV_TCP) {
            uint64_t sock = rd64(p + ly[LY_SOCK]), start_ts = rd64(p + ly[LY_START_TS]);
            uint32_t event = rd32(p + ly[LY_EVENT]), states = rd32(p + ly[LY_STATES]);
            uint16_t family = rd16(p + ly[LY_FAMILY]), sport = rd16(p + ly[LY_SPORT]), dport = rd16(p + ly[LY_DPORT]);
            int32_t old = (int32_t)rd32(p + ly[LY_OLD]), new_state = (int32_t)rd32(p + ly[LY_NEW]);
            int64_t fd = (int64_t)rd64(p + ly[LY_FD]);
            const char *saddr = p + ly[LY_SADDR], *daddr = p + ly[LY_DADDR];
            if (event < TCP_CONNECT || event > TCP_CLOSE)
                break;
            PyObject *local = address_piece(&m_local, locals, fill_local, family, saddr, 2, keep);
            PyObject *peer = local ? address_piece(&m_peer, peers, fill_peer, family, daddr, 3, keep) : NULL;
            if (peer == NULL)
                goto miss;
            PyObject *shape = NULL;
            for (int k = 0; k < SHAPE_MEMO && shape == NULL; k++)
                if (m_shape[k].value && m_shape[k].a == event && m_shape[k].b == old && m_shape[k].c == new_state && m_shape[k].d == states)
                    shape = m_shape[k].value;
            if (shape == NULL) {
                shape = piece(shapes, Py_BuildValue("(kiik)", (unsigned long)event, (int)old, (int)new_state, (unsigned long)states), fill_shape, NULL, 2, keep);
                if (shape == NULL)
                    goto miss;
                m_shape[shape_next] = (Memo){event, old, new_state, states, 0, {0}, NULL, shape};
                shape_next = (shape_next + 1) % SHAPE_MEMO;
            }
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
                    put_int_piece(b, tag, lport_h, sport) < 0 || put_bytes(b, BYTES_AT(peer, dest)) < 0 ||
                    put_int_piece(b, tag, pport_h, dport) < 0 || put_bytes(b, BYTES_AT(shape, dest)) < 0 ||
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
            int64_t ret = (int64_t)rd64(p + ly[LY_RET]);
            int32_t flags = (int32_t)rd32(p + ly[LY_FLAGS]);
            uint32_t mode = rd32(p + ly[LY_MODE]);
            const char *rp = p + ly[LY_PATH];
            const char *nul = memchr(rp, 0, size - ly[LY_PATH]);
            Py_ssize_t cut_n = nul == NULL ? size - ly[LY_PATH] : nul - rp;
            PyObject *found = m_path.value;
            if (!(found && m_path.a == flags && PyBytes_GET_SIZE(m_path_cut) == cut_n && memcmp(PyBytes_AS_STRING(m_path_cut), rp, cut_n) == 0)) {
                PyObject *cut = PyBytes_FromStringAndSize(rp, cut_n);
                if (cut == NULL)
                    goto error;
                found = piece(paths, Py_BuildValue("(Oi)", cut, (int)flags), fill_path, NULL, 3, keep);
                if (found != NULL && PyList_Append(keep, cut) < 0)
                    found = NULL;
                Py_DECREF(cut);
                if (found == NULL)
                    goto miss;
                m_path = (Memo){flags, 0, 0, 0, 0, {0}, NULL, found};
                m_path_cut = cut;
            }
            PyObject *err = NULL;
            if (ret < 0) {
                PyObject *ret_o = PyLong_FromLongLong(ret);
                err = piece(errors, ret_o, fill_error, ret_o ? PyTuple_Pack(1, ret_o) : NULL, 2, keep);
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
    PyErr_SetString(PyExc_TypeError, "context or drain tuple holds the wrong types, or a layout whose fields lie outside its records");
    return NULL;
}

#define RB_BUSY_BIT (1u << 31)
#define RB_DISCARD_BIT (1u << 30)
#define RB_HEADER_SIZE 8

static PyObject *ring_read(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *producer, *consumer;
    Py_ssize_t data, size, limit;
    if (!PyArg_ParseTuple(args, "OOnnn", &producer, &consumer, &data, &size, &limit))
        return NULL;
    if (size <= 0 || (size & (size - 1)) || data < 8 || data % 8) {
        PyErr_SetString(PyExc_ValueError, "ring_read: size must be a power of two and data a multiple of 8");
        return NULL;
    }
    Py_buffer pb, cb;
    if (PyObject_GetBuffer(producer, &pb, PyBUF_SIMPLE) < 0)
        return NULL;
    if (PyObject_GetBuffer(consumer, &cb, PyBUF_WRITABLE) < 0) {
        PyBuffer_Release(&pb);
        return NULL;
    }
    PyObject *out = NULL;
    if (pb.len < data + 2 * size || cb.len < 8) {
        PyErr_SetString(PyExc_ValueError, "ring_read: the mappings are smaller than the ring buffer");
        goto done;
    }
    const char *base = pb.buf;
    uint64_t *cons_p = cb.buf;
    const uint64_t *prod_p = pb.buf;
    uint64_t mask = (uint64_t)size - 1, cons = __atomic_load_n(cons_p, __ATOMIC_RELAXED), start = cons;
    uint64_t prod = __atomic_load_n(prod_p, __ATOMIC_ACQUIRE);
    Py_ssize_t bad = -1;
    out = PyList_New(0);
    if (out == NULL)
        goto done;
    while (cons < prod && PyList_GET_SIZE(out) < limit) {
        const char *rec = base + data + (cons & mask);
        uint32_t length = __atomic_load_n((const uint32_t *)rec, __ATOMIC_ACQUIRE);
        if (length & RB_BUSY_BIT)
            break;
        uint32_t n = length & ~(RB_BUSY_BIT | RB_DISCARD_BIT);
        if ((Py_ssize_t)n > size - RB_HEADER_SIZE) {
            bad = n;
            break;
        }
        if (!(length & RB_DISCARD_BIT)) {
            PyObject *item = PyBytes_FromStringAndSize(rec + RB_HEADER_SIZE, n);
            if (item == NULL || PyList_Append(out, item) < 0) {
                Py_XDECREF(item);
                Py_CLEAR(out);
                goto done;
            }
            Py_DECREF(item);
        }
        cons += (n + RB_HEADER_SIZE + 7) & ~(uint64_t)7;
        if (cons >= prod)
            prod = __atomic_load_n(prod_p, __ATOMIC_ACQUIRE);
    }
    if (bad < 0 && cons != start)
        __atomic_store_n(cons_p, cons, __ATOMIC_RELEASE);
    {
        PyObject *pair = Py_BuildValue("(Nn)", out, bad);
        out = pair;
    }
done:
    PyBuffer_Release(&pb);
    PyBuffer_Release(&cb);
    return out;
}

static PyMethodDef methods[] = {
    {"ring_read", ring_read, METH_VARARGS, "The committed records of a BPF ring buffer's mappings, and a bad length or -1."},
    {"scan", scan, METH_VARARGS, "The records of a drain decode_drain accepts, counted by (pid, cgroup id) and kind, and those it refuses."},
    {"run", run, METH_VARARGS, "Write the TCP and open events of events[i:] until another kind; returns (stop, id_at)."},
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
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:s,s:(kki)}", "EV_OPEN", EV_OPEN, "EV_TCP", EV_TCP, "TCP_CONNECT", TCP_CONNECT,
        "TCP_ACCEPT", TCP_ACCEPT, "TCP_CLOSE", TCP_CLOSE, "TCP_SYN_SENT", TCP_SYN_SENT, "TCP_CLOSED", TCP_CLOSED, "O_CREAT", O_CREAT_FLAG,
        "SPAN_KIND_SERVER", SPAN_KIND_SERVER, "SPAN_KIND_CLIENT", SPAN_KIND_CLIENT, "STATUS_CODE_ERROR", STATUS_CODE_ERROR,
        "T_ATTR_LOG", TAG_ATTR_LOG, "T_ATTR_SPAN", TAG_ATTR_SPAN, "CONTEXT", CX_COUNT, "LAYOUT", LY_COUNT, "COMM_SIZE", COMM_SIZE,
        "LAYOUT_CODES", LAYOUT_CODES, "RINGBUF", (unsigned long)RB_BUSY_BIT, (unsigned long)RB_DISCARD_BIT, RB_HEADER_SIZE);
    if (assumes == NULL || PyModule_AddObject(m, "ASSUMES", assumes) < 0) {
        Py_XDECREF(assumes);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
