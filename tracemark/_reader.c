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
#include <limits.h>
#include <stdio.h>

#include "_reader_lines.h"

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

/* The cyclic GC skips an event that holds nothing it tracks (ints, str, an untracked dict:
 * one of plain values, PyDict_SetItem's MAINTAIN_TRACKING in Objects/dictobject.c), as it
 * untracks such exact tuples itself (Modules/gcmodule.c untrack_tuples, which skips tuple
 * subclasses): without this, the chunks of events alive at once are traversed by every
 * collection of the older generations. An event in an asyncio task (a Task, tracked) or
 * with a tracked value stays tracked. */
static void untrack_if_atomic(PyObject *ev)
{
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(ev); k++) {
        PyObject *item = PyTuple_GET_ITEM(ev, k);
        if (PyObject_IS_GC(item) && PyObject_GC_IsTracked(item))
            return;
    }
    PyObject_GC_UnTrack(ev);
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
            untrack_if_atomic(ev);
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

/* --- view's text lines ---------------------------------------------------------------------
 *
 * format_text(events, start, previous, entries, pieces, second, show_other, Event)
 *   -> (text, next, previous)
 *
 * The lines `tracemark view` writes for events[start:] (tracemark/cli/view.py write_text,
 * its plain path), each ending in "\n", as one str; `next`: the index of the first event not
 * formatted (len(events), or an event this function declines: one not exactly an Event
 * (tracemark.ctf.reader.Event: its fields read by position), a timestamp beyond int64, a value whose text cannot be had; the caller formats that one the Python way and
 * calls again). A line is the time, the delta, then per field the caller's pieces and the
 * value:
 *   - pieces(ev) -> tuple of str (view._line_pieces: the text before each value, or the
 *     whole rest of the line when there is no field), cached in `entries` (a list) by the
 *     identity of the event's name, pid, tid, thread, task and field names;
 *   - second(seconds) -> "HH:MM:SS" (view._second: time.localtime), asked once per second;
 *   - values as view._SHOW shows them: int repr, float format(v, ".6g") (PyOS_double_to_string,
 *     Python/pystrtod.c, which float.__format__ calls), bool repr, bytes repr, str plain when
 *     fields._PLAIN matches (Unicode \w as sre's SRE_UNI_IS_WORD: Py_UNICODE_ISALNUM or '_',
 *     or one of ".:/@+-") else repr; any other type through show_other(v).
 */

int tm_buf_grow(Buf *b, Py_ssize_t n)
{
    if (b->len + n <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 1 << 16;
    while (cap < b->len + n) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    char *p = PyMem_Realloc(b->p, (size_t)cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

int tm_buf_add(Buf *b, const char *s, Py_ssize_t n)
{
    if (tm_buf_grow(b, n) < 0)
        return -1;
    memcpy(b->p + b->len, s, (size_t)n);
    b->len += n;
    return 0;
}

int tm_buf_str(Buf *b, PyObject *s)
{
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(s, &n);
    if (u == NULL) {
        if (PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
            PyErr_Clear();
            return 0;
        }
        return -1;
    }
    return tm_buf_add(b, u, n) < 0 ? -1 : 1;
}

/* A new str to show, as above, and 1; 0 declined; -1 an error. */
static int buf_obj_str(Buf *b, PyObject *s)
{
    if (s == NULL)
        return -1;
    int r = PyUnicode_Check(s) ? tm_buf_str(b, s) : 0;
    Py_DECREF(s);
    return r;
}

static int plain_text(PyObject *s)
{
    Py_ssize_t n = PyUnicode_GET_LENGTH(s);
    if (n == 0)
        return 0;
    int kind = PyUnicode_KIND(s);
    const void *data = PyUnicode_DATA(s);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 c = PyUnicode_READ(kind, data, i);
        if (c < 128) {
            if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9')
                  || c == '_' || c == '.' || c == ':' || c == '/' || c == '@' || c == '+'
                  || c == '-'))
                return 0;
        } else if (!Py_UNICODE_ISALNUM(c)) {
            return 0;
        }
    }
    return 1;
}

