/* tracemark._speedups, the firing path: a recorded marker's whole depth-0 event in one C
 * call, with no Python frame, when nothing unusual happens.
 *
 * What it replaces
 * ----------------
 * A marker is a generated Python function (tracemark/markers/dispatch.py) into which the
 * recorder's body is fused (tracemark/tracers/recording/generated.py). On the common event
 * (a positional call, depth 0, values of their fields' exact types, this thread's level-0
 * channel cached, no asyncio task, room in the sub-buffer) that function reads the thread's
 * dispatch state, sets and restores its depth, checks the values, finds the channel and
 * calls record(): ~100-150 ns of bytecode around the C call. A Fire object (one per
 * recorder binding of a marker, made by fire(bound, layout)) does all of it in C:
 *
 *   Fire.try_(values): the thread's _ThreadState (found in the thread state's dict, where
 *   configure_fire() / set_thread_state() keep it: a dict probe instead of a
 *   threading.local lookup), depth must be 0, its cache must be a Channel of the binding's
 *   recording, then tm_record(..., may_switch=0). Recorded: done. Anything else, declined,
 *   having written nothing: the Python firing function runs as before, so every unusual
 *   case (keywords, wrong arity, nesting, tasks, a full sub-buffer, a value of another type,
 *   faults, strict mode) is the pure path's by construction.
 *
 * How a call reaches it
 * ---------------------
 * The user holds the marker's function object (tracemark.marker() returns it, patched call
 * sites load it), so the object cannot change. Two ways in, chosen by install():
 *
 * - 3.12+: PyFunction_SetVectorcall (Include/cpython/funcobject.h) points the function's
 *   vectorcall at fire_hook. The eval loop honours it: CALL only inlines a Python function
 *   whose vectorcall is _PyFunction_Vectorcall (Python/bytecodes.c, CALL), and
 *   PyFunction_SetVectorcall clears func_version, so no CALL_PY_* specialisation skips it.
 *   fire_hook reads the function's global `_fast`; a Fire there is tried; on a decline (or
 *   no Fire) it calls the function's own vectorcall, the unchanged Python path. uninstall()
 *   puts that vectorcall back.
 * - 3.11: its CALL inlines every exact PyFunction whatever its vectorcall (Python/ceval.c,
 *   CALL), so install() says no and the registry compiles the firing function with a
 *   prologue that calls the Fire object (a vectorcall type) first: one frame, still cheap.
 *
 * Why every dispatch guarantee still holds
 * ----------------------------------------
 * - The fast path runs no Python code and never releases the GIL: it reads slots, packs
 *   bytes, and allocates only ints (not tracked by the GC, so no collection, so no
 *   finalizer, can start in it). Under the GIL it is atomic with respect to every other
 *   thread and to signal handlers (CPython runs those only from the eval loop).
 *   The one thing that would run Python code, Channel.switch on a full sub-buffer, is
 *   declined (may_switch 0): the Python path, in its firing frame, does it.
 * - Grace period: synchronize() waits for firing-function frames. A fast call has no frame,
 *   but since no other thread can run while it does, synchronize() can never observe a
 *   thread inside it: it is over before synchronize() reads any stack. The first call on a
 *   thread, which may run Python code (reading _tls.state), is declined after it.
 * - Snapshot (RCU): the registry sets `_fast` only while the binding is the marker's only
 *   probe, clears it before it changes anything and sets it last (registry.MarkerCore.
 *   _publish); a fast call reads it once and finishes atomically.
 * - Bounded re-entrancy / one depth-0 call at a time: the fast path only runs at depth 0
 *   (the thread state's depth is the int 0) and cannot be interrupted; an event fired while
 *   the Python path is inside a probe (depth >= 1: a signal handler, __del__) is declined and
 *   nested by the Python path, never written to the level-0 channel.
 * - Faults never propagate: an error inside (MemoryError) is cleared and declined; the
 *   Python path meets it again and handles it as it always did.
 * - A fork child: dispatch clears the thread state's cache; the fast path declines until the
 *   Python path has made the child's channel.
 */
#include "_speedups.h"

#include <structmember.h>

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *module; /* keeps the state alive */
    State *st;
    PyObject *bound;  /* generated.Bound: what the Python path reads as _in */
    PyObject *rec;    /* bound.rec */
    PyObject *layout; /* bytes, one code per field */
    unsigned long id; /* bound.id */
    Py_ssize_t nfields;
} Fire;

