/* The native half of decode.py: vLLM's KV-event batches (msgpack) into plain tuples.
 *
 * A general msgpack decoder makes one Python int per token id (32 per block), which alone cost
 * more than a microsecond per block; here token ids go straight into packed little-endian
 * uint32 bytes (what block hashing reads), and only block hashes become Python objects.
 *
 * decode_batch(payload) -> (ts, events, ignored), each event one of
 *   (0, hashes, parent, tokens, block_size, medium)   BlockStored
 *   (1, hashes, medium)                               BlockRemoved
 *   (2,)                                              AllBlocksCleared
 * A payload that is not msgpack, not one whole value, or not a batch raises ValueError. An
 * event of an unknown type or with fields of the wrong kind is counted in `ignored`, and the
 * rest of the batch still decodes. Unknown fields are skipped; nesting is bounded.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MAX_DEPTH 32
#define RELEASE_GIL_TOKENS 16384  /* arrays this long are read with the GIL released */

typedef enum { K_NIL, K_BOOL, K_UINT, K_INT, K_FLOAT, K_STR, K_BIN, K_ARRAY, K_MAP, K_EXT } Kind;

typedef struct {
    Kind kind;
    uint64_t u;     /* K_UINT value, K_BOOL value, K_ARRAY/K_MAP count */
    int64_t i;      /* K_INT value (negative) */
    double f;       /* K_FLOAT value */
    const uint8_t *data;  /* K_STR, K_BIN, K_EXT payload */
    size_t len;
} Head;

typedef struct {
    const uint8_t *p;
    const uint8_t *end;
    const char *error;  /* set on a structural error: the whole payload is refused */
} Reader;

static int fail(Reader *r, const char *why) {
    if (r->error == NULL) r->error = why;
    return -1;
}

static int need(Reader *r, size_t n) {
    return (size_t)(r->end - r->p) >= n ? 0 : fail(r, "truncated");
}

static uint64_t be(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int k = 0; k < n; k++) v = (v << 8) | p[k];
    return v;
}

/* Reads a value's head; the payload of strings, bins and exts is consumed with it. */
static int head(Reader *r, Head *h) {
    if (need(r, 1) < 0) return -1;
    uint8_t b = *r->p++;
    int n = 0;       /* bytes of a length or value that follow */
    h->data = NULL;
    h->len = 0;
    if (b <= 0x7f) { h->kind = K_UINT; h->u = b; return 0; }
    if (b >= 0xe0) { h->kind = K_INT; h->i = (int8_t)b; return 0; }
    if (b >= 0x80 && b <= 0x8f) { h->kind = K_MAP; h->u = b & 0x0f; return 0; }
    if (b >= 0x90 && b <= 0x9f) { h->kind = K_ARRAY; h->u = b & 0x0f; return 0; }
    if (b >= 0xa0 && b <= 0xbf) { h->kind = K_STR; h->len = b & 0x1f; goto payload; }
    switch (b) {
    case 0xc0: h->kind = K_NIL; return 0;
    case 0xc2: case 0xc3: h->kind = K_BOOL; h->u = b == 0xc3; return 0;
    case 0xc4: case 0xc5: case 0xc6:
        h->kind = K_BIN; n = 1 << (b - 0xc4); goto length;
    case 0xd9: case 0xda: case 0xdb:
        h->kind = K_STR; n = 1 << (b - 0xd9); goto length;
    case 0xc7: case 0xc8: case 0xc9:
        h->kind = K_EXT; n = 1 << (b - 0xc7);
        if (need(r, (size_t)n + 1) < 0) return -1;
        h->len = (size_t)be(r->p, n);
        r->p += n + 1;  /* the length, then the ext type byte */
        goto payload;
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8:
        h->kind = K_EXT; h->len = (size_t)1 << (b - 0xd4);
        if (need(r, 1) < 0) return -1;
        r->p += 1;  /* the ext type byte */
        goto payload;
    case 0xca: {
        if (need(r, 4) < 0) return -1;
        uint32_t bits = (uint32_t)be(r->p, 4);
        float f;
        memcpy(&f, &bits, 4);
        r->p += 4;
        h->kind = K_FLOAT; h->f = f; return 0;
    }
    case 0xcb: {
        if (need(r, 8) < 0) return -1;
        uint64_t bits = be(r->p, 8);
        double d;
        memcpy(&d, &bits, 8);
        r->p += 8;
        h->kind = K_FLOAT; h->f = d; return 0;
    }
    case 0xcc: case 0xcd: case 0xce: case 0xcf:
        n = 1 << (b - 0xcc);
        if (need(r, (size_t)n) < 0) return -1;
        h->kind = K_UINT; h->u = be(r->p, n); r->p += n; return 0;
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: {
        n = 1 << (b - 0xd0);
        if (need(r, (size_t)n) < 0) return -1;
        uint64_t raw = be(r->p, n);
        r->p += n;
        int64_t v;
        if (n == 8) v = (int64_t)raw;
        else {
            uint64_t sign = (uint64_t)1 << (8 * n - 1);
            v = (int64_t)(raw ^ sign) - (int64_t)sign;
        }
        if (v >= 0) { h->kind = K_UINT; h->u = (uint64_t)v; }
        else { h->kind = K_INT; h->i = v; }
        return 0;
    }
    case 0xdc: case 0xdd:
        n = b == 0xdc ? 2 : 4;
        if (need(r, (size_t)n) < 0) return -1;
        h->kind = K_ARRAY; h->u = be(r->p, n); r->p += n; return 0;
    case 0xde: case 0xdf:
        n = b == 0xde ? 2 : 4;
        if (need(r, (size_t)n) < 0) return -1;
        h->kind = K_MAP; h->u = be(r->p, n); r->p += n; return 0;
    default:
        return fail(r, "invalid type byte");
    }
length:
    if (need(r, (size_t)n) < 0) return -1;
    h->len = (size_t)be(r->p, n);
    r->p += n;
payload:
    if (need(r, h->len) < 0) return -1;
    h->data = r->p;
    r->p += h->len;
    return 0;
}