static int show(Buf *b, PyObject *v, PyObject *show_other)
{
    PyTypeObject *t = Py_TYPE(v);
    if (t == &PyLong_Type) {
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (x == -1 && PyErr_Occurred())
            return -1;
        if (overflow)
            return buf_obj_str(b, PyObject_Repr(v));
        char tmp[32];
        int n = snprintf(tmp, sizeof tmp, "%lld", x);
        return tm_buf_add(b, tmp, n) < 0 ? -1 : 1;
    }
    if (t == &PyFloat_Type) {
        char *s = PyOS_double_to_string(PyFloat_AS_DOUBLE(v), 'g', 6, 0, NULL);
        if (s == NULL)
            return -1;
        int r = tm_buf_add(b, s, (Py_ssize_t)strlen(s));
        PyMem_Free(s);
        return r < 0 ? -1 : 1;
    }
    if (t == &PyBool_Type)
        return tm_buf_add(b, v == Py_True ? "True" : "False", v == Py_True ? 4 : 5) < 0 ? -1 : 1;
    if (t == &PyUnicode_Type)
        return plain_text(v) ? tm_buf_str(b, v) : buf_obj_str(b, PyObject_Repr(v));
    if (t == &PyBytes_Type)
        return buf_obj_str(b, PyObject_Repr(v));
    return buf_obj_str(b, PyObject_CallOneArg(show_other, v));
}

PyObject *tm_cached_pieces(PyObject *ev, PyObject *entries, PyObject *make, const int *key,
                           int nkey, Py_ssize_t count)
{
    PyObject *fields = PyTuple_GET_ITEM(ev, 2);
    Py_ssize_t n = PyList_GET_SIZE(entries), nf = PyDict_GET_SIZE(fields);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *e = PyList_GET_ITEM(entries, i); /* (key items..., field names, pieces) */
        int same = 1;
        for (int k = 0; k < nkey && same; k++)
            same = PyTuple_GET_ITEM(e, k) == PyTuple_GET_ITEM(ev, key[k]);
        PyObject *names = PyTuple_GET_ITEM(e, nkey);
        if (!same || PyTuple_GET_SIZE(names) != nf)
            continue;
        Py_ssize_t pos = 0, j = 0;
        PyObject *k, *v;
        while (same && PyDict_Next(fields, &pos, &k, &v))
            same = PyTuple_GET_ITEM(names, j++) == k;
        if (same)
            return PyTuple_GET_ITEM(e, nkey + 1);
    }
    PyObject *pieces = PyObject_CallOneArg(make, ev);
    if (pieces == NULL)
        return NULL;
    if (!PyTuple_CheckExact(pieces) || PyTuple_GET_SIZE(pieces) != count) {
        Py_DECREF(pieces);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++)
        if (!PyUnicode_CheckExact(PyTuple_GET_ITEM(pieces, i))) {
            Py_DECREF(pieces);
            return NULL;
        }
    PyObject *e = PyTuple_New(nkey + 2), *names = PyTuple_New(nf), *k, *v;
    if (e == NULL || names == NULL) {
        Py_XDECREF(e);
        Py_XDECREF(names);
        Py_DECREF(pieces);
        return NULL;
    }
    Py_ssize_t pos = 0, j = 0;
    while (PyDict_Next(fields, &pos, &k, &v) && j < nf)
        PyTuple_SET_ITEM(names, j++, Py_NewRef(k));
    for (int i = 0; i < nkey; i++)
        PyTuple_SET_ITEM(e, i, Py_NewRef(PyTuple_GET_ITEM(ev, key[i])));
    PyTuple_SET_ITEM(e, nkey, names);
    PyTuple_SET_ITEM(e, nkey + 1, pieces);
    if (n >= 16 && PyList_SetSlice(entries, 15, n, NULL) < 0) {
        Py_DECREF(e);
        return NULL;
    }
    int r = PyList_Insert(entries, 0, e);
    Py_DECREF(e);
    return r < 0 ? NULL : pieces; /* the list holds it */
}

/* The pieces of a text line: keyed by name, pid, tid, thread and task; one per field (the
 * text before its value), or the whole rest of the line when there is no field. */
