/* What tracemark._creader's two line writers share (view's text lines in _reader.c, its JSON
 * lines in _reader_json.c): a growing output buffer, and the cache of each event shape's
 * line pieces. Defined in _reader.c. */
#ifndef TRACEMARK_READER_LINES_H
#define TRACEMARK_READER_LINES_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* An output buffer (PyMem); each function returns -1 with an exception set on failure. */
typedef struct {
    char *p;
    Py_ssize_t len, cap;
} Buf;

int tm_buf_grow(Buf *b, Py_ssize_t n); /* room for n more bytes: 0 */
int tm_buf_add(Buf *b, const char *s, Py_ssize_t n); /* 0 */
/* A str's UTF-8 appended: 1; 0 when it has none (a lone surrogate: error cleared), -1 error. */
int tm_buf_str(Buf *b, PyObject *s);

/* The pieces of ev's line (a tuple of `count` str, made by make(ev)), a borrowed reference,
 * cached in `entries` (a list, most recent first, at most 16) by the identity of the event's
 * items at the `nkey` indices `key` and of its field names. NULL and no error: declined
 * (make's answer was not such a tuple); NULL and an error: failed. */
PyObject *tm_cached_pieces(PyObject *ev, PyObject *entries, PyObject *make, const int *key,
                           int nkey, Py_ssize_t count);

/* view's JSON lines (_reader_json.c) */
PyObject *tm_format_json(PyObject *self, PyObject *args);

#endif
