/* tracemark._speedups, part 2: the C path of dynamic entry probes.
 *
 * What it does
 * ------------
 * An entry probe that captures plain names (tracemark/probes/events.py) and whose marker is
 * recorded, and only recorded, by one recording through the C core: the common case, and
 * the one issue 14 times. The pure path of such an event runs, in Python: the probe's
 * emitter (on 3.12+ also sys._getframe and f_locals, which builds a dict of every local),
 * the marker's firing function (dispatch.py's template: thread state, depth, the fused
 * recorder body of generated.py) and then _speedups.record. Here it is one C function:
 *
 * - EntryProbe(fire, names, ns, fallback): built per probe by events.Probe.compile. Called
 *   with the captured values (3.11: the recompiled code calls it with the parameters, in
 *   place of the emitter emit_args), or used by StartCallback with values read from the
 *   frame (3.12+).
 * - StartCallback(fallback): what sysmon registers for PY_START when the C core is in use.
 *   Its table (code object -> EntryProbe, set by sysmon._publish, replaced whole) says which
 *   code it serves; for those it reads each captured name with PyFrame_GetVar (3.12+,
 *   Include/cpython/pyframe.h: the same value f_locals would hold, cells and free variables
 *   included) from PyEval_GetFrame(), the probed frame (a C callback pushes no frame).
 *
 * Guarantees, and why they hold
 * -----------------------------
 * - Same events as the pure path, by construction: the C path records an event only when
 *   it can do exactly what the pure path would, and otherwise declines having written
 *   nothing, and the pure path runs for that event (EntryProbe calls its fallback, the
 *   Python emitter; StartCallback calls its fallback, SysMonitoring._on_start, whose frame
 *   depth its emitters expect). It declines when: the probe was retired (its namespace's
 *   _fire is no longer the marker: retire() swaps it), the marker's firing function has no
 *   recorder body fused in (ns["_fused_state"], kept by registry.MarkerCore._publish, is
 *   not a recording's Bound: other consumers, several probes, a keyword or nested path), the
 *   recording binds it with the pure core (Bound.layout is None), this thread has no
 *   dispatch state yet or is inside a probe (depth > 0: the pure path nests), its cached
 *   channel is not this recording's, a value is not of a plain exact type (None, bool, int
 *   within int64, float, str without surrogates, bytes: the pure path takes the repr), a
 *   name is unbound, an asyncio task is running, the event does not fit the sub-buffer
 *   (ch.switch is Python), or anything fails (a MemoryError is cleared, then declined).
 * - Tracing never breaks the program: no exception leaves the C path; the fallbacks are the
 *   pure path, with its own fault handling.
 * - Atomicity as the pure fused body: no Python code runs between reading the channel's
 *   position and publishing the event (tm_record_values, may_switch 0), so a signal
 *   handler, another thread or a finalizer sees the event whole or not at all. Everything
 *   that may allocate (the frame object, the values, the thread state lookup) comes first.
 * - Disable / remove mid-flight: the table and the fused state are single references
 *   replaced whole; a thread holds a strong reference to the EntryProbe it runs, so a
 *   table replaced meanwhile (a finalizer enabling a probe) is freed safely.
 * - Generators and coroutines: PY_START fires once per frame, at its first start, for the
 *   pure path and this one alike (the same event source, sys.monitoring).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>

#include "_speedups.h"

#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))
#define MAX_NAMES 16 /* more captures than this: declined (a stack array below) */

/* --- EntryProbe ---------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *module;   /* tracemark._speedups */
    PyObject *fire;     /* the marker's firing function */
    PyObject *fire_ns;  /* its globals */
    PyObject *names;    /* tuple of str: the captured names, in field order */
    PyObject *ns;       /* a namespace of the probe's: retire() sets its _fire */
    PyObject *fallback; /* the pure emitter taking the values, or None */
} EntryProbe;