/* The dict key of the dispatch state in each thread state's dict, and the global the hook
 * reads; interned once per process (3.12+ makes interned strings immortal). */
static PyObject *key_tstate, *key_fast;

/* This thread's dispatch._ThreadState, borrowed, or NULL (no exception) when it is not
 * registered yet. Then it is registered (reading _tls.state may run Python code) and NULL is
 * returned all the same: the caller declines, whatever ran meanwhile. */
static PyObject *thread_state(State *st)
{
    PyThreadState *tstate = PyThreadState_GET();
    if (tstate->id == st->last_tid && st->last_state != NULL)
        return st->last_state;
    PyObject *dict = tstate->dict;
    if (dict != NULL) {
        PyObject *s = PyDict_GetItemWithError(dict, key_tstate);
        if (s != NULL && Py_IS_TYPE(s, st->tstate_type)) {
            st->last_tid = tstate->id;
            st->last_state = s;
            return s;
        }
        if (s == NULL && PyErr_Occurred()) {
            PyErr_Clear();
            return NULL;
        }
        if (s != NULL)
            return NULL;
    }
    if (st->tls == NULL)
        return NULL;
    PyObject *s = PyObject_GetAttr(st->tls, st->str_state);
    dict = PyThreadState_GetDict();
    if (s != NULL && dict != NULL && Py_IS_TYPE(s, st->tstate_type))
        (void)PyDict_SetItem(dict, key_tstate, s);
    Py_XDECREF(s);
    PyErr_Clear();
    return NULL;
}

/* 1: recorded; 0: declined, nothing written, no exception set. Runs no Python code unless
 * it declines (thread_state's first call on a thread). */
static int fire_try(Fire *self, PyObject *const *args, Py_ssize_t nargs)
{
    State *st = self->st;
    if (nargs != self->nfields || st->tstate_type == NULL)
        return 0;
    PyObject *ts = thread_state(st);
    if (ts == NULL || SLOT(ts, st->off_depth) != st->zero)
        return 0;
    PyObject *ch = SLOT(ts, st->off_cache);
    if (ch == NULL || !Py_IS_TYPE(ch, st->channel_type) || SLOT(ch, st->off_rec) != self->rec)
        return 0;
    int r = tm_record(st, ch, self->id, PyBytes_AS_STRING(self->layout), args, nargs, 0);
    if (r == TM_ERROR) {
        PyErr_Clear();
        return 0;
    }
    if (r != TM_RECORDED)
        return 0;
    st->fast_events++;
    return 1;
}

/* Fire(extra, named, *values) -> bool, the firing function's prologue (3.11): extra and
 * named are its *_extra and **_named, which must be empty. True when recorded, False when
 * the caller must record it. */
static PyObject *fire_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf,
                                 PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if ((kwnames != NULL && PyTuple_GET_SIZE(kwnames)) || nargs < 2 ||
        !PyTuple_CheckExact(args[0]) || PyTuple_GET_SIZE(args[0]) ||
        !PyDict_CheckExact(args[1]) || PyDict_GET_SIZE(args[1]))
        Py_RETURN_FALSE;
    if (fire_try((Fire *)self, args + 2, nargs - 2))
        Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static int fire_traverse(Fire *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    Py_VISIT(self->module);
    Py_VISIT(self->bound);
    Py_VISIT(self->rec);
    return 0;
}

static int fire_clear(Fire *self)
{
    Py_CLEAR(self->module);
    Py_CLEAR(self->bound);
    Py_CLEAR(self->rec);
    Py_CLEAR(self->layout);
    return 0;
}

