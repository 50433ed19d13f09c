/* OTLP/JSON from an export request's protobuf bytes, compiled: what `tapio.otlpjson.encode_serialized` writes.
 *
 * `otlpjson.encode_serialized` uses this when it is built (scripts/setup.sh and pip build it; optional).
 * The reference is the Python walk in otlpjson.py, itself byte-identical to `encode(cls.FromString(data))`:
 * this walk writes the same bytes or gives up (returns None) and the Python path runs. Tests compare all three.
 *
 * Walker(messages) -> walker
 *   messages[i] is message type i (0 is the request): a sequence of field tuples
 *   (number, prefix, kind, wire, repeated, implicit, oneof, sub), as otlpjson builds them from the
 *   descriptors (its `_wire_plan` specs): prefix the UTF-8 text '"jsonName":', kind an index into
 *   KINDS, wire the field's wire type, implicit whether a zero value is left out (proto3 implicit
 *   presence), oneof the index of the field's oneof in its message (or -1), sub the message type
 *   index of a message field (for key_values: the type of KeyValue.value, i.e. AnyValue), else -1.
 *
 * walker.encode(data) -> bytes, or None where the Python path must write the document
 *
 * What it writes, as the Python walk: fields in field-number order, each field's JSON name; the last
 * value of a singular field; repeated fields in the order of their elements, packed or not (mixed);
 * zero values of implicit-presence fields left out, empty repeated fields left out; unknown fields
 * skipped; 64-bit integers as decimal strings, 32-bit ones and enums as numbers; doubles and floats
 * as Python's repr of the double (PyOS_double_to_string 'r'), NaN and infinities as "NaN",
 * "Infinity", "-Infinity"; bytes in base64, ids (kind hex) in lowercase hex; strings escaped as
 * json.encoder.c_encode_basestring does (", \, \b \f \n \r \t, other controls as \u00xx, the rest as
 * it is); a KeyValue as {"key":...} with its key always, and "value" when the value is set.
 *
 * When it gives up (returns None): invalid UTF-8 in a string, bytes that are not well-formed
 * protobuf (truncated, a varint beyond 64 bits, a tag beyond 5 bytes, field number 0, groups, a
 * known field in another wire type), a bool other than 0 or 1, a singular message field twice (the
 * parser would merge them), two members of one oneof, nesting deeper than 64 levels. The Python
 * walk gives up on these too (it reads tags of up to 10 bytes), and then protobuf's parser decides.
 *
 * The GIL is held throughout: the walk reads `data` and writes its own buffer only.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* field kinds: the order of otlpjson's _X_* constants (KINDS says it, and otlpjson checks) */
enum {
    K_MESSAGE, K_KEY_VALUES, K_INT64, K_UINT64, K_INT32, K_UINT32, K_SINT32, K_SINT64, K_BOOL, K_FIXED64,
    K_SFIXED64, K_FIXED32, K_SFIXED32, K_DOUBLE, K_FLOAT, K_STRING, K_HEX, K_BASE64, K_COUNT
};
static const char *const KIND_NAMES[K_COUNT] = {
    "message", "key_values", "int64", "uint64", "int32", "uint32", "sint32", "sint64", "bool", "fixed64",
    "sfixed64", "fixed32", "sfixed32", "double", "float", "string", "hex", "base64",
};
enum { WT_VARINT = 0, WT_FIXED64 = 1, WT_LEN = 2, WT_FIXED32 = 5 };
static const uint8_t KIND_WIRE[K_COUNT] = {
    WT_LEN, WT_LEN, WT_VARINT, WT_VARINT, WT_VARINT, WT_VARINT, WT_VARINT, WT_VARINT, WT_VARINT, WT_FIXED64,
    WT_FIXED64, WT_FIXED32, WT_FIXED32, WT_FIXED64, WT_FIXED32, WT_LEN, WT_LEN, WT_LEN,
};

#define MAX_FIELD_NUMBER ((1u << 29) - 1)
#define WALK_DEPTH 64   /* as otlpjson._WALK_DEPTH: deeper goes to protobuf's parser (its limit is 100) */
#define DIRECT 64       /* field numbers below this are looked up in a table, others by binary search */
#define MAX_FIELDS 256  /* per message (the slow path keeps a byte per field on the stack) */
#define MAX_ONEOFS 64   /* per message (a bit each) */

typedef struct {
    uint32_t number;
    uint8_t kind, wire, repeated, implicit;
    int32_t oneof, sub;
    const char *prefix;
    uint32_t prefix_off, prefix_len;
} Field;

typedef struct {
    const Field *fields; /* sorted by number */
    uint32_t count;
    int16_t direct[DIRECT];
} Msg;

/* A KeyValue's JSON text by its bytes: attributes repeat from record to record (the same file, plugin,
 * namespace, operation). Direct-mapped, a slot replaced by the next KeyValue that hashes to it. Only a
 * KeyValue whose value is a scalar (no array or kvlist under it) is kept: its text is the same wherever
 * it is met. */
#define KV_CACHE_SLOTS 512 /* a power of two */
#define KV_CACHE_KEY 64    /* KeyValue bytes at most this long */
#define KV_CACHE_TEXT 192  /* and their text at most this long */
typedef struct {
    uint16_t key_len, text_len; /* key_len 0: empty */
    uint8_t key[KV_CACHE_KEY];
    char text[KV_CACHE_TEXT];
} KvSlot;