/* Record one event from the values; 0 recorded, 1 declined (no exception set). */
static int entry_record(EntryProbe *self, PyObject *const *values, Py_ssize_t n)
{
    ProbesState *ps = tm_probes_state(self->module);
    if (ps->tls == NULL || n != PyTuple_GET_SIZE(self->names))
        return 1;
    for (Py_ssize_t i = 0; i < n; i++) { /* plain exact types only (events._PLAIN) */
        PyTypeObject *t = Py_TYPE(values[i]);
        if (!(values[i] == Py_None || t == &PyLong_Type || t == &PyFloat_Type ||
              t == &PyUnicode_Type || t == &PyBytes_Type || t == &PyBool_Type))
            return 1;
    }
    PyObject *fire = PyDict_GetItemWithError(self->ns, ps->str_fire);
    if (fire != self->fire)
        goto decline; /* retired (or an error) */
    PyObject *bound = PyDict_GetItemWithError(self->fire_ns, ps->str_fused);
    if (bound == NULL || !Py_IS_TYPE(bound, ps->bound_type))
        goto decline;
    PyObject *layout = SLOT(bound, ps->off_layout);
    PyObject *rec = SLOT(bound, ps->off_rec), *id_obj = SLOT(bound, ps->off_id);
    if (layout == NULL || !PyBytes_CheckExact(layout) || PyBytes_GET_SIZE(layout) != n ||
        rec == NULL || id_obj == NULL || !PyLong_CheckExact(id_obj))
        goto decline;
    /* The registry's thread state (dispatch._ThreadState): depth 0, and this recording's
     * channel cached in it (generated._INLINE_CHANNEL). The lookup may allocate: it comes
     * before anything reads the channel. */
    PyObject *tstate = PyObject_GetAttr(ps->tls, ps->str_state);
    if (tstate == NULL)
        goto decline;
    int declined = 1;
    if (Py_IS_TYPE(tstate, ps->tstate_type)) {
        PyObject *depth = SLOT(tstate, ps->off_depth), *ch = SLOT(tstate, ps->off_cache);
        if (depth != NULL && PyLong_CheckExact(depth) && PyLong_AsLong(depth) == 0 &&
            ch != NULL && Py_IS_TYPE(ch, ps->chan_type) && SLOT(ch, ps->off_ch_rec) == rec) {
            unsigned long id = PyLong_AsUnsignedLong(id_obj);
            if (!(id == (unsigned long)-1 && PyErr_Occurred()))
                declined = tm_record_values(self->module, ch, id, PyBytes_AS_STRING(layout), n,
                                            values, 0) != 0;
        }
    }
    Py_DECREF(tstate);
    if (declined)
        goto decline;
    return 0;
decline:
    if (PyErr_Occurred())
        PyErr_Clear();
    return 1;
}

static PyObject *entry_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                  PyObject *kwnames)
{
    EntryProbe *self = (EntryProbe *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kwnames == NULL && entry_record(self, args, nargs) == 0)
        Py_RETURN_NONE;
    if (self->fallback == Py_None)
        Py_RETURN_NONE;
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

static PyObject *entry_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *fire, *names, *ns, *fallback;
    if (!PyArg_ParseTuple(args, "OO!O!O:EntryProbe", &fire, &PyTuple_Type, &names,
                          &PyDict_Type, &ns, &fallback))
        return NULL;
    if (!PyFunction_Check(fire)) {
        PyErr_SetString(PyExc_TypeError, "EntryProbe: fire must be a marker's function");
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(names);
    if (n > MAX_NAMES) {
        PyErr_SetString(PyExc_ValueError, "EntryProbe: too many names");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(names, i))) {
            PyErr_SetString(PyExc_TypeError, "EntryProbe: names must be str");
            return NULL;
        }
    }
    PyObject *module = PyType_GetModule(type);
    if (module == NULL)
        return NULL;
    EntryProbe *self = (EntryProbe *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = entry_vectorcall;
    self->module = Py_NewRef(module);
    self->fire = Py_NewRef(fire);
    self->fire_ns = Py_NewRef(PyFunction_GET_GLOBALS(fire));
    self->names = Py_NewRef(names);
    self->ns = Py_NewRef(ns);
    self->fallback = Py_NewRef(fallback);
    return (PyObject *)self;
}

static int entry_traverse(EntryProbe *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->module);
    Py_VISIT(self->fire);
    Py_VISIT(self->fire_ns);
    Py_VISIT(self->names);
    Py_VISIT(self->ns);
    Py_VISIT(self->fallback);
    return 0;
}

static int entry_clear(EntryProbe *self)
{
    Py_CLEAR(self->module);
    Py_CLEAR(self->fire);
    Py_CLEAR(self->fire_ns);
    Py_CLEAR(self->names);
    Py_CLEAR(self->ns);
    Py_CLEAR(self->fallback);
    return 0;
}

