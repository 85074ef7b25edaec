/* tracemark._speedups: the optional C core of the recorder's firing path.
 *
 * One call per recorded event, record(ch, event_id, layout, *values), does what the pure
 * core's generated packing code does (tracemark/ctf/writer.py pack_source, and the contract
 * tracemark.ctf.writer.PackTarget): read the channel's pos and limit, call ch.switch(size)
 * when the event does not fit (the rare slow path, in Python), read the clock, pack the event
 * header, the fields and the end mark into ch.buf, then publish by storing pos and then
 * count.
 *
 * Guarantees, and why they hold
 * -----------------------------
 * - Same bytes as the pure core: every field kind it packs is written exactly as the pure
 *   core's struct format ("<IQ" header, q / d / ? / "I{n}s", the any variant's tag and payload
 *   by writer.any_parts' table, then the uint32 end mark), little-endian whatever the host.
 * - Nothing is half-done: record() either packs and publishes the event, or returns True
 *   ("declined") having written nothing, and the caller (the generated Python path) records
 *   the event the pure way. It declines whenever a value is not of the field kind's exact
 *   type (an int subclass, a float given for an int, a str with surrogates, an int beyond
 *   int64 in an `any` field, ...), when the thread is inside an asyncio task (the task
 *   bookkeeping stays in Python), or when the channel is not what configure() was told. So
 *   every corner case (errors, their messages, fault reports, text repair) is the pure
 *   core's, by construction.
 * - Publishing is atomic with respect to signal handlers and thread switches: between
 *   reading pos and storing count no Python code runs (a CPython signal handler or a thread
 *   switch only happens in the eval loop), except in ch.switch(), which runs before the event
 *   is packed, like in the pure core. The new pos and count objects are made before the two
 *   stores, so nothing can fail between them (or, when the slot's int is referenced by
 *   nothing else, it takes the new value in place: see int_reusable).
 * - The clock is CLOCK_MONOTONIC, which is what time.monotonic_ns() reads on Linux (the
 *   only platform setup.py builds this for).
 *
 * State: the module keeps the Channel type, the asyncio slot type, the offsets of the slots
 * it reads and an interned name in its module state (multi-phase init), set once by
 * configure(); nothing is global, so a fork child inherits a valid copy and each
 * (sub-)interpreter that imports the module gets its own. It needs the GIL: a free-threaded
 * build uses the pure core (tracemark.env says so) and this file refuses to build there.
 */
#include "_speedups.h"
#include <structmember.h>
#include <stdint.h>
#include <string.h>
#include <time.h>


#ifdef Py_GIL_DISABLED
#error "tracemark._speedups needs the GIL; a free-threaded build uses the pure-Python core"
#endif

#define END_MARK 0xFFFFFFFFu
#define END_SIZE 4
#define HEADER_SIZE 12 /* uint32 id, uint64 timestamp */
#define MAX_FIELDS 64  /* more than this: declined (stack arrays below) */

static inline State *get_state(PyObject *module) { return (State *)PyModule_GetState(module); }

/* SLOT (_speedups.h) reads a __slots__ attribute where CPython keeps it: attribute lookup
 * through the type would cost a dictionary probe and a descriptor call per field. */

/* Replace a slot's value; the old value is an int or a buffer, whose release runs no
 * Python code. */
static inline void set_slot(PyObject *obj, Py_ssize_t off, PyObject *value)
{
    PyObject *old = SLOT(obj, off);
    SLOT(obj, off) = value;
    Py_XDECREF(old);
}

/* Whether the int object v, held by a channel's slot, may take the value `value` in place:
 * an exact int whose only reference is that slot (so no code anywhere can tell), positive
 * and of one digit before and after, and never a small int (-5..256, which CPython shares;
 * 3.12+ makes them immortal, so their count is never 1 anyway). A new int and the old
 * one's release cost ~200 machine instructions each, a third of a recorded event's C work.
 * Reads and writes the digit where Include/cpython/longintrepr.h puts it. */
static inline int int_reusable(PyObject *v, Py_ssize_t value)
{
    if (v == NULL || value <= 256 || value > (Py_ssize_t)PyLong_MASK || Py_REFCNT(v) != 1 ||
        !PyLong_CheckExact(v))
        return 0;
#if PY_VERSION_HEX >= 0x030C0000
    /* One digit, sign bits 0 (positive), no immortality flag (3.13). */
    return ((PyLongObject *)v)->long_value.lv_tag == ((uintptr_t)1 << _PyLong_NON_SIZE_BITS);
#else
    return Py_SIZE(v) == 1;
#endif
}

