/* The cni-log receiver's compiled line parser and record writer (module tapio.receivers.cni_log._fast).
 *
 * `write` takes one batch's lines and, for every line it fully understands,
 * writes the same LogRecord item (`otlpwire.item` framing) that
 * _records.RecordWriter writes in Python; a line it is not sure about gets
 * None and is left to the Python path, which stays the reference (tests
 * compare every line's bytes and the style counts of both paths).
 *
 * What is done here mirrors tapio/receivers/cni_log/_parser.py step by step
 * (each function names the Python one it follows); the regular expressions
 * it emulates and the tables it copies are listed in ASSUMES, which
 * _records.py compares with the parser's own before using this module.
 * Accepted lines are conservative:
 * - ASCII printable only (0x20-0x7e), at most MAX_LINE bytes;
 * - JSON strings with no escapes but \" \\ \/ (nested values: any valid one);
 * - quoted values without backslashes, numbers of at most 18 digits;
 * - timestamps without a zone only when the naive zone is UTC.
 * The addresses in a text come from the parser's cache `_IPS_IN` (Python
 * fills it on a miss: its _IP_TOKEN pattern is not ported).
 */
#define _GNU_SOURCE
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <ctype.h>
#include <string.h>

#define MAX_LINE (16 * 1024)
#define MAX_ATTRS 64
#define MAX_IPS 64
#define MAX_HELD 32
#define MAX_FIELDS 128
#define MAX_DEPTH 64
#define MAX_EXTRA_FIELDS 16
#define MAX_EXTRA_VALUE 256
#define EXTRA_PREFIX "tapio.cni.field."

enum { OK = 0, FALLBACK = 1, ERR = -1 };
enum { ST_CALICO, ST_CILIUM, ST_MULTUS, ST_AWS, ST_AZURE, ST_JSON, ST_KV, ST_UNPARSED, N_STYLES };
static const char *STYLE_NAMES[N_STYLES] = {"calico", "cilium", "multus", "aws-vpc-cni", "azure-cni", "json", "kv", "unparsed"};
static const char *STYLE_PLUGIN[N_STYLES] = {"calico", "cilium-cni", "multus", "aws-cni", "azure-vnet", NULL, NULL, NULL};

typedef struct { const char *p; Py_ssize_t n; } Str;
#define LIT(s) ((Str){(s), (Py_ssize_t)sizeof(s) - 1})

static int eq(Str a, Str b) { return a.n == b.n && memcmp(a.p, b.p, (size_t)a.n) == 0; }
static int eqc(Str a, const char *c) {
    if (a.n == 0) return c[0] == 0;
    if (a.p[0] != c[0]) return 0;
    size_t n = strlen(c);
    return (size_t)a.n == n && memcmp(a.p, c, n) == 0;
}
static int cmp(Str a, Str b) {
    Py_ssize_t m = a.n < b.n ? a.n : b.n;
    int c = m ? memcmp(a.p, b.p, (size_t)m) : 0;
    return c ? c : (a.n > b.n) - (a.n < b.n);
}
static Str cstr(const char *c) { return (Str){c, (Py_ssize_t)strlen(c)}; }
static Str sub(Str s, Py_ssize_t a, Py_ssize_t b) { return (Str){s.p + a, b - a}; }
static int starts(Str s, const char *c) { size_t n = strlen(c); return (size_t)s.n >= n && memcmp(s.p, c, n) == 0; }
/* where needle c first occurs in h at or after from, or -1 (memchr on its first byte: needles here are short words) */
static Py_ssize_t find(Str h, Py_ssize_t from, const char *c) {
    size_t n = strlen(c);
    if (from < 0 || from > h.n || n == 0) return n == 0 && from >= 0 && from <= h.n ? from : -1;
    const char *p = h.p + from, *end = h.p + h.n;
    while ((size_t)(end - p) >= n) {
        p = memchr(p, c[0], (size_t)(end - p) - n + 1);
        if (p == NULL) return -1;
        if (memcmp(p + 1, c + 1, n - 1) == 0) return p - h.p;
        p++;
    }
    return -1;
}
static int contains(Str h, const char *c) { return find(h, 0, c) >= 0; }

static int is_digit(int c) { return c >= '0' && c <= '9'; }
static int is_alpha(int c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
static int is_word(int c) { return is_alpha(c) || is_digit(c) || c == '_'; }
static int is_keystart(int c) { return is_alpha(c) || c == '_'; }
static int is_keychar(int c) { return is_word(c) || c == '.' || c == '-'; }
static int is_hex(int c) { return is_digit(c) || (c >= 'a' && c <= 'f'); }
static int at(Str s, Py_ssize_t i) { return i >= 0 && i < s.n ? (unsigned char)s.p[i] : -1; }
/* \b before position i (ASCII: a word char on exactly one side) */
static int boundary(Str s, Py_ssize_t i) {
    int a = at(s, i - 1), b = at(s, i);
    return (a >= 0 && is_word(a)) != (b >= 0 && is_word(b));
}
static Str strip_spaces(Str s) {
    while (s.n && s.p[0] == ' ') { s.p++; s.n--; }
    while (s.n && s.p[s.n - 1] == ' ') s.n--;
    return s;
}
static Str rstrip_spaces(Str s) { while (s.n && s.p[s.n - 1] == ' ') s.n--; return s; }
static int all_digits(Str s) {
    if (!s.n) return 0;
    for (Py_ssize_t i = 0; i < s.n; i++) if (!is_digit((unsigned char)s.p[i])) return 0;
    return 1;
}
/* int() of at most 18 digits (FALLBACK beyond: Python's int has no such bound) */
static int digits_value(Str s, uint64_t *out) {
    if (s.n > 18) return FALLBACK;
    uint64_t v = 0;
    for (Py_ssize_t i = 0; i < s.n; i++) v = v * 10 + (uint64_t)(s.p[i] - '0');
    *out = v;
    return OK;
}

#define COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))
static int in_list(Str s, const char **list, int n) {
    for (int i = 0; i < n; i++) if (eqc(s, list[i])) return 1;
    return 0;
}

/* ------------------------------------------------------------ line state */

enum { V_STR, V_INT, V_IPS };
typedef struct { Str key; int type; Str s; uint64_t i; } Attr;
typedef struct {
    Attr attrs[MAX_ATTRS];
    int na;
    Str ips[MAX_IPS];
    int nips;
} Attrs;
typedef struct {
    Attrs *cur, main;
    PyObject *held[MAX_HELD];
    int nheld;
    char *arena;
    Py_ssize_t used, cap;
    int style, has_time, naive_utc;
    uint64_t ns;
    Str level, message, hint;
} Line;

typedef struct {
    PyObject *ips_cache, *ips_in;
} Context;
static Context ctx;

static char *arena(Line *l, Py_ssize_t n) {
    if (l->used + n > l->cap) return NULL;
    char *p = l->arena + l->used;
    l->used += n;
    return p;
}
static int hold(Line *l, PyObject *o) {
    if (l->nheld >= MAX_HELD) { Py_DECREF(o); return FALLBACK; }
    l->held[l->nheld++] = o;
    return OK;
}
static Str lower(Line *l, Str s) {
    char *p = arena(l, s.n);
    if (p == NULL) return (Str){NULL, -1};
    for (Py_ssize_t i = 0; i < s.n; i++) p[i] = (char)((s.p[i] >= 'A' && s.p[i] <= 'Z') ? s.p[i] + 32 : s.p[i]);
    return (Str){p, s.n};
}

static int attr_find(Line *l, Str key) {
    for (int i = 0; i < l->cur->na; i++) if (eq(l->cur->attrs[i].key, key)) return i;
    return -1;
}
static Attr *attr_add(Line *l, Str key) {
    if (l->cur->na >= MAX_ATTRS) return NULL;
    Attr *a = &l->cur->attrs[l->cur->na++];
    a->key = key;
    return a;
}
/* the attribute under key, added at the end when absent (NULL: too many) */
static Attr *slot(Line *l, Str key) {
    int i = attr_find(l, key);
    return i >= 0 ? &l->cur->attrs[i] : attr_add(l, key);
}
/* attrs[key] = value (in place when present) */
static int set_str(Line *l, Str key, Str v) {
    Attr *a = slot(l, key);
    if (a == NULL) return FALLBACK;
    a->type = V_STR;
    a->s = v;
    return OK;
}
static int add_int(Line *l, Str key, uint64_t v) {
    Attr *a = slot(l, key);
    if (a == NULL) return FALLBACK;
    a->type = V_INT;
    a->i = v;
    return OK;
}
static int setdefault_str(Line *l, Str key, Str v) { return attr_find(l, key) >= 0 ? OK : set_str(l, key, v); }
static int setdefault_int(Line *l, Str key, uint64_t v) { return attr_find(l, key) >= 0 ? OK : add_int(l, key, v); }
/* attrs.pop(key, None): 1 and the value when it was a str */
static int pop_str(Line *l, Str key, Str *out) {
    int i = attr_find(l, key);
    if (i < 0) return 0;
    int found = l->cur->attrs[i].type == V_STR;
    if (found) *out = l->cur->attrs[i].s;
    memmove(&l->cur->attrs[i], &l->cur->attrs[i + 1], sizeof(Attr) * (size_t)(l->cur->na - i - 1));
    l->cur->na--;
    return found ? 1 : -1;
}

static const Str K_IPS_ATTR = {"tapio.cni.ips", 13};

/* one address into attrs["tapio.cni.ips"], created on the first (`_add_ips`); dedupe: no when copying a list whole */
static int add_ip(Line *l, Str ip, int dedupe) {
    int i = attr_find(l, K_IPS_ATTR);
    if (i < 0) {
        Attr *a = attr_add(l, K_IPS_ATTR);
        if (a == NULL) return FALLBACK;
        a->type = V_IPS;
        l->cur->nips = 0;
    } else if (l->cur->attrs[i].type != V_IPS) {
        return FALLBACK;
    } else if (dedupe) {
        for (int k = 0; k < l->cur->nips; k++) if (eq(l->cur->ips[k], ip)) return OK;
    }
    if (l->cur->nips >= MAX_IPS) return FALLBACK;
    l->cur->ips[l->cur->nips++] = ip;
    return OK;
}

/* a Python exception from a callback: the Python path decides (it catches what parse() catches) */
static int py_failed(void) {
    if (PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_Clear();
        return FALLBACK;
    }
    return ERR;
}

static int utf8(PyObject *o, Str *out) {
    if (!PyUnicode_Check(o)) return FALLBACK;
    Py_ssize_t n;
    const char *p = PyUnicode_AsUTF8AndSize(o, &n);
    if (p == NULL) return py_failed();
    *out = (Str){p, n};
    return OK;
}

/* `_add_ips(attrs, [value])` for a str value: the addresses in it from `_IPS_IN` (Python fills it) */
static int add_ips_of(Line *l, Str value) {
    PyObject *key = PyUnicode_FromStringAndSize(value.p, value.n);
    if (key == NULL) return py_failed();
    PyObject *ips = PyDict_GetItemWithError(ctx.ips_cache, key);
    if (ips != NULL) {
        Py_INCREF(ips);
    } else if (PyErr_Occurred()) {
        Py_DECREF(key);
        return py_failed();
    } else {
        ips = PyObject_CallOneArg(ctx.ips_in, key);
        if (ips == NULL) { Py_DECREF(key); return py_failed(); }
    }
    Py_DECREF(key);
    if (hold(l, ips) != OK) return FALLBACK;
    if (!PyTuple_Check(ips)) return FALLBACK;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(ips); k++) {
        Str ip;
        int rc = utf8(PyTuple_GET_ITEM(ips, k), &ip);
        if (rc != OK) return rc;
        if ((rc = add_ip(l, ip, 1)) != OK) return rc;
    }
    return OK;
}

