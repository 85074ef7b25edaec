/* tracemark._creader: the optional C core of the trace reader's packet decoding.
 *
 * The pure-Python reader (tracemark/ctf/reader.py, Stream._decode_matching and the decoders
 * and checkers it compiles per event class) stays the reference. This module does the same
 * walk of one packet's events, in C:
 *
 *   layout = make_layout(events, task_eid, offset_ns, Event, Task, ReprText)
 *   decode(layout, data, pos, end, last, ts_end, pid, tid, thread, task, wanted, limit)
 *     -> (events, pos, last, n, task, error)
 *
 * Guarantees, and why they hold
 * -----------------------------
 * - Same events: every field kind is decoded as the Python decoder decodes it: int64 and
 *   float64 little-endian (struct "<q" / "<d"), bool a byte != 0 (struct "<?"), str and
 *   object fields through PyUnicode_DecodeUTF8 with strict errors (what bytes.decode() calls),
 *   bytes as bytes, `any` fields by the writer's tag table (0 None, 1 bool, 2 int, 3 float,
 *   4 str, 5 bytes, 6 ReprText). Events are built as tuple.__new__(Event, ...) builds them
 *   (tp_alloc of the named tuple type, items set: Objects/tupleobject.c tuple_subtype_new).
 *   Timestamps: ts + offset_ns; layouts with a clock frequency other than 1 GHz are declined
 *   (make_layout returns None) and read by Python.
 * - Same errors at the same offsets: the checks run in the Python reader's order (event
 *   header within the content; the id declared; the payload within the content and its text
 *   valid UTF-8, also for an event that is not wanted; then the timestamp within
 *   [previous, timestamp_end]). decode() stops at the first failure and returns it as
 *   (kind, at, event_id): kind 1 unknown id, 2 damaged, 3 timestamp; the caller raises the
 *   TraceError with the Python reader's message, after giving the events decoded before it.
 *   The count check (events vs. the packet context) stays in the caller.
 * - Bounded: every step advances by at least one 12-byte event header, every length is
 *   compared with the content end before anything is read or allocated (a uint32 length
 *   added to a position below PY_SSIZE_T_MAX / 2 cannot overflow on a 64-bit size_t, and
 *   data is at most reader.PACKET_LIMIT bytes), and at most `limit` events are built per
 *   call, so a caller iterating a huge packet holds a chunk of events, not the packet's.
 * - Declines instead of guessing: make_layout returns None for an event id above
 *   MAX_CLASSES, a field type it does not know, a clock that is not 1 GHz or an offset that
 *   does not fit int64; the Python reader then reads the sub-trace.
 *
 * No module state and no globals: the layout is a capsule owned by the caller. It needs the
 * GIL; setup.py does not build it for a free-threaded Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#ifdef Py_GIL_DISABLED
#error "tracemark._creader needs the GIL; a free-threaded build uses the pure-Python reader"
#endif

#define HEADER 12           /* uint32 id, uint64 timestamp (writer.EVENT_HEADER) */
#define MAX_CLASSES 65536   /* event ids above: declined */
#define CAPSULE "tracemark._creader.layout"

enum { F_INT = 'q', F_FLOAT = 'd', F_BOOL = '?', F_STR = 's', F_OBJ = 'o', F_BYTES = 'b',
       F_ANY = 'a' };
enum { E_NONE = 0, E_ID = 1, E_DAMAGED = 2, E_TIME = 3 };

typedef struct {
    PyObject *name;   /* NULL: no class with this id */
    PyObject **keys;  /* field names */
    char *codes;      /* one F_ code per field */
    Py_ssize_t nfields;
} Class;

typedef struct {
    Py_ssize_t ncls;
    Class *cls;
    long long task_eid; /* -1: none */
    int64_t offset_ns;
    PyObject *event_type, *task_type, *repr_type;
    PyObject *key_id, *key_name;
} Layout;

static void layout_free(Layout *L)
{
    if (L == NULL)
        return;
    if (L->cls != NULL) {
        for (Py_ssize_t i = 0; i < L->ncls; i++) {
            Class *c = &L->cls[i];
            for (Py_ssize_t k = 0; c->keys != NULL && k < c->nfields; k++)
                Py_XDECREF(c->keys[k]);
            PyMem_Free(c->keys);
            PyMem_Free(c->codes);
            Py_XDECREF(c->name);
        }
        PyMem_Free(L->cls);
    }
    Py_XDECREF(L->event_type);
    Py_XDECREF(L->task_type);
    Py_XDECREF(L->repr_type);
    Py_XDECREF(L->key_id);
    Py_XDECREF(L->key_name);
    PyMem_Free(L);
}

