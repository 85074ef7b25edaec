/* tracemark._creader, view's JSON lines (part of the _creader extension: see _reader.c).
 *
 * format_json(events, start, entries, pieces, ReprText, Event) -> (text, next)
 *
 * The lines `tracemark view --json` writes for events[start:] (tracemark/cli/view.py
 * write_json), each ending in "\n", as one str, byte for byte what the Python path writes
 * (tests/test_creader.py holds them to it); `next`: the index of the first event not
 * formatted: len(events), or one this function declines, which the caller formats the Python
 * way before calling again. Declined: an event not exactly the reader's Event, a timestamp,
 * pid or tid not exactly an int, a value of a type not listed below, text with a lone
 * surrogate (no UTF-8 for it here; the Python path writes what json writes).
 *
 * A line is pieces[0] timestamp pieces[1] pid pieces[2] tid, then per field pieces[3 + i]
 * and the value, then the last piece; pieces(ev) (view._json_pieces: the JSON around the
 * values, escaped by json's own encoder) is cached in `entries` by the identity of the
 * event's name, thread, task and field names. Values as view._ENCODE writes them:
 *   - int: its repr; bool: true / false; None: null;
 *   - float: its repr (float.__repr__: PyOS_double_to_string 'r' with Py_DTSF_ADD_DOT_0,
 *     Objects/floatobject.c float_repr); inf, -inf, nan as the strings "inf", "-inf", "nan";
 *   - str and ReprText: json's encode_basestring with ensure_ascii=False (Modules/_json.c
 *     escape_unicode): \" \\ \b \f \n \r \t, other code points below 0x20 as \u00xx
 *     (lowercase hex), everything else as it is;
 *   - bytes: its hex, as a JSON string (view._plain: bytes.hex()).
 */

#include <math.h>
#include <string.h>

#include "_reader_lines.h"

/* Every writer below: 1 done, 0 declined (no error set), -1 error. */

static int jstring(Buf *b, PyObject *s)
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
    /* at most 6 bytes out per byte in, and the quotes */
    if (n > (PY_SSIZE_T_MAX - 2) / 6 || tm_buf_grow(b, 6 * n + 2) < 0) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        return -1;
    }
    static const char hex[] = "0123456789abcdef";
    char *o = b->p + b->len;
    *o++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)u[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *o++ = (char)c; /* UTF-8 continuation and lead bytes are >= 0x80: as they are */
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\f': *o++ = 'f'; break;
        case '\n': *o++ = 'n'; break;
        case '\r': *o++ = 'r'; break;
        case '\t': *o++ = 't'; break;
        default:
            *o++ = 'u';
            *o++ = '0';
            *o++ = '0';
            *o++ = hex[c >> 4];
            *o++ = hex[c & 15];
        }
    }
    *o++ = '"';
    b->len = o - b->p;
    return 1;
}

static int jrepr(Buf *b, PyObject *v)
{
    PyObject *s = PyObject_Repr(v);
    if (s == NULL)
        return -1;
    int r = tm_buf_str(b, s);
    Py_DECREF(s);
    return r;
}

static int jint(Buf *b, PyObject *v)
{
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (x == -1 && PyErr_Occurred())
        return -1;
    if (overflow)
        return jrepr(b, v);
    char tmp[32];
    int n = snprintf(tmp, sizeof tmp, "%lld", x);
    return tm_buf_add(b, tmp, n) < 0 ? -1 : 1;
}