static inline void int_store(PyObject *v, Py_ssize_t value)
{
#if PY_VERSION_HEX >= 0x030C0000
    ((PyLongObject *)v)->long_value.ob_digit[0] = (digit)value;
#else
    ((PyLongObject *)v)->ob_digit[0] = (digit)value;
#endif
}

/* Little-endian stores, whatever the host (compilers turn them into single moves). */
static inline void put_u32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16); p[3] = (unsigned char)(v >> 24);
}

static inline void put_u64(unsigned char *p, uint64_t v)
{
    put_u32(p, (uint32_t)v);
    put_u32(p + 4, (uint32_t)(v >> 32));
}

/* The offset of a T_OBJECT_EX slot named `name` of `type`, or -1 with an exception set. */
Py_ssize_t tm_slot_offset(PyTypeObject *type, const char *name)
{
    PyObject *descr = PyDict_GetItemString(type->tp_dict, name); /* borrowed */
    if (descr == NULL || !Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not a __slots__ attribute", type->tp_name, name);
        return -1;
    }
    PyMemberDef *m = ((PyMemberDescrObject *)descr)->d_member;
    if (m->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "%s.%s is not an object slot", type->tp_name, name);
        return -1;
    }
    return m->offset;
}

PyDoc_STRVAR(configure_doc,
"configure(channel_type, slot_type)\n\n"
"Tell the module the Channel class (whose slots buf, pos, limit, count, loop and intask\n"
"record() reads and writes) and the asyncio slot class (slot running). Called once.");

static PyObject *configure(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    State *st = get_state(module);
    if (nargs != 2 || !PyType_Check(args[0]) || !PyType_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "configure(channel_type, slot_type)");
        return NULL;
    }
    PyTypeObject *ch = (PyTypeObject *)args[0], *slot = (PyTypeObject *)args[1];
    Py_ssize_t offs[7];
    const char *names[6] = {"buf", "pos", "limit", "count", "loop", "intask"};
    for (int i = 0; i < 6; i++) {
        if ((offs[i] = tm_slot_offset(ch, names[i])) < 0)
            return NULL;
    }
    if ((offs[6] = tm_slot_offset(slot, "running")) < 0)
        return NULL;
    st->off_buf = offs[0]; st->off_pos = offs[1]; st->off_limit = offs[2];
    st->off_count = offs[3]; st->off_loop = offs[4]; st->off_intask = offs[5];
    st->off_running = offs[6];
    Py_INCREF(ch);
    Py_XSETREF(st->channel_type, ch);
    Py_INCREF(slot);
    Py_XSETREF(st->slot_type, slot);
    Py_RETURN_NONE;
}

/* One field's value, made ready to pack: what to write and how many bytes. */
typedef struct {
    char kind;          /* the layout's code; for `any`, the tag's kind */
    unsigned char tag;  /* `any` only: the variant's tag */
    union { long long i; double d; } num;
    const char *data;   /* text or bytes */
    Py_ssize_t len;
} Prepared;

/* Text as UTF-8: pointed at in place when it is ASCII, else encoded into *owned (a new
 * bytes object the caller releases). 0, or -1 to decline (surrogates: the pure core repairs
 * the text) with no exception set. */
static int prepare_text(PyObject *v, Prepared *p, PyObject **owned)
{
    if (PyUnicode_IS_ASCII(v)) {
        p->data = (const char *)PyUnicode_DATA(v);
        p->len = PyUnicode_GET_LENGTH(v);
        return 0;
    }
    PyObject *b = PyUnicode_AsUTF8String(v);
    if (b == NULL) {
        PyErr_Clear();
        return -1;
    }
    *owned = b;
    p->data = PyBytes_AS_STRING(b);
    p->len = PyBytes_GET_SIZE(b);
    return 0;
}