static void entry_dealloc(EntryProbe *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    entry_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMemberDef entry_members[] = {
    {"names", T_OBJECT, offsetof(EntryProbe, names), READONLY, "the captured names"},
    {"fallback", T_OBJECT, offsetof(EntryProbe, fallback), READONLY, "the pure emitter"},
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(EntryProbe, vectorcall), READONLY, NULL},
    {NULL},
};

static PyType_Slot entry_slots[] = {
    {Py_tp_new, entry_new},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_traverse, entry_traverse},
    {Py_tp_clear, entry_clear},
    {Py_tp_dealloc, entry_dealloc},
    {Py_tp_members, entry_members},
    {Py_tp_doc, "EntryProbe(fire, names, ns, fallback): an entry probe's C path (see "
                "tracemark/_speedups_probes.c). Called with the captured values: records "
                "them, or calls fallback(*values), the pure emitter."},
    {0, NULL},
};

static PyType_Spec entry_spec = {
    .name = "tracemark._speedups.EntryProbe",
    .basicsize = sizeof(EntryProbe),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .slots = entry_slots,
};

/* --- StartCallback --------------------------------------------------------------------------- */

/* An open-addressing table code object -> EntryProbe, keyed by identity (a dict would hash
 * the code object, which CPython computes from its contents on every lookup). */
typedef struct {
    Py_ssize_t mask; /* capacity - 1, a power of two minus one */
    PyObject **keys; /* strong references, NULL: empty */
    PyObject **values;
} Table;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *module;
    PyObject *fallback; /* SysMonitoring._on_start */
    Table *table;       /* NULL: empty */
} StartCallback;

static inline size_t hash_ptr(const void *p)
{
    return (size_t)(((uintptr_t)p >> 4) * (uintptr_t)0x9E3779B97F4A7C15ull);
}

static void table_free(Table *t)
{
    if (t == NULL)
        return;
    for (Py_ssize_t i = 0; i <= t->mask; i++) {
        Py_XDECREF(t->keys[i]);
        Py_XDECREF(t->values[i]);
    }
    PyMem_Free(t->keys);
    PyMem_Free(t->values);
    PyMem_Free(t);
}

static PyObject *table_get(Table *t, PyObject *key)
{
    if (t == NULL)
        return NULL;
    for (size_t i = hash_ptr(key) & t->mask;; i = (i + 1) & t->mask) {
        PyObject *k = t->keys[i];
        if (k == key)
            return t->values[i];
        if (k == NULL)
            return NULL;
    }
}

/* A table of the dict's items whose values are EntryProbes (others are left out: the
 * fallback serves them); NULL with an exception set on failure, or *empty set. */
static Table *table_from(ProbesState *ps, PyObject *dict)
{
    Py_ssize_t n = PyDict_GET_SIZE(dict), cap = 8;
    while (cap < 2 * n + 2)
        cap *= 2;
    Table *t = PyMem_Calloc(1, sizeof(Table));
    if (t == NULL)
        return (Table *)PyErr_NoMemory();
    t->mask = cap - 1;
    t->keys = PyMem_Calloc((size_t)cap, sizeof(PyObject *));
    t->values = PyMem_Calloc((size_t)cap, sizeof(PyObject *));
    if (t->keys == NULL || t->values == NULL) {
        table_free(t);
        return (Table *)PyErr_NoMemory();
    }
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(dict, &pos, &k, &v)) {
        if (!Py_IS_TYPE(v, ps->entry_type))
            continue;
        size_t i = hash_ptr(k) & t->mask;
        while (t->keys[i] != NULL && t->keys[i] != k)
            i = (i + 1) & t->mask;
        Py_XSETREF(t->values[i], Py_NewRef(v));
        if (t->keys[i] == NULL)
            t->keys[i] = Py_NewRef(k);
    }
    return t;
}