static PyObject *line_pieces(PyObject *ev, PyObject *entries, PyObject *make)
{
    static const int key[] = {1, 3, 4, 5, 6};
    Py_ssize_t nf = PyDict_GET_SIZE(PyTuple_GET_ITEM(ev, 2));
    return tm_cached_pieces(ev, entries, make, key, 5, nf ? nf : 1);
}

static int int64_of(PyObject *o, long long *out)
{
    int overflow = 0;
    if (!PyLong_CheckExact(o))
        return 0;
    *out = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (*out == -1 && PyErr_Occurred())
        return -1;
    return !overflow;
}

static PyObject *format_text(PyObject *self, PyObject *args)
{
    PyObject *events, *previous, *entries, *make, *second, *show_other, *event_type;
    Py_ssize_t i;
    if (!PyArg_ParseTuple(args, "O!nOO!OOOO", &PyList_Type, &events, &i, &previous,
                          &PyList_Type, &entries, &make, &second, &show_other, &event_type))
        return NULL;
    Buf b = {NULL, 0, 0};
    long long prev = 0, cached_second = 0;
    int have_prev = previous != Py_None, have_second = 0;
    char clock[64];
    Py_ssize_t clock_len = 0;
    PyObject *result = NULL;
    if (have_prev) {
        int r = int64_of(previous, &prev);
        if (r < 0)
            return NULL;
        if (r == 0) /* declined: Python formats the first event */
            return Py_BuildValue("(snO)", "", i, previous);
    }
    for (; i < PyList_GET_SIZE(events); i++) {
        PyObject *ev = PyList_GET_ITEM(events, i);
        if ((PyObject *)Py_TYPE(ev) != event_type || PyTuple_GET_SIZE(ev) < 7
            || !PyDict_CheckExact(PyTuple_GET_ITEM(ev, 2)))
            break; /* not exactly the reader's Event: the caller's */
        long long ts;
        int r = int64_of(PyTuple_GET_ITEM(ev, 0), &ts);
        if (r < 0)
            goto error;
        if (r == 0 || (have_prev && ((prev < 0 && ts > LLONG_MAX + prev)
                                     || (prev > 0 && ts < LLONG_MIN + prev))))
            break; /* the delta would not fit int64 */
        PyObject *pieces = line_pieces(ev, entries, make);
        if (pieces == NULL) {
            if (PyErr_Occurred())
                goto error;
            break;
        }
        Py_INCREF(pieces);
        Py_ssize_t mark = b.len;
        /* the time: HH:MM:SS of the second (floor division, as divmod), microseconds */
        long long sec = ts / 1000000000LL, frac = ts % 1000000000LL;
        if (frac < 0) {
            frac += 1000000000LL;
            sec -= 1;
        }
        if (!have_second || sec != cached_second) {
            PyObject *text = PyObject_CallFunction(second, "L", sec);
            Py_ssize_t n;
            const char *u = text && PyUnicode_Check(text) ? PyUnicode_AsUTF8AndSize(text, &n) : NULL;
            if (u == NULL || n > 40) {
                Py_XDECREF(text);
                Py_DECREF(pieces);
                if (PyErr_Occurred())
                    goto error;
                break;
            }
            memcpy(clock, u, (size_t)n);
            clock_len = n;
            Py_DECREF(text);
            cached_second = sec;
            have_second = 1;
        }
        char head[128];
        int hn = snprintf(head, sizeof head, "%.*s.%06lld ", (int)clock_len, clock, frac / 1000);
        int ok = tm_buf_add(&b, head, hn) == 0;
        if (ok && !have_prev) {
            ok = tm_buf_add(&b, "+?.??????", 9) == 0;
        } else if (ok) {
            char *d = PyOS_double_to_string((double)(ts - prev) / 1e9, 'f', 6, 0, NULL);
            ok = d != NULL && tm_buf_add(&b, "+", 1) == 0 && tm_buf_add(&b, d, (Py_ssize_t)strlen(d)) == 0;
            PyMem_Free(d);
        }
        PyObject *fields = PyTuple_GET_ITEM(ev, 2), *k, *v;
        Py_ssize_t pos = 0, j = 0;
        int shown = 1;
        if (ok && PyDict_GET_SIZE(fields) == 0)
            ok = tm_buf_str(&b, PyTuple_GET_ITEM(pieces, 0)) == 1;
        while (ok && shown == 1 && PyDict_Next(fields, &pos, &k, &v)) {
            ok = tm_buf_str(&b, PyTuple_GET_ITEM(pieces, j++)) == 1;
            if (ok)
                shown = show(&b, v, show_other);
        }
        Py_DECREF(pieces);
        if (!ok || shown < 0) {
            if (PyErr_Occurred())
                goto error;
        }
        if (!ok || shown != 1) {
            b.len = mark; /* declined: this event is the caller's */
            break;
        }
        if (tm_buf_add(&b, "\n", 1) < 0)
            goto error;
        prev = ts;
        have_prev = 1;
        previous = PyTuple_GET_ITEM(ev, 0);
    }
    {
        PyObject *text = PyUnicode_DecodeUTF8(b.p ? b.p : "", b.len, "strict");
        if (text != NULL)
            result = Py_BuildValue("(NnO)", text, i, previous);
    }
error:
    PyMem_Free(b.p);
    return result;
}

