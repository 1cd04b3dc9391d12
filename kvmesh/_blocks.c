/* The native half of kvmesh/blocks.py: chained keyed BLAKE2b over fixed-size pieces.
 *
 * A block key is BLAKE2b-128 keyed with the seed, over (length-prefixed namespace and model,
 * parent key, piece). Python's hashlib costs four calls per block (copy, update, update, digest),
 * about 1 us; here a whole run of blocks is one call and each block costs its compressions
 * only. The state after the key block and the constant prefix is computed once per hasher and
 * copied per block. BLAKE2b is written here from RFC 7693; tests compare every output with
 * hashlib.blake2b.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define BLOCK_BYTES 128
#define KEY_OUT 16

static const uint64_t IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL,
};

static const uint8_t SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
};

typedef struct {
    uint64_t h[8];
    uint64_t t;  /* bytes compressed so far (inputs here stay far below 2^64) */
    uint8_t buf[BLOCK_BYTES];
    size_t buflen;
} State;

static inline uint64_t rotr(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline void store64(uint8_t *p, uint64_t v) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

#define MIX(a, b, c, d, x, y)          \
    do {                               \
        a = a + b + (x);               \
        d = rotr(d ^ a, 32);           \
        c = c + d;                     \
        b = rotr(b ^ c, 24);           \
        a = a + b + (y);               \
        d = rotr(d ^ a, 16);           \
        c = c + d;                     \
        b = rotr(b ^ c, 63);           \
    } while (0)

static void compress(State *s, const uint8_t *block, int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = load64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = s->h[i];
        v[i + 8] = IV[i];
    }
    v[12] ^= s->t;
    if (last) v[14] = ~v[14];
    /* Unrolled with constant rounds, so every message index is known at compile time. */
#define ROUND(r)                                                              \
    do {                                                                      \
        MIX(v[0], v[4], v[8], v[12], m[SIGMA[r][0]], m[SIGMA[r][1]]);         \
        MIX(v[1], v[5], v[9], v[13], m[SIGMA[r][2]], m[SIGMA[r][3]]);         \
        MIX(v[2], v[6], v[10], v[14], m[SIGMA[r][4]], m[SIGMA[r][5]]);        \
        MIX(v[3], v[7], v[11], v[15], m[SIGMA[r][6]], m[SIGMA[r][7]]);        \
        MIX(v[0], v[5], v[10], v[15], m[SIGMA[r][8]], m[SIGMA[r][9]]);        \
        MIX(v[1], v[6], v[11], v[12], m[SIGMA[r][10]], m[SIGMA[r][11]]);      \
        MIX(v[2], v[7], v[8], v[13], m[SIGMA[r][12]], m[SIGMA[r][13]]);       \
        MIX(v[3], v[4], v[9], v[14], m[SIGMA[r][14]], m[SIGMA[r][15]]);       \
    } while (0)
    ROUND(0); ROUND(1); ROUND(2); ROUND(3); ROUND(4); ROUND(5);
    ROUND(6); ROUND(7); ROUND(8); ROUND(9); ROUND(10); ROUND(11);
#undef ROUND
    for (int i = 0; i < 8; i++) s->h[i] ^= v[i] ^ v[i + 8];
}

/* Absorbs input; a full buffer is compressed only once more input follows (the last block is
 * always compressed by `finish`, flagged as last). */
static void absorb(State *s, const uint8_t *in, size_t len) {
    while (len > 0) {
        if (s->buflen == BLOCK_BYTES) {
            s->t += BLOCK_BYTES;
            compress(s, s->buf, 0);
            s->buflen = 0;
        }
        size_t take = BLOCK_BYTES - s->buflen;
        if (take > len) take = len;
        memcpy(s->buf + s->buflen, in, take);
        s->buflen += take;
        in += take;
        len -= take;
    }
}

static void finish(State *s, uint8_t out[KEY_OUT]) {
    s->t += s->buflen;
    memset(s->buf + s->buflen, 0, BLOCK_BYTES - s->buflen);
    compress(s, s->buf, 1);
    uint8_t full[64];
    for (int i = 0; i < 8; i++) store64(full + 8 * i, s->h[i]);
    memcpy(out, full, KEY_OUT);
}

typedef struct {
    PyObject_HEAD
    State base;  /* after the key block and the prefix */
} ChainObject;