/* A field's bytes after its kind (see writer.pack_source / any_parts); -1 to decline. */
static Py_ssize_t prepare(char kind, PyObject *v, Prepared *p, PyObject **owned)
{
    p->kind = kind;
    switch (kind) {
    case 'i': {
        if (!PyLong_CheckExact(v))
            return -1;
        int overflow;
        p->num.i = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow || (p->num.i == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return -1; /* the pure core raises struct.error: a bad value, counted */
        }
        return 8;
    }
    case 'f':
        if (!PyFloat_CheckExact(v))
            return -1;
        p->num.d = PyFloat_AS_DOUBLE(v);
        return 8;
    case 'b':
        if (v != Py_True && v != Py_False)
            return -1;
        p->num.i = (v == Py_True);
        return 1;
    case 's':
        if (!PyUnicode_CheckExact(v) || prepare_text(v, p, owned) < 0)
            return -1;
        return p->len > (Py_ssize_t)UINT32_MAX ? -1 : 4 + p->len; /* beyond: struct.error */
    case 'y':
        if (!PyBytes_CheckExact(v))
            return -1;
        p->data = PyBytes_AS_STRING(v);
        p->len = PyBytes_GET_SIZE(v);
        return p->len > (Py_ssize_t)UINT32_MAX ? -1 : 4 + p->len;
    case 'a': {
        /* The `any` variant: writer.any_parts' table, tag byte then payload. Anything it
         * would record as a repr (an int beyond int64, another type) is declined. */
        Py_ssize_t n;
        if (v == Py_None) {
            p->kind = 'n'; p->tag = 0;
            return 1;
        }
        if (PyLong_CheckExact(v)) { p->tag = 2; n = prepare('i', v, p, owned); }
        else if (PyFloat_CheckExact(v)) { p->tag = 3; n = prepare('f', v, p, owned); }
        else if (PyBool_Check(v)) { p->tag = 1; n = prepare('b', v, p, owned); }
        else if (PyUnicode_CheckExact(v)) { p->tag = 4; n = prepare('s', v, p, owned); }
        else if (PyBytes_CheckExact(v)) { p->tag = 5; n = prepare('y', v, p, owned); }
        else return -1;
        return n < 0 ? -1 : 1 + n;
    }
    default:
        return -1; /* a kind this core does not pack: the caller never passes one */
    }
}

/* Pack one prepared field at p; where it ends. */
static unsigned char *pack_field(unsigned char *p, const Prepared *f)
{
    if (f->kind == 'n') { /* any: None, the tag alone */
        *p++ = 0;
        return p;
    }
    if (f->tag) /* any: the tag, then the payload as a field of that kind */
        *p++ = f->tag;
    switch (f->kind) {
    case 'i':
        put_u64(p, (uint64_t)f->num.i);
        return p + 8;
    case 'f': {
        uint64_t bits;
        memcpy(&bits, &f->num.d, 8);
        put_u64(p, bits);
        return p + 8;
    }
    case 'b':
        *p = (unsigned char)f->num.i;
        return p + 1;
    default: /* 's', 'y': uint32 length, then the bytes */
        put_u32(p, (uint32_t)f->len);
        memcpy(p + 4, f->data, (size_t)f->len);
        return p + 4 + f->len;
    }
}

/* The writable bytes of a channel's sub-buffer (a bytearray, or a memoryview of the ring
 * file), or NULL when it is something else (then record() declines). */
static unsigned char *buffer_of(PyObject *buf, Py_ssize_t *len)
{
    if (PyByteArray_CheckExact(buf)) {
        *len = PyByteArray_GET_SIZE(buf);
        return (unsigned char *)PyByteArray_AS_STRING(buf);
    }
    if (PyMemoryView_Check(buf)) {
        Py_buffer *view = PyMemoryView_GET_BUFFER(buf);
        if (view->readonly || view->buf == NULL || view->itemsize != 1)
            return NULL;
        /* A 1-d view of bytes with no stride or a stride of 1 (a sub-buffer of the ring
         * file) is contiguous; anything else is asked. */
        if (!(view->ndim == 1 && (view->strides == NULL || view->strides[0] == 1)) &&
            !PyBuffer_IsContiguous(view, 'C'))
            return NULL;
        *len = view->len;
        return (unsigned char *)view->buf;
    }
    return NULL;
}

static void release(PyObject **owned, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        Py_XDECREF(owned[i]);
}

PyDoc_STRVAR(record_doc,
"record(ch, event_id, layout, *values) -> bool\n\n"
"Record one event in channel ch (a writer.PackTarget) with the fields' kinds given by\n"
"layout (bytes, one code per field: i int, f float, b bool, s str, y bytes, a any).\n"
"False: recorded (or discarded by ch.switch, which counted it). True: declined, nothing\n"
"written; the caller records the event the pure-Python way.");

