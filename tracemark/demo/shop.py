"""A small, realistic program with markers in it: an order-processing shop.

Orders arrive on a queue; worker threads price them (with a cache in front of a slow
"database"), charge a payment service that sometimes declines (and is retried), and hand the
paid ones to an invoice printer running in a child process (``multiprocessing``, spawn).
Nothing here knows who is listening: the markers cost one call each when no tracer is
connected. Run it with a printer attached, or record it, parent and child, into one trace::

    python -m tracemark.demo --print
    tracemark record -- python -m tracemark.demo
"""

from __future__ import annotations

import argparse
import multiprocessing
import queue
import random
import sys
import threading
import time

import tracemark

order_received = tracemark.marker("shop.order.received", "order=%d items=%d customer=%s")
order_done = tracemark.marker("shop.order.done", order=int, total=float, worker=str)
order_failed = tracemark.marker("shop.order.failed", "order=%d reason=%s")
cache_hit = tracemark.marker("shop.cache.hit", "sku=%s")
cache_miss = tracemark.marker("shop.cache.miss", "sku=%s")
db_query = tracemark.marker("shop.db.query", table=str, rows=int, ms=float)
payment = tracemark.marker("shop.payment", "order=%d amount=%.2f ok=%s")
invoice_printed = tracemark.marker("shop.invoice.printed", order=int, lines=int, bytes=int)
# Spans: begin/end marker pairs (tracemark spans, tracemark export show them as time).
order_span = tracemark.span("shop.order", order=int, customer=str)
db_span = tracemark.span("shop.db", table=str)

CUSTOMERS = ["ada", "grace", "linus", "barbara", "ken", "margaret", "dennis", "guido"]
SKUS = [f"sku-{n:03d}" for n in range(40)]


class PriceCache:
    """An LRU-less cache in front of the price table: misses go to the 'database'."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.prices: dict[str, float] = {}
        self.lock = threading.Lock()

    def price(self, sku: str) -> float:
        with self.lock:
            if sku in self.prices:
                cache_hit(sku)
                return self.prices[sku]
        cache_miss(sku)
        value = self.db.lookup_price(sku)
        with self.lock:
            self.prices[sku] = value
        return value


class Database:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def lookup_price(self, sku: str) -> float:
        db_span.begin("prices")
        start = time.perf_counter()
        time.sleep(self.rng.uniform(0.0002, 0.001))
        price = round(3 + int(sku[4:]) * 2.25, 2)
        db_query("prices", 1, (time.perf_counter() - start) * 1e3)
        db_span.end()
        return price


class PaymentDeclined(Exception):
    pass


def charge(order_id: int, amount: float, rng: random.Random) -> None:
    ok = rng.random() > 0.08
    payment(order_id, amount, "yes" if ok else "no")
    if not ok:
        raise PaymentDeclined("card declined")


def invoice_printer(invoices: multiprocessing.Queue) -> None:
    """The child process: renders each paid order's invoice until it receives None."""
    while (invoice := invoices.get()) is not None:
        order_id, customer, lines = invoice
        text = "\n".join(
            [f"INVOICE {order_id:06d} for {customer}"]
            + [f"{sku:<12}{price:>10.2f}" for sku, price in lines]
            + [f"{'total':<12}{sum(p for _, p in lines):>10.2f}"]
        )
        invoice_printed(order_id, len(lines), len(text.encode()))


def worker(
    orders: queue.Queue,
    cache: PriceCache,
    seed: int,
    results: list,
    invoices: multiprocessing.Queue | None = None,
) -> None:
    rng = random.Random(seed)
    name = threading.current_thread().name
    while (order := orders.get()) is not None:
        order_id, customer, skus = order
        with order_span(order_id, customer):
            process(order_id, customer, skus, cache, rng, name, results, invoices)


def process(
    order_id: int,
    customer: str,
    skus: list[str],
    cache: PriceCache,
    rng: random.Random,
    name: str,
    results: list,
    invoices: multiprocessing.Queue | None,
) -> None:
    """One order: price its items, charge the customer (up to 3 attempts), invoice it."""
    order_received(order_id, len(skus), customer)
    prices = [(sku, cache.price(sku)) for sku in skus]
    total = sum(price for _, price in prices)
    for attempt in range(1, 4):
        try:
            charge(order_id, total, rng)
        except PaymentDeclined as exc:
            tracemark.mark("shop.payment.retry", "order=%d attempt=%d", order_id, attempt)
            reason = str(exc)
            continue
        order_done(order_id, total, name)
        results.append(total)
        if invoices is not None:
            invoices.put((order_id, customer, prices))
        break
    else:
        order_failed(order_id, reason)


def run(orders: int = 300, workers: int = 4, seed: int = 1, invoices: bool = True) -> float:
    """Process ``orders`` orders on ``workers`` threads; returns the revenue.

    With ``invoices``, paid orders go to an invoice printer in a child process (spawned, so
    it starts clean whatever the platform's default is).
    """
    rng = random.Random(seed)
    cache = PriceCache(Database(random.Random(seed + 1)))
    q: queue.Queue = queue.Queue()
    results: list[float] = []
    printer = invoice_queue = None
    if invoices:
        ctx = multiprocessing.get_context("spawn")
        invoice_queue = ctx.Queue()
        printer = ctx.Process(target=invoice_printer, args=(invoice_queue,), name="invoices")
        printer.start()
    threads = [
        threading.Thread(
            target=worker,
            args=(q, cache, seed + 10 + i, results, invoice_queue),
            name=f"worker-{i}",
        )
        for i in range(workers)
    ]
    for t in threads:
        t.start()
    for order_id in range(1, orders + 1):
        skus = rng.sample(SKUS, rng.randint(1, 5))
        q.put((order_id, rng.choice(CUSTOMERS), skus))
    for _ in threads:
        q.put(None)
    for t in threads:
        t.join()
    if printer is not None and invoice_queue is not None:
        invoice_queue.put(None)
        printer.join()
    return sum(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tracemark.demo", description=__doc__)
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--no-invoices",
        dest="invoices",
        action="store_false",
        help="do not start the invoice printer child process",
    )
    parser.add_argument(
        "--print",
        dest="pattern",
        nargs="?",
        const="shop.*",
        default=None,
        help="print events of markers matching PATTERN (default shop.*) to stdout",
    )
    args = parser.parse_args(argv)
    conn = None
    if args.pattern:
        conn = tracemark.connect(args.pattern, tracemark.Printer(sys.stdout))
    revenue = run(args.orders, args.workers, args.seed, args.invoices)
    if conn is not None:
        tracemark.disconnect(conn)
    print(f"processed {args.orders} orders on {args.workers} threads: revenue {revenue:.2f}")
    return 0
