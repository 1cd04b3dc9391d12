/* The native half of shards.py: the router's two per-block maps.
 *
 * Each stored block adds one entry to each: engine hash -> own key (a list of shard dicts,
 * filled here in one C loop per event instead of a Python loop per entry) and block id -> tree
 * node (`BlockIndex` below).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>

/* The shard of `key`: the low bits of hash(key). -1 on error. */
static Py_ssize_t shard_of(PyObject *key, Py_ssize_t mask) {
    Py_hash_t h = PyObject_Hash(key);
    if (h == -1) return -1;
    return (Py_ssize_t)((size_t)h & (size_t)mask);
}

static int check_shards(PyObject *shards, Py_ssize_t *mask) {
    if (!PyList_CheckExact(shards)) {
        PyErr_SetString(PyExc_TypeError, "shards must be a list of dicts");
        return -1;
    }
    Py_ssize_t n = PyList_GET_SIZE(shards);
    if (n == 0 || (n & (n - 1)) != 0) {
        PyErr_SetString(PyExc_ValueError, "the number of shards must be a power of two");
        return -1;
    }
    *mask = n - 1;
    return 0;
}

/* update(shards, keys, values) -> new keys: shards[shard(k)][k] = v for each pair. */
static PyObject *update(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "update(shards, keys, values)");
        return NULL;
    }
    Py_ssize_t mask;
    if (check_shards(args[0], &mask) < 0) return NULL;
    PyObject *keys = PySequence_Fast(args[1], "keys must be a sequence");
    if (keys == NULL) return NULL;
    PyObject *values = PySequence_Fast(args[2], "values must be a sequence");
    if (values == NULL) {
        Py_DECREF(keys);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t added = 0;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(keys);
    if (PySequence_Fast_GET_SIZE(values) != n) {
        PyErr_SetString(PyExc_ValueError, "keys and values differ in length");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PySequence_Fast_GET_ITEM(keys, i);
        Py_ssize_t s = shard_of(key, mask);
        if (s < 0) goto done;
        PyObject *shard = PyList_GET_ITEM(args[0], s);
        if (!PyDict_CheckExact(shard)) {
            PyErr_SetString(PyExc_TypeError, "shards must be a list of dicts");
            goto done;
        }
        Py_ssize_t before = PyDict_GET_SIZE(shard);
        if (PyDict_SetItem(shard, key, PySequence_Fast_GET_ITEM(values, i)) < 0) goto done;
        added += PyDict_GET_SIZE(shard) - before;
    }
    result = PyLong_FromSsize_t(added);
done:
    Py_DECREF(keys);
    Py_DECREF(values);
    return result;
}

/* ---- BlockIndex: block id (u64) -> object, outside the garbage collector's view ----------
 *
 * The tree's index has one entry per stored block. As a dict it made every full collection of
 * the garbage collector visit each entry's int key (a cache miss each): 40 ms at 400k blocks on
 * the development machine, every time one ran, all of it holding the event loop. Here ids are
 * stored inline (no int object per entry) in 256 open-addressing tables with linear probing,
 * and the type is not GC-tracked: its references to values count as references from outside,
 * so values stay alive while indexed and are never visited through it. Values must not refer
 * back to the index (such a cycle would never be collected); tree nodes do not.
 * Splitting into 256 tables keeps each resize to about 1/256 of the entries.
 */

#define INDEX_SHARDS 256
#define INDEX_BUCKETS 1024

/* Table of each bucket (the low bits of an id's mixed hash): table i gets a share of buckets
 * proportional to 2^(i/256), so the tables do not all reach their next size at once (equal
 * tables grow in step and resize within the same few events). Filled at import. */
static uint8_t TABLE_OF[INDEX_BUCKETS];

static void stagger_tables(void) {
    double total = 0.0, used = 0.0;
    for (int i = 0; i < INDEX_SHARDS; i++) total += pow(2.0, (double)i / INDEX_SHARDS);
    int filled = 0;
    for (int i = 0; i < INDEX_SHARDS; i++) {
        used += pow(2.0, (double)i / INDEX_SHARDS);
        int upto = (int)(used / total * INDEX_BUCKETS + 0.5);
        while (filled < upto && filled < INDEX_BUCKETS) TABLE_OF[filled++] = (uint8_t)i;
    }
    while (filled < INDEX_BUCKETS) TABLE_OF[filled++] = INDEX_SHARDS - 1;
}

typedef struct {
    uint64_t key;
    PyObject *value;  /* NULL: empty slot */
} Slot;

typedef struct {
    Slot *slots;
    size_t capacity;  /* a power of two, or 0 */
    size_t used;
} Table;

