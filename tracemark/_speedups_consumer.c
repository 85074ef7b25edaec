/* tracemark._speedups.Writer: the recorder's native consumer, a thread without the GIL.
 *
 * (A firing thread waits for it in one place only, bounded: await_written, when every
 * sub-buffer of its channel is in the thread's hands. See there.)
 *
 * The pure consumer (tracemark/tracers/recording/consumer.py) is a Python thread: after
 * every write it must win the GIL back from the firing threads, and with several threads
 * firing flat out it waited whole switch intervals (5 ms) while they filled every
 * sub-buffer (0.6-3.7% of the events lost with 4 threads). This consumer is a pthread that
 * never takes the GIL and runs no Python code: it writes the packets it is handed and says
 * which are written; the Python side (with the GIL) does all the bookkeeping.
 *
 * Protocol (discard mode only; overwrite mode writes nothing while recording)
 * ------------------------------------------------------------------------------
 * - hand_over(ch, entry, write): the firing thread closing a packet (Channel._close). In one
 *   C call, so that no signal handler or thread switch comes between (CPython runs those only
 *   in the eval loop): a Py_buffer of the sub-buffer is taken (it keeps the mmap or bytearray
 *   alive and mapped while the thread reads it), the entry (buf, events, seq) is appended to
 *   ch.full, as the pure core does, and a job is queued for the thread (mutex + condition
 *   variable). Handing over never waits: the mutex is only held to link a job.
 * - The thread takes every queued job at once, writes each stream's consecutive packets with
 *   writev (at most IOV_MAX per call), and after each write moves the jobs so far, marked
 *   written or lost, to their stream's done list (not once per batch: see publish()).
 * - reap(ch): whoever needs ch's sub-buffers back (the firing thread in Channel.switch when
 *   ch.free is empty; stop's drain), with the GIL, in one C call: for each done job, in order,
 *   pop ch.full's first entry (checked to be that job's), append its buffer to ch.free, and
 *   count its events in ch.written (and ch.on_disk_discarded from its packet context) or in
 *   rec._lost. So an event is at any time in the open packet, in ch.full, written or lost:
 *   nothing is lost silently, and the counts are the pure consumer's.
 * - A sub-buffer is free again only once written: a process killed meanwhile (SIGKILL) leaves
 *   it in the ring file, where recovery finds it (by sequence number: nothing twice), exactly
 *   as with the pure consumer, which also writes before it frees.
 *
 * Guarantees, and why
 * -------------------
 * - Same bytes: each stream file is its packets in handing order, whole (a short write or an
 *   error truncates the file back to its last whole packet, like consumer.py, and every
 *   packet after it is lost, counted); the metadata appended while recording is a job of the
 *   same queue (metadata(path, text, write)), queued before any packet that uses it (the
 *   Python side queues pending classes before each hand-over, under the registration lock):
 *   an event class is on disk before the first packet that uses it.
 * - Errors: the first failure (open, write, metadata) is kept (errno, what, path) and
 *   take_error() returns it once; the Python side reports it with rec._fail, in the pure
 *   consumer's words. After a failure nothing more is written (lost, counted), as after
 *   rec._error in the pure consumer; a job handed over while rec._error is set is lost too.
 * - No deadlock with the GIL: the thread never takes the GIL; the GIL holders take the mutex
 *   only to link or unlink jobs, and the thread never waits for anything while holding it.
 *   wait() and close() release the GIL while they wait for the thread.
 * - stop() drains everything: wait() returns once every job queued before it is done;
 *   close() lets the thread finish every queued job, then joins it and closes the files.
 * - Signals reach the program: the thread is created with every signal blocked but those a
 *   fault raises synchronously (as lifecycle.start_without_signals does for Python threads).
 * - fork: the child has no thread. A Writer in a process other than the one that made it is
 *   inert, as after close(): it writes nothing there (the parent writes its packets; a child
 *   that stops the parent's recording before its own is set up, as the control server's fork
 *   hook may, leaves them in ch.full, never writing them into the parent's files a second
 *   time) and never touches its mutex. Freed there, it closes the inherited copies of its
 *   files and releases its buffers (the list of jobs alive is only touched with the GIL, so
 *   the forking thread left it consistent), never touching the mutex the parent's thread may
 *   have held. The child's recording makes a Writer of its own (Recording._setup_process).
 * - Interpreter exit: stop (atexit) drains and closes. A Writer never closed leaves a thread
 *   that touches no Python object, only memory it holds a Py_buffer on, which is never freed
 *   before the thread is joined (dealloc joins first), so finalization cannot pull a buffer
 *   from under it.
 *
 * Linux (setup.py builds this file there only): pthreads, writev, ftruncate, CLOEXEC.
 */
