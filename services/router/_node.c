/* The prefix tree's node (tree.py's `Node`), as a type the garbage collector does not track.
 *
 * A full collection visits every tracked object and every reference it holds. As a Python class
 * a node is tracked, and so are the dicts that refer to nodes (children, the per-pod node ->
 * last-used maps): at a few hundred thousand blocks a full collection took 10-80 ms on the
 * development machine, each time one ran, all of it holding the router's event loop. Nodes of
 * this type are not tracked, and a dict whose values are such nodes stays untracked too, so the
 * collector does not visit the tree at all.
 *
 * Nodes are freed by reference counting alone. The tree never leaves a cycle behind: it deletes
 * nodes as leaves, and `PrefixTree.__del__` cuts the parent links of a tree that goes away.
 * Freeing a line of nodes that each held the last reference to its parent runs as a loop, not
 * as a recursion (a prompt of 65,536 blocks may be a line of that many nodes).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

/* Every field is an object reference that is never NULL once initialised (None stands for "no
 * parent", "no children"...): members of that kind (T_OBJECT_EX) are the ones the interpreter
 * specializes like a Python class's __slots__; a T_OBJECT or T_BOOL member read through the
 * generic path made routing about 4 times slower. */
typedef struct {
    PyObject_HEAD
    PyObject *ids;       /* tuple of block ids */
    PyObject *parent;    /* Node or None */
    PyObject *children;  /* dict first id -> Node, or None */
    PyObject *mask;      /* int: slot bits of the pods holding it */
    PyObject *tiers;     /* list of slot masks per tier above 0, or None */
    PyObject *ref;       /* bool: used since the CLOCK hand last passed */
    PyObject *dead;      /* bool: deleted from the tree */
    PyObject *indexed;   /* bool: its ids are in the block index */
} NodeObject;

static PyTypeObject NodeType;

static int node_init(NodeObject *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"ids", "parent", NULL};
    PyObject *ids, *parent;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:Node", names, &ids, &parent)) return -1;
    if (parent != Py_None && !Py_IS_TYPE(parent, &NodeType)) {
        PyErr_SetString(PyExc_TypeError, "a node's parent is a Node or None");
        return -1;
    }
    PyObject *zero = PyLong_FromLong(0);
    if (zero == NULL) return -1;
    Py_XSETREF(self->ids, Py_NewRef(ids));
    Py_XSETREF(self->parent, Py_NewRef(parent));
    Py_XSETREF(self->children, Py_NewRef(Py_None));
    Py_XSETREF(self->tiers, Py_NewRef(Py_None));
    Py_XSETREF(self->mask, zero);
    Py_XSETREF(self->ref, Py_NewRef(Py_True));
    Py_XSETREF(self->dead, Py_NewRef(Py_False));
    Py_XSETREF(self->indexed, Py_NewRef(Py_False));
    return 0;
}

static void node_dealloc(NodeObject *self) {
    for (;;) {
        PyObject *parent = self->parent;
        self->parent = NULL;
        Py_CLEAR(self->ids);
        Py_CLEAR(self->children);
        Py_CLEAR(self->mask);
        Py_CLEAR(self->tiers);
        Py_CLEAR(self->ref);
        Py_CLEAR(self->dead);
        Py_CLEAR(self->indexed);
        Py_TYPE(self)->tp_free((PyObject *)self);
        if (parent == NULL) return;
        if (Py_REFCNT(parent) > 1 || !Py_IS_TYPE(parent, &NodeType)) {
            Py_DECREF(parent);
            return;
        }
        self = (NodeObject *)parent;  /* ours was the last reference: free it here, not recursively */
    }
}