static int jvalue(Buf *b, PyObject *v, PyObject *repr_text)
{
    PyTypeObject *t = Py_TYPE(v);
    if (t == &PyLong_Type)
        return jint(b, v);
    if (t == &PyUnicode_Type || (PyObject *)t == repr_text)
        return jstring(b, v);
    if (t == &PyFloat_Type) {
        double d = PyFloat_AS_DOUBLE(v);
        if (isnan(d))
            return tm_buf_add(b, "\"nan\"", 5) < 0 ? -1 : 1;
        if (isinf(d))
            return (d > 0 ? tm_buf_add(b, "\"inf\"", 5) : tm_buf_add(b, "\"-inf\"", 6)) < 0 ? -1 : 1;
        char *s = PyOS_double_to_string(d, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (s == NULL)
            return -1;
        int r = tm_buf_add(b, s, (Py_ssize_t)strlen(s));
        PyMem_Free(s);
        return r < 0 ? -1 : 1;
    }
    if (t == &PyBool_Type)
        return tm_buf_add(b, v == Py_True ? "true" : "false", v == Py_True ? 4 : 5) < 0 ? -1 : 1;
    if (v == Py_None)
        return tm_buf_add(b, "null", 4) < 0 ? -1 : 1;
    if (t == &PyBytes_Type) {
        static const char hex[] = "0123456789abcdef";
        Py_ssize_t n = PyBytes_GET_SIZE(v);
        const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(v);
        if (n > (PY_SSIZE_T_MAX - 2) / 2 || tm_buf_grow(b, 2 * n + 2) < 0) {
            if (!PyErr_Occurred())
                PyErr_NoMemory();
            return -1;
        }
        char *o = b->p + b->len;
        *o++ = '"';
        for (Py_ssize_t i = 0; i < n; i++) {
            *o++ = hex[p[i] >> 4];
            *o++ = hex[p[i] & 15];
        }
        *o++ = '"';
        b->len = o - b->p;
        return 1;
    }
    return 0;
}

/* The pieces of a JSON line: keyed by name, thread and task; the JSON before the timestamp,
 * the pid, the tid and each value, and the rest of the line. */
static PyObject *json_pieces(PyObject *ev, PyObject *entries, PyObject *make)
{
    static const int key[] = {1, 5, 6};
    return tm_cached_pieces(ev, entries, make, key, 3, PyDict_GET_SIZE(PyTuple_GET_ITEM(ev, 2)) + 4);
}

PyObject *tm_format_json(PyObject *self, PyObject *args)
{
    PyObject *events, *entries, *make, *repr_text, *event_type;
    Py_ssize_t i;
    if (!PyArg_ParseTuple(args, "O!nO!OOO", &PyList_Type, &events, &i, &PyList_Type, &entries,
                          &make, &repr_text, &event_type))
        return NULL;
    Buf b = {NULL, 0, 0};
    PyObject *result = NULL;
    for (; i < PyList_GET_SIZE(events); i++) {
        PyObject *ev = PyList_GET_ITEM(events, i);
        if ((PyObject *)Py_TYPE(ev) != event_type || PyTuple_GET_SIZE(ev) < 7
            || !PyDict_CheckExact(PyTuple_GET_ITEM(ev, 2))
            || !PyLong_CheckExact(PyTuple_GET_ITEM(ev, 0))
            || !PyLong_CheckExact(PyTuple_GET_ITEM(ev, 3))
            || !PyLong_CheckExact(PyTuple_GET_ITEM(ev, 4)))
            break; /* the caller's */
        PyObject *pieces = json_pieces(ev, entries, make);
        if (pieces == NULL) {
            if (PyErr_Occurred())
                goto error;
            break;
        }
        Py_INCREF(pieces); /* the cache may drop it meanwhile (a call to make) */
        Py_ssize_t mark = b.len;
        int r = tm_buf_str(&b, PyTuple_GET_ITEM(pieces, 0));
        if (r == 1)
            r = jint(&b, PyTuple_GET_ITEM(ev, 0));
        if (r == 1)
            r = tm_buf_str(&b, PyTuple_GET_ITEM(pieces, 1));
        if (r == 1)
            r = jint(&b, PyTuple_GET_ITEM(ev, 3));
        if (r == 1)
            r = tm_buf_str(&b, PyTuple_GET_ITEM(pieces, 2));
        if (r == 1)
            r = jint(&b, PyTuple_GET_ITEM(ev, 4));
        PyObject *fields = PyTuple_GET_ITEM(ev, 2), *k, *v;
        Py_ssize_t pos = 0, j = 3;
        while (r == 1 && PyDict_Next(fields, &pos, &k, &v)) {
            r = tm_buf_str(&b, PyTuple_GET_ITEM(pieces, j++));
            if (r == 1)
                r = jvalue(&b, v, repr_text);
        }
        if (r == 1)
            r = tm_buf_str(&b, PyTuple_GET_ITEM(pieces, j));
        Py_DECREF(pieces);
        if (r < 0)
            goto error;
        if (r == 0) {
            b.len = mark; /* declined: this event is the caller's */
            break;
        }
        if (tm_buf_add(&b, "\n", 1) < 0)
            goto error;
    }
    {
        PyObject *text = PyUnicode_DecodeUTF8(b.p ? b.p : "", b.len, "strict");
        if (text != NULL)
            result = Py_BuildValue("(Nn)", text, i);
    }
error:
    PyMem_Free(b.p);
    return result;
}