#define PY_SSIZE_T_CLEAN
#include "_speedups.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define BATCH_IOV 512 /* packets per writev: consumer.py's _IOV_MAX (Linux allows 1024) */

enum { JOB_PACKET, JOB_META };
enum { PENDING, WRITTEN, LOST };
enum { FAIL_NONE, FAIL_OPEN, FAIL_WRITE, FAIL_META_OPEN, FAIL_META_WRITE };
static const char *fail_names[] = {"", "open", "write", "metadata-open", "metadata-write"};

struct Stream;

typedef struct Job {
    struct Job *next;                /* queue, then done list: under the mutex */
    struct Job *all_prev, *all_next; /* packets alive: with the GIL only */
    int kind, write, status;
    struct Stream *stream;           /* packets */
    const char *data;                /* what to write */
    size_t size;
    Py_buffer view;                  /* packets: the sub-buffer (GIL to take and release) */
    PyObject *entry;                 /* packets: the (buf, events, seq) handed over */
    long long events;
    unsigned long long discarded;    /* packets: events_discarded of the packet context */
    char *path;                      /* metadata: the file appended to (owned) */
    char *text;                      /* metadata: a copy of the text (owned) */
} Job;

typedef struct Stream {
    long long id;      /* the channel's instance_id: stream_<id> */
    int fd;            /* the thread's; -1 before the first write */
    int opened;        /* ever opened (atomic): ch.fd = -2 says the stream exists */
    off_t size;        /* bytes of whole packets in the file (the thread's) */
    Job *done_head, *done_tail; /* under the mutex */
} Stream;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t work;   /* jobs queued, or stopping */
    pthread_cond_t idle;   /* jobs done */
    pthread_t thread;
    int started;           /* the thread exists (in the process that made it) */
    int closed;            /* close() done (GIL) */
    pid_t pid;             /* the process that made it */
    /* under the mutex */
    Job *queue_head, *queue_tail;
    unsigned long long queued, done;
    int stopping;
    int paused;            /* pause(True): nothing written until pause(False) (tests) */
    long long delay_ns;    /* slow_down(ns): each batch waits this long first (tests) */
    int fail_kind, fail_errno, fail_taken;
    char *fail_path;
    /* the thread's */
    int failed;
    /* with the GIL */
    long long budget_ns;   /* how long firing threads may still wait: see await_written */
    long long budget_at;   /* when it was last topped up (CLOCK_MONOTONIC ns) */
    long long waited_ns;   /* how long they waited in all */
    Stream **streams;
    Py_ssize_t nstreams, cap;
    Job *alive;
    char *dir;
    Py_ssize_t off_size, off_discarded;
    PyObject *s_full, *s_free, *s_popleft, *s_append, *s_written, *s_disk, *s_fd, *s_iid;
    PyObject *s_rec, *s_lost;
} Writer;

/* --- the thread ------------------------------------------------------------------------ */

static void set_failed(Writer *w, int kind, int err, const char *path)
{
    w->failed = 1;
    pthread_mutex_lock(&w->mu);
    if (w->fail_kind == FAIL_NONE) {
        w->fail_kind = kind;
        w->fail_errno = err;
        w->fail_path = path ? strdup(path) : NULL; /* NULL on ENOMEM: reported without */
    }
    pthread_mutex_unlock(&w->mu);
}

static uint64_t get_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

/* Append a metadata text: open(path, "a") then write, as Recording._write_metadata does. */
static void write_meta(Writer *w, Job *j)
{
    if (w->failed || !j->write) {
        j->status = LOST;
        return;
    }
    int fd = open(j->path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0666);
    if (fd < 0) {
        set_failed(w, FAIL_META_OPEN, errno, j->path);
        j->status = LOST;
        return;
    }
    size_t done = 0;
    while (done < j->size) {
        ssize_t n = write(fd, j->data + done, j->size - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            set_failed(w, FAIL_META_WRITE, n < 0 ? errno : EIO, NULL);
            break;
        }
        done += (size_t)n;
    }
    close(fd);
    j->status = done == j->size ? WRITTEN : LOST;
}

/* Write jobs[0..n) (consecutive packets of one stream, each to be written) with as few
 * writev calls as possible; mark each written (whole) or lost. */