/* Each element takes at least one byte: a count beyond what is left is a truncated payload
 * (checked before looping, so a claimed count of 2^32 costs nothing). */
static int plausible(Reader *r, uint64_t items) {
    return items <= (uint64_t)(r->end - r->p) ? 0 : fail(r, "truncated");
}

static int skip_items(Reader *r, uint64_t items, int depth);

static int skip_rest(Reader *r, const Head *h, int depth) {
    if (h->kind == K_ARRAY) return skip_items(r, h->u, depth + 1);
    if (h->kind == K_MAP) return h->u > UINT64_MAX / 2 ? fail(r, "truncated") : skip_items(r, 2 * h->u, depth + 1);
    return 0;
}

static int skip_items(Reader *r, uint64_t items, int depth) {
    if (depth > MAX_DEPTH) return fail(r, "nested too deeply");
    if (plausible(r, items) < 0) return -1;
    for (uint64_t k = 0; k < items; k++) {
        Head h;
        if (head(r, &h) < 0 || skip_rest(r, &h, depth) < 0) return -1;
    }
    return 0;
}

static int skip_value(Reader *r, int depth) { return skip_items(r, 1, depth); }

static int is_str(const Head *h, const char *s) {
    size_t n = strlen(s);
    return h->kind == K_STR && h->len == n && memcmp(h->data, s, n) == 0;
}

/* ---- fields ---------------------------------------------------------------------------- */

typedef enum { F_STORED, F_REMOVED, F_CLEARED, F_OTHER } Type;

typedef struct {
    PyObject *hashes;  /* list, or NULL when absent */
    PyObject *parent;  /* int, bytes or None; NULL when absent */
    PyObject *tokens;  /* bytes of packed uint32; NULL when absent */
    long long block_size;
    PyObject *medium;  /* str; NULL when absent or not a non-empty string */
    int bad;           /* BAD_* bits of fields of the wrong kind: an event that uses one is ignored */
} Fields;

enum { BAD_HASHES = 1, BAD_PARENT = 2, BAD_TOKENS = 4, BAD_SIZE = 8, BAD_MEDIUM = 16 };
#define STORED_USES (BAD_HASHES | BAD_PARENT | BAD_TOKENS | BAD_SIZE | BAD_MEDIUM)
#define REMOVED_USES (BAD_HASHES | BAD_MEDIUM)

