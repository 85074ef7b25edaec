"""The C reader's corpus and fuzzer, shared by tests/test_creader.py and its AddressSanitizer
run (a subprocess that imports this file alone: ``python creader_fuzz.py N SEED``).

``make_corpus(dir)`` records a small trace with every field kind (``any`` values of every
tag, asyncio tasks, several threads, several packets a stream). ``fuzz(trace, n, seed)``
decodes ``n`` mutated packets of it (bit flips, truncations, garbage, extreme lengths, ids,
timestamps and counts) with the C reader and, unless ``c_only``, with the Python reader,
and checks both give the same events and the same error (message and offset).
"""

from __future__ import annotations

import asyncio
import copy
import os
import random
import struct
import sys
import threading

EXTREMES = [0, 1, 7, 8, 255, 2**15, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]


def make_corpus(path: str) -> None:
    """A small trace of every field kind at ``path``."""
    import tracemark
    from tracemark.markers.fields import ReprText

    m = tracemark.marker("fz.m", i=int, s=str, f=float, b=bytes, t=bool, o=object)
    a = tracemark.marker("fz.any", v="any")
    e = tracemark.marker("fz.empty")
    values = [None, True, False, 0, -1, 2**62, 1.5, float("nan"), "", "é€", b"\0x", ReprText("<R>")]

    def work(k: int) -> None:
        for i in range(150):
            m(i * k, f"s{i}é", i / 3, bytes([i % 256]) * (i % 5), bool(i % 2), None)
            a(values[i % len(values)])
            if i % 7 == 0:
                e()

    async def tasks() -> None:
        async def one(k: int) -> None:
            for i in range(20):
                m(i, f"t{k}", 0.5, b"", True, k)
                await asyncio.sleep(0)

        await asyncio.gather(*(asyncio.create_task(one(k), name=f"task-{k}") for k in range(3)))

    with tracemark.record(path, "fz.*", subbuffer_size=4096, subbuffers=64):
        t = threading.Thread(target=work, args=(3,), name="other")
        t.start()
        work(1)
        t.join()
        asyncio.run(tasks())


def outcome(stream, p, data: bytes, wanted, use_c: bool):
    """(events as comparable text, error text) of one packet by one reader."""
    from tracemark.ctf import TraceError

    sub = stream.sub
    layout = sub.c_layout
    if not use_c:
        sub.c_layout = None
    events = []
    error = None
    try:
        for ev in stream._decode_matching(p, data, wanted):
            fields = [(k, type(v).__name__, repr(v)) for k, v in ev.fields.items()]
            events.append((type(ev).__name__, repr(ev._replace(fields=None)), fields))
    except TraceError as exc:
        error = str(exc)
    finally:
        sub.c_layout = layout
    return events, error


def mutate(rng: random.Random, p, data: bytes):
    """A mutated copy of packet ``p`` (its object and its bytes)."""
    q = copy.copy(p)
    blob = bytearray(data)
    body = range(p.start, max(p.start + 1, len(blob)))
    for _ in range(rng.choice([1, 1, 2, 3])):
        how = rng.choice(["flip", "flip", "cut", "u32", "u64", "garbage", "count", "ts_end"])
        if how == "flip" and blob:
            for _ in range(rng.randint(1, 8)):
                blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        elif how == "cut":
            cut = rng.randint(p.start, len(blob))
            del blob[cut:]
            q.content_end = cut
        elif how == "u32" and len(blob) >= 4:  # an event id or a length, huge or odd
            at = rng.choice(body) if len(blob) > body.start + 4 else 0
            at = min(at, len(blob) - 4)
            struct.pack_into("<I", blob, at, rng.choice(EXTREMES) % 2**32)
        elif how == "u64" and len(blob) >= 8:  # a timestamp or an int
            at = min(rng.choice(body), len(blob) - 8)
            struct.pack_into("<Q", blob, at, rng.choice(EXTREMES) % 2**64)
        elif how == "garbage" and blob:
            at = rng.randrange(len(blob))
            n = rng.randint(1, 64)
            blob[at : at + n] = bytes(rng.randrange(256) for _ in range(n))[: len(blob) - at]
        elif how == "count":
            q.count = rng.choice([0, p.count - 1, p.count + 1, 2**32 - 1])
        elif how == "ts_end":
            q.ts_end = rng.choice([p.ts_begin, p.ts_end - 1, 0 if p.ts_begin == 0 else p.ts_end])
    q.content_end = min(q.content_end, len(blob))
    return q, bytes(blob)


def packets(trace_path: str):
    """Every (stream, packet, bytes) of the trace, read with the C reader on."""
    from tracemark.ctf import read_trace

    trace = read_trace(trace_path)
    assert all(s.sub.c_layout is not None for s in trace.streams), "the C reader is not on"
    return [(s, p, s.read_packet(p)) for s in trace.streams for p in s.packet_list()]


def fuzz(trace_path: str, n: int, seed: int, c_only: bool = False) -> int:
    """Decode ``n`` mutated packets; return how many of them the readers found damaged."""
    rng = random.Random(seed)
    corpus = packets(trace_path)
    ids = sorted(corpus[0][0].sub.meta.events)
    damaged = 0
    for i in range(n):
        stream, p, data = rng.choice(corpus)
        q, blob = mutate(rng, p, data)
        wanted = (
            None if rng.random() < 0.7 else frozenset(rng.sample(ids, rng.randint(0, len(ids))))
        )
        got = outcome(stream, q, blob, wanted, True)
        if not c_only:
            want = outcome(stream, q, blob, wanted, False)
            assert got == want, (i, seed, got[1], want[1])
        damaged += got[1] is not None
    return damaged


if __name__ == "__main__":  # the AddressSanitizer run: N SEED TRACE_DIR
    count, seed_, where = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    if not os.path.exists(where):
        make_corpus(where)
    print(fuzz(where, count, seed_, c_only=False), "damaged")