static void write_packets(Writer *w, Stream *s, Job **jobs, int n)
{
    size_t total = 0;
    for (int i = 0; i < n; i++)
        total += jobs[i]->size;
    size_t done = 0;
    if (s->fd < 0) {
        char path[PATH_MAX];
        int len = snprintf(path, sizeof path, "%s/stream_%lld", w->dir, s->id);
        if (len < 0 || (size_t)len >= sizeof path) {
            set_failed(w, FAIL_OPEN, ENAMETOOLONG, w->dir);
            goto account;
        }
        s->fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (s->fd < 0) {
            set_failed(w, FAIL_OPEN, errno, path);
            goto account;
        }
        __atomic_store_n(&s->opened, 1, __ATOMIC_RELEASE);
    }
    while (done < total) {
        struct iovec iov[BATCH_IOV];
        int k = 0;
        size_t skip = done;
        for (int i = 0; i < n; i++) {
            if (skip >= jobs[i]->size) {
                skip -= jobs[i]->size;
                continue;
            }
            iov[k].iov_base = (void *)(jobs[i]->data + skip);
            iov[k].iov_len = jobs[i]->size - skip;
            skip = 0;
            k++;
        }
        ssize_t got = writev(s->fd, iov, k);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            set_failed(w, FAIL_WRITE, got < 0 ? errno : EIO, NULL);
            break;
        }
        done += (size_t)got;
    }
account:;
    /* Only packets written whole count; a partial one is cut away, and every one after it
     * is lost too (consumer.py's _write_packets). */
    size_t kept = 0;
    int whole = 1;
    for (int i = 0; i < n; i++) {
        whole = whole && kept + jobs[i]->size <= done;
        if (whole)
            kept += jobs[i]->size;
        jobs[i]->status = whole ? WRITTEN : LOST;
    }
    if (kept != done && s->fd >= 0)
        (void)!ftruncate(s->fd, s->size + (off_t)kept);
    s->size += (off_t)kept;
}

/* Give jobs [from, to) of a batch back, in order: packets to their stream's done list (reap
 * takes them from there), metadata freed. Called after each write, not once per batch: a
 * batch can be dozens of packets when the thread got no CPU for a while, and the firing
 * thread can reuse a sub-buffer as soon as its own packet is written. */
static void publish(Writer *w, Job *from, Job *to)
{
    if (from == to)
        return;
    pthread_mutex_lock(&w->mu);
    Job *next;
    for (Job *j = from; j != to; j = next) {
        next = j->next;
        j->next = NULL;
        if (j->kind == JOB_META) { /* nothing to give back: freed here */
            free(j->path);
            free(j->text);
            free(j);
        } else if (j->stream->done_tail) {
            j->stream->done_tail->next = j;
            j->stream->done_tail = j;
        } else {
            j->stream->done_head = j->stream->done_tail = j;
        }
        w->done++;
    }
    pthread_cond_broadcast(&w->idle);
    pthread_mutex_unlock(&w->mu);
}

/* Write a batch in order, giving each run of jobs back as soon as it is written. */
static void process(Writer *w, Job *batch)
{
    Job *group[BATCH_IOV];
    int n = 0;
    Job *unpublished = batch;
    for (Job *j = batch; j != NULL; j = j->next) {
        if (n && (j->kind != JOB_PACKET || j->stream != group[0]->stream || !j->write ||
                  n == BATCH_IOV)) {
            write_packets(w, group[0]->stream, group, n);
            n = 0;
            publish(w, unpublished, j); /* j->next is still intact: j is not given back */
            unpublished = j;
        }
        if (j->kind == JOB_META)
            write_meta(w, j);
        else if (w->failed || !j->write)
            j->status = LOST;
        else
            group[n++] = j;
    }
    if (n)
        write_packets(w, group[0]->stream, group, n);
    publish(w, unpublished, NULL);
}