/* ---------------------------------------------------------------- messages */

static const char *ERROR_LEVELS[] = {"error", "err", "critical", "fatal", "panic", "dpanic"};
static const char *AWS_PAREN_ATTR[][2] = {
    {"ContainerID", "container.id"}, {"Netns", "tapio.cni.netns"}, {"IfName", "network.interface.name"},
    {"PodNamespace", "k8s.namespace.name"}, {"PodName", "k8s.pod.name"},
};
static const char *GO_STRUCT_ATTR[][2] = {{"ContainerID", "container.id"}, {"Netns", "tapio.cni.netns"}, {"IfName", "network.interface.name"}};
static const Str K_OPERATION = {"tapio.cni.operation", 19};

static int lit_at(Str s, Py_ssize_t i, const char *w) {
    if (w[0] && (i < 0 || i >= s.n || s.p[i] != w[0])) return 0;
    size_t n = strlen(w);
    return i >= 0 && (size_t)(s.n - i) >= n && memcmp(s.p + i, w, n) == 0;
}

/* _OPERATION.search: the operation, or NULL */
static const char *operation_in(Str m) {
    static const char *cmd[][2] = {{"Add", "ADD"}, {"Del", "DEL"}, {"Check", "CHECK"}, {"Status", "STATUS"}, {"GC", "GC"}};
    static const char *verbs[][2] = {{"add", "ADD"}, {"del", "DEL"}, {"delete", "DEL"}, {"check", "CHECK"}};
    static const char *words[] = {"ADD", "DEL", "CHECK", "GC", "STATUS"};
    for (Py_ssize_t i = 0; i < m.n; i++) {
        if (i > 0 && is_word((unsigned char)m.p[i - 1])) continue;
        if (!strchr("CcpADGS", m.p[i])) continue;
        /* \b[Cc]md_?(Add|Del|Check|Status|GC) */
        if ((m.p[i] == 'C' || m.p[i] == 'c') && lit_at(m, i + 1, "md")) {
            Py_ssize_t j = i + 3;
            if (at(m, j) == '_')
                for (int k = 0; k < COUNT(cmd); k++) if (lit_at(m, j + 1, cmd[k][0])) return cmd[k][1];
            for (int k = 0; k < COUNT(cmd); k++) if (lit_at(m, j, cmd[k][0])) return cmd[k][1];
        }
        /* \b(?:CNI|process) (add|del|delete|check) request */
        Py_ssize_t v = lit_at(m, i, "CNI ") ? i + 4 : lit_at(m, i, "process ") ? i + 8 : -1;
        if (v > 0)
            for (int k = 0; k < COUNT(verbs); k++)
                if (lit_at(m, v, verbs[k][0]) && lit_at(m, v + (Py_ssize_t)strlen(verbs[k][0]), " request")) return verbs[k][1];
        /* \b(ADD|DEL|CHECK|GC|STATUS)\b */
        for (int k = 0; k < COUNT(words); k++)
            if (lit_at(m, i, words[k]) && boundary(m, i + (Py_ssize_t)strlen(words[k]))) return words[k];
        /* ^(Add|Del|Check): */
        if (i == 0)
            for (int k = 0; k < 3; k++)
                if (lit_at(m, 0, cmd[k][0]) && at(m, (Py_ssize_t)strlen(cmd[k][0])) == ':') return cmd[k][1];
    }
    return NULL;
}

/* _AWS_FOR_POD.search: 1 and its groups (cid.p NULL: no third group) */
static int for_pod(Str m, Str *pod, Str *ns, Str *cid) {
    for (Py_ssize_t i = find(m, 0, "for pod "); i >= 0; i = find(m, i + 1, "for pod ")) {
        if (i > 0 && is_word((unsigned char)m.p[i - 1])) continue;
        Py_ssize_t p = i + 8, q = p;
        while (q < m.n && m.p[q] != ' ') q++;
        if (q == p || !lit_at(m, q, " namespace ")) continue;
        Py_ssize_t g2 = q + 11, run = g2;
        while (run < m.n && m.p[run] != ' ') run++;
        for (Py_ssize_t r = g2 + 1; r <= run; r++) {
            static const char *opts[] = {" container", " sandbox", ""};
            for (int o = 0; o < 3; o++) {
                if (!lit_at(m, r, opts[o])) continue;
                Py_ssize_t r1 = r + (Py_ssize_t)strlen(opts[o]);
                for (int sp = 1; sp >= 0; sp--) {
                    if (sp && at(m, r1) != ' ') continue;
                    Py_ssize_t r2 = r1 + sp, h = r2;
                    while (is_hex(at(m, h))) h++;
                    for (int withhex = h - r2 >= 12; withhex >= 0; withhex--) {
                        Py_ssize_t r3 = withhex ? h : r2;
                        if (r3 == m.n || m.p[r3] == ':' || m.p[r3] == ' ') {
                            *pod = sub(m, p, q);
                            *ns = sub(m, g2, r);
                            *cid = withhex ? sub(m, r2, h) : (Str){NULL, 0};
                            return 1;
                        }
                    }
                }
            }
        }
    }
    return 0;
}

/* `_read_message` into the current attribute set */
static int read_message(Line *l, Str msg, Str level) {
    int rc;
    {
        /* Python looks for a few words first; any match of _OPERATION holds one of them, so the search alone says the same */
        const char *op = operation_in(msg);
        if (op && (rc = set_str(l, K_OPERATION, cstr(op))) != OK) return rc;
    }
    if (memchr(msg.p, '(', (size_t)msg.n)) {
        static const char *names[] = {"ContainerID", "Netns", "IfName", "Args", "PodNamespace", "PodName"};
        for (Py_ssize_t i = 0; i < msg.n;) {
            Py_ssize_t end = -1;
            if (i == 0 || !is_word((unsigned char)msg.p[i - 1])) {
                for (int k = 0; k < COUNT(names) && end < 0; k++) {
                    Py_ssize_t o = i + (Py_ssize_t)strlen(names[k]);
                    if (!lit_at(msg, i, names[k]) || at(msg, o) != '(') continue;
                    Py_ssize_t v = o + 1, e = v;
                    while (e < msg.n && msg.p[e] != '(' && msg.p[e] != ')') e++;
                    if (at(msg, e) != ')') continue;
                    end = e + 1;
                    if (e > v && k != 3) {
                        const char *attr = k < 3 ? AWS_PAREN_ATTR[k][1] : AWS_PAREN_ATTR[k - 1][1];
                        if ((rc = setdefault_str(l, cstr(attr), sub(msg, v, e))) != OK) return rc;
                    }
                }
            }
            i = end > 0 ? end : i + 1;
        }
    }
    if (contains(msg, "ipamd")) {
        for (Py_ssize_t i = find(msg, 0, "response from ipamd"); i >= 0; i = find(msg, i + 1, "response from ipamd")) {
            Py_ssize_t e = i + 19;
            if (!boundary(msg, e)) continue;
            Py_ssize_t c = find(msg, e, ":");
            if (c < 0 || at(msg, c + 1) != ' ') continue;
            if ((rc = setdefault_str(l, LIT("tapio.cni.result"), strip_spaces(sub(msg, c + 2, msg.n)))) != OK) return rc;
            break;
        }
    }
    if (contains(msg, "for pod ")) {
        Str pod, ns, cid;
        if (for_pod(msg, &pod, &ns, &cid)) {
            if ((rc = setdefault_str(l, LIT("k8s.pod.name"), pod)) != OK) return rc;
            if ((rc = setdefault_str(l, LIT("k8s.namespace.name"), ns)) != OK) return rc;
            if (cid.p && (rc = setdefault_str(l, LIT("container.id"), cid)) != OK) return rc;
        }
    }
    if (contains(msg, "IfName:") || contains(msg, "ContainerID:")) {
        for (Py_ssize_t i = 0; i < msg.n;) {
            Py_ssize_t end = -1;
            if (i == 0 || !is_word((unsigned char)msg.p[i - 1])) {
                for (int k = 0; k < COUNT(GO_STRUCT_ATTR) && end < 0; k++) {
                    Py_ssize_t o = i + (Py_ssize_t)strlen(GO_STRUCT_ATTR[k][0]);
                    if (!lit_at(msg, i, GO_STRUCT_ATTR[k][0]) || at(msg, o) != ':') continue;
                    Py_ssize_t v = o + 1, e;
                    Str value;
                    if (at(msg, v) == '"' && (e = find(msg, v + 1, "\"")) > 0) {
                        value = sub(msg, v + 1, e);
                        end = e + 1;
                    } else {
                        e = v;
                        while (e < msg.n && msg.p[e] != ' ' && msg.p[e] != '"' && msg.p[e] != '}') e++;
                        value = sub(msg, v, e);
                        end = e;
                    }
                    if (value.n && (rc = setdefault_str(l, cstr(GO_STRUCT_ATTR[k][1]), value)) != OK) return rc;
                }
            }
            i = end > 0 ? end : i + 1;
        }
    }
    if (contains(msg, "IP")) {
        for (Py_ssize_t i = find(msg, 0, "IP"); i >= 0;) {
            Py_ssize_t end = -1;
            if (i == 0 || !is_word((unsigned char)msg.p[i - 1])) {
                /* (?:IPv[46]|IPs?)(?:=|: )\[([^\]]*)\] */
                Py_ssize_t heads[3];
                int nh = 0;
                if (at(msg, i + 2) == 'v' && (at(msg, i + 3) == '4' || at(msg, i + 3) == '6')) heads[nh++] = i + 4;
                if (at(msg, i + 2) == 's') heads[nh++] = i + 3;
                heads[nh++] = i + 2;
                for (int k = 0; k < nh && end < 0; k++) {
                    Py_ssize_t b = at(msg, heads[k]) == '=' ? heads[k] + 1 : lit_at(msg, heads[k], ": ") ? heads[k] + 2 : -1;
                    if (b < 0 || at(msg, b) != '[') continue;
                    Py_ssize_t e = find(msg, b + 1, "]");
                    if (e < 0) continue;
                    end = e + 1;
                    if ((rc = add_ips_of(l, sub(msg, b + 1, e))) != OK) return rc;
                }
                /* IPv[46]Addr:\"([^\"]+)\" */
                if (end < 0 && at(msg, i + 2) == 'v' && (at(msg, i + 3) == '4' || at(msg, i + 3) == '6') && lit_at(msg, i + 4, "Addr:\"")) {
                    Py_ssize_t v = i + 10, e = find(msg, v, "\"");
                    if (e > v) {
                        end = e + 1;
                        if ((rc = add_ips_of(l, sub(msg, v, e))) != OK) return rc;
                    }
                }
            }
            i = find(msg, end > 0 ? end : i + 1, "IP");
        }
    }
    if (msg.n && in_list(level, ERROR_LEVELS, COUNT(ERROR_LEVELS)) && (rc = set_str(l, LIT("error.message"), msg)) != OK) return rc;
    return OK;
}

/* `_from_message`: what the message says, without overriding what the line's fields said */
static int from_message(Line *l) {
    Attrs *main = l->cur, found;
    found.na = found.nips = 0;
    l->cur = &found;
    int rc = read_message(l, l->message, l->level);
    l->cur = main;
    if (rc != OK) return rc;
    for (int k = 0; k < found.na; k++) {
        Attr *a = &found.attrs[k];
        int present = attr_find(l, a->key) >= 0;
        if (a->type == V_IPS) {
            for (int j = 0; j < found.nips; j++) if ((rc = add_ip(l, found.ips[j], present)) != OK) return rc;
        } else if (!present) {
            if ((rc = set_str(l, a->key, a->s)) != OK) return rc;
        }
    }
    return OK;
}