/* --- stats: events grouped by name -------------------------------------------------------
 *
 * group_events(events, Event) -> {name: [first timestamp, last timestamp, [fields, ...]]}
 * (names in order of first appearance), what `tracemark stats` (tracemark/cli/stats.py
 * collect) does per event, for a chunk of Event tuples; None (nothing done) when one of them
 * is not exactly an Event, for the caller's Python loop to take the chunk. */
static PyObject *group_events(PyObject *self, PyObject *args)
{
    PyObject *events, *event_type;
    if (!PyArg_ParseTuple(args, "O!O", &PyList_Type, &events, &event_type))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(events);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *ev = PyList_GET_ITEM(events, i);
        if ((PyObject *)Py_TYPE(ev) != event_type || PyTuple_GET_SIZE(ev) < 3)
            Py_RETURN_NONE;
    }
    PyObject *groups = PyDict_New();
    if (groups == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(events); i++) {
        PyObject *ev = PyList_GET_ITEM(events, i);
        PyObject *ts = PyTuple_GET_ITEM(ev, 0), *name = PyTuple_GET_ITEM(ev, 1);
        PyObject *fields = PyTuple_GET_ITEM(ev, 2);
        PyObject *entry = PyDict_GetItemWithError(groups, name);
        if (entry == NULL) {
            if (PyErr_Occurred())
                goto error;
            PyObject *rows = PyList_New(0);
            entry = rows ? Py_BuildValue("[OON]", ts, ts, rows) : NULL;
            if (entry == NULL)
                goto error;
            int r = PyDict_SetItem(groups, name, entry);
            Py_DECREF(entry);
            if (r < 0)
                goto error;
        } else {
            Py_INCREF(ts);
            if (PyList_SetItem(entry, 1, ts) < 0)
                goto error;
        }
        if (PyList_Append(PyList_GET_ITEM(entry, 2), fields) < 0)
            goto error;
    }
    return groups;
error:
    Py_DECREF(groups);
    return NULL;
}

/* --- the Parquet export's columns -----------------------------------------------------------
 *
 * decode_columns(layout, data, pos, end, last, ts_end)
 *   -> (classes, pos, last, n, tasks, error)
 *
 * decode()'s walk of one packet (the same checks in the same order, the same error tuple at
 * the same offset, every event wanted), but each event's values are appended to its class's
 * columns instead of building an Event (tracemark/export/parquet.py, its columnar path):
 * classes: {event id: [count, index of its first event among the n walked, timestamps
 * (int64, offset applied), task indexes (int32 into tasks), one item per field]}; a field is
 * int64 / float64 bytes, bool one byte 0 or 1 per event, str a pair (int32 Arrow offsets,
 * UTF-8 data); a class whose only event failed the time check has count 0 and empty
 * columns. tasks: [None, Task, ...], index 0 for "no task" (a packet starts outside
 * every task). Text is checked as read_text checks it (PyUnicode_DecodeUTF8, strict), ASCII
 * without it. A class with another field kind (bytes, object, any) is a ValueError: the
 * caller chose this path only for sub-traces without such classes. A timestamp plus the
 * offset beyond int64 is an OverflowError (the caller checked the packets' timestamp_end).
 * Nothing is kept between calls. */