static void *run(void *arg)
{
    Writer *w = (Writer *)arg;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while ((w->queue_head == NULL || w->paused) && !w->stopping)
            pthread_cond_wait(&w->work, &w->mu);
        Job *batch = w->queue_head;
        if (batch == NULL)
            break; /* stopping, and everything queued is done */
        w->queue_head = w->queue_tail = NULL;
        long long delay = w->delay_ns;
        pthread_mutex_unlock(&w->mu);
        if (delay > 0) {
            struct timespec ts = {delay / 1000000000LL, delay % 1000000000LL};
            while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
                ;
        }
        process(w, batch);
        pthread_mutex_lock(&w->mu);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* --- the Python side (GIL held) -------------------------------------------------------- */

/* Whether w is inert here: closed, or made by another process (a fork child has no thread;
 * the writer and its files are the parent's). */
static int inert(Writer *w) { return w->closed || w->pid != getpid(); }

static Stream *find_stream(Writer *w, long long id)
{
    for (Py_ssize_t i = 0; i < w->nstreams; i++)
        if (w->streams[i]->id == id)
            return w->streams[i];
    return NULL;
}

static Stream *new_stream(Writer *w, long long id)
{
    if (w->nstreams == w->cap) {
        Py_ssize_t cap = w->cap ? w->cap * 2 : 16;
        Stream **grown = PyMem_Realloc(w->streams, (size_t)cap * sizeof(Stream *));
        if (grown == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        w->streams = grown;
        w->cap = cap;
    }
    Stream *s = PyMem_Calloc(1, sizeof(Stream));
    if (s == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    s->id = id;
    s->fd = -1;
    w->streams[w->nstreams++] = s;
    return s;
}

static void enqueue(Writer *w, Job *j)
{
    pthread_mutex_lock(&w->mu);
    if (w->queue_tail)
        w->queue_tail->next = j;
    else
        w->queue_head = j;
    w->queue_tail = j;
    w->queued++;
    pthread_cond_signal(&w->work);
    pthread_mutex_unlock(&w->mu);
}

/* Free a packet job that is no longer queued nor in the thread's hands. */
static void drop_job(Writer *w, Job *j)
{
    if (j->all_prev)
        j->all_prev->all_next = j->all_next;
    else
        w->alive = j->all_next;
    if (j->all_next)
        j->all_next->all_prev = j->all_prev;
    PyBuffer_Release(&j->view);
    Py_XDECREF(j->entry);
    PyMem_Free(j);
}

static long long instance_id(Writer *w, PyObject *ch)
{
    PyObject *v = PyObject_GetAttr(ch, w->s_iid);
    if (v == NULL)
        return -1;
    long long id = PyLong_AsLongLong(v);
    Py_DECREF(v);
    if (id < 0 && !PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "negative instance_id");
    return id;
}

PyDoc_STRVAR(hand_over_doc,
"hand_over(ch, entry, write)\n\n"
"Hand the closed packet entry = (buf, events, seq) of channel ch to the thread: append entry\n"
"to ch.full and queue it (write false: count it as lost without writing it). On an error\n"
"nothing was done. After close(), entry is only appended to ch.full.");

static PyObject *hand_over(Writer *w, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyTuple_CheckExact(args[1]) || PyTuple_GET_SIZE(args[1]) != 3) {
        PyErr_SetString(PyExc_TypeError, "hand_over(ch, (buf, events, seq), write)");
        return NULL;
    }
    PyObject *ch = args[0], *entry = args[1];
    int write = PyObject_IsTrue(args[2]);
    if (write < 0)
        return NULL;
    PyObject *full = PyObject_GetAttr(ch, w->s_full);
    if (full == NULL)
        return NULL;
    if (inert(w)) { /* after stop: kept, like a packet the pure consumer never writes */
        PyObject *r = PyObject_CallMethodOneArg(full, w->s_append, entry);
        Py_DECREF(full);
        return r;
    }
    long long events = PyLong_AsLongLong(PyTuple_GET_ITEM(entry, 1));
    long long id = events == -1 && PyErr_Occurred() ? -1 : instance_id(w, ch);
    if (id < 0) {
        Py_DECREF(full);
        return NULL;
    }
    Job *j = PyMem_Calloc(1, sizeof(Job));
    if (j == NULL) {
        Py_DECREF(full);
        return PyErr_NoMemory();
    }
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(entry, 0), &j->view, PyBUF_SIMPLE) < 0) {
        PyMem_Free(j);
        Py_DECREF(full);
        return NULL;
    }
    /* The packet's size, from its context (consumer.py: packet_size bits / 8). */
    const unsigned char *base = (const unsigned char *)j->view.buf;
    Py_ssize_t len = j->view.len;
    uint64_t size = 0;
    if (w->off_size + 8 <= len && w->off_discarded + 8 <= len) {
        size = get_u64(base + w->off_size) / 8;
        j->discarded = get_u64(base + w->off_discarded);
    }
    if (size == 0 || size > (uint64_t)len) {
        PyBuffer_Release(&j->view);
        PyMem_Free(j);
        Py_DECREF(full);
        PyErr_SetString(PyExc_ValueError, "hand_over: the packet's size is not within its buffer");
        return NULL;
    }
    Stream *s = find_stream(w, id);
    if (s == NULL && (s = new_stream(w, id)) == NULL) {
        PyBuffer_Release(&j->view);
        PyMem_Free(j);
        Py_DECREF(full);
        return NULL;
    }
    /* The last step that can fail: after it, nothing can. */
    PyObject *r = PyObject_CallMethodOneArg(full, w->s_append, entry);
    Py_DECREF(full);
    if (r == NULL) {
        PyBuffer_Release(&j->view);
        PyMem_Free(j);
        return NULL;
    }
    Py_DECREF(r);
    j->kind = JOB_PACKET;
    j->write = write;
    j->stream = s;
    j->data = (const char *)base;
    j->size = (size_t)size;
    j->events = events;
    Py_INCREF(entry);
    j->entry = entry;
    j->all_next = w->alive;
    if (w->alive)
        w->alive->all_prev = j;
    w->alive = j;
    enqueue(w, j);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(metadata_doc,
"metadata(path, text, write)\n\n"
"Queue text (bytes) to be appended to the file path (bytes), in order with the packets\n"
"(write false: not written).");

static PyObject *metadata(Writer *w, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyBytes_Check(args[0]) || !PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "metadata(path: bytes, text: bytes, write)");
        return NULL;
    }
    int write = PyObject_IsTrue(args[2]);
    if (write < 0)
        return NULL;
    if (inert(w))
        Py_RETURN_NONE;
    Job *j = calloc(1, sizeof(Job)); /* freed by the thread: malloc, not PyMem */
    Py_ssize_t n = PyBytes_GET_SIZE(args[1]);
    if (j == NULL || (j->path = strdup(PyBytes_AS_STRING(args[0]))) == NULL ||
        (j->text = malloc((size_t)n + 1)) == NULL) {
        if (j)
            free(j->path);
        free(j);
        return PyErr_NoMemory();
    }
    memcpy(j->text, PyBytes_AS_STRING(args[1]), (size_t)n);
    j->kind = JOB_META;
    j->write = write;
    j->data = j->text;
    j->size = (size_t)n;
    enqueue(w, j);
    Py_RETURN_NONE;
}