static void fields_clear(Fields *f) {
    Py_CLEAR(f->hashes);
    Py_CLEAR(f->parent);
    Py_CLEAR(f->tokens);
    Py_CLEAR(f->medium);
}

/* A block hash: an int (uint64 or negative int64) or raw bytes. Returns NULL with `bad` set
 * (and no Python error) for any other kind. */
static PyObject *hash_value(const Head *h, int *bad) {
    if (h->kind == K_UINT) return PyLong_FromUnsignedLongLong(h->u);
    if (h->kind == K_INT) return PyLong_FromLongLong(h->i);
    if (h->kind == K_BIN) return PyBytes_FromStringAndSize((const char *)h->data, (Py_ssize_t)h->len);
    *bad = 1;
    return NULL;
}

/* Field readers return -1 on a structural or Python error, and set their BAD_* bit for a value
 * of the wrong kind (the value is then skipped whole). */
/* The head of a field that is an array or nil: 1 when an array of h->u items follows, 0 when
 * there is nothing to read (nil, or a value of another kind: skipped, `bad` set), -1 on error. */
static int array_field(Reader *r, Fields *f, int bad, int depth, Head *h) {
    if (head(r, h) < 0) return -1;
    if (h->kind == K_NIL) return 0;
    if (h->kind != K_ARRAY) {
        f->bad |= bad;
        return skip_rest(r, h, depth) < 0 ? -1 : 0;
    }
    return plausible(r, h->u) < 0 ? -1 : 1;
}

static int read_hashes(Reader *r, Fields *f, int depth) {
    Head h;
    int found = array_field(r, f, BAD_HASHES, depth, &h);
    if (found <= 0) return found;
    PyObject *list = PyList_New((Py_ssize_t)h.u);
    if (list == NULL) return -1;
    for (uint64_t k = 0; k < h.u; k++) {
        Head e;
        if (head(r, &e) < 0) goto error;
        int bad = 0;
        PyObject *v = hash_value(&e, &bad);
        if (v == NULL) {
            if (!bad) goto error;
            f->bad |= BAD_HASHES;
            Py_DECREF(list);
            if (skip_rest(r, &e, depth + 1) < 0) return -1;
            return skip_items(r, h.u - k - 1, depth + 1);
        }
        PyList_SET_ITEM(list, (Py_ssize_t)k, v);
    }
    Py_XSETREF(f->hashes, list);
    return 0;
error:
    Py_DECREF(list);
    return -1;
}

static int read_parent(Reader *r, Fields *f, int depth) {
    Head h;
    if (head(r, &h) < 0) return -1;
    if (h.kind == K_NIL) {
        Py_XSETREF(f->parent, Py_NewRef(Py_None));
        return 0;
    }
    int bad = 0;
    PyObject *v = hash_value(&h, &bad);
    if (v == NULL) {
        if (!bad) return -1;
        f->bad |= BAD_PARENT;
        return skip_rest(r, &h, depth);
    }
    Py_XSETREF(f->parent, v);
    return 0;
}