/* PY_START of a code object with an EntryProbe: record from the frame; 0, or 1 declined. */
static int start_record(EntryProbe *entry, PyObject *code)
{
#if PY_VERSION_HEX >= 0x030C0000
    Py_ssize_t n = PyTuple_GET_SIZE(entry->names);
    if (n > MAX_NAMES)
        return 1;
    PyFrameObject *frame = PyEval_GetFrame(); /* borrowed: the probed frame */
    if (frame == NULL)
        goto decline;
    PyCodeObject *fcode = PyFrame_GetCode(frame);
    Py_DECREF(fcode); /* the frame holds it */
    if ((PyObject *)fcode != code)
        goto decline;
    PyObject *values[MAX_NAMES];
    Py_ssize_t got = 0;
    for (; got < n; got++) {
        values[got] = PyFrame_GetVar(frame, PyTuple_GET_ITEM(entry->names, got));
        if (values[got] == NULL) /* unbound (NameError) or failed: the pure path says so */
            break;
    }
    int r = got == n ? entry_record(entry, values, n) : 1;
    for (Py_ssize_t i = 0; i < got; i++)
        Py_DECREF(values[i]);
    if (r == 0)
        return 0;
decline:
    if (PyErr_Occurred())
        PyErr_Clear();
#endif
    return 1;
}

static PyObject *start_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf,
                                  PyObject *kwnames)
{
    StartCallback *self = (StartCallback *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs >= 1 && kwnames == NULL) {
        PyObject *entry = table_get(self->table, args[0]);
        if (entry != NULL) {
            Py_INCREF(entry); /* the table may be replaced meanwhile */
            int r = start_record((EntryProbe *)entry, args[0]);
            Py_DECREF(entry);
            if (r == 0)
                Py_RETURN_NONE;
        }
    }
    return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
}

static PyObject *start_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *fallback;
    if (!PyArg_ParseTuple(args, "O:StartCallback", &fallback))
        return NULL;
    PyObject *module = PyType_GetModule(type);
    if (module == NULL)
        return NULL;
    StartCallback *self = (StartCallback *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = start_vectorcall;
    self->module = Py_NewRef(module);
    self->fallback = Py_NewRef(fallback);
    self->table = NULL;
    return (PyObject *)self;
}

PyDoc_STRVAR(set_table_doc,
"set_table(dict)\n\nServe these code objects (dict: code -> EntryProbe; other values are\n"
"left to the fallback) from now on, in place of the previous table.");

static PyObject *start_set_table(StartCallback *self, PyObject *dict)
{
    if (!PyDict_Check(dict)) {
        PyErr_SetString(PyExc_TypeError, "set_table(dict)");
        return NULL;
    }
    Table *t = table_from(tm_probes_state(self->module), dict);
    if (t == NULL)
        return NULL;
    Table *old = self->table;
    self->table = t; /* one store: a callback sees the old table or the new one */
    table_free(old); /* may run finalizers: after the store */
    Py_RETURN_NONE;
}

static PyObject *start_served(StartCallback *self, PyObject *code)
{
    PyObject *entry = table_get(self->table, code);
    return Py_NewRef(entry ? entry : Py_None);
}

static PyMethodDef start_methods[] = {
    {"set_table", (PyCFunction)start_set_table, METH_O, set_table_doc},
    {"served", (PyCFunction)start_served, METH_O, "served(code): its EntryProbe, or None"},
    {NULL},
};

static int start_traverse(StartCallback *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->module);
    Py_VISIT(self->fallback);
    Table *t = self->table;
    if (t != NULL) {
        for (Py_ssize_t i = 0; i <= t->mask; i++) {
            Py_VISIT(t->keys[i]);
            Py_VISIT(t->values[i]);
        }
    }
    return 0;
}

static int start_clear(StartCallback *self)
{
    Py_CLEAR(self->module);
    Py_CLEAR(self->fallback);
    Table *t = self->table;
    self->table = NULL;
    table_free(t);
    return 0;
}

static void start_dealloc(StartCallback *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    start_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyMemberDef start_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(StartCallback, vectorcall), READONLY, NULL},
    {NULL},
};

static PyType_Slot start_slots[] = {
    {Py_tp_new, start_new},
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_traverse, start_traverse},
    {Py_tp_clear, start_clear},
    {Py_tp_dealloc, start_dealloc},
    {Py_tp_members, start_members},
    {Py_tp_methods, start_methods},
    {Py_tp_doc, "StartCallback(fallback): a sys.monitoring PY_START callback (see "
                "tracemark/_speedups_probes.c): code objects in its table are recorded from "
                "the frame in C, everything else calls fallback(code, offset)."},
    {0, NULL},
};

static PyType_Spec start_spec = {
    .name = "tracemark._speedups.StartCallback",
    .basicsize = sizeof(StartCallback),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .slots = start_slots,
};

/* --- configure_probes, and the module's part -------------------------------------------------- */