static void capsule_free(PyObject *capsule)
{
    layout_free((Layout *)PyCapsule_GetPointer(capsule, CAPSULE));
}

static int type_code(PyObject *name)
{
    static const struct { const char *name; int code; } table[] = {
        {"int", F_INT}, {"float", F_FLOAT}, {"bool", F_BOOL}, {"str", F_STR},
        {"object", F_OBJ}, {"bytes", F_BYTES}, {"any", F_ANY},
    };
    if (!PyUnicode_Check(name))
        return 0;
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++)
        if (PyUnicode_CompareWithASCIIString(name, table[i].name) == 0)
            return table[i].code;
    return 0;
}

/* make_layout(events, task_eid, offset_ns, freq, Event, Task, ReprText): a layout capsule,
 * or None when this module declines the sub-trace (see the header comment). events: the
 * metadata's {id: (name, ((field name, type name), ...))}. */
static PyObject *make_layout(PyObject *self, PyObject *args)
{
    PyObject *events, *offset, *freq, *event_type, *task_type, *repr_type;
    long long task_eid;
    if (!PyArg_ParseTuple(args, "O!LOOOOO", &PyDict_Type, &events, &task_eid, &offset, &freq,
                          &event_type, &task_type, &repr_type))
        return NULL;
    if (!PyType_Check(event_type) || !PyType_IsSubtype((PyTypeObject *)event_type,
                                                       &PyTuple_Type))
        return PyErr_Format(PyExc_TypeError, "Event must be a tuple type");
    int overflow = 0;
    long long f = PyLong_Check(freq) ? PyLong_AsLongLongAndOverflow(freq, &overflow) : 0;
    if (f == -1 && PyErr_Occurred())
        return NULL;
    if (overflow || f != 1000000000LL)
        Py_RETURN_NONE;
    long long off = PyLong_Check(offset) ? PyLong_AsLongLongAndOverflow(offset, &overflow) : 0;
    if (off == -1 && PyErr_Occurred())
        return NULL;
    if (overflow || !PyLong_Check(offset))
        Py_RETURN_NONE;

    Py_ssize_t ncls = 0, i = 0;
    PyObject *k, *v;
    while (PyDict_Next(events, &i, &k, &v)) {
        if (!PyLong_Check(k))
            Py_RETURN_NONE;
        long long id = PyLong_AsLongLongAndOverflow(k, &overflow);
        if (id == -1 && PyErr_Occurred())
            return NULL;
        if (overflow || id < 0 || id >= MAX_CLASSES)
            Py_RETURN_NONE;
        if (id + 1 > ncls)
            ncls = (Py_ssize_t)id + 1;
    }
    Layout *L = PyMem_Calloc(1, sizeof(Layout));
    if (L == NULL)
        return PyErr_NoMemory();
    L->cls = PyMem_Calloc(ncls ? (size_t)ncls : 1, sizeof(Class));
    if (L->cls == NULL) {
        PyMem_Free(L);
        return PyErr_NoMemory();
    }
    L->ncls = ncls;
    L->task_eid = task_eid;
    L->offset_ns = off;
    L->event_type = Py_NewRef(event_type);
    L->task_type = Py_NewRef(task_type);
    L->repr_type = Py_NewRef(repr_type);
    L->key_id = PyUnicode_InternFromString("id");
    L->key_name = PyUnicode_InternFromString("name");
    if (L->key_id == NULL || L->key_name == NULL)
        goto error;
    i = 0;
    while (PyDict_Next(events, &i, &k, &v)) {
        Class *c = &L->cls[PyLong_AsSsize_t(k)];
        PyObject *name, *fields;
        if (!PyTuple_Check(v) || PyTuple_GET_SIZE(v) != 2)
            goto decline;
        name = PyTuple_GET_ITEM(v, 0);
        fields = PyTuple_GET_ITEM(v, 1);
        if (!PyUnicode_Check(name) || !PyTuple_Check(fields))
            goto decline;
        Py_ssize_t n = PyTuple_GET_SIZE(fields);
        c->keys = PyMem_Calloc(n ? (size_t)n : 1, sizeof(PyObject *));
        c->codes = PyMem_Calloc(n ? (size_t)n : 1, 1);
        if (c->keys == NULL || c->codes == NULL) {
            PyErr_NoMemory();
            goto error;
        }
        c->nfields = n;
        c->name = Py_NewRef(name);
        for (Py_ssize_t j = 0; j < n; j++) {
            PyObject *fd = PyTuple_GET_ITEM(fields, j);
            if (!PyTuple_Check(fd) || PyTuple_GET_SIZE(fd) != 2
                || !PyUnicode_Check(PyTuple_GET_ITEM(fd, 0)))
                goto decline;
            int code = type_code(PyTuple_GET_ITEM(fd, 1));
            if (!code)
                goto decline;
            c->codes[j] = (char)code;
            c->keys[j] = Py_NewRef(PyTuple_GET_ITEM(fd, 0));
        }
    }
    PyObject *capsule = PyCapsule_New(L, CAPSULE, capsule_free);
    if (capsule == NULL)
        layout_free(L);
    return capsule;
decline:
    layout_free(L);
    Py_RETURN_NONE;
error:
    layout_free(L);
    return NULL;
}