/* Add n to the int attribute name of obj. */
static int add_to(PyObject *obj, PyObject *name, long long n)
{
    PyObject *old = PyObject_GetAttr(obj, name);
    if (old == NULL)
        return -1;
    PyObject *add = PyLong_FromLongLong(n);
    PyObject *sum = add ? PyNumber_Add(old, add) : NULL;
    Py_DECREF(old);
    Py_XDECREF(add);
    if (sum == NULL)
        return -1;
    int r = PyObject_SetAttr(obj, name, sum);
    Py_DECREF(sum);
    return r;
}

PyDoc_STRVAR(reap_doc,
"reap(ch) -> int\n\n"
"Take back channel ch's packets the thread is done with, in order: each one's entry is\n"
"popped from ch.full and its buffer appended to ch.free; its events are counted in\n"
"ch.written (ch.on_disk_discarded from its packet) or, lost, in ch.rec._lost. How many.");

static PyObject *reap(Writer *w, PyObject *ch)
{
    if (w->pid != getpid())
        return PyLong_FromLong(0);
    long long id = instance_id(w, ch);
    if (id < 0)
        return NULL;
    Stream *s = find_stream(w, id);
    if (s == NULL)
        return PyLong_FromLong(0);
    pthread_mutex_lock(&w->mu);
    Job *list = s->done_head;
    s->done_head = s->done_tail = NULL;
    pthread_mutex_unlock(&w->mu);
    if (list == NULL)
        return PyLong_FromLong(0);

    PyObject *full = PyObject_GetAttr(ch, w->s_full);
    PyObject *freed = full ? PyObject_GetAttr(ch, w->s_free) : NULL;
    long long written = 0, lost = 0, count = 0;
    unsigned long long disk = 0;
    int have_disk = 0, bad = 0;
    Job *next;
    for (Job *j = list; j != NULL; j = next) {
        next = j->next;
        count++;
        if (j->status == WRITTEN) {
            written += j->events;
            disk = j->discarded;
            have_disk = 1;
        } else {
            lost += j->events;
        }
        /* Its entry is ch.full's first (hand_over appends, only this pops): checked. */
        PyObject *first = (!bad && freed) ? PySequence_GetItem(full, 0) : NULL;
        if (first == j->entry) {
            PyObject *r = PyObject_CallMethodNoArgs(full, w->s_popleft);
            Py_XDECREF(r);
            r = r ? PyObject_CallMethodOneArg(freed, w->s_append,
                                              PyTuple_GET_ITEM(j->entry, 0)) : NULL;
            Py_XDECREF(r);
            if (r == NULL)
                bad = 1;
        } else {
            bad = 1;
        }
        Py_XDECREF(first);
        PyErr_Clear(); /* reported below as one error */
        drop_job(w, j);
    }
    Py_XDECREF(full);
    Py_XDECREF(freed);

    int failed = 0;
    PyObject *v;
    if (written)
        failed |= add_to(ch, w->s_written, written) < 0;
    if (have_disk && (v = PyLong_FromUnsignedLongLong(disk)) != NULL) {
        failed |= PyObject_SetAttr(ch, w->s_disk, v) < 0;
        Py_DECREF(v);
    }
    if (__atomic_load_n(&s->opened, __ATOMIC_ACQUIRE) && (v = PyObject_GetAttr(ch, w->s_fd))) {
        if (PyLong_Check(v) && PyLong_AsLong(v) == -1) {
            PyObject *two = PyLong_FromLong(-2); /* consumer.py: the stream exists */
            failed |= two == NULL || PyObject_SetAttr(ch, w->s_fd, two) < 0;
            Py_XDECREF(two);
        }
        Py_DECREF(v);
    }
    if (lost) {
        PyObject *rec = PyObject_GetAttr(ch, w->s_rec);
        failed |= rec == NULL || add_to(rec, w->s_lost, lost) < 0;
        Py_XDECREF(rec);
    }
    if (failed || bad) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_RuntimeError,
                            "tracemark's native consumer lost track of a channel's packets");
        return NULL;
    }
    return PyLong_FromLongLong(count);
}