static void fire_dealloc(Fire *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    fire_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

static PyObject *fire_repr(Fire *self)
{
    return PyUnicode_FromFormat("<tracemark C firing path of %R>", self->bound);
}

static PyMemberDef fire_members[] = {
    {"__vectorcalloffset__", T_PYSSIZET, offsetof(Fire, vectorcall), READONLY, NULL},
    {"bound", T_OBJECT, offsetof(Fire, bound), READONLY, NULL},
    {NULL},
};

static PyType_Slot fire_slots[] = {
    {Py_tp_call, PyVectorcall_Call},
    {Py_tp_traverse, fire_traverse},
    {Py_tp_clear, fire_clear},
    {Py_tp_dealloc, fire_dealloc},
    {Py_tp_repr, fire_repr},
    {Py_tp_members, fire_members},
    {Py_tp_doc, "A recorder binding's firing path in C (see tracemark/_speedups_fire.c)."},
    {0, NULL},
};

static PyType_Spec fire_spec = {
    .name = "tracemark._speedups.Fire",
    .basicsize = sizeof(Fire),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
             Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = fire_slots,
};

/* --- module functions ------------------------------------------------------------------ */

PyDoc_STRVAR(configure_fire_doc,
"configure_fire(thread_state_type, tls)\n\n"
"Tell the module dispatch's _ThreadState class (slots depth and cache) and the\n"
"threading.local whose .state is each thread's instance. After configure().");

static PyObject *configure_fire(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    State *st = PyModule_GetState(module);
    if (nargs != 2 || !PyType_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "configure_fire(thread_state_type, tls)");
        return NULL;
    }
    if (st->channel_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "configure_fire() before configure()");
        return NULL;
    }
    PyTypeObject *ts = (PyTypeObject *)args[0];
    Py_ssize_t depth = tm_slot_offset(ts, "depth"), cache = tm_slot_offset(ts, "cache");
    Py_ssize_t rec = tm_slot_offset(st->channel_type, "rec");
    if (depth < 0 || cache < 0 || rec < 0)
        return NULL;
    st->off_depth = depth;
    st->off_cache = cache;
    st->off_rec = rec;
    Py_INCREF(args[1]);
    Py_XSETREF(st->tls, args[1]);
    Py_INCREF(ts);
    Py_XSETREF(st->tstate_type, ts);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(set_thread_state_doc,
"set_thread_state(state)\n\n"
"Keep this thread's dispatch state where the C firing path finds it (the thread state's\n"
"dict; cleared with the thread).");