static PyObject *record(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    State *st = get_state(module);
    if (nargs < 3 || !PyBytes_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "record(ch, event_id, layout: bytes, *values)");
        return NULL;
    }
    if (PyBytes_GET_SIZE(args[2]) != nargs - 3) {
        PyErr_SetString(PyExc_TypeError, "record(): one value per layout code");
        return NULL;
    }
    unsigned long event_id = PyLong_AsUnsignedLong(args[1]);
    if (event_id == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    switch (tm_record(st, args[0], event_id, PyBytes_AS_STRING(args[2]), args + 3, nargs - 3, 1)) {
    case TM_ERROR:
        return NULL;
    case TM_RECORDED:
        Py_RETURN_FALSE;
    default:
        Py_RETURN_TRUE;
    }
}

/* The whole of record() but its argument checks: layout is bytes of nfields codes. With
 * may_switch 0, an event that does not fit is declined instead of calling ch.switch(), and
 * then no Python code runs at all (the firing path in _speedups_fire.c relies on it). */
int tm_record(State *st, PyObject *ch, unsigned long event_id, const char *layout,
              PyObject *const *values, Py_ssize_t nfields, int may_switch)
{
    if (st->channel_type == NULL || !Py_IS_TYPE(ch, st->channel_type) || nfields > MAX_FIELDS)
        return TM_DECLINED;

    /* Task identity (tracers/recording/tasks.py): the fast case is "no loop running and the
     * last event was in no task"; anything else is the pure core's business. */
    PyObject *loop = SLOT(ch, st->off_loop);
    if (loop == NULL || !Py_IS_TYPE(loop, st->slot_type) ||
        SLOT(loop, st->off_running) != Py_None || SLOT(ch, st->off_intask) != Py_False)
        return TM_DECLINED;

    /* Every value checked and sized before the channel is touched. */
    Prepared fields[MAX_FIELDS];
    PyObject *owned[MAX_FIELDS]; /* the first nfields are set below */
    Py_ssize_t size = HEADER_SIZE;
    for (Py_ssize_t i = 0; i < nfields; i++) {
        owned[i] = NULL;
        fields[i].tag = 0;
        Py_ssize_t n = prepare(layout[i], values[i], &fields[i], &owned[i]);
        if (n < 0) {
            release(owned, i + 1);
            return TM_DECLINED;
        }
        size += n;
    }

    /* Reserve: pos + size must stay within limit, else switch to the next sub-buffer. */
    PyObject *pos_obj = SLOT(ch, st->off_pos), *limit_obj = SLOT(ch, st->off_limit);
    if (pos_obj == NULL || limit_obj == NULL || !PyLong_CheckExact(pos_obj) ||
        !PyLong_CheckExact(limit_obj)) {
        release(owned, nfields);
        return TM_DECLINED;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(pos_obj), limit = PyLong_AsSsize_t(limit_obj);
    if ((pos == -1 || limit == -1) && PyErr_Occurred()) {
        PyErr_Clear();
        release(owned, nfields);
        return TM_DECLINED;
    }
    if (pos + size > limit) {
        if (!may_switch) {
            release(owned, nfields);
            return TM_DECLINED;
        }
        /* The rare slow path, in Python: closes the packet (hands it to the consumer) and
         * opens the next, or counts the event as discarded and returns -1. */
        PyObject *size_obj = PyLong_FromSsize_t(size);
        PyObject *r = size_obj ? PyObject_CallMethodOneArg(ch, st->str_switch, size_obj) : NULL;
        Py_XDECREF(size_obj);
        if (r == NULL) {
            release(owned, nfields);
            return TM_ERROR;
        }
        pos = PyLong_AsSsize_t(r);
        Py_DECREF(r);
        if (pos == -1 && PyErr_Occurred()) {
            release(owned, nfields);
            return TM_ERROR;
        }
        if (pos < 0) {
            release(owned, nfields);
            return TM_RECORDED;
        }
    }
    Py_ssize_t buflen;
    PyObject *buf = SLOT(ch, st->off_buf);
    unsigned char *base = buf ? buffer_of(buf, &buflen) : NULL;
    PyObject *count_obj = SLOT(ch, st->off_count);
    if (base == NULL || pos < 0 || pos + size + END_SIZE > buflen || count_obj == NULL ||
        !PyLong_CheckExact(count_obj)) {
        release(owned, nfields); /* nothing written: the pure path packs at ch.pos */
        return TM_DECLINED;
    }
    Py_ssize_t count = PyLong_AsSsize_t(count_obj);
    if (count == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        release(owned, nfields);
        return TM_DECLINED;
    }
    /* The slots' own int objects take the new values in place when nothing else can see
     * them (see int_reusable); else new ints, made before anything is written. */
    PyObject *cur_pos = SLOT(ch, st->off_pos);
    int reuse_pos = int_reusable(cur_pos, pos + size);
    int reuse_count = int_reusable(count_obj, count + 1);
    PyObject *new_pos = reuse_pos ? NULL : PyLong_FromSsize_t(pos + size);
    PyObject *new_count = reuse_count ? NULL : PyLong_FromSsize_t(count + 1);
    if ((!reuse_pos && new_pos == NULL) || (!reuse_count && new_count == NULL)) {
        Py_XDECREF(new_pos);
        Py_XDECREF(new_count);
        release(owned, nfields);
        return TM_ERROR;
    }

    /* Pack: header (after the switch, so the timestamp is inside the packet), fields, end. */
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    unsigned char *p = base + pos;
    /* The crash protocol of tracemark/ctf/ring.py, as struct.pack_into keeps it: first zero
     * the whole region (event and end mark), then store the values in order, the end mark
     * last. A process killed part-way leaves zeroes, never the 0xFF fill, where its end mark
     * would be, so recovery drops the torn event instead of decoding it. SIGKILL stops the
     * process between two instructions: only the compiler could reorder these stores, and
     * the signal fences forbid it. */
    memset(p, 0, (size_t)(size + END_SIZE));
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    put_u32(p, (uint32_t)event_id);
    put_u64(p + 4, (uint64_t)now.tv_sec * 1000000000u + (uint64_t)now.tv_nsec);
    p += HEADER_SIZE;
    for (Py_ssize_t i = 0; i < nfields; i++)
        p = pack_field(p, &fields[i]);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    put_u32(p, END_MARK);
    release(owned, nfields);

    /* Publish: pos then count, nothing between them (see the file's comment). */
    if (reuse_pos)
        int_store(cur_pos, pos + size);
    else
        set_slot(ch, st->off_pos, new_pos);
    if (reuse_count)
        int_store(count_obj, count + 1);
    else
        set_slot(ch, st->off_count, new_count);
    return TM_RECORDED;
}

ProbesState *tm_probes_state(PyObject *module) { return &get_state(module)->probes; }

int tm_record_values(PyObject *module, PyObject *ch, unsigned long event_id, const char *layout,
                     Py_ssize_t nfields, PyObject *const *values, int may_switch)
{
    return tm_record(get_state(module), ch, event_id, layout, values, nfields, may_switch);
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL, configure_doc},
    {"record", (PyCFunction)(void (*)(void))record, METH_FASTCALL, record_doc},
    {NULL, NULL, 0, NULL},
};