typedef struct {
    PyObject_HEAD
    Msg *msgs;
    uint32_t nmsgs;
    Field *fields;
    char *text;        /* the prefixes */
    KvSlot *kv_cache;  /* made at the first encode */
} Walker;

/* walk results */
enum { WALK_OK = 0, WALK_GIVEUP = 1, WALK_NOMEM = 2 };

/* the document, written straight into the bytes object returned */
typedef struct {
    PyObject *bytes;
    char *buf;
    size_t len, cap;
} Out;

typedef struct {
    const Walker *w;
    Out out;
    const uint8_t *data_end; /* the end of the request's bytes: reads of 16 or 8 bytes at once stay before it */
    KvSlot *kv_cache;
    uint64_t messages;       /* messages walked so far */
} Ctx;

/* one field occurrence: its field, whether packed, a varint's value, its payload [s, e) */
typedef struct {
    const Field *f;
    int packed;
    uint64_t v;
    const uint8_t *s, *e;
} Occ;

/* ------------------------------------------------------------------ output */

static int grow(Out *o, size_t n) {
    size_t cap = o->cap;
    while (cap - o->len < n) {
        if (cap > ((size_t)PY_SSIZE_T_MAX) / 2)
            return WALK_NOMEM;
        cap *= 2;
    }
    if (_PyBytes_Resize(&o->bytes, (Py_ssize_t)cap) < 0) /* o->bytes is NULL then */
        return WALK_NOMEM;
    o->buf = PyBytes_AS_STRING(o->bytes);
    o->cap = cap;
    return WALK_OK;
}

#define RESERVE(c, n)                                                          \
    do {                                                                       \
        if ((c)->out.cap - (c)->out.len < (size_t)(n) && grow(&(c)->out, (n))) \
            return WALK_NOMEM;                                                 \
    } while (0)
/* after RESERVE: a field's prefix (its text is padded: PREFIX_COPY bytes may be read at once) */
#define PREFIX_COPY 16
#define PUT_PREFIX(c, f)                                                       \
    do {                                                                       \
        if ((f)->prefix_len <= PREFIX_COPY)                                    \
            memcpy((c)->out.buf + (c)->out.len, (f)->prefix, PREFIX_COPY);     \
        else                                                                   \
            memcpy((c)->out.buf + (c)->out.len, (f)->prefix, (f)->prefix_len); \
        (c)->out.len += (f)->prefix_len;                                       \
    } while (0)
/* after RESERVE */
#define PUTC(c, ch) ((c)->out.buf[(c)->out.len++] = (char)(ch))
#define PUTS(c, s, n) (memcpy((c)->out.buf + (c)->out.len, (s), (n)), (c)->out.len += (n))

static inline int put(Ctx *c, const char *s, size_t n) {
    RESERVE(c, n);
    PUTS(c, s, n);
    return WALK_OK;
}

/* ------------------------------------------------------------------ reading protobuf */

/* a varint of at most 10 bytes whose value fits 64 bits */
static inline int read_varint(const uint8_t **pp, const uint8_t *end, uint64_t *v) {
    const uint8_t *p = *pp;
    uint64_t r = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (p >= end)
            return -1;
        uint8_t b = *p++;
        if (shift == 63 && b > 1)
            return -1;
        r |= (uint64_t)(b & 0x7F) << shift;
        if (b < 0x80) {
            *pp = p;
            *v = r;
            return 0;
        }
    }
    return -1;
}

static inline const Field *lookup(const Msg *m, uint32_t number) {
    if (number < DIRECT) {
        int i = m->direct[number];
        return i < 0 ? NULL : &m->fields[i];
    }
    uint32_t lo = 0, hi = m->count;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        uint32_t n = m->fields[mid].number;
        if (n == number)
            return &m->fields[mid];
        if (n < number)
            lo = mid + 1;
        else
            hi = mid;
    }
    return NULL;
}

/* a field's tag at *pp (< end): at most 5 bytes, below 2**32 */
static inline int read_tag(const uint8_t **pp, const uint8_t *end, uint64_t *tag) {
    const uint8_t *p = *pp;
    if (*p < 0x80) {
        *tag = *p;
        *pp = p + 1;
        return 0;
    }
    return read_varint(pp, end, tag) || *pp - p > 5 || *tag > UINT32_MAX ? -1 : 0;
}

/* The next known field of message m at *pp (unknown ones skipped): 1, 0 at the end, -1 not well-formed. */
static inline int next_field(const Msg *m, const uint8_t **pp, const uint8_t *end, Occ *o) {
    const uint8_t *p = *pp;
    while (p < end) {
        uint64_t tag;
        if (read_tag(&p, end, &tag))
            return -1;
        uint32_t number = (uint32_t)(tag >> 3);
        unsigned wire = tag & 7;
        const uint8_t *s = p;
        uint64_t v = 0;
        switch (wire) {
        case WT_VARINT:
            if (p < end && *p < 0x80)
                v = *p++;
            else if (read_varint(&p, end, &v))
                return -1;
            break;
        case WT_FIXED64:
            if (end - p < 8)
                return -1;
            p += 8;
            break;
        case WT_FIXED32:
            if (end - p < 4)
                return -1;
            p += 4;
            break;
        case WT_LEN: {
            uint64_t n;
            if (p < end && *p < 0x80)
                n = *p++;
            else if (read_varint(&p, end, &n))
                return -1;
            if (n > (uint64_t)(end - p))
                return -1;
            s = p;
            p += n;
            break;
        }
        default: /* groups (3, 4) and 6, 7 */
            return -1;
        }
        if (number == 0 || number > MAX_FIELD_NUMBER)
            return -1;
        const Field *f = lookup(m, number);
        if (f == NULL)
            continue; /* unknown: not listed, as protobuf keeps it aside */
        if (wire == f->wire) {
            o->packed = 0;
        } else if (wire == WT_LEN && f->repeated && f->wire != WT_LEN) {
            o->packed = 1;
        } else {
            return -1; /* a known field in another wire form */
        }
        o->f = f;
        o->v = v;
        o->s = s;
        o->e = p;
        *pp = p;
        return 1;
    }
    *pp = p;
    return 0;
}