static Py_ssize_t member_offset(PyTypeObject *type, const char *name)
{
    PyObject *descr = PyDict_GetItemString(type->tp_dict, name); /* borrowed */
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type) ||
        ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not an object slot", type->tp_name, name);
        return -1;
    }
    return ((PyMemberDescrObject *)descr)->d_member->offset;
}

PyDoc_STRVAR(configure_probes_doc,
"configure_probes(tls, thread_state_type, bound_type, channel_type)\n\n"
"Tell the probes' C path the registry's thread-local (markers.dispatch._tls), its\n"
"per-thread state class, the recorder's binding state class (generated.Bound) and the\n"
"Channel class, whose __slots__ it reads.");

static PyObject *configure_probes(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    ProbesState *ps = tm_probes_state(module);
    if (nargs != 4 || !PyType_Check(args[1]) || !PyType_Check(args[2]) ||
        !PyType_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "configure_probes(tls, thread_state_type, bound_type, channel_type)");
        return NULL;
    }
    PyTypeObject *ts = (PyTypeObject *)args[1], *bound = (PyTypeObject *)args[2];
    PyTypeObject *ch = (PyTypeObject *)args[3];
    Py_ssize_t depth = member_offset(ts, "depth"), cache = member_offset(ts, "cache");
    Py_ssize_t id = member_offset(bound, "id"), rec = member_offset(bound, "rec");
    Py_ssize_t layout = member_offset(bound, "layout"), ch_rec = member_offset(ch, "rec");
    if (depth < 0 || cache < 0 || id < 0 || rec < 0 || layout < 0 || ch_rec < 0)
        return NULL;
    ps->off_depth = depth; ps->off_cache = cache; ps->off_id = id; ps->off_rec = rec;
    ps->off_layout = layout; ps->off_ch_rec = ch_rec;
    Py_XSETREF(ps->tstate_type, (PyTypeObject *)Py_NewRef(ts));
    Py_XSETREF(ps->bound_type, (PyTypeObject *)Py_NewRef(bound));
    Py_XSETREF(ps->chan_type, (PyTypeObject *)Py_NewRef(ch));
    Py_XSETREF(ps->tls, Py_NewRef(args[0])); /* last: the C path runs once tls is set */
    Py_RETURN_NONE;
}

static PyMethodDef probes_methods[] = {
    {"configure_probes", (PyCFunction)(void (*)(void))configure_probes, METH_FASTCALL,
     configure_probes_doc},
    {NULL, NULL, 0, NULL},
};

int tm_probes_exec(PyObject *module)
{
    ProbesState *ps = tm_probes_state(module);
    if (PyModule_AddFunctions(module, probes_methods) < 0)
        return -1;
    ps->str_state = PyUnicode_InternFromString("state");
    ps->str_fire = PyUnicode_InternFromString("_fire");
    ps->str_fused = PyUnicode_InternFromString("_fused_state");
    if (ps->str_state == NULL || ps->str_fire == NULL || ps->str_fused == NULL)
        return -1;
    ps->entry_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &entry_spec, NULL);
    if (ps->entry_type == NULL || PyModule_AddObjectRef(module, "EntryProbe",
                                                        (PyObject *)ps->entry_type) < 0)
        return -1;
    ps->start_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &start_spec, NULL);
    if (ps->start_type == NULL || PyModule_AddObjectRef(module, "StartCallback",
                                                        (PyObject *)ps->start_type) < 0)
        return -1;
    return 0;
}

int tm_probes_traverse(PyObject *module, visitproc visit, void *arg)
{
    ProbesState *ps = tm_probes_state(module);
    Py_VISIT(ps->entry_type);
    Py_VISIT(ps->start_type);
    Py_VISIT(ps->tls);
    Py_VISIT(ps->tstate_type);
    Py_VISIT(ps->bound_type);
    Py_VISIT(ps->chan_type);
    return 0;
}

int tm_probes_clear(PyObject *module)
{
    ProbesState *ps = tm_probes_state(module);
    Py_CLEAR(ps->entry_type);
    Py_CLEAR(ps->start_type);
    Py_CLEAR(ps->tls);
    Py_CLEAR(ps->tstate_type);
    Py_CLEAR(ps->bound_type);
    Py_CLEAR(ps->chan_type);
    Py_CLEAR(ps->str_state);
    Py_CLEAR(ps->str_fire);
    Py_CLEAR(ps->str_fused);
    return 0;
}