typedef struct {
    Py_ssize_t count, first;
    Buf ts, task;
    Buf *cols;   /* per field: values (str: the offsets) */
    Buf *texts;  /* per field: str data */
} ColClass;

static int ascii_only(const unsigned char *p, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (p[i] & 0x80)
            return 0;
    return 1;
}

static void colclass_free(ColClass *cc, Py_ssize_t nfields)
{
    PyMem_Free(cc->ts.p);
    PyMem_Free(cc->task.p);
    for (Py_ssize_t j = 0; j < nfields; j++) {
        if (cc->cols)
            PyMem_Free(cc->cols[j].p);
        if (cc->texts)
            PyMem_Free(cc->texts[j].p);
    }
    PyMem_Free(cc->cols);
    PyMem_Free(cc->texts);
}

/* Class c's payload at *pos appended to cc: 1, DAMAGED (cc's lengths as before), -1. */
static int column_fields(const Class *c, ColClass *cc, const unsigned char *d, Py_ssize_t *pos,
                         Py_ssize_t end)
{
    Py_ssize_t p = *pos;
    /* Check first (nothing appended to a damaged event's columns), then append. */
    for (Py_ssize_t j = 0; j < c->nfields; j++) {
        switch (c->codes[j]) {
        case F_INT:
        case F_FLOAT:
            if (p + 8 > end)
                return DAMAGED;
            p += 8;
            break;
        case F_BOOL:
            if (p + 1 > end)
                return DAMAGED;
            p += 1;
            break;
        case F_STR: {
            if (p + 4 > end)
                return DAMAGED;
            Py_ssize_t n = (Py_ssize_t)get_u32(d + p);
            p += 4;
            if (n > end - p)
                return DAMAGED;
            if (!ascii_only(d + p, n)) {
                int r = read_text(d + p, n, NULL);
                if (r <= 0)
                    return r;
            }
            p += n;
            break;
        }
        default:
            PyErr_SetString(PyExc_ValueError, "decode_columns: a field kind it does not take");
            return -1;
        }
    }
    p = *pos;
    for (Py_ssize_t j = 0; j < c->nfields; j++) {
        Buf *b = &cc->cols[j];
        switch (c->codes[j]) {
        case F_INT:
        case F_FLOAT:
            if (tm_buf_add(b, (const char *)d + p, 8) < 0) /* little-endian, as the host */
                return -1;
            p += 8;
            break;
        case F_BOOL: {
            char v = d[p] != 0;
            if (tm_buf_add(b, &v, 1) < 0)
                return -1;
            p += 1;
            break;
        }
        default: { /* F_STR */
            Py_ssize_t n = (Py_ssize_t)get_u32(d + p);
            p += 4;
            Buf *t = &cc->texts[j];
            if (t->len + n > INT32_MAX) {
                PyErr_SetString(PyExc_OverflowError, "decode_columns: text beyond int32");
                return -1;
            }
            int32_t off = (int32_t)(t->len + n);
            if (tm_buf_add(t, (const char *)d + p, n) < 0
                || tm_buf_add(b, (const char *)&off, 4) < 0)
                return -1;
            p += n;
        }
        }
    }
    *pos = p;
    return 1;
}

static PyObject *buf_bytes(const Buf *b)
{
    return PyBytes_FromStringAndSize(b->p ? b->p : "", b->len);
}