static int read_tokens(Reader *r, Fields *f, int depth) {
    Head h;
    int found = array_field(r, f, BAD_TOKENS, depth, &h);
    if (found <= 0) return found;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(h.u * 4));
    if (out == NULL) return -1;
    uint8_t *w = (uint8_t *)PyBytes_AS_STRING(out);
    /* Local cursor (the compiler cannot keep r->p in a register across the stores into `w`). */
    const uint8_t *p = r->p;
    const uint8_t *end = r->end;
    int status = 0;  /* 1: a value that is not a uint32 token id (in `e`), -1: not msgpack */
    Head e;
    uint64_t k = 0;
    /* The loop touches no Python object: a big prefill's ids are read without the GIL, so the
     * event loop runs while a worker thread decodes them (--kv-events-decode-inline-bytes). */
    PyThreadState *released = h.u >= RELEASE_GIL_TOKENS ? PyEval_SaveThread() : NULL;
    for (; k < h.u; k++, w += 4) {
        uint32_t v;
        /* The usual token ids (fixint, uint16, uint8, uint32) without the general path. */
        if (end - p >= 5 && *p <= 0x7f) {
            v = *p;
            p += 1;
        } else if (end - p >= 5 && *p == 0xcd) {
            v = (uint32_t)p[1] << 8 | p[2];
            p += 3;
        } else if (end - p >= 5 && *p == 0xcc) {
            v = p[1];
            p += 2;
        } else if (end - p >= 5 && *p == 0xce) {
            v = (uint32_t)p[1] << 24 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 8 | p[4];
            p += 5;
        } else {
            r->p = p;
            if (head(r, &e) < 0) {
                status = -1;
                break;
            }
            if (e.kind != K_UINT || e.u > 0xFFFFFFFFULL) {
                status = 1;
                break;
            }
            v = (uint32_t)e.u;
            p = r->p;
        }
        w[0] = (uint8_t)v;
        w[1] = (uint8_t)(v >> 8);
        w[2] = (uint8_t)(v >> 16);
        w[3] = (uint8_t)(v >> 24);
    }
    if (released != NULL) PyEval_RestoreThread(released);
    if (status != 0) {
        Py_DECREF(out);
        if (status < 0) return -1;
        f->bad |= BAD_TOKENS;  /* the event is ignored; the rest of the array is skipped */
        if (skip_rest(r, &e, depth + 1) < 0) return -1;
        return skip_items(r, h.u - k - 1, depth + 1);
    }
    r->p = p;
    Py_XSETREF(f->tokens, out);
    return 0;
}

static int read_block_size(Reader *r, Fields *f, int depth) {
    Head h;
    if (head(r, &h) < 0) return -1;
    if (h.kind == K_NIL) f->block_size = 0;
    else if (h.kind == K_UINT && h.u <= (uint64_t)LLONG_MAX) f->block_size = (long long)h.u;
    else {
        f->bad |= BAD_SIZE;
        return skip_rest(r, &h, depth);
    }
    return 0;
}

static PyObject *GPU;  /* the default medium, one shared str */

static int read_medium(Reader *r, Fields *f, int depth) {
    Head h;
    if (head(r, &h) < 0) return -1;
    if (h.kind != K_STR || h.len == 0) return skip_rest(r, &h, depth);  /* → the default */
    PyObject *s = h.len == 3 && memcmp(h.data, "GPU", 3) == 0
                      ? Py_NewRef(GPU)
                      : PyUnicode_DecodeUTF8((const char *)h.data, (Py_ssize_t)h.len, "strict");
    if (s == NULL) {  /* not UTF-8: the event is ignored */
        PyErr_Clear();
        f->bad |= BAD_MEDIUM;
        return 0;
    }
    Py_XSETREF(f->medium, s);
    return 0;
}

typedef int (*FieldReader)(Reader *, Fields *, int);

static const struct {
    const char *name;
    FieldReader read;
} STORED_FIELDS[] = {
    /* the array encoding's order after the type name; lora_id (index 4) is skipped */
    {"block_hashes", read_hashes}, {"parent_block_hash", read_parent}, {"token_ids", read_tokens},
    {"block_size", read_block_size}, {"lora_id", NULL}, {"medium", read_medium},
};
static const struct {
    const char *name;
    FieldReader read;
} REMOVED_FIELDS[] = {{"block_hashes", read_hashes}, {"medium", read_medium}};

static Type type_of(const Head *h) {
    if (is_str(h, "BlockStored")) return F_STORED;
    if (is_str(h, "BlockRemoved")) return F_REMOVED;
    if (is_str(h, "AllBlocksCleared")) return F_CLEARED;
    return F_OTHER;
}

/* A map field: the reader for `key` (map encoding: any known field of any type; the type then
 * decides which ones count). */
static FieldReader map_field(const Head *key) {
    for (size_t k = 0; k < sizeof STORED_FIELDS / sizeof STORED_FIELDS[0]; k++)
        if (STORED_FIELDS[k].read != NULL && is_str(key, STORED_FIELDS[k].name)) return STORED_FIELDS[k].read;
    return NULL;
}