PyDoc_STRVAR(take_error_doc,
"take_error() -> None | (what, errno, path)\n\n"
"The first failure of the thread, once: what is 'open', 'write', 'metadata-open' or\n"
"'metadata-write'; path is the file (bytes) or None.");

static PyObject *take_error(Writer *w, PyObject *unused)
{
    if (w->pid != getpid())
        Py_RETURN_NONE;
    pthread_mutex_lock(&w->mu);
    int kind = w->fail_taken ? FAIL_NONE : w->fail_kind, err = w->fail_errno;
    char *path = w->fail_path;
    if (kind != FAIL_NONE)
        w->fail_taken = 1;
    pthread_mutex_unlock(&w->mu);
    if (kind == FAIL_NONE)
        Py_RETURN_NONE;
    if (path == NULL)
        return Py_BuildValue("(siO)", fail_names[kind], err, Py_None);
    return Py_BuildValue("(siy)", fail_names[kind], err, path);
}

/* Wait (GIL released) until the thread has done every job queued before the call. */
static void wait_done(Writer *w)
{
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&w->mu);
    unsigned long long target = w->queued;
    while (w->done < target)
        pthread_cond_wait(&w->idle, &w->mu);
    pthread_mutex_unlock(&w->mu);
    Py_END_ALLOW_THREADS
}

PyDoc_STRVAR(wait_doc, "wait()\n\nReturn once the thread has done every job queued so far.");

static PyObject *wait_(Writer *w, PyObject *unused)
{
    if (w->started && !inert(w))
        wait_done(w);
    Py_RETURN_NONE;
}

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

PyDoc_STRVAR(await_written_doc,
"await_written(ch) -> bool\n\n"
"Wait, the GIL held, until the thread gives back one of channel ch's packets (True) or the\n"
"wait budget runs out (False): a firing thread whose sub-buffers are all in the consumer's\n"
"hands waits for one rather than discard its events. The budget: at most\n"
"WAIT_MAX_NS at once, and 1/WAIT_SHARE of the time since the writer was made, in all.");

/* The firing threads' wait budget (LTTng's blocking-timeout, bounded both ways): a consumer
 * that lost the CPU for a few milliseconds costs no events, and a disk slower than the
 * program costs it at most WAIT_MAX_NS at once and 1/WAIT_SHARE of its time (5%); beyond
 * that, events are discarded (counted) as before. */
#define WAIT_MAX_NS 20000000LL
#define WAIT_SHARE 20

static PyObject *await_written(Writer *w, PyObject *ch)
{
    if (!w->started || inert(w))
        Py_RETURN_FALSE;
    long long id = instance_id(w, ch);
    if (id < 0)
        return NULL;
    Stream *s = find_stream(w, id);
    if (s == NULL)
        Py_RETURN_FALSE;
    long long start = now_ns();
    w->budget_ns += (start - w->budget_at) / WAIT_SHARE;
    if (w->budget_ns > WAIT_MAX_NS)
        w->budget_ns = WAIT_MAX_NS;
    w->budget_at = start;
    if (w->budget_ns <= 0)
        Py_RETURN_FALSE;
    long long end = start + w->budget_ns;
    struct timespec deadline = {end / 1000000000LL, end % 1000000000LL};
    int got;
    /* The GIL stays held: the thread never needs it, and no other Python thread can stop
     * the recording or touch this channel while it is between two packets. Signals wait
     * for the eval loop, as during any C call. */
    pthread_mutex_lock(&w->mu);
    while (!(got = s->done_head != NULL) && !w->stopping)
        if (pthread_cond_timedwait(&w->idle, &w->mu, &deadline) == ETIMEDOUT) {
            got = s->done_head != NULL;
            break;
        }
    pthread_mutex_unlock(&w->mu);
    long long spent = now_ns() - start;
    w->budget_ns -= spent;
    w->waited_ns += spent;
    return PyBool_FromLong(got);
}