/* ------------------------------------------------------------------ time */

static int64_t days_from_civil(int64_t y, int64_t m, int64_t d) {
    y -= m <= 2;
    int64_t era = (y >= 0 ? y : y - 399) / 400;
    int64_t yoe = y - era * 400;
    int64_t doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1;
    int64_t doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}
static int two(Str s, Py_ssize_t i) { return (s.p[i] - '0') * 10 + (s.p[i + 1] - '0'); }

/* `LineParser._time`: match _TIME at the start of t; *end: where the match ended (0: no match) */
static int parse_time(Line *l, Str t, Py_ssize_t *end) {
    l->has_time = 0;
    l->ns = 0;
    if (end) *end = 0;
    static const char shape[] = "dddd-dd-dd?dd:dd:dd";
    if (t.n < 19) return OK;
    for (int i = 0; i < 19; i++) {
        int c = (unsigned char)t.p[i];
        if (shape[i] == 'd' ? !is_digit(c) : shape[i] == '?' ? (c != 'T' && c != ' ') : c != shape[i]) return OK;
    }
    Py_ssize_t p = 19;
    uint64_t frac = 0;
    int fdigits = 0;
    if (p + 1 < t.n && (t.p[p] == '.' || t.p[p] == ',') && is_digit((unsigned char)t.p[p + 1])) {
        p++;
        while (p < t.n && fdigits < 9 && is_digit((unsigned char)t.p[p])) { frac = frac * 10 + (uint64_t)(t.p[p] - '0'); p++; fdigits++; }
    }
    int has_zone = 0;
    int64_t offset = 0;
    if (p < t.n && (t.p[p] == 'Z' || t.p[p] == 'z')) {
        has_zone = 1;
        p++;
    } else if (p + 2 < t.n && (t.p[p] == '+' || t.p[p] == '-') && is_digit((unsigned char)t.p[p + 1]) && is_digit((unsigned char)t.p[p + 2])) {
        int sign = t.p[p] == '-' ? -1 : 1, hours = two(t, p + 1), minutes = 0;
        p += 3;
        if (at(t, p) == ':' && is_digit(at(t, p + 1)) && is_digit(at(t, p + 2))) {
            minutes = two(t, p + 1);
            p += 3;
        } else if (is_digit(at(t, p)) && is_digit(at(t, p + 1))) {
            minutes = two(t, p);
            p += 2;
        }
        has_zone = 1;
        offset = sign * (hours * 3600 + minutes * 60);
    }
    if (end) *end = p;
    if (!has_zone && !l->naive_utc) return FALLBACK;
    int y = two(t, 0) * 100 + two(t, 2), mo = two(t, 5), d = two(t, 8), h = two(t, 11), mi = two(t, 14), s = two(t, 17);
    static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    if (y < 1 || mo < 1 || mo > 12 || d < 1 || h > 23 || mi > 59) return OK;
    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    if (d > mdays[mo - 1] + (mo == 2 && leap)) return OK;
    if (s > 59) s = 59;
    int64_t seconds = days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + s - offset;
    if (seconds < 0) return OK;
    static const uint64_t scale[] = {1, 100000000, 10000000, 1000000, 100000, 10000, 1000, 100, 10, 1};
    uint64_t fns = fdigits ? frac * scale[fdigits] : 0;
    l->ns = (uint64_t)seconds * 1000000000u + fns;
    l->has_time = seconds > 0 || fns > 0;
    return OK;
}

/* ------------------------------------------------------------------ JSON */

enum { J_STR, J_INT, J_FLOAT, J_TRUE, J_FALSE, J_NULL, J_OBJ, J_ARR };
typedef struct { Str key; int t; Str v; } Field;

static void ws(Str s, Py_ssize_t *p) { while (*p < s.n && s.p[*p] == ' ') (*p)++; }

/* a JSON string at s[*p] == '"'; decoded (only \" \\ \/ are decoded, other escapes are FALLBACK unless skipping) */
static int j_string(Line *l, Str s, Py_ssize_t *p, Str *out, int skip) {
    Py_ssize_t i = *p + 1, start = i;
    while (i < s.n && s.p[i] != '"' && s.p[i] != '\\') i++;
    if (i >= s.n) return FALLBACK;
    if (s.p[i] == '"') {
        if (out) *out = sub(s, start, i);
        *p = i + 1;
        return OK;
    }
    char *buf = skip ? NULL : arena(l, s.n - start);
    if (!skip && buf == NULL) return FALLBACK;
    Py_ssize_t k = i - start;
    if (buf) memcpy(buf, s.p + start, (size_t)k);
    while (i < s.n && s.p[i] != '"') {
        char c = s.p[i];
        if (c == '\\') {
            if (i + 1 >= s.n) return FALLBACK;
            char e = s.p[i + 1];
            if (e == '"' || e == '\\' || e == '/') {
                if (buf) buf[k++] = e;
                i += 2;
                continue;
            }
            if (!skip) return FALLBACK;
            if (strchr("bfnrt", e) && e) { i += 2; continue; }
            if (e == 'u' && i + 5 < s.n && isxdigit((unsigned char)s.p[i + 2]) && isxdigit((unsigned char)s.p[i + 3])
                && isxdigit((unsigned char)s.p[i + 4]) && isxdigit((unsigned char)s.p[i + 5])) { i += 6; continue; }
            return FALLBACK;
        }
        if (buf) buf[k++] = c;
        i++;
    }
    if (i >= s.n) return FALLBACK;
    if (out) *out = (Str){buf, k};
    *p = i + 1;
    return OK;
}

static int j_value(Line *l, Str s, Py_ssize_t *p, Field *f, int depth);

/* a JSON number (its grammar); ints of more than 18 digits are FALLBACK (Python's int() limits them) */
static int j_number(Str s, Py_ssize_t *p, Field *f) {
    Py_ssize_t i = *p, start = i;
    if (at(s, i) == '-') i++;
    if (at(s, i) == '0') i++;
    else if (at(s, i) >= '1' && at(s, i) <= '9') while (is_digit(at(s, i))) i++;
    else return FALLBACK;
    Py_ssize_t int_digits = i - start - (s.p[start] == '-');
    int is_float = 0;
    if (at(s, i) == '.' && is_digit(at(s, i + 1))) { i++; while (is_digit(at(s, i))) i++; is_float = 1; }
    if ((at(s, i) == 'e' || at(s, i) == 'E')) {
        Py_ssize_t j = i + 1;
        if (at(s, j) == '+' || at(s, j) == '-') j++;
        if (is_digit(at(s, j))) { while (is_digit(at(s, j))) j++; i = j; is_float = 1; }
    }
    if (int_digits > 18) return FALLBACK;
    if (f) { f->t = is_float ? J_FLOAT : J_INT; f->v = sub(s, start, i); }
    *p = i;
    return OK;
}

static int j_container(Line *l, Str s, Py_ssize_t *p, int depth, char close) {
    if (depth > MAX_DEPTH) return FALLBACK;
    Py_ssize_t i = *p + 1;
    ws(s, &i);
    if (at(s, i) == close) { *p = i + 1; return OK; }
    for (;;) {
        int rc;
        if (close == '}') {
            if (at(s, i) != '"') return FALLBACK;
            if ((rc = j_string(l, s, &i, NULL, 1)) != OK) return rc;
            ws(s, &i);
            if (at(s, i) != ':') return FALLBACK;
            i++;
            ws(s, &i);
        }
        if ((rc = j_value(l, s, &i, NULL, depth + 1)) != OK) return rc;
        ws(s, &i);
        if (at(s, i) == ',') { i++; ws(s, &i); continue; }
        if (at(s, i) == close) { *p = i + 1; return OK; }
        return FALLBACK;
    }
}

static int lit(Str s, Py_ssize_t *p, const char *w) {
    size_t n = strlen(w);
    if ((size_t)(s.n - *p) < n || memcmp(s.p + *p, w, n) != 0) return 0;
    *p += (Py_ssize_t)n;
    return 1;
}

static int j_value(Line *l, Str s, Py_ssize_t *p, Field *f, int depth) {
    Py_ssize_t start = *p;
    int c = at(s, *p), rc;
    if (c == '"') {
        Str v;
        if ((rc = j_string(l, s, p, &v, f == NULL)) != OK) return rc;
        if (f) { f->t = J_STR; f->v = v; }
        return OK;
    }
    if (c == '{' || c == '[') {
        if ((rc = j_container(l, s, p, depth, c == '{' ? '}' : ']')) != OK) return rc;
        if (f) { f->t = c == '{' ? J_OBJ : J_ARR; f->v = sub(s, start, *p); }
        return OK;
    }
    if (c == '-' || is_digit(c)) return j_number(s, p, f);
    int t = lit(s, p, "true") ? J_TRUE : lit(s, p, "false") ? J_FALSE : lit(s, p, "null") ? J_NULL : -1;
    if (t < 0) return FALLBACK;  /* NaN, Infinity or not JSON: Python decides */
    if (f) f->t = t;
    return OK;
}

/* a whole JSON object's members (`json.loads` of a line that must be exactly one object); duplicate keys are FALLBACK */
static int j_object(Line *l, Str s, Field *fields, int *nf) {
    Py_ssize_t i = 1;
    int n = 0, rc;
    ws(s, &i);
    if (at(s, i) == '}') { i++; goto done; }
    for (;;) {
        if (at(s, i) != '"' || n >= MAX_FIELDS) return FALLBACK;
        Field *f = &fields[n];
        if ((rc = j_string(l, s, &i, &f->key, 0)) != OK) return rc;
        for (int k = 0; k < n; k++) if (eq(fields[k].key, f->key)) return FALLBACK;
        ws(s, &i);
        if (at(s, i) != ':') return FALLBACK;
        i++;
        ws(s, &i);
        if ((rc = j_value(l, s, &i, f, 1)) != OK) return rc;
        n++;
        ws(s, &i);
        if (at(s, i) == ',') { i++; ws(s, &i); continue; }
        if (at(s, i) == '}') { i++; break; }
        return FALLBACK;
    }
done:
    ws(s, &i);
    if (i != s.n) return FALLBACK;
    *nf = n;
    return OK;
}

static Field *field_get(Field *fields, int n, const char *key) {
    for (int i = 0; i < n; i++) if (eqc(fields[i].key, key)) return &fields[i];
    return NULL;
}

