"""The recording side of ``tracemark record``: what runs inside each recorded Python process.

``tracemark record`` passes its settings down in the environment, which every child process
inherits, and puts :file:`_site/sitecustomize.py` first on ``PYTHONPATH``, which calls
:func:`start` at interpreter start-up.

=========================  ===============================================================
``TRACEMARK_RECORD_DIR``   the trace directory; nothing is recorded when it is unset
``TRACEMARK_RECORD_EVENTS`` comma-separated globs of the markers to record (default ``*``)
``TRACEMARK_RECORD_MODE``  ``discard`` (default) or ``overwrite``
``TRACEMARK_RECORD_BUFFER`` bytes of buffer per thread (split into sub-buffers), optional
``TRACEMARK_RECORD_PROBES`` dynamic probe specs, one per line, installed before the program
                           (deferred: a module not imported yet is probed when it is)
``TRACEMARK_RECORD_OTEL``  an OTLP/HTTP endpoint: the same markers are also sent there,
                           live, by the OpenTelemetry bridge (:mod:`tracemark.tracers.otel`)
=========================  ===============================================================

With ``TRACEMARK_RECORD_OTEL``, each process writes what its bridge sent, failed or dropped
to ``DIR/.tracemark-otel-PID`` (JSON) when the bridge stops (at exit; in a
``multiprocessing`` fork worker, from its finalizer): ``record``'s summary adds them up.
The file is first written when the bridge starts (and in each forked child), saying it has
not stopped: the summary names a process that ended without stopping it (``os._exit()``, a
crash, a kill), whose queued spans were never sent. A
process whose Python lacks OpenTelemetry says so in one line and is recorded all the same.

Each process that installs probes keeps the state of each in ``DIR/.tracemark-probes-PID``
(JSON, rewritten when a deferred probe is installed or fails, so a process that ends by
``os._exit`` has said it too): ``record``'s summary lists the probes no process installed.

Guarantees: :func:`start` records at most once per process (a forked child is the
recorder's business: it carries on into its own sub-trace, and is flushed even when it is a
``multiprocessing`` child that skips atexit); the recording is stopped, and so flushed, at
interpreter exit. Every failure is reported as one line on stderr by the caller
(``sitecustomize``) and the program runs on untraced.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

ENV_DIR = "TRACEMARK_RECORD_DIR"
ENV_EVENTS = "TRACEMARK_RECORD_EVENTS"
ENV_MODE = "TRACEMARK_RECORD_MODE"
ENV_BUFFER = "TRACEMARK_RECORD_BUFFER"
ENV_PROBES = "TRACEMARK_RECORD_PROBES"
ENV_HOME = "TRACEMARK_HOME"
ENV_OTEL = "TRACEMARK_RECORD_OTEL"
OTEL_FILE = ".tracemark-otel-"

#: Sub-buffers per thread channel when ``--buffer`` gives the total size.
SUBBUFFERS = 4
MIN_SUBBUFFER = 4096

recording: Any = None


def settings(environ: dict[str, str] | None = None) -> dict[str, Any] | None:
    """The ``tracemark.record`` arguments the environment asks for, or None."""
    env = os.environ if environ is None else environ
    path = env.get(ENV_DIR)
    if not path:
        return None
    events = [g for g in env.get(ENV_EVENTS, "*").split(",") if g] or ["*"]
    kwargs: dict[str, Any] = {"mode": env.get(ENV_MODE) or "discard"}
    buffer = env.get(ENV_BUFFER)
    if buffer:
        # The recorder wants sub-buffers of at least 4 KiB, in multiples of 8 bytes.
        kwargs["subbuffer_size"] = max(MIN_SUBBUFFER, int(buffer) // SUBBUFFERS // 8 * 8)
        kwargs["subbuffers"] = SUBBUFFERS
    probes = [p for p in env.get(ENV_PROBES, "").split("\n") if p.strip()]
    return {"path": path, "events": events, "kwargs": kwargs, "probes": probes}


def start() -> None:
    global recording
    if recording is not None:
        return
    config = settings()
    if config is None:
        return
    import tracemark
    from tracemark.tracers.recording import lifecycle

    # No SIGTERM handler in the recorded processes: one that SIGTERM kills leaves its ring
    # files, and tracemark record recovers them (see lifecycle.leave_sigterm_to_recovery).
    lifecycle.leave_sigterm_to_recovery = True
    events = config["events"]
    recording = tracemark.record(
        config["path"], events if len(events) > 1 else events[0], **config["kwargs"]
    )
    atexit.register(_stop)
    endpoint = os.environ.get(ENV_OTEL)
    if endpoint:
        _start_otel(endpoint, events, config["path"])
    if config["probes"]:
        _install_probes(config["probes"])


def _start_otel(endpoint: str, events: list[str], directory: str) -> None:
    """Send the recorded markers to ``endpoint`` too; a failure is one line on stderr and
    the recording goes on."""
    import sys

    try:
        from tracemark.tracers import otel

        bridge = otel.bridge(events, endpoint=endpoint)
    except Exception as exc:  # ImportError (no OpenTelemetry here) included
        sys.stderr.write(
            f"tracemark: this process ({os.getpid()}) is recorded but not sent to "
            f"OpenTelemetry: {exc}\n"
        )
        return

    def write(stats: dict | None = None) -> None:
        record = {"pid": os.getpid(), "endpoint": endpoint, "stopped": stats is not None}
        _write_json(directory, OTEL_FILE, {**record, **(stats or {})})

    # Written now, and in each forked child, as "not stopped": a process that then ends
    # without stopping its bridge (os._exit(), a crash, a kill) loses what its queue held,
    # and record's summary can say which process did.
    write()
    os.register_at_fork(after_in_child=write)
    bridge.on_stop = write


def _write_json(directory: str, prefix: str, value: dict) -> None:
    """``DIR/PREFIXPID``, written whole (a temporary file renamed); never raises."""
    import json

    path = os.path.join(directory, f"{prefix}{os.getpid()}")
    try:
        with open(path + ".tmp", "w") as f:
            json.dump(value, f)
        os.replace(path + ".tmp", path)
    except OSError:
        pass  # the summary then knows less; the program must not notice


PROBES_FILE = ".tracemark-probes-"


def _install_probes(specs: list[str]) -> None:
    """Install each ``--probe`` spec, deferred when its module is not imported yet; one that
    fails here is one line on stderr, and recording goes on. The state of all of them is
    written for the summary (see the module docstring)."""
    import sys

    from tracemark import probes
    from tracemark.probes import deferred

    handles: list[tuple[str, Any]] = []
    for spec in specs:
        try:
            handles.append((spec, probes.install_spec(spec, defer=True)))
        except Exception as exc:
            handles.append((spec, str(exc)))
            sys.stderr.write(f"tracemark: --probe {spec} not installed in {os.getpid()}: {exc}\n")

    def write(_: object = None) -> None:
        _write_probe_states(handles)

    deferred.add_listener(write)
    write()


def _write_probe_states(handles: list[tuple[str, Any]]) -> None:
    """``DIR/.tracemark-probes-PID``: each spec with ``state`` and ``why`` (never raises)."""
    states = []
    for spec, handle in handles:
        if isinstance(handle, str):
            states.append({"spec": spec, "state": "failed", "why": handle})
        elif hasattr(handle, "why"):  # a DeferredProbe
            states.append({"spec": spec, "state": handle.state, "why": handle.why})
        else:
            states.append({"spec": spec, "state": "installed", "why": ""})
    directory = os.environ.get(ENV_DIR)
    if directory:
        _write_json(directory, PROBES_FILE, {"pid": os.getpid(), "probes": states})


def _stop() -> None:
    global recording
    rec, recording = recording, None
    if rec is not None:
        try:
            rec.stop()
        except Exception as exc:  # the trace may be incomplete; say so, do not raise at exit
            import sys

            sys.stderr.write(f"tracemark: stopping the recording failed: {exc}\n")
