/* What the source files of tracemark._speedups share (one extension, one module state). */
#ifndef TRACEMARK_SPEEDUPS_H
#define TRACEMARK_SPEEDUPS_H

#include <Python.h>

/* Record one event: what record() does (see _speedups.c), from C. 0: recorded (or discarded
 * and counted by ch.switch), 1: declined (nothing written: the caller takes the Python path),
 * -1: an exception is set. With may_switch 0, an event that does not fit the sub-buffer is
 * declined instead of calling ch.switch (so no Python code runs at all). */
int tm_record_values(PyObject *module, PyObject *ch, unsigned long event_id, const char *layout,
                     Py_ssize_t nfields, PyObject *const *values, int may_switch);

/* tracemark/_speedups_probes.c: the dynamic probes' C path. Its part of the module state. */
typedef struct {
    PyTypeObject *entry_type; /* EntryProbe */
    PyTypeObject *start_type; /* StartCallback */
    /* Set by configure_probes(): the registry's thread-local dispatch state and the classes
     * whose __slots__ the C path reads (offsets of those slots). */
    PyObject *tls;
    PyTypeObject *tstate_type, *bound_type, *chan_type;
    Py_ssize_t off_depth, off_cache, off_id, off_rec, off_layout, off_ch_rec;
    PyObject *str_state, *str_fire, *str_fused;
} ProbesState;

ProbesState *tm_probes_state(PyObject *module);
int tm_probes_exec(PyObject *module);
int tm_probes_traverse(PyObject *module, visitproc visit, void *arg);
int tm_probes_clear(PyObject *module);

#endif