static PyObject *colclass_result(const Class *c, const ColClass *cc)
{
    PyObject *list = PyList_New(4 + c->nfields);
    if (list == NULL)
        return NULL;
    PyObject *items[4] = {PyLong_FromSsize_t(cc->count), PyLong_FromSsize_t(cc->first),
                          buf_bytes(&cc->ts), buf_bytes(&cc->task)};
    for (int k = 0; k < 4; k++) {
        if (items[k] == NULL) {
            for (int m = k + 1; m < 4; m++)
                Py_XDECREF(items[m]);
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, k, items[k]);
    }
    for (Py_ssize_t j = 0; j < c->nfields; j++) {
        PyObject *v = c->codes[j] == F_STR
                          ? Py_BuildValue("(NN)", buf_bytes(&cc->cols[j]), buf_bytes(&cc->texts[j]))
                          : buf_bytes(&cc->cols[j]);
        if (v == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, 4 + j, v);
    }
    return list;
}

static PyObject *decode_columns(PyObject *self, PyObject *args)
{
    PyObject *capsule;
    Py_buffer buf;
    Py_ssize_t pos, end;
    unsigned long long last, ts_end;
    if (!PyArg_ParseTuple(args, "Oy*nnKK", &capsule, &buf, &pos, &end, &last, &ts_end))
        return NULL;
    Layout *L = PyCapsule_GetPointer(capsule, CAPSULE);
    PyObject *tasks = NULL, *classes = NULL, *result = NULL;
    Py_ssize_t *slot = NULL; /* per class id: its index in ccs + 1, 0 none yet */
    ColClass *ccs = NULL;
    uint32_t *ids = NULL;
    Py_ssize_t nccs = 0, capccs = 0;
    int kind = E_NONE;
    Py_ssize_t at = pos, n = 0;
    uint32_t eid = 0;
    int32_t task_index = 0;
    if (L == NULL)
        goto done;
    if (end > buf.len || pos < 0 || end < 0 || end > PY_SSIZE_T_MAX / 2) {
        PyErr_SetString(PyExc_ValueError, "end beyond the data");
        goto done;
    }
    slot = PyMem_Calloc(L->ncls ? (size_t)L->ncls : 1, sizeof(Py_ssize_t));
    if (slot == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if ((tasks = PyList_New(1)) == NULL)
        goto done;
    PyList_SET_ITEM(tasks, 0, Py_NewRef(Py_None));
    const unsigned char *d = buf.buf;
    while (pos < end) {
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
        int r;
        if ((long long)eid == L->task_eid) {
            PyObject *fields = NULL;
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
                    goto fail;
                if (t == Py_None) {
                    Py_DECREF(t);
                    task_index = 0;
                } else {
                    /* checked below with the timestamp: a task event that fails it ends
                     * the walk, and tasks holds one entry more than is used (harmless) */
                    if (PyList_GET_SIZE(tasks) >= INT32_MAX) {
                        Py_DECREF(t);
                        PyErr_SetString(PyExc_OverflowError, "too many tasks in a packet");
                        goto fail;
                    }
                    r = PyList_Append(tasks, t);
                    Py_DECREF(t);
                    if (r < 0)
                        goto fail;
                    r = 1;
                    task_index = (int32_t)(PyList_GET_SIZE(tasks) - 1);
                }
            }
            if (r < 0)
                goto fail;
            if (r == DAMAGED) {
                kind = E_DAMAGED;
                break;
            }
            if (ts < last || ts > ts_end) {
                kind = E_TIME;
                break;
            }
            last = ts;
            n++;
            continue;
        }
        if (slot[eid] == 0) {
            if (nccs == capccs) {
                Py_ssize_t cap = capccs ? capccs * 2 : 8;
                ColClass *m = PyMem_Realloc(ccs, (size_t)cap * sizeof(ColClass));
                uint32_t *mi = m ? PyMem_Realloc(ids, (size_t)cap * sizeof(uint32_t)) : NULL;
                if (m != NULL)
                    ccs = m;
                if (mi == NULL) {
                    PyErr_NoMemory();
                    goto fail;
                }
                ids = mi;
                capccs = cap;
            }
            ColClass *cc = &ccs[nccs];
            memset(cc, 0, sizeof *cc);
            ids[nccs] = eid;
            nccs++;
            size_t nf = c->nfields ? (size_t)c->nfields : 1;
            cc->cols = PyMem_Calloc(nf, sizeof(Buf));
            cc->texts = PyMem_Calloc(nf, sizeof(Buf));
            if (cc->cols == NULL || cc->texts == NULL) {
                PyErr_NoMemory();
                goto fail;
            }
            for (Py_ssize_t j = 0; j < c->nfields; j++)
                if (c->codes[j] == F_STR) {
                    int32_t zero = 0;
                    if (tm_buf_add(&cc->cols[j], (const char *)&zero, 4) < 0)
                        goto fail;
                }
            cc->first = n;
            slot[eid] = nccs;
        }
        ColClass *cc = &ccs[slot[eid] - 1];
        /* the timestamp is checked after the payload, as decode() does; the payload is
         * appended only once both hold (column_fields checks before appending) */
        /* the payload, checked then appended (column_fields), then the time: undone
         * when it fails, as decode() gives no event then */
        Py_ssize_t p2 = pos;
        r = column_fields(c, cc, d, &p2, end);
        if (r < 0)
            goto fail;
        if (r == DAMAGED) {
            kind = E_DAMAGED;
            break;
        }
        if (ts < last || ts > ts_end) {
            /* undo the payload just appended: the event is not given */
            for (Py_ssize_t j = 0; j < c->nfields; j++) {
                Buf *b = &cc->cols[j];
                if (c->codes[j] == F_STR) {
                    b->len -= 4;
                    int32_t off;
                    memcpy(&off, b->p + b->len - 4, 4);
                    cc->texts[j].len = off;
                } else {
                    b->len -= c->codes[j] == F_BOOL ? 1 : 8;
                }
            }
            pos = p2; /* as decode() leaves it: after the payload */
            kind = E_TIME;
            break;
        }
        pos = p2;
        last = ts;
        n++;
        int64_t t = (int64_t)ts;
        if (ts > (uint64_t)INT64_MAX || (L->offset_ns >= 0 && t > INT64_MAX - L->offset_ns)
            || (L->offset_ns < 0 && t < INT64_MIN - L->offset_ns)) {
            PyErr_SetString(PyExc_OverflowError, "decode_columns: a timestamp beyond int64");
            goto fail;
        }
        t += L->offset_ns;
        if (tm_buf_add(&cc->ts, (const char *)&t, 8) < 0
            || tm_buf_add(&cc->task, (const char *)&task_index, 4) < 0)
            goto fail;
        cc->count++;
    }
    if ((classes = PyDict_New()) == NULL)
        goto fail;
    for (Py_ssize_t k = 0; k < nccs; k++) {
        PyObject *key = PyLong_FromUnsignedLong(ids[k]);
        PyObject *v = key ? colclass_result(&L->cls[ids[k]], &ccs[k]) : NULL;
        int r = v ? PyDict_SetItem(classes, key, v) : -1;
        Py_XDECREF(key);
        Py_XDECREF(v);
        if (r < 0)
            goto fail;
    }
    if (kind == E_NONE)
        result = Py_BuildValue("(OnKnO O)", classes, pos, last, n, tasks, Py_None);
    else
        result = Py_BuildValue("(OnKnO(inI))", classes, pos, last, n, tasks, kind, at,
                               (unsigned int)eid);
fail:
    Py_XDECREF(classes);
    for (Py_ssize_t k = 0; k < nccs; k++)
        colclass_free(&ccs[k], L->cls[ids[k]].nfields);
    PyMem_Free(ccs);
    PyMem_Free(ids);
done:
    Py_XDECREF(tasks);
    PyMem_Free(slot);
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
    {"decode_columns", decode_columns, METH_VARARGS,
     "decode_columns(layout, data, pos, end, last, ts_end) -> (classes, pos, last, n, tasks, "
     "error): a packet's events as columns (the Parquet export)."},
    {"format_text", format_text, METH_VARARGS,
     "format_text(events, start, previous, entries, pieces, second, show_other, Event) "
     "-> (text, next, previous): view's plain text lines."},
    {"format_json", tm_format_json, METH_VARARGS,
     "format_json(events, start, entries, pieces, ReprText, Event) -> (text, next): view's "
     "JSON lines."},
    {"group_events", group_events, METH_VARARGS,
     "group_events(events, Event) -> {name: [first ts, last ts, [fields, ...]]} or None"},
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
