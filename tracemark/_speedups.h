/* What the source files of tracemark._speedups share: the module state, the
 * recording core both call, and the firing path's entries (see _speedups_fire.c's header). */
#ifndef TRACEMARK_SPEEDUPS_H
#define TRACEMARK_SPEEDUPS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

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

/* The module state (multi-phase init: one per module object). */
typedef struct {
    PyTypeObject *channel_type; /* exact type record() accepts as a channel */
    PyTypeObject *slot_type;    /* tracers.recording.tasks._Slot */
    Py_ssize_t off_buf, off_pos, off_limit, off_count, off_loop, off_intask;
    Py_ssize_t off_running;
    PyObject *str_switch;
    /* The firing path (_speedups_fire.c), set by configure_fire(). */
    PyTypeObject *fire_type;     /* Fire, a heap type of this module */
    PyTypeObject *tstate_type;   /* markers.dispatch._ThreadState */
    PyObject *tls;               /* markers.dispatch._tls */
    PyObject *zero;              /* the int 0 (a small int: depth 0 is always this object) */
    PyObject *str_state;
    Py_ssize_t off_depth, off_cache, off_rec;
    unsigned long long fast_events; /* events the firing path recorded (fast_events()) */
    /* The last thread the firing path served: its PyThreadState.id (unique in the
     * interpreter, never reused) and its dispatch state, borrowed from that thread's dict
     * (valid while the thread lives; set_thread_state() forgets it when it replaces it). */
    uint64_t last_tid;
    PyObject *last_state;
    ProbesState probes; /* tracemark/_speedups_probes.c's */
} State;

/* A __slots__ attribute, read where CPython keeps it (NULL when unset). */
#define SLOT(obj, off) (*(PyObject **)((char *)(obj) + (off)))

/* tm_record's outcomes. */
#define TM_ERROR (-1)   /* an exception is set, nothing written */
#define TM_RECORDED 0   /* recorded, or discarded by ch.switch (which counted it) */
#define TM_DECLINED 1   /* nothing written: the caller records the event the pure way */

/* Record one event (see record() in _speedups.c). With may_switch 0 an event that does not
 * fit the sub-buffer is declined instead of calling ch.switch(): then no Python code runs. */
int tm_record(State *st, PyObject *ch, unsigned long event_id, const char *layout,
              PyObject *const *values, Py_ssize_t nfields, int may_switch);

/* The same from the module object (the probes' C path): returns a TM_ outcome. */
int tm_record_values(PyObject *module, PyObject *ch, unsigned long event_id, const char *layout,
                     Py_ssize_t nfields, PyObject *const *values, int may_switch);

Py_ssize_t tm_slot_offset(PyTypeObject *type, const char *name);

/* _speedups_fire.c */
int tm_fire_exec(PyObject *module, State *st);
int tm_fire_traverse(State *st, visitproc visit, void *arg);
void tm_fire_clear(State *st);
extern PyMethodDef tm_fire_methods[];

/* tracemark/_speedups_consumer.c: add the native consumer's type, Writer, to the module
 * (called from the module's exec slot). 0, or -1 with an exception set. */
int tm_consumer_exec(PyObject *module);

#endif