static inline uint32_t get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t get_u64(const unsigned char *p)
{
    return (uint64_t)get_u32(p) | (uint64_t)get_u32(p + 4) << 32;
}

static inline double get_f64(const unsigned char *p)
{
    uint64_t bits = get_u64(p);
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

/* The result of reading one field: 1 done, 0 damaged (nothing set, no exception), -1 an
 * exception (memory). With out == NULL the field is only checked (UTF-8 too). */
#define DAMAGED 0

/* Text at p, n bytes, strictly decoded; on invalid UTF-8: DAMAGED with the error cleared. */
static int read_text(const unsigned char *p, Py_ssize_t n, PyObject **out)
{
    PyObject *s = PyUnicode_DecodeUTF8((const char *)p, n, NULL);
    if (s == NULL) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            return DAMAGED;
        }
        return -1;
    }
    if (out != NULL)
        *out = s;
    else
        Py_DECREF(s);
    return 1;
}

/* An `any` field (reader.decode_any) at *pos. */
static int read_any(const Layout *L, const unsigned char *d, Py_ssize_t *pos, Py_ssize_t end,
                    PyObject **out)
{
    Py_ssize_t p = *pos;
    if (p >= end)
        return DAMAGED;
    int tag = d[p++];
    PyObject *value = NULL;
    switch (tag) {
    case 0:
        if (out)
            value = Py_NewRef(Py_None);
        break;
    case 1:
        if (p + 1 > end)
            return DAMAGED;
        if (out)
            value = PyBool_FromLong(d[p] != 0);
        p += 1;
        break;
    case 2:
    case 3:
        if (p + 8 > end)
            return DAMAGED;
        if (out)
            value = tag == 2 ? PyLong_FromLongLong((long long)get_u64(d + p))
                             : PyFloat_FromDouble(get_f64(d + p));
        p += 8;
        break;
    case 4:
    case 5:
    case 6: {
        if (p + 4 > end)
            return DAMAGED;
        Py_ssize_t n = (Py_ssize_t)get_u32(d + p);
        p += 4;
        if (n > end - p)
            return DAMAGED;
        if (tag == 5) {
            if (out)
                value = PyBytes_FromStringAndSize((const char *)d + p, n);
        } else {
            PyObject *s = NULL;
            int r = read_text(d + p, n, out ? &s : NULL);
            if (r <= 0)
                return r;
            if (out && tag == 6) {
                value = PyObject_CallOneArg(L->repr_type, s);
                Py_DECREF(s);
            } else {
                value = s;
            }
        }
        p += n;
        break;
    }
    default:
        return DAMAGED;
    }
    if (out) {
        if (value == NULL)
            return -1;
        *out = value;
    }
    *pos = p;
    return 1;
}