static int chain_init(ChainObject *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"key", "prefix", NULL};
    Py_buffer key, prefix;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*y*:Chain", names, &key, &prefix)) return -1;
    int ok = key.len <= 64;
    if (ok) {
        State *s = &self->base;
        memcpy(s->h, IV, sizeof IV);
        s->h[0] ^= 0x01010000ULL ^ ((uint64_t)key.len << 8) ^ KEY_OUT;
        s->t = 0;
        s->buflen = 0;
        if (key.len > 0) {
            uint8_t block[BLOCK_BYTES] = {0};
            memcpy(block, key.buf, (size_t)key.len);
            absorb(s, block, BLOCK_BYTES);
        }
        absorb(s, prefix.buf, (size_t)prefix.len);
    }
    PyBuffer_Release(&key);
    PyBuffer_Release(&prefix);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "the key is at most 64 bytes");
        return -1;
    }
    return 0;
}

/* keys(raw, step, parent) -> list of 16-byte keys, one per full `step`-byte piece of raw. */
static PyObject *chain_keys(ChainObject *self, PyObject *args) {
    Py_buffer raw, parent;
    Py_ssize_t step;
    if (!PyArg_ParseTuple(args, "y*ny*:keys", &raw, &step, &parent)) return NULL;
    PyObject *out = NULL;
    if (step <= 0 || parent.len != KEY_OUT) {
        PyErr_SetString(PyExc_ValueError, "step must be positive and parent 16 bytes");
        goto done;
    }
    Py_ssize_t count = raw.len / step;
    out = PyList_New(count);
    if (out == NULL) goto done;
    uint8_t link[KEY_OUT];
    memcpy(link, parent.buf, KEY_OUT);
    const uint8_t *piece = raw.buf;
    for (Py_ssize_t i = 0; i < count; i++, piece += step) {
        State s = self->base;
        absorb(&s, link, KEY_OUT);
        absorb(&s, piece, (size_t)step);
        finish(&s, link);
        PyObject *key = PyBytes_FromStringAndSize((const char *)link, KEY_OUT);
        if (key == NULL) {
            Py_CLEAR(out);
            goto done;
        }
        PyList_SET_ITEM(out, i, key);
    }
done:
    PyBuffer_Release(&raw);
    PyBuffer_Release(&parent);
    return out;
}

/* ids(keys) -> the router's block id of each key: its first 8 bytes as a little-endian u64. */
static PyObject *block_ids(PyObject *module, PyObject *arg) {
    (void)module;
    PyObject *keys = PySequence_Fast(arg, "keys must be a sequence");
    if (keys == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(keys);
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out != NULL && i < n; i++) {
        PyObject *key = PySequence_Fast_GET_ITEM(keys, i);
        if (!PyBytes_Check(key) || PyBytes_GET_SIZE(key) < 8) {
            PyErr_SetString(PyExc_ValueError, "a key is bytes of at least 8");
            Py_CLEAR(out);
            break;
        }
        const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(key);
        uint64_t id = 0;
        for (int k = 7; k >= 0; k--) id = (id << 8) | p[k];
        PyObject *v = PyLong_FromUnsignedLongLong(id);
        if (v == NULL) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, v);
    }
    Py_DECREF(keys);
    return out;
}

static PyMethodDef module_methods[] = {
    {"ids", block_ids, METH_O, "ids(keys) -> the block id of each key (first 8 bytes, little-endian u64)"},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef chain_methods[] = {
    {"keys", (PyCFunction)chain_keys, METH_VARARGS,
     "keys(raw, step, parent) -> list of 16-byte chained keys, one per full step-byte piece"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ChainType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvmesh._blocks.Chain",
    .tp_basicsize = sizeof(ChainObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Chain(key, prefix): BLAKE2b-128 keyed with `key`, every input starting with `prefix`",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)chain_init,
    .tp_methods = chain_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvmesh._blocks", "Chained keyed BLAKE2b block keys (native half of kvmesh.blocks).",
    -1, module_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__blocks(void) {
    if (PyType_Ready(&ChainType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&ChainType);
    if (PyModule_AddObject(m, "Chain", (PyObject *)&ChainType) < 0) {
        Py_DECREF(&ChainType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