static inline uint64_t le64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint32_t le32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

/* ------------------------------------------------------------------ values */

static char *fmt_u64(char *p, uint64_t v) {
    char tmp[20];
    int n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        *p++ = tmp[--n];
    return p;
}

/* a decimal integer (-magnitude when negative), in quotes for 64-bit fields */
static int put_number(Ctx *c, uint64_t magnitude, int negative, int quoted) {
    RESERVE(c, 24);
    char *p = c->out.buf + c->out.len;
    if (quoted)
        *p++ = '"';
    if (negative)
        *p++ = '-';
    p = fmt_u64(p, magnitude);
    if (quoted)
        *p++ = '"';
    c->out.len = (size_t)(p - c->out.buf);
    return WALK_OK;
}

static inline int put_int(Ctx *c, int64_t v, int quoted) {
    return v < 0 ? put_number(c, (uint64_t)0 - (uint64_t)v, 1, quoted) : put_number(c, (uint64_t)v, 0, quoted);
}

static inline int put_uint(Ctx *c, uint64_t v, int quoted) {
    return put_number(c, v, 0, quoted);
}

/* otlpjson._encode_double: repr of a finite double, "NaN", "Infinity", "-Infinity" */
static int put_double(Ctx *c, double d) {
    if (isnan(d))
        return put(c, "\"NaN\"", 5);
    if (isinf(d))
        return d > 0 ? put(c, "\"Infinity\"", 10) : put(c, "\"-Infinity\"", 11);
    char *s = PyOS_double_to_string(d, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (s == NULL)
        return WALK_NOMEM;
    int r = put(c, s, strlen(s));
    PyMem_Free(s);
    return r;
}

/* 0: a byte that stands for itself; 1: a byte escaped as \X; 2: a control escaped as \u00xx; 3: a byte >= 0x80 */
static uint8_t CHAR_CLASS[256];
static char SHORT_ESCAPE[256];

static void init_tables(void) {
    for (int i = 0; i < 256; i++)
        CHAR_CLASS[i] = i < 0x20 ? 2 : i >= 0x80 ? 3 : 0;
    const char *from = "\"\\\b\f\n\r\t", *to = "\"\\bfnrt";
    for (int i = 0; from[i]; i++) {
        CHAR_CLASS[(uint8_t)from[i]] = 1;
        SHORT_ESCAPE[(uint8_t)from[i]] = to[i];
    }
}

/* The length of the well-formed UTF-8 sequence (Unicode Table 3-7) starting at p (p[0] >= 0x80), or 0. */
static inline int utf8_sequence(const uint8_t *p, const uint8_t *end) {
    uint8_t b0 = p[0];
    ptrdiff_t left = end - p;
    if (b0 < 0xC2)
        return 0;
    if (b0 < 0xE0)
        return left >= 2 && (p[1] & 0xC0) == 0x80 ? 2 : 0;
    if (b0 < 0xF0) {
        if (left < 3 || (p[2] & 0xC0) != 0x80)
            return 0;
        uint8_t lo = b0 == 0xE0 ? 0xA0 : 0x80, hi = b0 == 0xED ? 0x9F : 0xBF;
        return p[1] >= lo && p[1] <= hi ? 3 : 0;
    }
    if (b0 < 0xF5) {
        if (left < 4 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80)
            return 0;
        uint8_t lo = b0 == 0xF0 ? 0x90 : 0x80, hi = b0 == 0xF4 ? 0x8F : 0xBF;
        return p[1] >= lo && p[1] <= hi ? 4 : 0;
    }
    return 0;
}

static int valid_utf8(const uint8_t *p, const uint8_t *end) {
    while (p < end) {
        if (*p < 0x80) {
            p++;
        } else {
            int n = utf8_sequence(p, end);
            if (n == 0)
                return 0;
            p += n;
        }
    }
    return 1;
}

static const char HEX_DIGITS[] = "0123456789abcdef";

/* Whether any of the 8 bytes in x is below 0x20, '"', '\\' or >= 0x80 ("hasless" and "haszero" of the
 * bit-twiddling folklore: exact as to whether any byte matches, which is all that is asked). */
static inline uint64_t special8(uint64_t x) {
    const uint64_t ones = 0x0101010101010101ULL, high = 0x8080808080808080ULL;
    uint64_t quote = x ^ (ones * '"'), backslash = x ^ (ones * '\\');
    uint64_t t = ((x - ones * 0x20) & ~x)         /* a byte < 0x20 */
               | ((quote - ones) & ~quote)         /* a '"' */
               | ((backslash - ones) & ~backslash) /* a '\\' */
               | x;                                /* a byte >= 0x80 */
    return t & high;
}

/* a string field's payload as a JSON string (WALK_GIVEUP when it is not UTF-8) */
static int put_string(Ctx *c, const uint8_t *p, const uint8_t *end) {
    size_t n = (size_t)(end - p);
    if (n > (PY_SSIZE_T_MAX - 10) / 6)
        return WALK_NOMEM;
    RESERVE(c, n * 6 + 18); /* 6 per byte at most, the quotes, 16 written at once past the last byte */
    char *o = c->out.buf + c->out.len;
    *o++ = '"';
    while (p < end) {
#if defined(__SSE2__)
        if (c->data_end - p >= 16) {
            /* sixteen bytes at once, as the eight below */
            size_t left = (size_t)(end - p);
            __m128i x = _mm_loadu_si128((const __m128i *)p);
            _mm_storeu_si128((__m128i *)o, x);
            /* signed: bytes >= 0x80 are below 0x20 too */
            __m128i hit = _mm_or_si128(_mm_cmplt_epi8(x, _mm_set1_epi8(0x20)),
                                       _mm_or_si128(_mm_cmpeq_epi8(x, _mm_set1_epi8('"')), _mm_cmpeq_epi8(x, _mm_set1_epi8('\\'))));
            unsigned special = (unsigned)_mm_movemask_epi8(hit);
            if (left < 16)
                special |= 1u << left;
            if (!special) {
                o += 16;
                p += 16;
                continue;
            }
            unsigned k = (unsigned)__builtin_ctz(special);
            o += k;
            p += k;
            if (p == end)
                break;
        } else
#endif
        if (c->data_end - p >= 8) {
            /* eight bytes at once: copied, then kept up to the first control, '"', '\\', byte >= 0x80 or the end */
            size_t left = (size_t)(end - p);
            memcpy(o, p, 8);
            uint64_t special = special8(le64(p)); /* byte i in bits 8i..8i+7; the lowest flag is exact */
            if (left < 8)
                special |= (uint64_t)0x80 << (8 * left);
            if (!special) {
                o += 8;
                p += 8;
                continue;
            }
            unsigned k = (unsigned)__builtin_ctzll(special) >> 3;
            o += k;
            p += k;
            if (p == end)
                break;
        } else if (CHAR_CLASS[*p] == 0) { /* the last bytes of the request: one at a time */
            *o++ = (char)*p++;
            continue;
        }
        uint8_t b = *p;
        switch (CHAR_CLASS[b]) {
        case 1:
            *o++ = '\\';
            *o++ = SHORT_ESCAPE[b];
            p++;
            break;
        case 2:
            memcpy(o, "\\u00", 4);
            o[4] = HEX_DIGITS[b >> 4];
            o[5] = HEX_DIGITS[b & 15];
            o += 6;
            p++;
            break;
        default: {
            int k = utf8_sequence(p, end);
            if (k == 0)
                return WALK_GIVEUP;
            memcpy(o, p, (size_t)k);
            o += k;
            p += k;
        }
        }
    }
    *o++ = '"';
    c->out.len = (size_t)(o - c->out.buf);
    return WALK_OK;
}

static int put_hex(Ctx *c, const uint8_t *p, const uint8_t *end) {
    size_t n = (size_t)(end - p);
    RESERVE(c, n * 2 + 2);
    char *o = c->out.buf + c->out.len;
    *o++ = '"';
    for (; p < end; p++) {
        *o++ = HEX_DIGITS[*p >> 4];
        *o++ = HEX_DIGITS[*p & 15];
    }
    *o++ = '"';
    c->out.len = (size_t)(o - c->out.buf);
    return WALK_OK;
}

static int put_base64(Ctx *c, const uint8_t *p, const uint8_t *end) {
    static const char A[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t n = (size_t)(end - p);
    RESERVE(c, (n + 2) / 3 * 4 + 2);
    char *o = c->out.buf + c->out.len;
    *o++ = '"';
    for (; end - p >= 3; p += 3) {
        uint32_t t = (uint32_t)p[0] << 16 | (uint32_t)p[1] << 8 | p[2];
        *o++ = A[t >> 18];
        *o++ = A[t >> 12 & 63];
        *o++ = A[t >> 6 & 63];
        *o++ = A[t & 63];
    }
    if (end - p == 1) {
        *o++ = A[p[0] >> 2];
        *o++ = A[(p[0] & 3) << 4];
        *o++ = '=';
        *o++ = '=';
    } else if (end - p == 2) {
        *o++ = A[p[0] >> 2];
        *o++ = A[(p[0] & 3) << 4 | p[1] >> 4];
        *o++ = A[(p[1] & 15) << 2];
        *o++ = '=';
    }
    *o++ = '"';
    c->out.len = (size_t)(o - c->out.buf);
    return WALK_OK;
}

/* ------------------------------------------------------------------ messages */

static int write_message(Ctx *c, uint32_t mi, const uint8_t *p, const uint8_t *end, int depth);

/* Whether a singular field's value is the implicit default (left out): zero bits after the kind's conversion. */
static inline int is_default(const Field *f, const Occ *o) {
    if (!f->implicit)
        return 0;
    switch (f->kind) {
    case K_INT32: case K_UINT32: case K_SINT32:
        return (uint32_t)o->v == 0;
    case K_INT64: case K_UINT64: case K_SINT64: case K_BOOL:
        return o->v == 0;
    case K_FIXED64: case K_SFIXED64: case K_DOUBLE:
        return le64(o->s) == 0;
    case K_FIXED32: case K_SFIXED32: case K_FLOAT:
        return le32(o->s) == 0;
    default: /* strings and bytes */
        return o->s == o->e;
    }
}

/* one KeyValue as otlpjson._encode_key_values writes it: its key always, its value when set */
static int write_key_value(Ctx *c, uint32_t any_value, const uint8_t *p, const uint8_t *end, int depth) {
    const uint8_t *key = p, *key_end = p, *value = NULL, *value_end = NULL;
    while (p < end) {
        uint64_t tag;
        if (read_tag(&p, end, &tag))
            return WALK_GIVEUP;
        uint64_t number = tag >> 3, n;
        if (number == 0 || number > MAX_FIELD_NUMBER)
            return WALK_GIVEUP;
        switch (tag & 7) {
        case WT_LEN:
            if (read_varint(&p, end, &n) || n > (uint64_t)(end - p))
                return WALK_GIVEUP;
            if (number == 1) {
                if (!valid_utf8(p, p + n))
                    return WALK_GIVEUP;
                key = p;
                key_end = p + n;
            } else if (number == 2) {
                if (value != NULL)
                    return WALK_GIVEUP; /* merged by protobuf */
                value = p;
                value_end = p + n;
            }
            p += n;
            continue;
        case WT_VARINT:
            if (number <= 2 || read_varint(&p, end, &n))
                return WALK_GIVEUP;
            continue;
        case WT_FIXED64:
            if (number <= 2 || end - p < 8)
                return WALK_GIVEUP;
            p += 8;
            continue;
        case WT_FIXED32:
            if (number <= 2 || end - p < 4)
                return WALK_GIVEUP;
            p += 4;
            continue;
        default:
            return WALK_GIVEUP;
        }
    }
    int r;
    if ((r = put(c, "{\"key\":", 7)) || (r = put_string(c, key, key_end)))
        return r;
    if (value != NULL) {
        if ((r = put(c, ",\"value\":", 9)) || (r = write_message(c, any_value, value, value_end, depth + 1)))
            return r;
    }
    return put(c, "}", 1);
}

static inline uint64_t kv_hash(const uint8_t *p, size_t n, const uint8_t *data_end) {
    uint64_t h = (uint64_t)n * 0x9E3779B97F4A7C15ULL;
    for (; n >= 8; p += 8, n -= 8) {
        h = (h ^ le64(p)) * 0xFF51AFD7ED558CCDULL;
        h ^= h >> 29;
    }
    if (n) {
        uint64_t x = 0;
        if (data_end - p >= 8) {
            x = le64(p) & (((uint64_t)1 << (8 * n)) - 1);
        } else {
            for (size_t i = 0; i < n; i++)
                x |= (uint64_t)p[i] << (8 * i);
        }
        h = (h ^ x) * 0xFF51AFD7ED558CCDULL;
    }
    return h ^ (h >> 32);
}

/* write_key_value through the cache */
static int write_key_value_cached(Ctx *c, uint32_t any_value, const uint8_t *p, const uint8_t *end, int depth) {
    size_t n = (size_t)(end - p);
    KvSlot *slot = NULL;
    if (c->kv_cache != NULL && n > 0 && n <= KV_CACHE_KEY && depth + 1 <= WALK_DEPTH) {
        slot = &c->kv_cache[kv_hash(p, n, c->data_end) & (KV_CACHE_SLOTS - 1)];
        if (slot->key_len == n && memcmp(slot->key, p, n) == 0)
            return put(c, slot->text, slot->text_len);
    }
    size_t mark = c->out.len;
    uint64_t messages = c->messages;
    int r = write_key_value(c, any_value, p, end, depth);
    size_t len = c->out.len - mark;
    if (r == WALK_OK && slot != NULL && c->messages - messages <= 1 && len <= KV_CACHE_TEXT) {
        slot->key_len = (uint16_t)n;
        slot->text_len = (uint16_t)len;
        memcpy(slot->key, p, n);
        memcpy(slot->text, c->out.buf + mark, len);
    }
    return r;
}

/* one value of field f (not packed) */
static int write_value(Ctx *c, const Field *f, const Occ *o, int depth) {
    uint64_t v = o->v;
    switch (f->kind) {
    case K_MESSAGE:
        return write_message(c, (uint32_t)f->sub, o->s, o->e, depth + 1);
    case K_KEY_VALUES:
        return write_key_value_cached(c, (uint32_t)f->sub, o->s, o->e, depth + 1);
    case K_INT64:
        return put_int(c, (int64_t)v, 1);
    case K_UINT64:
        return put_uint(c, v, 1);
    case K_INT32:
        return put_int(c, (int32_t)(uint32_t)v, 0);
    case K_UINT32:
        return put_uint(c, (uint32_t)v, 0);
    case K_SINT32: {
        uint32_t u = (uint32_t)v;
        return put_int(c, (int32_t)(u >> 1) ^ -(int32_t)(u & 1), 0);
    }
    case K_SINT64:
        return put_int(c, (int64_t)(v >> 1) ^ -(int64_t)(v & 1), 1);
    case K_BOOL:
        if (v > 1)
            return WALK_GIVEUP;
        return v ? put(c, "true", 4) : put(c, "false", 5);
    case K_FIXED64:
        return put_uint(c, le64(o->s), 1);
    case K_SFIXED64:
        return put_int(c, (int64_t)le64(o->s), 1);
    case K_FIXED32:
        return put_uint(c, le32(o->s), 0);
    case K_SFIXED32:
        return put_int(c, (int32_t)le32(o->s), 0);
    case K_DOUBLE: {
        uint64_t bits = le64(o->s);
        double d;
        memcpy(&d, &bits, 8);
        return put_double(c, d);
    }
    case K_FLOAT: {
        uint32_t bits = le32(o->s);
        float x;
        memcpy(&x, &bits, 4);
        return put_double(c, (double)x);
    }
    case K_STRING:
        return put_string(c, o->s, o->e);
    case K_HEX:
        return put_hex(c, o->s, o->e);
    default:
        return put_base64(c, o->s, o->e);
    }
}

/* The separator before a repeated field's next element, opening its array "name":[ before the first one. */
static inline int open_element(Ctx *c, const Field *f, int *open, int *written) {
    if (*open)
        return put(c, ",", 1);
    RESERVE(c, f->prefix_len + PREFIX_COPY + 2);
    if (*written)
        PUTC(c, ',');
    PUT_PREFIX(c, f);
    PUTC(c, '[');
    *open = 1;
    (*written)++;
    return WALK_OK;
}

/* the elements of one occurrence of repeated field f (one, or those packed in it) */
static int write_elements(Ctx *c, const Field *f, const Occ *o, int *open, int *written, int depth) {
    int r;
    if (!o->packed) {
        if ((r = open_element(c, f, open, written)))
            return r;
        return write_value(c, f, o, depth);
    }
    Occ e = *o;
    const uint8_t *p = o->s, *end = o->e;
    e.packed = 0;
    while (p < end) {
        e.s = p;
        switch (f->wire) {
        case WT_VARINT:
            if (read_varint(&p, end, &e.v))
                return WALK_GIVEUP;
            break;
        case WT_FIXED64:
            if (end - p < 8)
                return WALK_GIVEUP;
            p += 8;
            break;
        default:
            if (end - p < 4)
                return WALK_GIVEUP;
            p += 4;
        }
        if ((r = open_element(c, f, open, written)) || (r = write_value(c, f, &e, depth)))
            return r;
    }
    return WALK_OK;
}

/* a singular field "name":value after the separator (nothing for an implicit default) */
static int write_singular(Ctx *c, const Field *f, const Occ *o, int *written, int depth) {
    if (is_default(f, o))
        return WALK_OK;
    RESERVE(c, f->prefix_len + PREFIX_COPY + 1);
    if (*written)
        PUTC(c, ',');
    PUT_PREFIX(c, f);
    (*written)++;
    return write_value(c, f, o, depth);
}

/* Fields in any order, any number of times: protobuf's rules (the last value of a singular field counts). */
static int write_message_any_order(Ctx *c, const Msg *m, const uint8_t *begin, const uint8_t *end, int depth) {
    uint8_t seen[MAX_FIELDS];
    uint32_t member[MAX_ONEOFS];
    uint64_t oneofs = 0;
    memset(seen, 0, m->count);
    const uint8_t *p = begin;
    Occ o;
    int r;
    while ((r = next_field(m, &p, end, &o)) > 0) {
        const Field *f = o.f;
        size_t i = (size_t)(f - m->fields);
        if (f->oneof >= 0) {
            uint64_t bit = (uint64_t)1 << f->oneof;
            if (!(oneofs & bit)) {
                oneofs |= bit;
                member[f->oneof] = f->number;
            } else if (member[f->oneof] != f->number) {
                return WALK_GIVEUP; /* two members of one oneof */
            }
        }
        if (f->kind == K_MESSAGE && !f->repeated && seen[i])
            return WALK_GIVEUP; /* merged by protobuf */
        if (f->kind == K_STRING && !valid_utf8(o.s, o.e))
            return WALK_GIVEUP; /* protobuf refuses it even where a later value replaces it */
        seen[i] = 1;
    }
    if (r < 0)
        return WALK_GIVEUP;
    int written = 0;
    if ((r = put(c, "{", 1)))
        return r;
    for (uint32_t i = 0; i < m->count; i++) {
        if (!seen[i])
            continue;
        const Field *f = &m->fields[i];
        int open = 0, found = 0;
        Occ last = {NULL, 0, 0, NULL, NULL};
        p = begin;
        while (next_field(m, &p, end, &o) > 0) {
            if (o.f != f)
                continue;
            if (f->repeated) {
                if ((r = write_elements(c, f, &o, &open, &written, depth)))
                    return r;
            } else {
                last = o;
                found = 1;
            }
        }
        if (open && (r = put(c, "]", 1)))
            return r;
        if (found && (r = write_singular(c, f, &last, &written, depth)))
            return r;
    }
    return put(c, "}", 1);
}

/* The JSON object of message type mi serialized in [p, end).
 * Fast path: fields in field-number order, each once (a repeated one in one run), as protobuf writes them;
 * anything else is written again by write_message_any_order. */
static int write_message(Ctx *c, uint32_t mi, const uint8_t *p, const uint8_t *end, int depth) {
    if (depth > WALK_DEPTH)
        return WALK_GIVEUP;
    c->messages++;
    const Msg *m = &c->w->msgs[mi];
    const uint8_t *begin = p;
    size_t mark = c->out.len;
    int r, written = 0, open = 0;
    uint32_t last = 0;
    uint64_t oneofs = 0;
    const Field *run = NULL;
    Occ o;
    if ((r = put(c, "{", 1)))
        return r;
    while ((r = next_field(m, &p, end, &o)) > 0) {
        const Field *f = o.f;
        if (f != run) {
            if (open) {
                if ((r = put(c, "]", 1)))
                    return r;
                open = 0;
            }
            if (f->number <= last) {
                c->out.len = mark;
                return write_message_any_order(c, m, begin, end, depth);
            }
            last = f->number;
            if (f->oneof >= 0) {
                uint64_t bit = (uint64_t)1 << f->oneof;
                if (oneofs & bit)
                    return WALK_GIVEUP; /* two members of one oneof */
                oneofs |= bit;
            }
            run = f->repeated ? f : NULL;
        }
        if (f->repeated)
            r = write_elements(c, f, &o, &open, &written, depth);
        else
            r = write_singular(c, f, &o, &written, depth);
        if (r)
            return r;
    }
    if (r < 0)
        return WALK_GIVEUP;
    if (open && (r = put(c, "]", 1)))
        return r;
    return put(c, "}", 1);
}

/* ------------------------------------------------------------------ the Walker type */

static void Walker_dealloc(Walker *self) {
    PyMem_Free(self->msgs);
    PyMem_Free(self->fields);
    PyMem_Free(self->text);
    PyMem_Free(self->kv_cache);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int field_order(const void *a, const void *b) {
    uint32_t x = ((const Field *)a)->number, y = ((const Field *)b)->number;
    return x < y ? -1 : x > y;
}

static int Walker_init(Walker *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"messages", NULL};
    PyObject *messages;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Walker", kwlist, &messages))
        return -1;
    if (self->msgs != NULL) {
        PyErr_SetString(PyExc_TypeError, "Walker is initialized once");
        return -1;
    }
    PyObject *seq = PySequence_Fast(messages, "messages must be a sequence");
    if (seq == NULL)
        return -1;
    Py_ssize_t nmsgs = PySequence_Fast_GET_SIZE(seq);
    Py_ssize_t nfields = 0, ntext = 0;
    size_t text_cap = 0;
    int ok = 0;
    if (nmsgs < 1 || nmsgs > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "messages must hold at least the request's type");
        goto done;
    }
    /* first pass: sizes */
    for (Py_ssize_t i = 0; i < nmsgs; i++) {
        PyObject *fields = PySequence_Fast_GET_ITEM(seq, i);
        Py_ssize_t n = PySequence_Length(fields);
        if (n < 0)
            goto done;
        if (n > MAX_FIELDS) {
            PyErr_Format(PyExc_ValueError, "message %zd has more than %d fields", i, MAX_FIELDS);
            goto done;
        }
        nfields += n;
    }
    self->msgs = PyMem_Calloc((size_t)nmsgs, sizeof(Msg));
    self->fields = PyMem_Calloc((size_t)(nfields ? nfields : 1), sizeof(Field));
    if (self->msgs == NULL || self->fields == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    self->nmsgs = (uint32_t)nmsgs;
    /* second pass: the fields (prefixes pointed into the tuples' bytes for now, copied below) */
    Py_ssize_t at = 0;
    for (Py_ssize_t i = 0; i < nmsgs; i++) {
        PyObject *fields = PySequence_Fast(PySequence_Fast_GET_ITEM(seq, i), "a message must be a sequence of fields");
        if (fields == NULL)
            goto done;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(fields);
        Msg *m = &self->msgs[i];
        m->fields = &self->fields[at];
        for (Py_ssize_t j = 0; j < n; j++) {
            Field *f = &self->fields[at + j];
            const char *prefix;
            Py_ssize_t prefix_len;
            unsigned long number;
            int kind, wire, repeated, implicit, oneof, sub;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fields, j), "ky#iippii:field", &number, &prefix, &prefix_len,
                                  &kind, &wire, &repeated, &implicit, &oneof, &sub)) {
                Py_DECREF(fields);
                goto done;
            }
            const char *bad = NULL;
            if (number == 0 || number > MAX_FIELD_NUMBER)
                bad = "a field number out of range";
            else if (kind < 0 || kind >= K_COUNT)
                bad = "an unknown kind";
            else if (wire != KIND_WIRE[kind])
                bad = "a wire type that does not fit its kind";
            else if (oneof < -1 || oneof >= MAX_ONEOFS)
                bad = "a oneof index out of range";
            else if ((kind == K_MESSAGE || kind == K_KEY_VALUES) ? (sub < 0 || sub >= nmsgs) : sub != -1)
                bad = "a bad message type index";
            else if (kind == K_KEY_VALUES && !repeated)
                bad = "a single key_values field";
            else if (prefix_len > UINT32_MAX / 2)
                bad = "a prefix too long";
            if (bad != NULL) {
                PyErr_Format(PyExc_ValueError, "message %zd, field %lu: %s", i, number, bad);
                Py_DECREF(fields);
                goto done;
            }
            f->number = (uint32_t)number;
            f->kind = (uint8_t)kind;
            f->wire = (uint8_t)wire;
            f->repeated = (uint8_t)repeated;
            f->implicit = (uint8_t)(implicit && !repeated);
            f->oneof = oneof;
            f->sub = sub;
            if ((size_t)(ntext + prefix_len + PREFIX_COPY) > text_cap) {
                size_t cap = text_cap ? text_cap : 1024;
                while (cap < (size_t)(ntext + prefix_len + PREFIX_COPY))
                    cap *= 2;
                char *grown = PyMem_Realloc(self->text, cap);
                if (grown == NULL) {
                    PyErr_NoMemory();
                    Py_DECREF(fields);
                    goto done;
                }
                self->text = grown;
                text_cap = cap;
            }
            memcpy(self->text + ntext, prefix, (size_t)prefix_len);
            f->prefix = NULL; /* set below, once the text no longer moves */
            f->prefix_off = (uint32_t)ntext;
            f->prefix_len = (uint32_t)prefix_len;
            ntext += prefix_len;
        }
        m->count = (uint32_t)n;
        qsort(&self->fields[at], (size_t)n, sizeof(Field), field_order);
        for (int k = 0; k < DIRECT; k++)
            m->direct[k] = -1;
        for (Py_ssize_t j = 0; j < n; j++) {
            if (j > 0 && m->fields[j].number == m->fields[j - 1].number) {
                PyErr_Format(PyExc_ValueError, "message %zd: field %u twice", i, m->fields[j].number);
                Py_DECREF(fields);
                goto done;
            }
            if (m->fields[j].number < DIRECT)
                m->direct[m->fields[j].number] = (int16_t)j;
        }
        Py_DECREF(fields);
        at += n;
    }
    if (self->text == NULL && (self->text = PyMem_Malloc(PREFIX_COPY)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    memset(self->text + ntext, 0, PREFIX_COPY); /* the padding PUT_PREFIX may read */
    for (Py_ssize_t k = 0; k < nfields; k++)
        self->fields[k].prefix = self->text + self->fields[k].prefix_off;
    ok = 1;
done:
    Py_DECREF(seq);
    if (!ok) {
        PyMem_Free(self->msgs);
        PyMem_Free(self->fields);
        PyMem_Free(self->text);
        self->msgs = NULL;
        self->fields = NULL;
        self->text = NULL;
        self->nmsgs = 0;
    }
    return ok ? 0 : -1;
}

static PyObject *Walker_encode(Walker *self, PyObject *arg) {
    if (self->msgs == NULL) {
        PyErr_SetString(PyExc_TypeError, "Walker is not initialized");
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (self->kv_cache == NULL && (self->kv_cache = PyMem_Calloc(KV_CACHE_SLOTS, sizeof(KvSlot))) == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    const uint8_t *p = view.buf;
    Ctx c = {self, {NULL, NULL, 0, 0}, p + view.len, self->kv_cache, 0};
    int r = WALK_NOMEM;
    if ((size_t)view.len < (size_t)PY_SSIZE_T_MAX / 4) {
        c.out.cap = (size_t)view.len * 2 + 64; /* OTLP/JSON is ~1.5 times the protobuf bytes */
        c.out.bytes = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)c.out.cap);
    }
    if (c.out.bytes != NULL) {
        c.out.buf = PyBytes_AS_STRING(c.out.bytes);
        r = write_message(&c, 0, p, p + view.len, 1);
    }
    PyBuffer_Release(&view);
    if (r == WALK_OK) {
        if (_PyBytes_Resize(&c.out.bytes, (Py_ssize_t)c.out.len) < 0)
            return NULL;
        return c.out.bytes;
    }
    Py_XDECREF(c.out.bytes);
    if (r == WALK_GIVEUP)
        Py_RETURN_NONE;
    return PyErr_Occurred() ? NULL : PyErr_NoMemory();
}

static PyMethodDef Walker_methods[] = {
    {"encode", (PyCFunction)Walker_encode, METH_O,
     "encode(data) -> the OTLP/JSON of the request serialized in data, or None where the Python path must write it"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject WalkerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tapio._wirejson.Walker",
    .tp_basicsize = sizeof(Walker),
    .tp_dealloc = (destructor)Walker_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Walker(messages): writes OTLP/JSON from protobuf bytes by the field tables of one request type",
    .tp_methods = Walker_methods,
    .tp_init = (initproc)Walker_init,
    .tp_new = PyType_GenericNew,
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "tapio._wirejson",
    .m_doc = "OTLP/JSON from protobuf bytes, compiled (see tapio/otlpjson.py)",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__wirejson(void) {
    init_tables();
    if (PyType_Ready(&WalkerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *kinds = PyTuple_New(K_COUNT);
    if (kinds == NULL)
        goto fail;
    for (int i = 0; i < K_COUNT; i++) {
        PyObject *s = PyUnicode_FromString(KIND_NAMES[i]);
        if (s == NULL) {
            Py_DECREF(kinds);
            goto fail;
        }
        PyTuple_SET_ITEM(kinds, i, s);
    }
    if (PyModule_AddObject(m, "KINDS", kinds) < 0) {
        Py_DECREF(kinds);
        goto fail;
    }
    Py_INCREF(&WalkerType);
    if (PyModule_AddObject(m, "Walker", (PyObject *)&WalkerType) < 0) {
        Py_DECREF(&WalkerType);
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