static PyMemberDef node_members[] = {
    {"ids", T_OBJECT_EX, offsetof(NodeObject, ids), 0, "the run of block ids (a tuple)"},
    {"parent", T_OBJECT_EX, offsetof(NodeObject, parent), 0, "the parent node (None at the root)"},
    {"children", T_OBJECT_EX, offsetof(NodeObject, children), 0, "first id -> child node, or None"},
    {"mask", T_OBJECT_EX, offsetof(NodeObject, mask), 0, "slot bits of the pods holding the node"},
    {"tiers", T_OBJECT_EX, offsetof(NodeObject, tiers), 0, "slot masks per tier above 0, or None"},
    {"ref", T_OBJECT_EX, offsetof(NodeObject, ref), 0, "used since the CLOCK hand last passed"},
    {"dead", T_OBJECT_EX, offsetof(NodeObject, dead), 0, "deleted from the tree"},
    {"indexed", T_OBJECT_EX, offsetof(NodeObject, indexed), 0, "its ids are in the block index"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject NodeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvmesh.services.router._node.Node",
    .tp_basicsize = sizeof(NodeObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Node(ids, parent): a run of block ids held by the same pods (not tracked by the collector)",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)node_init,
    .tp_dealloc = (destructor)node_dealloc,
    .tp_members = node_members,
};

/* ---- NodeQueue: the CLOCK's FIFO of nodes, outside the collector's view too ---------------
 *
 * As a deque it was tracked, and each compaction (dropping deleted nodes once they outnumber
 * live ones) made a new deque of every node: young, so the next collection of the youngest
 * generation visited all of it (44 ms at 400k blocks here, in the middle of a storm). This ring
 * buffer is not tracked and compacts in place.
 */

typedef struct {
    PyObject_HEAD
    PyObject **items;
    Py_ssize_t capacity;  /* a power of two, or 0 */
    Py_ssize_t head;      /* index of the first item */
    Py_ssize_t size;
} QueueObject;

static int queue_grow(QueueObject *q) {
    Py_ssize_t capacity = q->capacity ? q->capacity * 2 : 64;
    PyObject **items = PyMem_New(PyObject *, (size_t)capacity);
    if (items == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < q->size; i++) items[i] = q->items[(q->head + i) & (q->capacity - 1)];
    PyMem_Free(q->items);
    q->items = items;
    q->capacity = capacity;
    q->head = 0;
    return 0;
}

static PyObject *queue_append(QueueObject *q, PyObject *node) {
    if (!Py_IS_TYPE(node, &NodeType)) {
        PyErr_SetString(PyExc_TypeError, "a NodeQueue holds nodes");
        return NULL;
    }
    if (q->size == q->capacity && queue_grow(q) < 0) return NULL;
    q->items[(q->head + q->size) & (q->capacity - 1)] = Py_NewRef(node);
    q->size++;
    Py_RETURN_NONE;
}

static PyObject *queue_popleft(QueueObject *q, PyObject *unused) {
    (void)unused;
    if (q->size == 0) {
        PyErr_SetString(PyExc_IndexError, "pop from an empty NodeQueue");
        return NULL;
    }
    PyObject *node = q->items[q->head];
    q->head = (q->head + 1) & (q->capacity - 1);
    q->size--;
    return node;  /* the queue's reference, now the caller's */
}

/* drop_dead() -> how many: removes the deleted nodes, keeping the others in order. Releasing a
 * node frees at most nodes and their tuples, dicts and ints: nothing that could reach back into
 * this queue while it is being compacted. */
static PyObject *queue_drop_dead(QueueObject *q, PyObject *unused) {
    (void)unused;
    Py_ssize_t kept = 0, size = q->size;
    Py_ssize_t mask = q->capacity - 1;
    for (Py_ssize_t i = 0; i < size; i++) {
        PyObject *node = q->items[(q->head + i) & mask];
        if (((NodeObject *)node)->dead == Py_True) Py_DECREF(node);
        else q->items[(q->head + kept++) & mask] = node;
    }
    q->size = kept;
    return PyLong_FromSsize_t(size - kept);
}

static Py_ssize_t queue_len(QueueObject *q) { return q->size; }

static void queue_dealloc(QueueObject *q) {
    PyObject **items = q->items;
    Py_ssize_t head = q->head, size = q->size, mask = q->capacity - 1;
    q->items = NULL;
    q->size = 0;
    for (Py_ssize_t i = 0; i < size; i++) Py_DECREF(items[(head + i) & mask]);
    PyMem_Free(items);
    Py_TYPE(q)->tp_free((PyObject *)q);
}

static PyMethodDef queue_methods[] = {
    {"append", (PyCFunction)queue_append, METH_O, "append(node): at the back"},
    {"popleft", (PyCFunction)queue_popleft, METH_NOARGS, "popleft() -> the node at the front"},
    {"drop_dead", (PyCFunction)queue_drop_dead, METH_NOARGS,
     "drop_dead() -> how many: removes deleted nodes, the others keep their order"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods queue_as_sequence = {
    .sq_length = (lenfunc)queue_len,
};

static PyTypeObject QueueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvmesh.services.router._node.NodeQueue",
    .tp_basicsize = sizeof(QueueObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "NodeQueue(): a FIFO of nodes (the CLOCK's), not tracked by the collector",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)queue_dealloc,
    .tp_methods = queue_methods,
    .tp_as_sequence = &queue_as_sequence,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvmesh.services.router._node",
    "The prefix tree's node, outside the garbage collector's view (native half of tree.py).", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__node(void) {
    if (PyType_Ready(&NodeType) < 0 || PyType_Ready(&QueueType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Node", (PyObject *)&NodeType) < 0 ||
        PyModule_AddObjectRef(m, "NodeQueue", (PyObject *)&QueueType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