/* The patcher's functions: tracemark/_speedups_patching.c. This table, the patcher's and
 * the firing path's (tm_fire_methods) are all added in exec_module. */
extern PyMethodDef tm_patching_methods[];

static int exec_module(PyObject *module)
{
    State *st = get_state(module);
    if (PyModule_AddFunctions(module, tm_patching_methods) < 0)
        return -1;
    st->str_switch = PyUnicode_InternFromString("switch");
    if (st->str_switch == NULL || PyModule_AddFunctions(module, tm_fire_methods) < 0)
        return -1;
    if (tm_fire_exec(module, st) < 0 || tm_consumer_exec(module) < 0)
        return -1;
    return tm_probes_exec(module);
}

static int traverse(PyObject *module, visitproc visit, void *arg)
{
    State *st = get_state(module);
    Py_VISIT(st->channel_type);
    Py_VISIT(st->slot_type);
    if (tm_fire_traverse(st, visit, arg) < 0)
        return -1;
    return tm_probes_traverse(module, visit, arg);
}

static int clear(PyObject *module)
{
    State *st = get_state(module);
    Py_CLEAR(st->channel_type);
    Py_CLEAR(st->slot_type);
    Py_CLEAR(st->str_switch);
    tm_fire_clear(st);
    return tm_probes_clear(module);
}

static void free_module(void *module) { clear((PyObject *)module); }

static PyModuleDef_Slot slots[] = {
    {Py_mod_exec, exec_module},
    {0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "tracemark._speedups",
    .m_doc = "The recorder's optional C core (see tracemark/_speedups.c).",
    .m_size = sizeof(State),
    .m_methods = methods,
    .m_slots = slots,
    .m_traverse = traverse,
    .m_clear = clear,
    .m_free = free_module,
};

PyMODINIT_FUNC PyInit__speedups(void) { return PyModuleDef_Init(&moduledef); }