/* _scalar(value) as text */
static int scalar(Line *l, Field *f, Str *out) {
    switch (f->t) {
    case J_STR: *out = f->v; return OK;
    case J_TRUE: *out = LIT("true"); return OK;
    case J_FALSE: *out = LIT("false"); return OK;
    case J_INT: *out = eqc(f->v, "-0") ? LIT("0") : f->v; return OK;
    case J_FLOAT: {
        char num[64];
        if (f->v.n >= (Py_ssize_t)sizeof(num)) return FALLBACK;
        memcpy(num, f->v.p, (size_t)f->v.n);
        num[f->v.n] = 0;
        char *r = PyOS_double_to_string(strtod(num, NULL), 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (r == NULL) return py_failed();
        Py_ssize_t n = (Py_ssize_t)strlen(r);
        char *p = arena(l, n);
        if (p) memcpy(p, r, (size_t)n);
        PyMem_Free(r);
        if (!p) return FALLBACK;
        *out = (Str){p, n};
        return OK;
    }
    default: *out = (Str){"", 0}; return OK;
    }
}

/* `_epoch_number`: zap's numeric ts */
static int epoch_number(Line *l, Field *f) {
    l->has_time = 0;
    l->ns = 0;
    static const int64_t scales[] = {1000000000, 1000000, 1000, 1};
    if (f->t == J_INT) {
        int neg = f->v.p[0] == '-';
        uint64_t v;
        if (digits_value(sub(f->v, neg, f->v.n), &v) != OK) return FALLBACK;
        if (neg) return OK;
        for (int k = 0; k < 4; k++) {
            unsigned __int128 ns = (unsigned __int128)v * (uint64_t)scales[k];
            if (ns >= (unsigned __int128)100000000000000000ULL && ns < (unsigned __int128)100000000000000000ULL * 1000) {
                l->ns = (uint64_t)ns;
                l->has_time = 1;
                return OK;
            }
        }
        return OK;
    }
    char num[64];
    if (f->v.n >= (Py_ssize_t)sizeof(num)) return FALLBACK;
    memcpy(num, f->v.p, (size_t)f->v.n);
    num[f->v.n] = 0;
    double d = strtod(num, NULL);
    for (int k = 0; k < 4; k++) {
        double ns = d * (double)scales[k];
        if (1e17 <= ns && ns < 1e20) {
            l->ns = (uint64_t)(unsigned __int128)ns;
            l->has_time = 1;
            return OK;
        }
    }
    return OK;
}

/* `_any_time` */
static int any_time(Line *l, Field *f) {
    l->has_time = 0;
    l->ns = 0;
    if (f == NULL) return OK;
    if (f->t == J_STR) return parse_time(l, f->v, NULL);
    if (f->t == J_INT || f->t == J_FLOAT) return epoch_number(l, f);
    return OK;
}

/* ---------------------------------------------------------------- fields */

enum { K_ATTR, K_CMD, K_SKIP, K_PID, K_IPS, K_CALLER, K_EXTRA };
static const char *FIELD_ATTR[][2] = {
    {"containerid", "container.id"}, {"container_id", "container.id"}, {"cni_containerid", "container.id"},
    {"netns", "tapio.cni.netns"}, {"cni_netns", "tapio.cni.netns"}, {"netnspath", "tapio.cni.netns"},
    {"ifname", "network.interface.name"}, {"cni_ifname", "network.interface.name"},
    {"k8snamespace", "k8s.namespace.name"}, {"k8s_pod_namespace", "k8s.namespace.name"}, {"namespace", "k8s.namespace.name"},
    {"podnamespace", "k8s.namespace.name"}, {"k8spodname", "k8s.pod.name"}, {"k8s_pod_name", "k8s.pod.name"},
    {"pod", "k8s.pod.name"}, {"podname", "k8s.pod.name"}, {"k8s_pod_uid", "k8s.pod.uid"}, {"poduid", "k8s.pod.uid"},
    {"k8s_pod_infra_container_id", "container.id"}, {"container", "container.id"}, {"error", "error.message"},
    {"err", "error.message"}, {"errmsg", "error.message"}, {"result", "tapio.cni.result"}, {"eventuuid", "tapio.cni.event_id"},
    {"network", "tapio.cni.network"}, {"networkname", "tapio.cni.network"}, {"plugin", "tapio.cni.plugin"},
};
static const char *CMD_KEYS[] = {"command", "cni_command", "cmd"};
static const char *ARGS_KEYS[] = {"args", "cni_args"};
static const char *IP_KEYS[] = {"ip", "ips", "ipaddr", "ipv4", "ipv6", "ipv4addr", "ipv6addr", "ipaddress", "ip_address", "podip", "podips"};
static const char *CALLER_KEYS[] = {"caller", "source"};
static const char *LEVEL_KEYS[] = {"level", "lvl", "severity"};
static const char *MESSAGE_KEYS[] = {"msg", "message"};
static const char *TIME_KEYS[] = {"time", "ts", "timestamp", "@timestamp"};
static const char *OPERATIONS[][2] = {
    {"add", "ADD"}, {"del", "DEL"}, {"delete", "DEL"}, {"check", "CHECK"}, {"gc", "GC"}, {"status", "STATUS"}, {"version", "VERSION"},
};
static const char *MULTUS_LEVELS[] = {"panic", "error", "verbose", "debug"};
static int is_header(Str key) {
    return in_list(key, LEVEL_KEYS, COUNT(LEVEL_KEYS)) || in_list(key, MESSAGE_KEYS, COUNT(MESSAGE_KEYS)) || in_list(key, TIME_KEYS, COUNT(TIME_KEYS));
}

static int key_kind(Str key, Str *attr) {
    if (key.n == 0) return K_SKIP;
    char buf[48];
    if (key.n < (Py_ssize_t)sizeof(buf)) {
        for (Py_ssize_t i = 0; i < key.n; i++) buf[i] = (char)((key.p[i] >= 'A' && key.p[i] <= 'Z') ? key.p[i] + 32 : key.p[i]);
        Str low = {buf, key.n};
        for (int i = 0; i < COUNT(FIELD_ATTR); i++) if (eqc(low, FIELD_ATTR[i][0])) { *attr = cstr(FIELD_ATTR[i][1]); return K_ATTR; }
        if (in_list(low, CMD_KEYS, COUNT(CMD_KEYS))) { *attr = LIT("tapio.cni.operation"); return K_CMD; }
        if (in_list(low, ARGS_KEYS, COUNT(ARGS_KEYS))) return K_SKIP;
        if (eqc(low, "pid")) { *attr = LIT("process.pid"); return K_PID; }
        if (in_list(low, IP_KEYS, COUNT(IP_KEYS))) { *attr = K_IPS_ATTR; return K_IPS; }
        if (in_list(low, CALLER_KEYS, COUNT(CALLER_KEYS))) { *attr = LIT("code.file.path"); return K_CALLER; }
    }
    return K_EXTRA;
}

/* `_apply_fields` */
static int apply_fields(Line *l, Field *fields, int n, int skip_headers) {
    int extra = 0, rc;
    for (int j = 0; j < n; j++) {
        Field *f = &fields[j];
        if (skip_headers && is_header(f->key)) continue;
        Str attr = {NULL, 0}, text;
        switch (key_kind(f->key, &attr)) {
        case K_ATTR:
            if (attr_find(l, attr) >= 0) break;
            if ((rc = scalar(l, f, &text)) != OK) return rc;
            if (text.n && (rc = set_str(l, attr, text)) != OK) return rc;
            break;
        case K_EXTRA: {
            if (extra >= MAX_EXTRA_FIELDS) break;
            if ((rc = scalar(l, f, &text)) != OK) return rc;
            if (!text.n && f->t != J_STR) break;
            Py_ssize_t pn = (Py_ssize_t)strlen(EXTRA_PREFIX);
            char *k = arena(l, pn + f->key.n);
            if (k == NULL) return FALLBACK;
            memcpy(k, EXTRA_PREFIX, (size_t)pn);
            memcpy(k + pn, f->key.p, (size_t)f->key.n);
            if (text.n > MAX_EXTRA_VALUE) {
                char *v = arena(l, MAX_EXTRA_VALUE - 1 + 3);
                if (v == NULL) return FALLBACK;
                memcpy(v, text.p, MAX_EXTRA_VALUE - 1);
                memcpy(v + MAX_EXTRA_VALUE - 1, "\xe2\x80\xa6", 3);
                text = (Str){v, MAX_EXTRA_VALUE - 1 + 3};
            }
            if ((rc = set_str(l, (Str){k, pn + f->key.n}, text)) != OK) return rc;
            extra++;
            break;
        }
        case K_CMD: {
            if ((rc = scalar(l, f, &text)) != OK) return rc;
            Str low = lower(l, text);
            if (low.n < 0) return FALLBACK;
            for (int i = 0; i < COUNT(OPERATIONS); i++)
                if (eqc(low, OPERATIONS[i][0])) { if ((rc = setdefault_str(l, attr, cstr(OPERATIONS[i][1]))) != OK) return rc; break; }
            break;
        }
        case K_PID: {
            uint64_t v;
            if (f->t == J_INT) {
                int neg = f->v.p[0] == '-';
                if (digits_value(sub(f->v, neg, f->v.n), &v) != OK) return FALLBACK;
                if (neg) v = (uint64_t)(-(int64_t)v);
            } else if (f->t == J_STR && all_digits(f->v)) {
                if (digits_value(f->v, &v) != OK) return FALLBACK;
            } else {
                break;
            }
            if ((rc = setdefault_int(l, attr, v)) != OK) return rc;
            break;
        }
        case K_IPS:
            if (f->t == J_STR) { if ((rc = add_ips_of(l, f->v)) != OK) return rc; }
            else if (f->t == J_ARR || f->t == J_OBJ) return FALLBACK;
            break;
        case K_CALLER:
            if (f->t == J_STR) {
                Py_ssize_t c = -1;
                for (Py_ssize_t i = f->v.n - 1; i >= 0; i--) if (f->v.p[i] == ':') { c = i; break; }
                if (c < 0) break;
                if ((rc = setdefault_str(l, attr, sub(f->v, 0, c))) != OK) return rc;
                Str line = sub(f->v, c + 1, f->v.n);
                if (all_digits(line)) {
                    uint64_t v;
                    if (digits_value(line, &v) != OK) return FALLBACK;
                    if ((rc = setdefault_int(l, LIT("code.line.number"), v)) != OK) return rc;
                }
            }
            break;
        default:
            break;
        }
    }
    return OK;
}

/* _unquote: FALLBACK for Go escapes */
static int unquote(Str v, Str *out) {
    if (v.n >= 2 && v.p[0] == '"' && v.p[v.n - 1] == '"') {
        Str inner = sub(v, 1, v.n - 1);
        if (memchr(inner.p, '\\', (size_t)inner.n)) return FALLBACK;
        *out = inner;
    } else {
        *out = v;
    }
    return OK;
}

/* the end of a quoted string at s[p] == '"' ("[^"\\]*(?:\\.[^"\\]*)*"), or -1 */
static Py_ssize_t quoted_end(Str s, Py_ssize_t p) {
    Py_ssize_t i = p + 1;
    while (i < s.n) {
        char c = s.p[i];
        if (c == '"') return i + 1;
        if (c == '\\') { if (i + 1 >= s.n) return -1; i += 2; continue; }
        i++;
    }
    return -1;
}
/* the end of a key ([A-Za-z_][\w.\-]*) at p, or -1 */
static Py_ssize_t key_end(Str s, Py_ssize_t p) {
    if (!is_keystart(at(s, p))) return -1;
    Py_ssize_t i = p + 1;
    while (i < s.n && is_keychar((unsigned char)s.p[i])) i++;
    return i;
}

/* one simple pair ` key=("quoted"|[^\s"]*)` at p that ends at a space or the end (_SIMPLE_TAIL's unit); its end or -1 */
static Py_ssize_t simple_pair(Str s, Py_ssize_t p, Py_ssize_t *ke) {
    if (at(s, p) != ' ') return -1;
    Py_ssize_t k = key_end(s, p + 1);
    if (k < 0 || at(s, k) != '=') return -1;
    if (ke) *ke = k;
    Py_ssize_t v = k + 1, e;
    if (at(s, v) == '"') {
        e = quoted_end(s, v);
        if (e < 0) return -1;
    } else {
        e = v;
        while (e < s.n && s.p[e] != ' ' && s.p[e] != '"') e++;
    }
    if (e < s.n && s.p[e] != ' ') return -1;
    return e;
}

/* `_scan_sorted_fields` */
static int scan_sorted_fields(Line *l, Str rest, Str *message, Field *fields, int *nf) {
    typedef struct { Py_ssize_t start, vstart; Str key; } Cand;
    Cand cands[MAX_FIELDS];
    int nc = 0, depth = 0;
    Py_ssize_t pos = 0;
    (void)l;
    while (pos < rest.n) {
        char c = rest.p[pos];
        if (c == '"') {
            Py_ssize_t e = quoted_end(rest, pos);
            pos = e > 0 ? e : pos + 1;
            continue;
        }
        if (c == '{' || c == '[' || c == '(') { depth++; pos++; continue; }
        if (c == '}' || c == ']' || c == ')') { depth = depth > 0 ? depth - 1 : 0; pos++; continue; }
        if (c == ' ') {
            Py_ssize_t k = key_end(rest, pos + 1);
            if (k > 0 && at(rest, k) == '=') {
                if (depth == 0) {
                    if (nc >= MAX_FIELDS) return FALLBACK;
                    cands[nc++] = (Cand){pos, k + 1, sub(rest, pos + 1, k)};
                }
                pos = k + 1;
                continue;
            }
        }
        pos++;
    }
    if (nc == 0) { *message = rest; *nf = 0; return OK; }
    int i = nc - 1;
    while (i > 0 && cmp(cands[i - 1].key, cands[i].key) <= 0) i--;
    int n = 0;
    for (int j = i; j < nc; j++) {
        Py_ssize_t end = j + 1 < nc ? cands[j + 1].start : rest.n;
        Str v;
        if (unquote(strip_spaces(sub(rest, cands[j].vstart, end)), &v) != OK) return FALLBACK;
        fields[n++] = (Field){cands[j].key, J_STR, v};
    }
    *message = rstrip_spaces(sub(rest, 0, cands[i].start));
    *nf = n;
    return OK;
}

/* `_split_sorted_fields` */
static int split_sorted_fields(Line *l, Str rest, Str *message, Field *fields, int *nf) {
    *nf = 0;
    if (!memchr(rest.p, '=', (size_t)rest.n)) { *message = rest; return OK; }
    /* _SIMPLE_TAIL.search: the first space from which simple pairs run to the end (memo: 1 yes, 2 no) */
    unsigned char *memo = (unsigned char *)arena(l, rest.n + 1);
    if (memo == NULL) return FALLBACK;
    memset(memo, 0, (size_t)rest.n + 1);
    Py_ssize_t start = -1;
    for (Py_ssize_t p = 0; p < rest.n && start < 0; p++) {
        if (rest.p[p] != ' ') continue;
        Py_ssize_t chain[64];
        int nchain = 0, ok = 0;
        Py_ssize_t q = p;
        for (;;) {
            if (memo[q]) { ok = memo[q] == 1; break; }
            Py_ssize_t e = simple_pair(rest, q, NULL);
            if (nchain < 64) chain[nchain++] = q;
            if (e < 0) { ok = 0; break; }
            if (e == rest.n) { ok = 1; break; }
            q = e;
        }
        for (int c = 0; c < nchain; c++) memo[chain[c]] = ok ? 1 : 2;
        if (ok) start = p;
    }
    if (start >= 0) {
        typedef struct { Str key; Str value; Py_ssize_t begin; } Pair;
        Pair pairs[MAX_FIELDS];
        int np = 0;
        for (Py_ssize_t q = start; q < rest.n;) {
            Py_ssize_t ke, e = simple_pair(rest, q, &ke);
            if (e < 0 || np >= MAX_FIELDS) return FALLBACK;
            pairs[np++] = (Pair){sub(rest, q + 1, ke), sub(rest, ke + 1, e), q};
            q = e;
        }
        int i = np - 1;
        while (i > 0 && cmp(pairs[i - 1].key, pairs[i].key) <= 0) i--;
        Py_ssize_t head_end = pairs[i].begin;
        Str before = {"", 0};
        if (i) {
            before = pairs[i - 1].key;
        } else {
            /* (_KEY_EQ.findall(head) or [""])[-1] */
            Str head = sub(rest, 0, head_end);
            for (Py_ssize_t p = 0; p < head.n;) {
                if (head.p[p] == ' ') {
                    Py_ssize_t k = key_end(head, p + 1);
                    if (k > 0 && at(head, k) == '=') { before = sub(head, p + 1, k); p = k + 1; continue; }
                }
                p++;
            }
        }
        if (!before.n || cmp(before, pairs[i].key) > 0) {
            int n = 0;
            for (int j = i; j < np; j++) {
                Str v;
                if (unquote(pairs[j].value, &v) != OK) return FALLBACK;
                fields[n++] = (Field){pairs[j].key, J_STR, v};
            }
            *message = rstrip_spaces(sub(rest, 0, head_end));
            *nf = n;
            return OK;
        }
    }
    return scan_sorted_fields(l, rest, message, fields, nf);
}

/* ---------------------------------------------------------------- styles */

/* `\d{4}-\d\d-\d\d<sep>\d\d:\d\d:\d\d(?:\.\d{1,9})?` at the start of s, as _CALICO and _BRACKETED begin (where
 * more than 9 digits of fraction fail both): its end, or -1 */
static Py_ssize_t stamp_end(Str s, char sep) {
    static const char shape[] = "dddd-dd-dd?dd:dd:dd";
    if (s.n < 19) return -1;
    for (int i = 0; i < 19; i++) {
        int c = (unsigned char)s.p[i];
        if (shape[i] == 'd' ? !is_digit(c) : shape[i] == '?' ? c != sep : c != shape[i]) return -1;
    }
    Py_ssize_t p = 19;
    if (at(s, p) == '.' && is_digit(at(s, p + 1))) {
        Py_ssize_t q = p + 1;
        while (is_digit(at(s, q))) q++;
        if (q - p - 1 > 9) return -1;
        p = q;
    }
    return p;
}

/* _CALICO.match */
static int parse_calico(Line *l, Str s, int *matched) {
    *matched = 0;
    Py_ssize_t p = stamp_end(s, ' ');
    if (p < 0) return OK;
    Str stamp = sub(s, 0, p);
    if (at(s, p) != ' ' || at(s, p + 1) != '[') return OK;
    p += 2;
    Py_ssize_t lv = p;
    while (is_alpha(at(s, p))) p++;
    if (p == lv || at(s, p) != ']' || at(s, p + 1) != '[') return OK;
    Str level = sub(s, lv, p);
    p += 2;
    Py_ssize_t pd = p;
    while (is_digit(at(s, p))) p++;
    if (p == pd || at(s, p) != ']' || at(s, p + 1) != ' ') return OK;
    Str pid = sub(s, pd, p);
    p += 2;
    Str src = {NULL, 0}, lineno = {NULL, 0};
    {
        Py_ssize_t q = p;
        while (q < s.n && s.p[q] != ' ') q++;
        if (q > p && at(s, q) == ' ') {
            Py_ssize_t r = q + 1, e = -1;
            if (is_digit(at(s, r))) { e = r; while (is_digit(at(s, e))) e++; }
            if (e > 0 && at(s, e) == ':' && at(s, e + 1) == ' ') {
            } else if (s.n - r >= 5 && memcmp(s.p + r, "<nil>", 5) == 0 && at(s, r + 5) == ':' && at(s, r + 6) == ' ') {
                e = r + 5;
            } else if (at(s, r) == '?' && at(s, r + 1) == ':' && at(s, r + 2) == ' ') {
                e = r + 1;
            } else {
                e = -1;
            }
            if (e > 0) {
                src = sub(s, p, q);
                lineno = sub(s, r, e);
                p = e + 2;
            }
        }
    }
    *matched = 1;
    Str rest = sub(s, p, s.n);
    int rc;
    Field fields[MAX_FIELDS];
    int nf;
    if ((rc = split_sorted_fields(l, rest, &l->message, fields, &nf)) != OK) return rc;
    if ((rc = parse_time(l, stamp, NULL)) != OK) return rc;
    l->style = ST_CALICO;
    l->level = lower(l, level);
    if (l->level.n < 0) return FALLBACK;
    if (src.p && !eqc(src, "<nil>") && !eqc(src, "?") && (rc = set_str(l, LIT("code.file.path"), src)) != OK) return rc;
    uint64_t v;
    if (lineno.p && all_digits(lineno)) {
        if (digits_value(lineno, &v) != OK) return FALLBACK;
        if ((rc = add_int(l, LIT("code.line.number"), v)) != OK) return rc;
    }
    if (digits_value(pid, &v) != OK) return FALLBACK;
    if ((rc = add_int(l, LIT("process.pid"), v)) != OK) return rc;
    if ((rc = apply_fields(l, fields, nf, 0)) != OK) return rc;
    return from_message(l);
}

/* _AWS_MARKERS.search */
static int word_at(Str h, const char *w, int before, int after) {
    Py_ssize_t n = (Py_ssize_t)strlen(w);
    for (Py_ssize_t i = find(h, 0, w); i >= 0; i = find(h, i + 1, w)) {
        if (before && !boundary(h, i)) continue;
        if (after && !boundary(h, i + n)) continue;
        return 1;
    }
    return 0;
}
static int aws_markers(Str m) {
    return word_at(m, "ContainerID(", 1, 0) || word_at(m, "Netns(", 1, 0) || word_at(m, "IfName(", 1, 0) || word_at(m, "ipamd", 1, 1)
        || word_at(m, "CNI Plugin", 1, 1) || contains(m, "aws-cni") || word_at(m, "ENI", 1, 1);
}

static int multus_payload_ips(Line *l, Str payload);

/* `_from_multus_message` */
static int from_multus(Line *l) {
    Str msg = l->message;
    int rc;
    Py_ssize_t sep = find(msg, 0, ": ");
    if (sep >= 0) {
        Str verb = sub(msg, 0, sep);
        if (eqc(verb, "Add") || eqc(verb, "Del") || eqc(verb, "Check")) {
            Str rest = sub(msg, sep + 2, msg.n);
            Py_ssize_t sp = find(rest, 0, " ");
            Str head = sp >= 0 ? sub(rest, 0, sp) : rest, payload = sp >= 0 ? sub(rest, sp + 1, rest.n) : (Str){"", 0};
            Str parts[6];
            int np = 0;
            Py_ssize_t b = 0;
            for (Py_ssize_t i = 0; i <= head.n; i++) {
                if (i == head.n || head.p[i] == ':') {
                    if (np < 6) parts[np] = sub(head, b, i);
                    np++;
                    b = i + 1;
                }
            }
            int all = np == 4 || np == 5;
            for (int i = 0; all && i < np; i++) if (!parts[i].n) all = 0;
            if (all) {
                Str ns = parts[0], pod = parts[1], ifname = parts[np - 1], net = parts[np - 2];
                if (np == 5 && !eqc(parts[2], "unknownUID") && (rc = set_str(l, LIT("k8s.pod.uid"), parts[2])) != OK) return rc;
                if ((rc = set_str(l, LIT("k8s.namespace.name"), ns)) != OK) return rc;
                if ((rc = set_str(l, LIT("k8s.pod.name"), pod)) != OK) return rc;
                if ((rc = set_str(l, LIT("network.interface.name"), ifname)) != OK) return rc;
                Py_ssize_t paren = find(net, 0, "(");
                Str netname = paren > 0 ? sub(net, 0, paren) : net;
                if ((rc = set_str(l, LIT("tapio.cni.network"), netname)) != OK) return rc;
                if (eqc(verb, "Add") && starts(payload, "{")) {
                    if ((rc = set_str(l, LIT("tapio.cni.result"), payload)) != OK) return rc;
                    if ((rc = multus_payload_ips(l, payload)) != OK) return rc;
                }
            }
            return OK;
        }
    }
    /* _MULTUS_POD.search */
    for (Py_ssize_t i = find(msg, 0, "["); i >= 0; i = find(msg, i + 1, "[")) {
        Py_ssize_t p = i + 1, a = p;
#define POD_CHAR(c) ((c) >= 0 && (((c) >= 'a' && (c) <= 'z') || is_digit(c) || (c) == '.' || (c) == '-'))
#define POD_START(c) ((c) >= 0 && (((c) >= 'a' && (c) <= 'z') || is_digit(c)))
        if (!POD_START(at(msg, p))) continue;
        while (POD_CHAR(at(msg, p))) p++;
        if (at(msg, p) != '/') continue;
        Str ns = sub(msg, a, p);
        p++;
        a = p;
        if (!POD_START(at(msg, p))) continue;
        while (POD_CHAR(at(msg, p))) p++;
        Str pod = sub(msg, a, p), uid = {NULL, 0}, net = {NULL, 0};
        if (at(msg, p) == '/') {
            Py_ssize_t q = p + 1;
            while (is_hex(at(msg, q)) || at(msg, q) == '-') q++;
            if (q - p - 1 >= 8) { uid = sub(msg, p + 1, q); p = q; }
        }
        if (at(msg, p) == ':') {
            Py_ssize_t q = p + 1;
            while (q < msg.n && msg.p[q] != ']' && msg.p[q] != ' ') q++;
            if (q > p + 1) { net = sub(msg, p + 1, q); p = q; }
        }
        if (at(msg, p) != ']') continue;
        if ((rc = set_str(l, LIT("k8s.namespace.name"), ns)) != OK) return rc;
        if ((rc = set_str(l, LIT("k8s.pod.name"), pod)) != OK) return rc;
        if (uid.p && (rc = set_str(l, LIT("k8s.pod.uid"), uid)) != OK) return rc;
        if (net.p && (rc = set_str(l, LIT("tapio.cni.network"), net)) != OK) return rc;
        return OK;
    }
    return OK;
}

/* a member of a JSON object by key, the last one (a dict keeps the last of duplicates) */
static int j_member(Line *l, Str obj, const char *key, Field *out, int *found) {
    Py_ssize_t i = 1;
    int rc;
    *found = 0;
    ws(obj, &i);
    if (at(obj, i) == '}') return OK;
    for (;;) {
        Str k;
        Field f;
        if ((rc = j_string(l, obj, &i, &k, 0)) != OK) return rc;
        ws(obj, &i);
        i++; /* ':' (validated) */
        ws(obj, &i);
        if ((rc = j_value(l, obj, &i, &f, 1)) != OK) return rc;
        if (eqc(k, key)) { *out = f; *found = 1; }
        ws(obj, &i);
        if (at(obj, i) == ',') { i++; ws(obj, &i); continue; }
        return OK;
    }
}

/* Multus's Add result: json.loads(payload)["ips"] into `_add_ips` */
static int multus_payload_ips(Line *l, Str payload) {
    Py_ssize_t p = 0;
    Field top;
    int rc, found;
    if ((rc = j_value(l, payload, &p, &top, 0)) != OK) return rc;
    ws(payload, &p);
    if (p != payload.n) return FALLBACK;  /* json.loads raises: Python decides */
    if (top.t != J_OBJ) return OK;
    Field ips;
    if ((rc = j_member(l, top.v, "ips", &ips, &found)) != OK) return rc;
    if (!found || ips.t != J_ARR) return OK;
    Str arr = ips.v;
    Py_ssize_t i = 1;
    ws(arr, &i);
    if (at(arr, i) == ']') return OK;
    for (;;) {
        Field item;
        if ((rc = j_value(l, arr, &i, &item, 1)) != OK) return rc;
        if (item.t == J_OBJ) {
            Field addr;
            if ((rc = j_member(l, item.v, "address", &addr, &found)) != OK) return rc;
            if (!found) { addr.t = J_STR; addr.v = (Str){"", 0}; }
            if (addr.t == J_STR && (rc = add_ips_of(l, addr.v)) != OK) return rc;
        } else if (item.t == J_STR) {
            if ((rc = add_ips_of(l, item.v)) != OK) return rc;
        }
        ws(arr, &i);
        if (at(arr, i) == ',') { i++; ws(arr, &i); continue; }
        return OK;
    }
}

/* _BRACKETED.match */
static int parse_bracketed(Line *l, Str s, int *matched) {
    *matched = 0;
    Py_ssize_t p = stamp_end(s, 'T');
    if (p < 0) return OK;
    if (at(s, p) == 'Z') {
        p++;
    } else if ((at(s, p) == '+' || at(s, p) == '-') && is_digit(at(s, p + 1)) && is_digit(at(s, p + 2))) {
        Py_ssize_t q = p + 3;
        if (at(s, q) == ':') q++;
        if (is_digit(at(s, q)) && is_digit(at(s, q + 1))) p = q + 2;
    }
    Str stamp = sub(s, 0, p);
    if (at(s, p) != ' ' || at(s, p + 1) != '[') return OK;
    p += 2;
    Py_ssize_t lv = p;
    while (is_alpha(at(s, p))) p++;
    if (p == lv || at(s, p) != ']') return OK;
    Str level = sub(s, lv, p);
    p++;
    if (at(s, p) == ' ') p++;
    *matched = 1;
    l->message = sub(s, p, s.n);
    l->level = lower(l, level);
    if (l->level.n < 0) return FALLBACK;
    int islower = 1;
    for (Py_ssize_t i = 0; i < level.n; i++) if (level.p[i] < 'a') islower = 0;
    int rc;
    if (in_list(l->level, MULTUS_LEVELS, COUNT(MULTUS_LEVELS)) && islower) l->style = ST_MULTUS;
    else if (eqc(l->hint, "aws-cni") || aws_markers(l->message)) l->style = ST_AWS;
    else l->style = ST_KV;
    if ((rc = parse_time(l, stamp, NULL)) != OK) return rc;
    if (l->style == ST_MULTUS && (rc = from_multus(l)) != OK) return rc;
    return from_message(l);
}

static int parse_json(Line *l, Str s) {
    Field fields[MAX_FIELDS];
    int nf, rc;
    if ((rc = j_object(l, s, fields, &nf)) != OK) return rc;
    Str level = {"", 0};
    l->message = (Str){"", 0};
    for (int k = 0; k < COUNT(LEVEL_KEYS); k++) {
        Field *f = field_get(fields, nf, LEVEL_KEYS[k]);
        if (f && f->t == J_STR) { level = f->v; break; }
    }
    for (int k = 0; k < COUNT(MESSAGE_KEYS); k++) {
        Field *f = field_get(fields, nf, MESSAGE_KEYS[k]);
        if (f && f->t == J_STR) { l->message = f->v; break; }
    }
    Field *stamp = NULL;
    for (int k = 0; k < COUNT(TIME_KEYS) && stamp == NULL; k++) stamp = field_get(fields, nf, TIME_KEYS[k]);
    Field *caller = field_get(fields, nf, "caller"), *subsys = field_get(fields, nf, "subsys"), *component = field_get(fields, nf, "component");
    l->level = lower(l, level);
    if (l->level.n < 0) return FALLBACK;
    if ((subsys && subsys->t == J_STR && eqc(subsys->v, "cilium-cni")) || field_get(fields, nf, "eventUUID")) l->style = ST_CILIUM;
    else if (eqc(l->hint, "aws-cni") || (caller && caller->t == J_STR && contains(caller->v, "routed-eni-cni-plugin"))) l->style = ST_AWS;
    else if ((component && component->t == J_STR && eqc(component->v, "cni")) || starts(l->message, "[cni-")) l->style = ST_AZURE;
    else l->style = ST_JSON;
    if ((rc = any_time(l, stamp)) != OK) return rc;
    if ((rc = apply_fields(l, fields, nf, 1)) != OK) return rc;
    return from_message(l);
}

/* `_logfmt`: 1 and the pairs when the line is key=value pairs from start to end */
static int logfmt(Str s, Field *fields, int *nf, int *isfmt) {
    Py_ssize_t pos = 0;
    int n = 0;
    *isfmt = 0;
    while (pos < s.n) {
        Py_ssize_t p = pos;
        while (p < s.n && s.p[p] == ' ') p++;
        Py_ssize_t k = key_end(s, p);
        if (k < 0 || at(s, k) != '=') return OK;
        Py_ssize_t v = k + 1, e;
        if (at(s, v) == '"' && (e = quoted_end(s, v)) > 0) {
        } else {
            e = v;
            while (e < s.n && s.p[e] != ' ' && s.p[e] != '"') e++;
        }
        if (n >= MAX_FIELDS) return FALLBACK;
        Str value;
        if (unquote(sub(s, v, e), &value) != OK) return FALLBACK;
        fields[n++] = (Field){sub(s, p, k), J_STR, value};
        pos = e;
        if (pos < s.n && s.p[pos] != ' ') return OK;
    }
    *isfmt = n > 0;
    *nf = n;
    return OK;
}

static Field *last_field(Field *fields, int n, const char *key) {
    for (int i = n - 1; i >= 0; i--) if (eqc(fields[i].key, key)) return &fields[i];
    return NULL;
}

static int parse_kv(Line *l, Field *fields, int nf) {
    Field *f;
    Str level = {"", 0};
    l->message = (Str){"", 0};
    for (int k = 0; k < COUNT(LEVEL_KEYS); k++) if ((f = last_field(fields, nf, LEVEL_KEYS[k]))) { level = f->v; break; }
    for (int k = 0; k < COUNT(MESSAGE_KEYS); k++) if ((f = last_field(fields, nf, MESSAGE_KEYS[k]))) { l->message = f->v; break; }
    Field *stamp = NULL;
    for (int k = 0; k < COUNT(TIME_KEYS) && stamp == NULL; k++) stamp = last_field(fields, nf, TIME_KEYS[k]);
    f = last_field(fields, nf, "subsys");
    l->style = f && eqc(f->v, "cilium-cni") ? ST_CILIUM : ST_KV;
    l->level = lower(l, level);
    if (l->level.n < 0) return FALLBACK;
    int rc;
    if ((rc = any_time(l, stamp)) != OK) return rc;
    if ((rc = apply_fields(l, fields, nf, 1)) != OK) return rc;
    return from_message(l);
}

/* _LOOSE_PAIR at p of s (lookbehind: start of s or a space before); its end or -1 */
static Py_ssize_t loose_pair(Str s, Py_ssize_t p, Py_ssize_t *ke) {
    if (p > 0 && s.p[p - 1] != ' ') return -1;
    Py_ssize_t k = key_end(s, p);
    if (k < 0 || at(s, k) != '=') return -1;
    *ke = k;
    Py_ssize_t v = k + 1, e;
    if (at(s, v) == '"' && (e = quoted_end(s, v)) > 0) return e;
    e = v;
    while (e < s.n && s.p[e] != ' ' && s.p[e] != '"') e++;
    return e > v ? e : -1;
}

static const char *SEVERITY_WORDS[] = {"trace", "debug", "verbose", "info", "information", "notice", "warn", "warning",
                                       "error", "err", "critical", "fatal", "panic", "dpanic"};
static const int SEVERITY_NUMBERS[] = {1, 5, 9, 9, 9, 10, 13, 13, 17, 17, 21, 21, 21, 21};
static const char *SEVERITY_TEXTS[] = {"TRACE", "DEBUG", "INFO", "INFO", "INFO", "INFO", "WARN", "WARN",
                                       "ERROR", "ERROR", "FATAL", "FATAL", "FATAL", "FATAL"};

/* `_parse_loose`: 0 in *matched when no pair is found (unparsed) */
static int parse_loose(Line *l, Str s, int *matched) {
    Field fields[MAX_FIELDS];
    int nf = 0, rc;
    *matched = 0;
    for (Py_ssize_t p = 0; p < s.n;) {
        Py_ssize_t ke, e = loose_pair(s, p, &ke);
        if (e < 0) { p++; continue; }
        if (nf >= MAX_FIELDS) return FALLBACK;
        Str v;
        if (unquote(sub(s, ke + 1, e), &v) != OK) return FALLBACK;
        fields[nf++] = (Field){sub(s, p, ke), J_STR, v};
        p = e;
    }
    if (!nf) return OK;
    *matched = 1;
    Py_ssize_t end;
    if ((rc = parse_time(l, s, &end)) != OK) return rc;
    Str text = s;
    if (end > 0) {
        text = sub(s, end, s.n);
        while (text.n && text.p[0] == ' ') { text.p++; text.n--; }
    }
    Py_ssize_t sp = find(text, 0, " ");
    Str word = sp >= 0 ? sub(text, 0, sp) : text, after = sp >= 0 ? sub(text, sp + 1, text.n) : (Str){"", 0};
    while (word.n && strchr("[]:", word.p[0])) { word.p++; word.n--; }
    while (word.n && strchr("[]:", word.p[word.n - 1])) word.n--;
    Str level = lower(l, word);
    if (level.n < 0) return FALLBACK;
    if (in_list(level, SEVERITY_WORDS, COUNT(SEVERITY_WORDS))) text = after;
    else level = (Str){"", 0};
    l->level = level;
    l->message = text;
    for (Py_ssize_t p = 0; p < text.n; p++) {
        Py_ssize_t ke;
        if (loose_pair(text, p, &ke) >= 0) { l->message = strip_spaces(sub(text, 0, p)); break; }
    }
    l->style = ST_KV;
    if ((rc = apply_fields(l, fields, nf, 0)) != OK) return rc;
    return from_message(l);
}

/* `_from_cni_args` over the whole line */
static int from_cni_args(Line *l, Str line) {
    static const char *names[] = {"NAMESPACE", "NAME", "UID", "INFRA_CONTAINER_ID"};
    static const char *attrs[] = {"k8s.namespace.name", "k8s.pod.name", "k8s.pod.uid", "container.id"};
    Py_ssize_t pos = 0;
    int rc;
    while ((pos = find(line, pos, "K8S_POD_")) >= 0) {
        Py_ssize_t q = pos + 8;
        int matched = 0;
        for (int k = 0; k < 4 && !matched; k++) {
            Py_ssize_t n = (Py_ssize_t)strlen(names[k]);
            if (line.n - q < n + 1 || memcmp(line.p + q, names[k], (size_t)n) != 0 || line.p[q + n] != '=') continue;
            Py_ssize_t v = q + n + 1, e = v;
            while (e < line.n && !strchr(";\t\n\v\f\r ,)\"']}&\\", line.p[e])) e++;
            if (e == v) continue;
            if ((rc = setdefault_str(l, cstr(attrs[k]), sub(line, v, e))) != OK) return rc;
            matched = 1;
            pos = e;
        }
        if (!matched) pos++;
    }
    return OK;
}

/* `LineParser.parse` */
static int parse_line(Line *l, Str line) {
    if (line.n > MAX_LINE) return FALLBACK;
    for (Py_ssize_t i = 0; i < line.n; i++) {
        unsigned char c = (unsigned char)line.p[i];
        if (c < 0x20 || c > 0x7e) return FALLBACK;
    }
    Str s = strip_spaces(line);
    int rc = OK, matched = 0;
    l->style = ST_UNPARSED;
    if (s.n == 0) {
        matched = 0;
    } else if (s.p[0] == '{') {
        if ((rc = parse_json(l, s)) != OK) return rc;
        matched = 1;
    } else {
        if (is_digit((unsigned char)s.p[0])) {
            if ((rc = parse_calico(l, s, &matched)) != OK) return rc;
            if (!matched && (rc = parse_bracketed(l, s, &matched)) != OK) return rc;
        }
        if (!matched) {
            Field fields[MAX_FIELDS];
            int nf = 0, isfmt;
            if ((rc = logfmt(s, fields, &nf, &isfmt)) != OK) return rc;
            if (isfmt) {
                if ((rc = parse_kv(l, fields, nf)) != OK) return rc;
                matched = 1;
            } else if ((rc = parse_loose(l, s, &matched)) != OK) {
                return rc;
            }
        }
    }
    if (!matched) {
        l->cur->na = 0;
        l->style = ST_UNPARSED;
        l->has_time = 0;
        l->level = (Str){"", 0};
        if ((rc = set_str(l, LIT("tapio.cni.style"), LIT("unparsed"))) != OK) return rc;
        if (l->hint.n && (rc = set_str(l, LIT("tapio.cni.plugin"), l->hint)) != OK) return rc;
        return OK;
    }
    if (contains(line, "K8S_POD_") && (rc = from_cni_args(l, line)) != OK) return rc;
    if ((rc = set_str(l, LIT("tapio.cni.style"), cstr(STYLE_NAMES[l->style]))) != OK) return rc;
    if (STYLE_PLUGIN[l->style]) return set_str(l, LIT("tapio.cni.plugin"), cstr(STYLE_PLUGIN[l->style]));
    Str plugin = {"", 0};
    if (pop_str(l, LIT("tapio.cni.plugin"), &plugin) <= 0 || !plugin.n) plugin = l->hint;
    if (plugin.n) return set_str(l, LIT("tapio.cni.plugin"), plugin);
    return OK;
}

/* --------------------------------------------------------------- encoding */

static Py_ssize_t vlen(uint64_t v) { Py_ssize_t n = 1; while (v >= 0x80) { v >>= 7; n++; } return n; }
static char *wv(char *p, uint64_t v) {
    while (v >= 0x80) { *p++ = (char)((v & 0x7f) | 0x80); v >>= 7; }
    *p++ = (char)v;
    return p;
}
static Py_ssize_t ld(Py_ssize_t n) { return 1 + vlen((uint64_t)n) + n; }

static Py_ssize_t any_size(Line *l, Attr *a) {
    if (a->type == V_STR) return ld(a->s.n);
    if (a->type == V_INT) return 1 + vlen(a->i);
    Py_ssize_t arr = 0;
    for (int k = 0; k < l->cur->nips; k++) arr += ld(ld(l->cur->ips[k].n));
    return ld(arr);
}
static Py_ssize_t kv_size(Line *l, Attr *a, Py_ssize_t *any) {
    *any = any_size(l, a);
    return (a->key.n ? ld(a->key.n) : 0) + ld(*any);
}
static char *write_any(Line *l, Attr *a, char *p) {
    if (a->type == V_STR) {
        *p++ = 0x0a;
        p = wv(p, (uint64_t)a->s.n);
        memcpy(p, a->s.p, (size_t)a->s.n);
        return p + a->s.n;
    }
    if (a->type == V_INT) {
        *p++ = 0x18;
        return wv(p, a->i);
    }
    Py_ssize_t arr = 0;
    for (int k = 0; k < l->cur->nips; k++) arr += ld(ld(l->cur->ips[k].n));
    *p++ = 0x2a;
    p = wv(p, (uint64_t)arr);
    for (int k = 0; k < l->cur->nips; k++) {
        Py_ssize_t n = l->cur->ips[k].n;
        *p++ = 0x0a;
        p = wv(p, (uint64_t)ld(n));
        *p++ = 0x0a;
        p = wv(p, (uint64_t)n);
        memcpy(p, l->cur->ips[k].p, (size_t)n);
        p += n;
    }
    return p;
}

/* the severity fields of a level word (as `otlpwire.log_record` writes them) */
static Str severity_head(Str level, char *buf) {
    for (int k = 0; k < COUNT(SEVERITY_WORDS); k++) {
        if (!eqc(level, SEVERITY_WORDS[k])) continue;
        char *p = buf;
        *p++ = 0x10;
        p = wv(p, (uint64_t)SEVERITY_NUMBERS[k]);
        size_t n = strlen(SEVERITY_TEXTS[k]);
        *p++ = 0x1a;
        *p++ = (char)n;
        memcpy(p, SEVERITY_TEXTS[k], n);
        return (Str){buf, (p - buf) + (Py_ssize_t)n};
    }
    return (Str){"", 0};
}

static PyObject *encode(Line *l, Str body, Str file_frame, Str cut, Str observed) {
    char headbuf[32];
    Str head = severity_head(l->level, headbuf);
    Py_ssize_t anys[MAX_ATTRS], kvs[MAX_ATTRS], attrs = 0;
    for (int i = 0; i < l->cur->na; i++) {
        kvs[i] = kv_size(l, &l->cur->attrs[i], &anys[i]);
        attrs += ld(kvs[i]);
    }
    Py_ssize_t value = ld(body.n);
    Py_ssize_t record = (l->has_time ? 9 : 0) + head.n + ld(value) + attrs + file_frame.n + cut.n + observed.n;
    PyObject *out = PyBytes_FromStringAndSize(NULL, ld(record));
    if (out == NULL) return NULL;
    char *p = PyBytes_AS_STRING(out);
    *p++ = 0x12;
    p = wv(p, (uint64_t)record);
    if (l->has_time) {
        *p++ = 0x09;
        for (int k = 0; k < 8; k++) *p++ = (char)(l->ns >> (8 * k));
    }
    memcpy(p, head.p, (size_t)head.n);
    p += head.n;
    *p++ = 0x2a;
    p = wv(p, (uint64_t)value);
    *p++ = 0x0a;
    p = wv(p, (uint64_t)body.n);
    memcpy(p, body.p, (size_t)body.n);
    p += body.n;
    for (int i = 0; i < l->cur->na; i++) {
        Attr *a = &l->cur->attrs[i];
        *p++ = 0x32;
        p = wv(p, (uint64_t)kvs[i]);
        if (a->key.n) {
            *p++ = 0x0a;
            p = wv(p, (uint64_t)a->key.n);
            memcpy(p, a->key.p, (size_t)a->key.n);
            p += a->key.n;
        }
        *p++ = 0x12;
        p = wv(p, (uint64_t)anys[i]);
        p = write_any(l, a, p);
    }
    memcpy(p, file_frame.p, (size_t)file_frame.n);
    p += file_frame.n;
    memcpy(p, cut.p, (size_t)cut.n);
    p += cut.n;
    memcpy(p, observed.p, (size_t)observed.n);
    p += observed.n;
    if (p != PyBytes_AS_STRING(out) + PyBytes_GET_SIZE(out)) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_SystemError, "cni-log record size mismatch");
        return NULL;
    }
    return out;
}

