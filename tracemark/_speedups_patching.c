/* tracemark._speedups, the patcher's part: what only C can do for an inactive marker's jump.
 *
 * Two things cost a patched function more than its one jump (benchmarks/bench_jumps.py
 * counts them in machine instructions), and both need the C API:
 *
 * 1. set_code(func, code): on 3.13, assigning func.__code__ clears the function's version
 *    and never gives it a new one (CPython Objects/funcobject.c, func_set_code and
 *    "Function (and code) versions"), so every caller's CALL stays unspecialised: +93
 *    instructions per call, patched or not. A function made by MAKE_FUNCTION gets its code's
 *    co_version as its version (PyFunction_NewWithQualName); set_code assigns __code__ the
 *    normal way (function watchers see it, the type checks run) and then puts the function
 *    back in that same state with _PyFunction_SetVersion (exported by 3.13,
 *    Include/internal/pycore_function.h), but only if it was in it before: a function
 *    whose version was already cleared (its defaults or keyword defaults were changed) or
 *    never matched its code keeps version 0, as CPython would leave it. 3.11 and 3.12 give
 *    a function a new version lazily (_PyFunction_GetVersionForCurrentState): nothing to do.
 *
 * 2. watch(globals, names, callback) / unwatch(globals) (3.12+, PEP 699's dictionary
 *    watchers, PyDict_AddWatcher): the patched jump over an inactive `rx(...)` is guarded
 *    (load `rx`, compare it with the marker, jump back) so that a rebound name still gets
 *    called; that guard is +110 to +122 instructions. With a watcher on the module's
 *    globals, the patcher can drop the guard of global names: the callback runs when one of
 *    `names` is assigned, deleted or the dict is cleared or replaced wholesale, *before* the
 *    change takes effect, and the patcher then puts the guarded variant back on every
 *    function of that module's units, before the statement that rebinds finishes.
 *
 *    What the callback costs: every store into a watched globals dict (a module's
 *    `global counter; counter += 1` included) runs on_dict_event: a scan of the watched
 *    dicts (modules with patched sites, a short array) and, for a watched dict, one set
 *    lookup of an exact str key. A non-str key or another name returns at once.
 *
 *    Guarantees: the callback never raises into the program (an exception from the Python
 *    callback is reported as unraisable and the exception being handled, if any, is kept);
 *    a dict being deallocated is forgotten without running Python code; only the main
 *    interpreter watches (the registry below is process-global; a subinterpreter's watch()
 *    returns False and keeps its guards). A fork child inherits the registry with the
 *    dicts it describes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#if PY_VERSION_HEX >= 0x030D0000 && PY_VERSION_HEX < 0x030E0000
/* Exported (PyAPI_FUNC) by 3.13 in an internal header we do not include. */
PyAPI_FUNC(void) _PyFunction_SetVersion(PyFunctionObject *func, uint32_t version);
#define TM_REVIVE_VERSION 1
#else
#define TM_REVIVE_VERSION 0
#endif

PyDoc_STRVAR(set_code_doc,
"set_code(func, code)\n\n"
"func.__code__ = code; on 3.13 the function keeps a valid version (so callers stay\n"
"specialised) if it had one matching its old code.");

static PyObject *set_code(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyFunction_Check(args[0]) || !PyCode_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "set_code(function, code)");
        return NULL;
    }
#if TM_REVIVE_VERSION
    PyFunctionObject *func = (PyFunctionObject *)args[0];
    uint32_t before = func->func_version;
    int fresh = before != 0 && before == ((PyCodeObject *)func->func_code)->co_version;
#endif
    if (PyObject_SetAttrString(args[0], "__code__", args[1]) < 0)
        return NULL;
#if TM_REVIVE_VERSION
    PyCodeObject *code = (PyCodeObject *)func->func_code;
    if (fresh && func->func_version == 0 && (PyObject *)code == args[1])
        _PyFunction_SetVersion(func, code->co_version);
#endif
    Py_RETURN_NONE;
}

PyDoc_STRVAR(function_version_doc,
"function_version(func) -> int\n\n"
"The function's specialisation version as CPython keeps it now (0: none; tests).");

static PyObject *function_version(PyObject *module, PyObject *func)
{
    if (!PyFunction_Check(func)) {
        PyErr_SetString(PyExc_TypeError, "function_version(function)");
        return NULL;
    }
    return PyLong_FromUnsignedLong(((PyFunctionObject *)func)->func_version);
}

#if PY_VERSION_HEX >= 0x030C0000
/* The watched dicts: a short array (one entry per module with patched sites). */
typedef struct {
    PyObject *dict;  /* borrowed: forgotten on PyDict_EVENT_DEALLOCATED */
    PyObject *names; /* a set of str */
} Watched;