static PyObject *set_thread_state(PyObject *module, PyObject *state)
{
    PyObject *dict = PyThreadState_GetDict();
    if (dict == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "no thread state dict");
        return NULL;
    }
    State *st = PyModule_GetState(module);
    st->last_state = NULL; /* the state it replaces may be freed now */
    if (PyDict_SetItem(dict, key_tstate, state) < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(fire_doc,
"fire(bound, layout) -> Fire\n\n"
"The C firing path of one recorder binding (generated.Bound: its rec and id) of a marker\n"
"whose fields' kinds are layout (the codes of record()). Called as fire(extra, named,\n"
"*values) (the firing function's *_extra, **_named, which must be empty, then the event's\n"
"values), it returns True when it recorded the event, False when the caller must.");

static PyObject *make_fire(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    State *st = PyModule_GetState(module);
    if (nargs != 2 || !PyBytes_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "fire(bound, layout: bytes)");
        return NULL;
    }
    PyObject *rec = PyObject_GetAttrString(args[0], "rec");
    if (rec == NULL)
        return NULL;
    PyObject *id_obj = PyObject_GetAttrString(args[0], "id");
    unsigned long id = id_obj ? PyLong_AsUnsignedLong(id_obj) : (unsigned long)-1;
    Py_XDECREF(id_obj);
    if (id == (unsigned long)-1 && PyErr_Occurred()) {
        Py_DECREF(rec);
        return NULL;
    }
    if (id > 0xFFFFFFFFul) { /* the header's uint32: the pure path raises, counted */
        Py_DECREF(rec);
        PyErr_SetString(PyExc_OverflowError, "event id beyond uint32");
        return NULL;
    }
    Fire *self = PyObject_GC_New(Fire, st->fire_type);
    if (self == NULL) {
        Py_DECREF(rec);
        return NULL;
    }
    self->vectorcall = fire_vectorcall;
    self->module = Py_NewRef(module);
    self->st = st;
    self->bound = Py_NewRef(args[0]);
    self->rec = rec;
    self->layout = Py_NewRef(args[1]);
    self->id = id;
    self->nfields = PyBytes_GET_SIZE(args[1]);
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

/* --- the vectorcall hook (3.12+) -------------------------------------------------------- */

#if PY_VERSION_HEX >= 0x030C0000
/* Every Python function's own vectorcall (_PyFunction_Vectorcall, not in 3.13's public
 * headers): read from the first function hooked. */
static vectorcallfunc function_vectorcall;

static PyObject *fire_hook(PyObject *func, PyObject *const *args, size_t nargsf,
                           PyObject *kwnames)
{
    if (kwnames == NULL) {
        PyObject *fast = PyDict_GetItemWithError(((PyFunctionObject *)func)->func_globals,
                                                 key_fast);
        if (fast != NULL && Py_TYPE(fast)->tp_dealloc == (destructor)fire_dealloc) {
            if (fire_try((Fire *)fast, args, PyVectorcall_NARGS(nargsf)))
                Py_RETURN_NONE;
        }
        else if (fast == NULL && PyErr_Occurred())
            PyErr_Clear();
    }
    return function_vectorcall(func, args, nargsf, kwnames);
}
#endif

PyDoc_STRVAR(install_doc,
"install(func) -> bool\n\n"
"Route calls of the marker's firing function func through the C firing path first (its\n"
"global _fast). False where the interpreter would not honour it (3.11) or func's\n"
"vectorcall is someone else's: then the registry uses a prologue in Python instead.");

static PyObject *install(PyObject *module, PyObject *func)
{
#if PY_VERSION_HEX >= 0x030C0000
    if (!PyFunction_Check(func))
        Py_RETURN_FALSE;
    PyFunctionObject *f = (PyFunctionObject *)func;
    if (f->vectorcall == fire_hook)
        Py_RETURN_TRUE;
    if (function_vectorcall == NULL)
        function_vectorcall = f->vectorcall;
    if (f->vectorcall != function_vectorcall)
        Py_RETURN_FALSE;
    PyFunction_SetVectorcall(f, fire_hook);
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

PyDoc_STRVAR(uninstall_doc,
"uninstall(func) -> bool\n\n"
"Undo install(func); False if it was not installed.");

static PyObject *uninstall(PyObject *module, PyObject *func)
{
#if PY_VERSION_HEX >= 0x030C0000
    if (PyFunction_Check(func) && ((PyFunctionObject *)func)->vectorcall == fire_hook) {
        PyFunction_SetVectorcall((PyFunctionObject *)func, function_vectorcall);
        Py_RETURN_TRUE;
    }
#endif
    Py_RETURN_FALSE;
}

PyDoc_STRVAR(installed_doc, "installed(func) -> bool: whether install(func) is in force.");

static PyObject *installed(PyObject *module, PyObject *func)
{
#if PY_VERSION_HEX >= 0x030C0000
    if (PyFunction_Check(func) && ((PyFunctionObject *)func)->vectorcall == fire_hook)
        Py_RETURN_TRUE;
#endif
    Py_RETURN_FALSE;
}

PyDoc_STRVAR(fast_events_doc,
"fast_events() -> int: how many events the C firing path recorded in this process (for\n"
"tests and benchmarks: which path an event took).");

static PyObject *fast_events(PyObject *module, PyObject *unused)
{
    return PyLong_FromUnsignedLongLong(((State *)PyModule_GetState(module))->fast_events);
}

PyMethodDef tm_fire_methods[] = {
    {"fast_events", fast_events, METH_NOARGS, fast_events_doc},
    {"configure_fire", (PyCFunction)(void (*)(void))configure_fire, METH_FASTCALL,
     configure_fire_doc},
    {"set_thread_state", set_thread_state, METH_O, set_thread_state_doc},
    {"fire", (PyCFunction)(void (*)(void))make_fire, METH_FASTCALL, fire_doc},
    {"install", install, METH_O, install_doc},
    {"uninstall", uninstall, METH_O, uninstall_doc},
    {"installed", installed, METH_O, installed_doc},
    {NULL, NULL, 0, NULL},
};

int tm_fire_exec(PyObject *module, State *st)
{
    if (key_tstate == NULL && (key_tstate = PyUnicode_InternFromString(
                                   "tracemark.markers.dispatch.state")) == NULL)
        return -1;
    if (key_fast == NULL && (key_fast = PyUnicode_InternFromString("_fast")) == NULL)
        return -1;
    st->str_state = PyUnicode_InternFromString("state");
    st->zero = PyLong_FromLong(0);
    if (st->str_state == NULL || st->zero == NULL)
        return -1;
    st->fire_type = (PyTypeObject *)PyType_FromModuleAndSpec(module, &fire_spec, NULL);
    if (st->fire_type == NULL)
        return -1;
    return PyModule_AddObjectRef(module, "Fire", (PyObject *)st->fire_type);
}

int tm_fire_traverse(State *st, visitproc visit, void *arg)
{
    Py_VISIT(st->fire_type);
    Py_VISIT(st->tstate_type);
    Py_VISIT(st->tls);
    return 0;
}

void tm_fire_clear(State *st)
{
    Py_CLEAR(st->fire_type);
    Py_CLEAR(st->tstate_type);
    Py_CLEAR(st->tls);
    Py_CLEAR(st->zero);
    Py_CLEAR(st->str_state);
}