static PyObject *medium_or_default(Fields *f) { return f->medium != NULL ? Py_NewRef(f->medium) : Py_NewRef(GPU); }

static PyObject *empty_list_or(PyObject *list) { return list != NULL ? Py_NewRef(list) : PyList_New(0); }

/* Builds the event tuple; NULL with no Python error means "ignored". */
static PyObject *event_tuple(Type type, Fields *f) {
    switch (type) {
    case F_STORED: {
        if (f->bad & STORED_USES) return NULL;
        PyObject *tokens = f->tokens != NULL ? Py_NewRef(f->tokens) : PyBytes_FromStringAndSize(NULL, 0);
        PyObject *parent = f->parent != NULL ? Py_NewRef(f->parent) : Py_NewRef(Py_None);
        PyObject *hashes = empty_list_or(f->hashes);
        PyObject *size = PyLong_FromLongLong(f->block_size);
        PyObject *medium = medium_or_default(f);
        if (tokens == NULL || hashes == NULL || size == NULL) {
            Py_XDECREF(tokens);
            Py_XDECREF(hashes);
            Py_XDECREF(size);
            Py_DECREF(parent);
            Py_DECREF(medium);
            return NULL;
        }
        return Py_BuildValue("(iNNNNN)", 0, hashes, parent, tokens, size, medium);
    }
    case F_REMOVED: {
        if (f->bad & REMOVED_USES) return NULL;
        PyObject *hashes = empty_list_or(f->hashes);
        if (hashes == NULL) return NULL;
        return Py_BuildValue("(iNN)", 1, hashes, medium_or_default(f));
    }
    case F_CLEARED:
        return Py_BuildValue("(i)", 2);
    default:
        return NULL;
    }
}

/* One event: appends its tuple to `out` or counts it in `ignored`. -1: refuse the payload. */
static int read_event(Reader *r, PyObject *out, long *ignored) {
    Head h;
    if (head(r, &h) < 0) return -1;
    Fields f = {0};
    Type type = F_OTHER;
    if (h.kind == K_MAP) {
        if (plausible(r, h.u) < 0) return -1;
        for (uint64_t k = 0; k < h.u; k++) {
            Head key;
            if (head(r, &key) < 0) goto error;
            if (key.kind == K_ARRAY || key.kind == K_MAP) {
                if (skip_rest(r, &key, 1) < 0 || skip_value(r, 1) < 0) goto error;
                continue;
            }
            if (is_str(&key, "type")) {
                Head t;
                if (head(r, &t) < 0) goto error;
                type = type_of(&t);
                if (skip_rest(r, &t, 1) < 0) goto error;
                continue;
            }
            FieldReader read = map_field(&key);
            if (read == NULL ? skip_value(r, 1) < 0 : read(r, &f, 1) < 0) goto error;
        }
    } else if (h.kind == K_ARRAY && h.u > 0) {
        if (plausible(r, h.u) < 0) return -1;
        Head t;
        if (head(r, &t) < 0) return -1;
        type = type_of(&t);
        if (skip_rest(r, &t, 1) < 0) return -1;
        uint64_t rest = h.u - 1;
        uint64_t k = 0;
        if (type == F_STORED || type == F_REMOVED) {
            size_t known = type == F_STORED ? sizeof STORED_FIELDS / sizeof STORED_FIELDS[0]
                                            : sizeof REMOVED_FIELDS / sizeof REMOVED_FIELDS[0];
            for (; k < rest && k < known; k++) {
                FieldReader read = type == F_STORED ? STORED_FIELDS[k].read : REMOVED_FIELDS[k].read;
                if (read == NULL ? skip_value(r, 1) < 0 : read(r, &f, 1) < 0) goto error;
            }
        }
        if (skip_items(r, rest - k, 1) < 0) goto error;
    } else {
        if (skip_rest(r, &h, 0) < 0) return -1;
        ++*ignored;
        return 0;
    }
    PyObject *event = event_tuple(type, &f);
    fields_clear(&f);
    if (event == NULL) {
        if (PyErr_Occurred()) return -1;
        ++*ignored;
        return 0;
    }
    int rc = PyList_Append(out, event);
    Py_DECREF(event);
    return rc;
error:
    fields_clear(&f);
    return -1;
}