static Watched *watched = NULL;
static Py_ssize_t n_watched = 0, cap_watched = 0;
static PyObject *rebind_callback = NULL;
static int watcher_id = -1;

static Py_ssize_t find(PyObject *dict)
{
    for (Py_ssize_t i = 0; i < n_watched; i++)
        if (watched[i].dict == dict)
            return i;
    return -1;
}

static void forget(Py_ssize_t i)
{
    PyObject *names = watched[i].names;
    watched[i] = watched[--n_watched];
    Py_DECREF(names); /* a set of str: its release runs no Python code */
}

static int on_dict_event(PyDict_WatchEvent event, PyObject *dict, PyObject *key, PyObject *value)
{
    Py_ssize_t i = find(dict);
    if (i < 0)
        return 0;
    if (event == PyDict_EVENT_DEALLOCATED) {
        forget(i);
        return 0;
    }
    if (event == PyDict_EVENT_ADDED || event == PyDict_EVENT_MODIFIED ||
        event == PyDict_EVENT_DELETED) {
        if (key == NULL || !PyUnicode_CheckExact(key))
            return 0;
        int hit = PySet_Contains(watched[i].names, key);
        if (hit <= 0) {
            if (hit < 0)
                PyErr_Clear();
            return 0;
        }
    } else {
        key = Py_None; /* cleared, or filled from another dict: every name may change */
    }
    PyObject *callback = rebind_callback;
    if (callback == NULL)
        return 0;
    Py_INCREF(callback);
    Py_INCREF(key);
    PyObject *pending = PyErr_GetRaisedException();
    PyObject *result = PyObject_CallFunctionObjArgs(callback, dict, key, NULL);
    if (result == NULL)
        PyErr_WriteUnraisable(callback);
    Py_XDECREF(result);
    PyErr_SetRaisedException(pending);
    Py_DECREF(key);
    Py_DECREF(callback);
    return 0;
}
#endif

PyDoc_STRVAR(watch_doc,
"watch(globals, names, callback) -> bool\n\n"
"Call callback(globals, name) before any of names is assigned or deleted in the dict\n"
"globals, and callback(globals, None) before it is cleared or refilled; False (nothing\n"
"watched) before 3.12, in a subinterpreter, or when no dictionary watcher is free.\n"
"names replaces the names watched before in that dict.");

static PyObject *watch(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyDict_CheckExact(args[0]) || !PyCallable_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "watch(dict, names, callback)");
        return NULL;
    }
#if PY_VERSION_HEX >= 0x030C0000
    if (PyInterpreterState_Get() != PyInterpreterState_Main())
        Py_RETURN_FALSE;
    PyObject *names = PySet_New(args[1]);
    if (names == NULL)
        return NULL;
    if (watcher_id < 0) {
        watcher_id = PyDict_AddWatcher(on_dict_event);
        if (watcher_id < 0) { /* all 8 taken: keep the guards */
            PyErr_Clear();
            Py_DECREF(names);
            Py_RETURN_FALSE;
        }
    }
    Py_ssize_t i = find(args[0]);
    if (i < 0) {
        if (n_watched == cap_watched) {
            Py_ssize_t cap = cap_watched ? cap_watched * 2 : 16;
            Watched *grown = PyMem_Realloc(watched, cap * sizeof(Watched));
            if (grown == NULL) {
                Py_DECREF(names);
                return PyErr_NoMemory();
            }
            watched = grown;
            cap_watched = cap;
        }
        if (PyDict_Watch(watcher_id, args[0]) < 0) {
            Py_DECREF(names);
            return NULL;
        }
        i = n_watched++;
        watched[i].dict = args[0];
        watched[i].names = names;
    } else {
        Py_SETREF(watched[i].names, names);
    }
    Py_INCREF(args[2]);
    Py_XSETREF(rebind_callback, args[2]);
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

PyDoc_STRVAR(unwatch_doc, "unwatch(globals)\n\nStop watching the dict (no-op if not watched).");

static PyObject *unwatch(PyObject *module, PyObject *dict)
{
#if PY_VERSION_HEX >= 0x030C0000
    Py_ssize_t i = find(dict);
    if (i >= 0) {
        forget(i);
        if (PyDict_Unwatch(watcher_id, dict) < 0)
            return NULL;
    }
#endif
    Py_RETURN_NONE;
}

PyMethodDef tm_patching_methods[] = {
    {"set_code", (PyCFunction)(void (*)(void))set_code, METH_FASTCALL, set_code_doc},
    {"function_version", function_version, METH_O, function_version_doc},
    {"watch", (PyCFunction)(void (*)(void))watch, METH_FASTCALL, watch_doc},
    {"unwatch", unwatch, METH_O, unwatch_doc},
    {NULL, NULL, 0, NULL},
};