/* The payload of class c at *pos: into a new dict at *out (out != NULL), or only checked. */
static int read_fields(const Layout *L, const Class *c, const unsigned char *d, Py_ssize_t *pos,
                       Py_ssize_t end, PyObject **out)
{
    Py_ssize_t p = *pos;
    PyObject *dict = NULL;
    if (out != NULL && (dict = PyDict_New()) == NULL)
        return -1;
    for (Py_ssize_t j = 0; j < c->nfields; j++) {
        PyObject *value = NULL;
        PyObject **slot = dict ? &value : NULL;
        int r = 1;
        switch (c->codes[j]) {
        case F_INT:
            if (p + 8 > end) { r = DAMAGED; break; }
            if (slot) value = PyLong_FromLongLong((long long)get_u64(d + p));
            p += 8;
            break;
        case F_FLOAT:
            if (p + 8 > end) { r = DAMAGED; break; }
            if (slot) value = PyFloat_FromDouble(get_f64(d + p));
            p += 8;
            break;
        case F_BOOL:
            if (p + 1 > end) { r = DAMAGED; break; }
            if (slot) value = PyBool_FromLong(d[p] != 0);
            p += 1;
            break;
        case F_ANY:
            r = read_any(L, d, &p, end, slot);
            break;
        default: { /* a uint32 length, then the bytes */
            if (p + 4 > end) { r = DAMAGED; break; }
            Py_ssize_t n = (Py_ssize_t)get_u32(d + p);
            p += 4;
            if (n > end - p) { r = DAMAGED; break; }
            if (c->codes[j] == F_BYTES) {
                if (slot) value = PyBytes_FromStringAndSize((const char *)d + p, n);
            } else {
                r = read_text(d + p, n, slot);
            }
            p += n;
        }
        }
        if (r == 1 && slot && value == NULL)
            r = -1;
        if (r == 1 && dict && PyDict_SetItem(dict, c->keys[j], value) < 0)
            r = -1;
        Py_XDECREF(value);
        if (r != 1) {
            Py_XDECREF(dict);
            return r;
        }
    }
    *pos = p;
    if (out)
        *out = dict;
    return 1;
}

static PyObject *timestamp(const Layout *L, uint64_t ts)
{
    if (ts <= (uint64_t)INT64_MAX) {
        int64_t t = (int64_t)ts;
        if ((L->offset_ns >= 0 && t <= INT64_MAX - L->offset_ns)
            || (L->offset_ns < 0 && t >= INT64_MIN - L->offset_ns))
            return PyLong_FromLongLong(t + L->offset_ns);
    }
    PyObject *a = PyLong_FromUnsignedLongLong(ts);
    if (a == NULL)
        return NULL;
    PyObject *b = PyLong_FromLongLong(L->offset_ns);
    PyObject *sum = b ? PyNumber_Add(a, b) : NULL;
    Py_DECREF(a);
    Py_XDECREF(b);
    return sum;
}