typedef struct {
    PyObject_HEAD
    Table tables[INDEX_SHARDS];
    Py_ssize_t size;
} IndexObject;

static inline uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static int as_id(PyObject *key, uint64_t *out) {
    if (!PyLong_Check(key)) {
        PyErr_SetString(PyExc_TypeError, "block ids are ints");
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(key);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_SetString(PyExc_OverflowError, "block ids are unsigned 64-bit ints");
        return -1;
    }
    *out = v;
    return 0;
}

/* The slot holding `key`, or the empty slot where it would go. */
static Slot *find(Table *t, uint64_t key, uint64_t mixed) {
    size_t mask = t->capacity - 1;
    size_t i = (size_t)(mixed >> 10) & mask;
    for (;;) {
        Slot *s = &t->slots[i];
        if (s->value == NULL || s->key == key) return s;
        i = (i + 1) & mask;
    }
}

static int grow(Table *t) {
    size_t capacity = t->capacity ? t->capacity * 2 : 16;
    Slot *slots = PyMem_Calloc(capacity, sizeof(Slot));
    if (slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Table bigger = {slots, capacity, t->used};
    for (size_t i = 0; i < t->capacity; i++) {
        Slot *s = &t->slots[i];
        if (s->value != NULL) *find(&bigger, s->key, mix(s->key)) = *s;
    }
    PyMem_Free(t->slots);
    *t = bigger;
    return 0;
}

/* Stores key -> value (a new reference is taken). 1: a new key, 0: replaced, -1: error. */
static int index_put(IndexObject *self, uint64_t key, PyObject *value) {
    uint64_t mixed = mix(key);
    Table *t = &self->tables[TABLE_OF[mixed & (INDEX_BUCKETS - 1)]];
    if ((t->used + 1) * 4 > t->capacity * 3 && grow(t) < 0) return -1;
    Slot *s = find(t, key, mixed);
    PyObject *old = s->value;
    s->key = key;
    s->value = Py_NewRef(value);
    if (old != NULL) {
        Py_DECREF(old);
        return 0;
    }
    t->used++;
    self->size++;
    return 1;
}

static PyObject *index_lookup(IndexObject *self, uint64_t key) {
    uint64_t mixed = mix(key);
    Table *t = &self->tables[TABLE_OF[mixed & (INDEX_BUCKETS - 1)]];
    if (t->capacity == 0) return NULL;
    return find(t, key, mixed)->value;
}

/* Removes `key` when present (and, when `only` is not NULL, mapped to `only`); returns the
 * removed value (a reference the caller owns) or NULL. Backward-shift deletion: the entries
 * after it that probed past it move back, so no tombstones accumulate. */
static PyObject *index_remove(IndexObject *self, uint64_t key, PyObject *only) {
    uint64_t mixed = mix(key);
    Table *t = &self->tables[TABLE_OF[mixed & (INDEX_BUCKETS - 1)]];
    if (t->capacity == 0) return NULL;
    Slot *hole = find(t, key, mixed);
    PyObject *value = hole->value;
    if (value == NULL || (only != NULL && value != only)) return NULL;
    size_t mask = t->capacity - 1;
    size_t i = (size_t)(hole - t->slots);
    size_t j = i;
    for (;;) {
        j = (j + 1) & mask;
        Slot *s = &t->slots[j];
        if (s->value == NULL) break;
        size_t home = (size_t)(mix(s->key) >> 10) & mask;
        /* s may move to the hole at i when its home is not cyclically within (i, j] */
        int stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
        if (!stays) {
            t->slots[i] = *s;
            i = j;
        }
    }
    t->slots[i].value = NULL;
    t->used--;
    self->size--;
    return value;
}

static void index_clear_all(IndexObject *self) {
    for (int k = 0; k < INDEX_SHARDS; k++) {
        Table t = self->tables[k];
        self->tables[k] = (Table){NULL, 0, 0};
        for (size_t i = 0; i < t.capacity; i++) Py_XDECREF(t.slots[i].value);
        PyMem_Free(t.slots);
    }
    self->size = 0;
}

static void index_dealloc(IndexObject *self) {
    index_clear_all(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *index_get(IndexObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(id, default=None)");
        return NULL;
    }
    uint64_t key;
    if (as_id(args[0], &key) < 0) return NULL;
    PyObject *value = index_lookup(self, key);
    if (value == NULL) value = nargs == 2 ? args[1] : Py_None;
    return Py_NewRef(value);
}

static PyObject *index_put_all(IndexObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "put_all(ids, value)");
        return NULL;
    }
    PyObject *ids = PySequence_Fast(args[0], "ids must be a sequence");
    if (ids == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(ids);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t key;
        if (as_id(PySequence_Fast_GET_ITEM(ids, i), &key) < 0 || index_put(self, key, args[1]) < 0) {
            Py_DECREF(ids);
            return NULL;
        }
    }
    Py_DECREF(ids);
    Py_RETURN_NONE;
}

