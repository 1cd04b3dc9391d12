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

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvmesh.services.router._node",
    "The prefix tree's node, outside the garbage collector's view (native half of tree.py).", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__node(void) {
    if (PyType_Ready(&NodeType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Node", (PyObject *)&NodeType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