/* A mask of the wanted ids (NULL: all wanted), or -1 on error. */
static int wanted_mask(const Layout *L, PyObject *wanted, unsigned char **mask)
{
    *mask = NULL;
    if (wanted == Py_None)
        return 0;
    unsigned char *m = PyMem_Calloc(L->ncls ? (size_t)L->ncls : 1, 1);
    if (m == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *it = PyObject_GetIter(wanted), *item;
    if (it == NULL) {
        PyMem_Free(m);
        return -1;
    }
    while ((item = PyIter_Next(it)) != NULL) {
        int overflow = 0;
        long long id = PyLong_Check(item) ? PyLong_AsLongLongAndOverflow(item, &overflow) : -1;
        Py_DECREF(item);
        if (!overflow && id >= 0 && id < L->ncls)
            m[id] = 1;
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) {
        PyMem_Free(m);
        return -1;
    }
    *mask = m;
    return 0;
}

/* decode(layout, data, pos, end, last, ts_end, pid, tid, thread, task, wanted, limit)
 *   -> (events, pos, last, n, task, error)
 * Walks the events of one packet from pos (its content ends at end) until end, an error,
 * or `limit` events given. n: events walked (task events and unwanted ones included);
 * error: None or (kind, offset of the event in data, event id). */
static PyObject *decode(PyObject *self, PyObject *args)
{
    PyObject *capsule, *pid, *tid, *thread, *task, *wanted;
    Py_buffer buf;
    Py_ssize_t pos, end, limit;
    unsigned long long last, ts_end;
    if (!PyArg_ParseTuple(args, "Oy*nnKKOOOOOn", &capsule, &buf, &pos, &end, &last, &ts_end,
                          &pid, &tid, &thread, &task, &wanted, &limit))
        return NULL;
    Layout *L = PyCapsule_GetPointer(capsule, CAPSULE);
    PyObject *events = NULL, *result = NULL;
    unsigned char *mask = NULL;
    int kind = E_NONE;
    Py_ssize_t at = pos;
    uint32_t eid = 0;
    Py_ssize_t n = 0;
    if (L == NULL)
        goto done;
    if (end > buf.len || pos < 0 || end < 0 || end > PY_SSIZE_T_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "end beyond the data");
        goto done;
    }
    if (wanted_mask(L, wanted, &mask) < 0)
        goto done;
    if ((events = PyList_New(0)) == NULL)
        goto done;
    Py_INCREF(task);
    const unsigned char *d = buf.buf;
    while (pos < end && PyList_GET_SIZE(events) < limit) {
        at = pos;
        if (pos + HEADER > end) {
            kind = E_DAMAGED;
            break;
        }
        eid = get_u32(d + pos);
        uint64_t ts = get_u64(d + pos + 4);
        pos += HEADER;
        if (eid >= L->ncls || L->cls[eid].name == NULL) {
            kind = E_ID;
            break;
        }
        const Class *c = &L->cls[eid];
        PyObject *fields = NULL;
        int shown = 0, r;
        if ((long long)eid == L->task_eid) {
            r = read_fields(L, c, d, &pos, end, &fields);
            if (r == 1) {
                PyObject *id = PyDict_GetItemWithError(fields, L->key_id);
                PyObject *name = id ? PyDict_GetItemWithError(fields, L->key_name) : NULL;
                int truth = name ? PyObject_IsTrue(id) : -1;
                PyObject *t = truth == 1 ? PyObject_CallFunctionObjArgs(L->task_type, id, name,
                                                                        NULL)
                              : truth == 0 ? Py_NewRef(Py_None) : NULL;
                if (t == NULL && !PyErr_Occurred())
                    PyErr_SetString(PyExc_ValueError, "task event without id or name");
                Py_CLEAR(fields);
                if (t == NULL)
                    r = -1;
                else
                    Py_SETREF(task, t);
            }
        } else if (mask == NULL || mask[eid]) {
            r = read_fields(L, c, d, &pos, end, &fields);
            shown = 1;
        } else {
            r = read_fields(L, c, d, &pos, end, NULL);
        }
        if (r < 0)
            goto fail;
        if (r == DAMAGED) {
            kind = E_DAMAGED;
            break;
        }
        if (ts < last || ts > ts_end) {
            Py_XDECREF(fields);
            kind = E_TIME;
            break;
        }
        last = ts;
        n++;
        if (shown) {
            PyTypeObject *tp = (PyTypeObject *)L->event_type;
            PyObject *ev = tp->tp_alloc(tp, 7);
            PyObject *t = timestamp(L, ts);
            if (ev == NULL || t == NULL) {
                Py_XDECREF(ev);
                Py_XDECREF(t);
                Py_DECREF(fields);
                goto fail;
            }
            PyTuple_SET_ITEM(ev, 0, t);
            PyTuple_SET_ITEM(ev, 1, Py_NewRef(c->name));
            PyTuple_SET_ITEM(ev, 2, fields);
            PyTuple_SET_ITEM(ev, 3, Py_NewRef(pid));
            PyTuple_SET_ITEM(ev, 4, Py_NewRef(tid));
            PyTuple_SET_ITEM(ev, 5, Py_NewRef(thread));
            PyTuple_SET_ITEM(ev, 6, Py_NewRef(task));
            r = PyList_Append(events, ev);
            Py_DECREF(ev);
            if (r < 0)
                goto fail;
        }
    }
    if (kind == E_NONE)
        result = Py_BuildValue("(OnKnO O)", events, pos, last, n, task, Py_None);
    else
        result = Py_BuildValue("(OnKnO(inI))", events, pos, last, n, task, kind, at,
                               (unsigned int)eid);
fail:
    Py_DECREF(task);
done:
    Py_XDECREF(events);
    PyMem_Free(mask);
    PyBuffer_Release(&buf);
    return result;
}

static PyMethodDef methods[] = {
    {"make_layout", make_layout, METH_VARARGS,
     "make_layout(events, task_eid, offset_ns, freq, Event, Task, ReprText): a layout, or "
     "None when the C reader declines the sub-trace."},
    {"decode", decode, METH_VARARGS,
     "decode(layout, data, pos, end, last, ts_end, pid, tid, thread, task, wanted, limit) "
     "-> (events, pos, last, n, task, error)"},
    {NULL, NULL, 0, NULL},
};

static PyModuleDef_Slot slots[] = {
#if PY_VERSION_HEX >= 0x030C0000
    {Py_mod_multiple_interpreters, Py_MOD_PER_INTERPRETER_GIL_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "tracemark._creader",
    "The optional C core of tracemark's trace reader (see tracemark/_reader.c).",
    0, methods, slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__creader(void) { return PyModuleDef_Init(&module); }
