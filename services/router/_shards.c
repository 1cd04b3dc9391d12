/* The native half of shards.py: bulk writes into a list of shard dicts.
 *
 * Each stored block adds one entry to two per-block maps (engine hash -> own key, block id ->
 * tree node). A Python loop that picks the shard and stores costs several hundred ns per entry
 * on the machines this runs on; here it is one C loop per event.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* The shard of `key`: its low bits when `by_value` (non-negative int keys spread over their low
 * bits), else the low bits of hash(key). -1 on error. */
static Py_ssize_t shard_of(PyObject *key, int by_value, Py_ssize_t mask) {
    if (by_value) {
        unsigned long long v = PyLong_AsUnsignedLongLongMask(key);
        if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
        return (Py_ssize_t)(v & (unsigned long long)mask);
    }
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
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyDict_CheckExact(PyList_GET_ITEM(shards, i))) {
            PyErr_SetString(PyExc_TypeError, "shards must be a list of dicts");
            return -1;
        }
    }
    *mask = n - 1;
    return 0;
}

/* update(shards, keys, values, by_value) -> new keys: shards[shard(k)][k] = v for each pair. */
static PyObject *update(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "update(shards, keys, values, by_value)");
        return NULL;
    }
    Py_ssize_t mask;
    if (check_shards(args[0], &mask) < 0) return NULL;
    int by_value = PyObject_IsTrue(args[3]);
    if (by_value < 0) return NULL;
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
        Py_ssize_t s = shard_of(key, by_value, mask);
        if (s < 0) goto done;
        PyObject *shard = PyList_GET_ITEM(args[0], s);
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

/* fill(shards, keys, value, by_value) -> new keys: shards[shard(k)][k] = value for each key. */
static PyObject *fill(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "fill(shards, keys, value, by_value)");
        return NULL;
    }
    Py_ssize_t mask;
    if (check_shards(args[0], &mask) < 0) return NULL;
    int by_value = PyObject_IsTrue(args[3]);
    if (by_value < 0) return NULL;
    PyObject *keys = PySequence_Fast(args[1], "keys must be a sequence");
    if (keys == NULL) return NULL;
    Py_ssize_t added = 0;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(keys);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PySequence_Fast_GET_ITEM(keys, i);
        Py_ssize_t s = shard_of(key, by_value, mask);
        PyObject *shard = s < 0 ? NULL : PyList_GET_ITEM(args[0], s);
        Py_ssize_t before = shard == NULL ? 0 : PyDict_GET_SIZE(shard);
        if (shard == NULL || PyDict_SetItem(shard, key, args[2]) < 0) {
            Py_DECREF(keys);
            return NULL;
        }
        added += PyDict_GET_SIZE(shard) - before;
    }
    Py_DECREF(keys);
    return PyLong_FromSsize_t(added);
}

static PyMethodDef methods[] = {
    {"update", (PyCFunction)(void (*)(void))update, METH_FASTCALL,
     "update(shards, keys, values, by_value) -> how many keys are new: each key to its value, in its shard"},
    {"fill", (PyCFunction)(void (*)(void))fill, METH_FASTCALL,
     "fill(shards, keys, value, by_value) -> how many keys are new: each key to the one value, in its shard"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvmesh.services.router._shards",
    "Bulk writes into shard dicts (native half of shards.py).", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__shards(void) { return PyModule_Create(&module); }