static int read_events(Reader *r, PyObject **events, long *ignored) {
    Head h;
    if (head(r, &h) < 0) return -1;
    if (h.kind != K_ARRAY) {
        if (skip_rest(r, &h, 0) < 0) return -1;
        Py_CLEAR(*events);  /* not a list: the batch is refused once the payload is read */
        return 0;
    }
    if (plausible(r, h.u) < 0) return -1;
    PyObject *list = PyList_New(0);
    if (list == NULL) return -1;
    *ignored = 0;
    for (uint64_t k = 0; k < h.u; k++) {
        if (read_event(r, list, ignored) < 0) {
            Py_DECREF(list);
            return -1;
        }
    }
    Py_XSETREF(*events, list);
    return 0;
}

static int read_ts(Reader *r, double *ts) {
    Head h;
    if (head(r, &h) < 0) return -1;
    switch (h.kind) {
    case K_FLOAT: *ts = h.f; break;
    case K_UINT: case K_BOOL: *ts = (double)h.u; break;
    case K_INT: *ts = (double)h.i; break;
    default: *ts = 0.0; return skip_rest(r, &h, 0);
    }
    return 0;
}

static PyObject *refuse(const char *why) {
    PyErr_SetString(PyExc_ValueError, why);
    return NULL;
}

static PyObject *decode_batch(PyObject *module, PyObject *arg) {
    (void)module;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    Reader r = {(const uint8_t *)view.buf, (const uint8_t *)view.buf + view.len, NULL};
    double ts = 0.0;
    long ignored = 0;
    PyObject *events = NULL;
    int found_events = 0;
    const char *shape = NULL;  /* set when the payload is msgpack but not a batch */
    Head top;
    if (head(&r, &top) < 0) goto structural;
    if (top.kind == K_MAP) {
        if (plausible(&r, top.u) < 0) goto structural;
        for (uint64_t k = 0; k < top.u; k++) {
            Head key;
            if (head(&r, &key) < 0) goto structural;
            if (is_str(&key, "ts")) {
                if (read_ts(&r, &ts) < 0) goto structural;
            } else if (is_str(&key, "events")) {
                found_events = 1;
                if (read_events(&r, &events, &ignored) < 0) goto structural;
            } else if (skip_rest(&r, &key, 0) < 0 || skip_value(&r, 0) < 0) {
                goto structural;
            }
        }
    } else if (top.kind == K_ARRAY && top.u >= 2) {
        if (plausible(&r, top.u) < 0 || read_ts(&r, &ts) < 0) goto structural;
        found_events = 1;
        if (read_events(&r, &events, &ignored) < 0 || skip_items(&r, top.u - 2, 1) < 0) goto structural;
    } else {
        if (skip_rest(&r, &top, 0) < 0) goto structural;
        shape = "batch is not [ts, events, ...]";
    }
    if (r.p != r.end) {
        fail(&r, "extra data after the batch");
        goto structural;
    }
    PyBuffer_Release(&view);
    if (shape != NULL) {
        Py_XDECREF(events);
        return refuse(shape);
    }
    if (!found_events || events == NULL) {
        Py_XDECREF(events);
        return refuse("batch events is not a list");
    }
    return Py_BuildValue("(dNl)", ts, events, ignored);
structural:
    PyBuffer_Release(&view);
    Py_XDECREF(events);
    if (PyErr_Occurred()) return NULL;
    PyErr_Format(PyExc_ValueError, "not msgpack: %s", r.error != NULL ? r.error : "malformed");
    return NULL;
}

static PyMethodDef methods[] = {
    {"decode_batch", decode_batch, METH_O,
     "decode_batch(payload) -> (ts, events, ignored); ValueError when the payload is not a batch"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvmesh.services.router.kv_events._decode",
    "vLLM KV-event batches decoded with token ids packed (native half of decode.py).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__decode(void) {
    GPU = PyUnicode_InternFromString("GPU");
    if (GPU == NULL) return NULL;
    return PyModule_Create(&module);
}