static void stop_thread(Writer *w)
{
    if (!w->started)
        return;
    pthread_mutex_lock(&w->mu);
    w->stopping = 1;
    pthread_cond_signal(&w->work);
    pthread_mutex_unlock(&w->mu);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(w->thread, NULL);
    Py_END_ALLOW_THREADS
    w->started = 0;
}

static void close_streams(Writer *w)
{
    for (Py_ssize_t i = 0; i < w->nstreams; i++) {
        Stream *s = w->streams[i];
        if (s->fd >= 0)
            close(s->fd);
        s->fd = -1;
    }
}

PyDoc_STRVAR(close_doc,
"close()\n\nLet the thread write everything queued, end it, close the stream files. Packets\n"
"handed over afterwards are only appended to ch.full. Idempotent.");

static PyObject *close_(Writer *w, PyObject *unused)
{
    if (!inert(w)) {
        w->closed = 1;
        stop_thread(w);
        close_streams(w);
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(pause_doc,
"pause(flag)\n\nTrue: the thread writes nothing until pause(False) (or close()), as with a\n"
"disk that stalls (for tests). Waiting for it meanwhile (wait()) waits for the unpause.");

static PyObject *pause_(Writer *w, PyObject *flag)
{
    int on = PyObject_IsTrue(flag);
    if (on < 0)
        return NULL;
    if (inert(w))
        Py_RETURN_NONE;
    pthread_mutex_lock(&w->mu);
    w->paused = on;
    pthread_cond_signal(&w->work);
    pthread_mutex_unlock(&w->mu);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(slow_down_doc,
"slow_down(ns)\n\nThe thread waits ns before writing each batch, as a slow disk would (for\n"
"tests); 0: no more.");

static PyObject *slow_down(Writer *w, PyObject *arg)
{
    long long ns = PyLong_AsLongLong(arg);
    if (ns == -1 && PyErr_Occurred())
        return NULL;
    if (inert(w))
        Py_RETURN_NONE;
    pthread_mutex_lock(&w->mu);
    w->delay_ns = ns;
    pthread_mutex_unlock(&w->mu);
    Py_RETURN_NONE;
}

static PyObject *get_waited(Writer *w, void *unused)
{
    return PyLong_FromLongLong(w->waited_ns);
}

static PyObject *get_pending(Writer *w, void *unused)
{
    if (w->pid != getpid())
        return PyLong_FromLong(0);
    pthread_mutex_lock(&w->mu);
    unsigned long long n = w->queued - w->done;
    pthread_mutex_unlock(&w->mu);
    return PyLong_FromUnsignedLongLong(n);
}

static PyObject *get_alive(Writer *w, void *unused)
{
    Py_ssize_t n = 0;
    for (Job *j = w->alive; j != NULL; j = j->all_next)
        n++;
    return PyLong_FromSsize_t(n);
}

static PyObject *writer_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    const char *dir;
    Py_ssize_t dirlen, off_size, off_discarded;
    if (!PyArg_ParseTuple(args, "y#nn:Writer", &dir, &dirlen, &off_size, &off_discarded))
        return NULL;
    if (off_size < 0 || off_discarded < 0 || (size_t)dirlen != strlen(dir)) {
        PyErr_SetString(PyExc_ValueError, "Writer(directory, off_size, off_discarded)");
        return NULL;
    }
    Writer *w = (Writer *)type->tp_alloc(type, 0);
    if (w == NULL)
        return NULL;
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->work, NULL);
    pthread_condattr_t monotonic; /* await_written's deadline: CLOCK_MONOTONIC */
    pthread_condattr_init(&monotonic);
    pthread_condattr_setclock(&monotonic, CLOCK_MONOTONIC);
    pthread_cond_init(&w->idle, &monotonic);
    pthread_condattr_destroy(&monotonic);
    w->budget_ns = WAIT_MAX_NS;
    w->budget_at = now_ns();
    w->pid = getpid();
    w->off_size = off_size;
    w->off_discarded = off_discarded;
    if ((w->dir = PyMem_Malloc((size_t)dirlen + 1)) == NULL) {
        Py_DECREF(w);
        return PyErr_NoMemory();
    }
    memcpy(w->dir, dir, (size_t)dirlen + 1);
    const char *names[] = {"full", "free", "popleft", "append", "written",
                           "on_disk_discarded", "fd", "instance_id", "rec", "_lost"};
    PyObject **slots[] = {&w->s_full, &w->s_free, &w->s_popleft, &w->s_append, &w->s_written,
                          &w->s_disk, &w->s_fd, &w->s_iid, &w->s_rec, &w->s_lost};
    for (int i = 0; i < 10; i++) {
        if ((*slots[i] = PyUnicode_InternFromString(names[i])) == NULL) {
            Py_DECREF(w);
            return NULL;
        }
    }
    /* Every signal blocked in the thread (it inherits the creator's mask), but the ones a
     * fault of its own raises: see tracemark.tracers.recording.lifecycle. */
    sigset_t all, old;
    sigfillset(&all);
    int faults[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS};
    for (size_t i = 0; i < sizeof faults / sizeof *faults; i++)
        sigdelset(&all, faults[i]);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int err = pthread_create(&w->thread, NULL, run, w);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (err != 0) {
        Py_DECREF(w);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    w->started = 1;
    return (PyObject *)w;
}

static void writer_dealloc(Writer *w)
{
    PyTypeObject *tp = Py_TYPE(w);
    if (w->pid == getpid()) {
        stop_thread(w); /* the thread must not read a buffer released below */
        close_streams(w);
        pthread_mutex_lock(&w->mu);
        pthread_mutex_unlock(&w->mu);
        pthread_cond_destroy(&w->work);
        pthread_cond_destroy(&w->idle);
        pthread_mutex_destroy(&w->mu);
        free(w->fail_path);
        for (Py_ssize_t i = 0; i < w->nstreams; i++)
            PyMem_Free(w->streams[i]);
    } else {
        /* A fork child: no thread here, and its mutex may have been held by the parent's
         * thread at the fork: untouched (its queue and done lists are leaked; the packet jobs
         * are all in the GIL-only list below, released). The files are the inherited copies. */
        for (Py_ssize_t i = 0; i < w->nstreams; i++) {
            int fd = __atomic_load_n(&w->streams[i]->opened, __ATOMIC_ACQUIRE)
                         ? w->streams[i]->fd : -1;
            if (fd >= 0)
                close(fd);
        }
    }
    while (w->alive)
        drop_job(w, w->alive);
    PyMem_Free(w->streams);
    PyMem_Free(w->dir);
    Py_XDECREF(w->s_full);
    Py_XDECREF(w->s_free);
    Py_XDECREF(w->s_popleft);
    Py_XDECREF(w->s_append);
    Py_XDECREF(w->s_written);
    Py_XDECREF(w->s_disk);
    Py_XDECREF(w->s_fd);
    Py_XDECREF(w->s_iid);
    Py_XDECREF(w->s_rec);
    Py_XDECREF(w->s_lost);
    tp->tp_free((PyObject *)w);
    Py_DECREF(tp);
}

static PyMethodDef writer_methods[] = {
    {"hand_over", (PyCFunction)(void (*)(void))hand_over, METH_FASTCALL, hand_over_doc},
    {"metadata", (PyCFunction)(void (*)(void))metadata, METH_FASTCALL, metadata_doc},
    {"reap", (PyCFunction)reap, METH_O, reap_doc},
    {"take_error", (PyCFunction)take_error, METH_NOARGS, take_error_doc},
    {"wait", (PyCFunction)wait_, METH_NOARGS, wait_doc},
    {"close", (PyCFunction)close_, METH_NOARGS, close_doc},
    {"pause", (PyCFunction)pause_, METH_O, pause_doc},
    {"slow_down", (PyCFunction)slow_down, METH_O, slow_down_doc},
    {"await_written", (PyCFunction)await_written, METH_O, await_written_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef writer_getset[] = {
    {"pending", (getter)get_pending, NULL, "jobs queued and not done yet", NULL},
    {"alive", (getter)get_alive, NULL, "packets handed over and not reaped yet", NULL},
    {"waited_ns", (getter)get_waited, NULL,
     "how long firing threads waited in await_written, in all (ns)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot writer_slots[] = {
    {Py_tp_new, writer_new},
    {Py_tp_dealloc, writer_dealloc},
    {Py_tp_methods, writer_methods},
    {Py_tp_getset, writer_getset},
    {Py_tp_doc, "Writer(directory: bytes, off_size, off_discarded): the native consumer "
                "(see tracemark/_speedups_consumer.c)."},
    {0, NULL},
};

static PyType_Spec writer_spec = {
    .name = "tracemark._speedups.Writer",
    .basicsize = sizeof(Writer),
    .flags = Py_TPFLAGS_DEFAULT,
    .slots = writer_slots,
};

int tm_consumer_exec(PyObject *module)
{
    PyObject *type = PyType_FromModuleAndSpec(module, &writer_spec, NULL);
    if (type == NULL)
        return -1;
    int r = PyModule_AddObjectRef(module, "Writer", type);
    Py_DECREF(type);
    return r;
}