static void release(Line *l) {
    for (int i = 0; i < l->nheld; i++) Py_DECREF(l->held[i]);
    l->nheld = 0;
}

/* write(lines, hint, file_frame, cut_frame, observed, truncated, naive_utc) -> (items, fallback indexes, style counts) */
static PyObject *fast_write(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *lines, *truncated;
    const char *hint, *ff, *cf, *ob;
    Py_ssize_t hint_n, ff_n, cf_n, ob_n;
    int naive_utc;
    if (!PyArg_ParseTuple(args, "O!s#y#y#y#Op", &PyList_Type, &lines, &hint, &hint_n, &ff, &ff_n, &cf, &cf_n, &ob, &ob_n, &truncated, &naive_utc))
        return NULL;
    if (ctx.ips_cache == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_fast.configure was not called");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(lines);
    int check_cut = PyObject_IsTrue(truncated);
    if (check_cut < 0) return NULL;
    PyObject *items = PyList_New(n), *fallbacks = PyList_New(0);
    Line *l = PyMem_Malloc(sizeof(Line));
    char *buf = PyMem_Malloc(4 * MAX_LINE + 8192);
    long counts[N_STYLES] = {0};
    if (items == NULL || fallbacks == NULL || l == NULL || buf == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *text = PyList_GET_ITEM(lines, i), *item = NULL;
        int rc = FALLBACK;
        if (PyUnicode_CheckExact(text) && PyUnicode_IS_ASCII(text)) {
            Str line = {(const char *)PyUnicode_DATA(text), PyUnicode_GET_LENGTH(text)};
            l->cur = &l->main;
            l->main.na = l->main.nips = l->nheld = 0;
            l->arena = buf;
            l->used = 0;
            l->cap = 4 * MAX_LINE + 8192;
            l->has_time = 0;
            l->ns = 0;
            l->naive_utc = naive_utc;
            l->hint = (Str){hint, hint_n};
            l->level = l->message = (Str){"", 0};
            rc = parse_line(l, line);
            if (rc == OK) {
                Str cut = {"", 0};
                if (check_cut) {
                    PyObject *idx = PyLong_FromSsize_t(i);
                    int in = idx ? PySequence_Contains(truncated, idx) : -1;
                    Py_XDECREF(idx);
                    if (in < 0) { release(l); goto fail; }
                    if (in) cut = (Str){cf, cf_n};
                }
                item = encode(l, line, (Str){ff, ff_n}, cut, (Str){ob, ob_n});
                if (item == NULL) { release(l); goto fail; }
                counts[l->style]++;
            }
            release(l);
            if (rc == ERR) goto fail;
        }
        if (item == NULL) {
            Py_INCREF(Py_None);
            item = Py_None;
            PyObject *idx = PyLong_FromSsize_t(i);
            if (idx == NULL || PyList_Append(fallbacks, idx) < 0) { Py_XDECREF(idx); Py_DECREF(item); goto fail; }
            Py_DECREF(idx);
        }
        PyList_SET_ITEM(items, i, item);
    }
    PyMem_Free(l);
    PyMem_Free(buf);
    PyObject *styles = PyDict_New();
    if (styles == NULL) { Py_DECREF(items); Py_DECREF(fallbacks); return NULL; }
    for (int s = 0; s < N_STYLES; s++) {
        if (!counts[s]) continue;
        PyObject *c = PyLong_FromLong(counts[s]);
        if (c == NULL || PyDict_SetItemString(styles, STYLE_NAMES[s], c) < 0) { Py_XDECREF(c); Py_DECREF(styles); Py_DECREF(items); Py_DECREF(fallbacks); return NULL; }
        Py_DECREF(c);
    }
    return Py_BuildValue("(NNN)", items, fallbacks, styles);
fail:
    Py_XDECREF(items);
    Py_XDECREF(fallbacks);
    PyMem_Free(l);
    PyMem_Free(buf);
    return NULL;
}

/* configure(ips_cache, ips_in): the parser's cache of the addresses in a text, and its filler */
static PyObject *fast_configure(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *ic, *ii;
    if (!PyArg_ParseTuple(args, "O!O", &PyDict_Type, &ic, &ii)) return NULL;
    Py_INCREF(ic);
    Py_INCREF(ii);
    Py_XSETREF(ctx.ips_cache, ic);
    Py_XSETREF(ctx.ips_in, ii);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"write", fast_write, METH_VARARGS, "write(lines, hint, file_frame, cut_frame, observed, truncated, naive_utc) -> (items, fallback indexes, style counts)"},
    {"configure", fast_configure, METH_VARARGS, "configure(ips_cache, ips_in)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fast", "The cni-log receiver's compiled line parser and record writer.", -1, methods, NULL, NULL, NULL, NULL};

/* what this file was written against; _records.py compares it with the parser's own */
static const char *PATTERNS[][2] = {
    {"_TIME", "(\\d{4})-(\\d\\d)-(\\d\\d)[T ](\\d\\d):(\\d\\d):(\\d\\d)(?:[.,](\\d{1,9}))?(Z|z|[+-]\\d\\d(?::?\\d\\d)?)?"},
    {"_CALICO", "(\\d{4}-\\d\\d-\\d\\d \\d\\d:\\d\\d:\\d\\d(?:\\.\\d{1,9})?) \\[([A-Za-z]+)\\]\\[(\\d+)\\] (?:(\\S+) (\\d+|<nil>|\\?): )?(.*)"},
    {"_BRACKETED", "(\\d{4}-\\d\\d-\\d\\dT\\d\\d:\\d\\d:\\d\\d(?:\\.\\d{1,9})?(?:Z|[+-]\\d\\d:?\\d\\d)?) \\[([A-Za-z]+)\\] ?(.*)"},
    {"_FIELD_SCAN", "\"[^\"\\\\]*(?:\\\\.[^\"\\\\]*)*\"|[{}\\[\\]()]| ([A-Za-z_][\\w.\\-]*)="},
    {"_SIMPLE_TAIL", " [A-Za-z_][\\w.\\-]*=(?:\"[^\"\\\\]*(?:\\\\.[^\"\\\\]*)*\"|[^\\s\"]*)(?: [A-Za-z_][\\w.\\-]*=(?:\"[^\"\\\\]*(?:\\\\.[^\"\\\\]*)*\"|[^\\s\"]*))*$"},
    {"_SIMPLE_PAIR", " ([A-Za-z_][\\w.\\-]*)=(\"[^\"\\\\]*(?:\\\\.[^\"\\\\]*)*\"|[^\\s\"]*)"},
    {"_KEY_EQ", " ([A-Za-z_][\\w.\\-]*)="},
    {"_LOGFMT", "\\s*([A-Za-z_][\\w.\\-]*)=(\"(?:[^\"\\\\]|\\\\.)*\"|[^\\s\"]*)"},
    {"_LOOSE_PAIR", "(?<!\\S)([A-Za-z_][\\w.\\-]*)=(\"(?:[^\"\\\\]|\\\\.)*\"|[^\\s\"]+)"},
    {"_AWS_MARKERS", "\\b(?:ContainerID|Netns|IfName)\\(|\\bipamd\\b|\\bCNI Plugin\\b|aws-cni|\\bENI\\b"},
    {"_CNI_ARG", "K8S_POD_(NAMESPACE|NAME|UID|INFRA_CONTAINER_ID)=([^;\\s,)\\\"'\\]}&\\\\]+)"},
    {"_OPERATION", "\\b[Cc]md_?(Add|Del|Check|Status|GC)|\\b(?:CNI|process) (add|del|delete|check) request|\\b(ADD|DEL|CHECK|GC|STATUS)\\b|^(Add|Del|Check):"},
    {"_AWS_PAREN", "\\b(ContainerID|Netns|IfName|Args|PodNamespace|PodName)\\(([^()]*)\\)"},
    {"_AWS_RESPONSE", "response from ipamd\\b[^:]*: (.*)"},
    {"_AWS_FOR_POD", "\\bfor pod (\\S+) namespace (\\S+?)(?: container| sandbox)? ?([0-9a-f]{12,})?(?::|$|\\s)"},
    {"_GO_STRUCT_FIELD", "\\b(ContainerID|Netns|IfName):(?:\\\"([^\\\"]*)\\\"|([^\\s\\\"}]*))"},
    {"_MESSAGE_IPS", "\\b(?:IPv[46]|IPs?)(?:=|: )\\[([^\\]]*)\\]|\\bIPv[46]Addr:\\\"([^\\\"]+)\\\""},
    {"_MULTUS_POD", "\\[([a-z0-9][a-z0-9.\\-]*)/([a-z0-9][a-z0-9.\\-]*)(?:/([0-9a-f\\-]{8,}))?(?::([^\\]\\s]+))?\\]"},
};

static int put(PyObject *d, const char *key, PyObject *v) {
    if (v == NULL) return -1;
    int rc = PyDict_SetItemString(d, key, v);
    Py_DECREF(v);
    return rc;
}
static PyObject *str_tuple(const char **items, int n) {
    PyObject *t = PyTuple_New(n);
    for (int i = 0; t && i < n; i++) {
        PyObject *s = PyUnicode_FromString(items[i]);
        if (s == NULL) { Py_DECREF(t); return NULL; }
        PyTuple_SET_ITEM(t, i, s);
    }
    return t;
}
static PyObject *pair_dict(const char *(*pairs)[2], int n) {
    PyObject *d = PyDict_New();
    for (int i = 0; d && i < n; i++) {
        if (put(d, pairs[i][0], PyUnicode_FromString(pairs[i][1])) < 0) { Py_DECREF(d); return NULL; }
    }
    return d;
}

PyMODINIT_FUNC PyInit__fast(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyObject *a = PyDict_New(), *sev = PyDict_New(), *plugins = PyDict_New();
    if (a == NULL || sev == NULL || plugins == NULL) goto fail;
    for (int k = 0; k < COUNT(SEVERITY_WORDS); k++)
        if (put(sev, SEVERITY_WORDS[k], Py_BuildValue("(is)", SEVERITY_NUMBERS[k], SEVERITY_TEXTS[k])) < 0) goto fail;
    for (int s = 0; s < N_STYLES; s++)
        if (STYLE_PLUGIN[s] && put(plugins, STYLE_NAMES[s], PyUnicode_FromString(STYLE_PLUGIN[s])) < 0) goto fail;
    if (put(a, "PATTERNS", pair_dict(PATTERNS, COUNT(PATTERNS))) < 0
        || put(a, "SEVERITIES", sev) < 0 || put(a, "_STYLE_PLUGIN", plugins) < 0
        || put(a, "STYLES", str_tuple(STYLE_NAMES, N_STYLES)) < 0
        || put(a, "_FIELD_ATTR", pair_dict(FIELD_ATTR, COUNT(FIELD_ATTR))) < 0
        || put(a, "_OPERATIONS", pair_dict(OPERATIONS, COUNT(OPERATIONS))) < 0
        || put(a, "_AWS_PAREN_ATTR", pair_dict(AWS_PAREN_ATTR, COUNT(AWS_PAREN_ATTR))) < 0
        || put(a, "_GO_STRUCT_ATTR", pair_dict(GO_STRUCT_ATTR, COUNT(GO_STRUCT_ATTR))) < 0
        || put(a, "EXTRA_PREFIX", PyUnicode_FromString(EXTRA_PREFIX)) < 0
        || put(a, "MAX_EXTRA_FIELDS", PyLong_FromLong(MAX_EXTRA_FIELDS)) < 0
        || put(a, "MAX_EXTRA_VALUE", PyLong_FromLong(MAX_EXTRA_VALUE)) < 0)
        goto fail;
    static const struct { const char *name; const char **items; int n; } lists[] = {
        {"_CMD_KEYS", CMD_KEYS, COUNT(CMD_KEYS)}, {"_ARGS_KEYS", ARGS_KEYS, COUNT(ARGS_KEYS)}, {"_IP_KEYS", IP_KEYS, COUNT(IP_KEYS)},
        {"_CALLER_KEYS", CALLER_KEYS, COUNT(CALLER_KEYS)}, {"_LEVEL_KEYS", LEVEL_KEYS, COUNT(LEVEL_KEYS)},
        {"_MESSAGE_KEYS", MESSAGE_KEYS, COUNT(MESSAGE_KEYS)}, {"_TIME_KEYS", TIME_KEYS, COUNT(TIME_KEYS)},
        {"_MULTUS_LEVELS", MULTUS_LEVELS, COUNT(MULTUS_LEVELS)}, {"_ERROR_LEVELS", ERROR_LEVELS, COUNT(ERROR_LEVELS)},
    };
    for (int k = 0; k < COUNT(lists); k++)
        if (put(a, lists[k].name, str_tuple(lists[k].items, lists[k].n)) < 0) goto fail;
    if (PyModule_AddObject(m, "ASSUMES", a) < 0) goto fail;
    return m;
fail:
    Py_XDECREF(a);
    Py_DECREF(m);
    return NULL;
}