static PyObject *index_remove_all(IndexObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "remove_all(ids, value)");
        return NULL;
    }
    PyObject *ids = PySequence_Fast(args[0], "ids must be a sequence");
    if (ids == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(ids);
    Py_ssize_t removed = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t key;
        if (as_id(PySequence_Fast_GET_ITEM(ids, i), &key) < 0) {
            Py_DECREF(ids);
            return NULL;
        }
        PyObject *gone = index_remove(self, key, args[1]);
        if (gone != NULL) {
            removed++;
            Py_DECREF(gone);
        }
    }
    Py_DECREF(ids);
    return PyLong_FromSsize_t(removed);
}

static PyObject *index_ids(IndexObject *self, PyObject *unused) {
    (void)unused;
    PyObject *out = PyList_New(0);
    for (int k = 0; out != NULL && k < INDEX_SHARDS; k++) {
        Table *t = &self->tables[k];
        for (size_t i = 0; i < t->capacity; i++) {
            if (t->slots[i].value == NULL) continue;
            PyObject *id = PyLong_FromUnsignedLongLong(t->slots[i].key);
            if (id == NULL || PyList_Append(out, id) < 0) {
                Py_XDECREF(id);
                Py_CLEAR(out);
                break;
            }
            Py_DECREF(id);
        }
    }
    return out;
}

static PyObject *index_clear(IndexObject *self, PyObject *unused) {
    (void)unused;
    index_clear_all(self);
    Py_RETURN_NONE;
}

static Py_ssize_t index_len(IndexObject *self) { return self->size; }

static int index_contains(IndexObject *self, PyObject *key) {
    uint64_t id;
    if (!PyLong_Check(key)) return 0;
    if (as_id(key, &id) < 0) {
        PyErr_Clear();
        return 0;
    }
    return index_lookup(self, id) != NULL;
}

static PyObject *index_getitem(IndexObject *self, PyObject *key) {
    uint64_t id;
    if (as_id(key, &id) < 0) return NULL;
    PyObject *value = index_lookup(self, id);
    if (value == NULL) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return Py_NewRef(value);
}

static int index_setitem(IndexObject *self, PyObject *key, PyObject *value) {
    uint64_t id;
    if (as_id(key, &id) < 0) return -1;
    if (value != NULL) return index_put(self, id, value) < 0 ? -1 : 0;
    PyObject *gone = index_remove(self, id, NULL);
    if (gone == NULL) {
        PyErr_SetObject(PyExc_KeyError, key);
        return -1;
    }
    Py_DECREF(gone);
    return 0;
}

static PyMethodDef index_methods[] = {
    {"get", (PyCFunction)(void (*)(void))index_get, METH_FASTCALL, "get(id, default=None)"},
    {"put_all", (PyCFunction)(void (*)(void))index_put_all, METH_FASTCALL, "put_all(ids, value): each id to value"},
    {"remove_all", (PyCFunction)(void (*)(void))index_remove_all, METH_FASTCALL,
     "remove_all(ids, value) -> removed: drops each id that maps to value (by identity)"},
    {"ids", (PyCFunction)index_ids, METH_NOARGS, "ids() -> list of every id (in no particular order)"},
    {"clear", (PyCFunction)index_clear, METH_NOARGS, "clear(): drops every entry"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods index_as_sequence = {
    .sq_contains = (objobjproc)index_contains,
};

static PyMappingMethods index_as_mapping = {
    .mp_length = (lenfunc)index_len,
    .mp_subscript = (binaryfunc)index_getitem,
    .mp_ass_subscript = (objobjargproc)index_setitem,
};

static PyTypeObject IndexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvmesh.services.router._shards.BlockIndex",
    .tp_basicsize = sizeof(IndexObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "BlockIndex(): block id (unsigned 64-bit int) -> object, not tracked by the garbage collector",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)index_dealloc,
    .tp_methods = index_methods,
    .tp_as_sequence = &index_as_sequence,
    .tp_as_mapping = &index_as_mapping,
};

static PyMethodDef methods[] = {
    {"update", (PyCFunction)(void (*)(void))update, METH_FASTCALL,
     "update(shards, keys, values) -> how many keys are new: each key to its value, in its shard"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvmesh.services.router._shards",
    "Bulk writes into shard dicts (native half of shards.py).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__shards(void) {
    stagger_tables();
    if (PyType_Ready(&IndexType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "BlockIndex", (PyObject *)&IndexType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
