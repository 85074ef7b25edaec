/* Declarations shared by the source files of tracemark._speedups (one extension module). */
#ifndef TRACEMARK_SPEEDUPS_H
#define TRACEMARK_SPEEDUPS_H

#include <Python.h>

/* tracemark/_speedups_consumer.c: add the native consumer's type, Writer, to the module
 * (called from the module's exec slot). 0, or -1 with an exception set. */
int tm_consumer_exec(PyObject *module);

#endif
