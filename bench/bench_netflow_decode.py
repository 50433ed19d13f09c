"""Decode throughput of the netflow receiver's parser vs the `netflow` PyPI package, on the same datagrams.

Run: ``.venv/bin/python bench/bench_netflow_decode.py``. For NetFlow v9 and
IPFIX export packets of 30 flows each (softflowd's IPv4 template), measures
flows decoded per CPU second on one core:

- ``tapio``: the sans-IO collector (`Collector.feed`): headers, sequence
  numbers, templates, every record decoded to a tuple of its values;
- ``tapio_totals``: the same plus the per-protocol totals the receiver
  keeps (what a metrics-only pipeline costs);
- ``tapio_records``: the same plus writing every flow's OTLP log record with
  all built-in attributes and parsing the batch once (what a logs pipeline
  costs);
- ``netflow_pypi``: ``netflow.parse_packet`` (0.12.2) with its template
  cache, reading each flow's decoded fields.

Prints one JSON line; ``ratio`` is tapio's decoding rate / netflow_pypi's
(goal: at least 10), ``ratio_totals`` and ``ratio_with_records`` the same
for the other two.
"""

from __future__ import annotations

import json
import time

from tapio.pdata import Batch, Signal
from tapio.receivers.netflow import _encode as enc
from tapio.receivers.netflow._parser import Collector, DataRecords
from tapio.receivers.netflow._records import Output, RecordBuilder
from tapio.testing.netflow import blast

RECORDS = 30


def cpu(fn, *args) -> float:
    t0 = time.process_time()
    fn(*args)
    return time.process_time() - t0


def run_decode(datagrams: list[bytes]) -> None:
    collector = Collector()
    for data in datagrams:
        collector.feed(data, "192.0.2.1", 0.0)


def run_tapio(datagrams: list[bytes], records: bool) -> None:
    collector = Collector()
    builder = RecordBuilder(Output())
    totals: dict = {}
    resource, scope = enc.resource([("service.name", "tapio")]), enc.scope("tapio.netflow", "0.1.0")
    items: list[bytes] = []
    for data in datagrams:
        now = time.time_ns()
        for ev in collector.feed(data, "192.0.2.1", now / 1e9):
            if type(ev) is DataRecords and not ev.template.options:
                compiled = builder.compiled(ev.template)
                compiled.tally(ev.rows, totals, builder.rate(ev), ev.session.sampling)
                if records:
                    compiled.encode(ev.rows, items, builder.context(ev, now, enc.observed_time_field(now), compiled))
        if records and len(items) >= 2048:
            Batch.from_bytes(Signal.LOGS, enc.logs_request(resource, scope, items))
            items = []


def run_pypi(datagrams: list[bytes]) -> None:
    import netflow

    templates = {"netflow": {}, "ipfix": {}}
    for data in datagrams:
        packet = netflow.parse_packet(data, templates)
        for flow in packet.flows:
            flow.data  # the decoded fields, as its users read them


def main() -> None:
    out: dict = {"bench": "netflow_decode", "records_per_datagram": RECORDS}
    for name, version in (("v9", 9), ("ipfix", 10)):
        datagrams = blast(version, 4000, records=RECORDS)
        flows = len(datagrams) * RECORDS
        run_tapio(datagrams[:200], True)  # warm up (imports, compiled builders)
        tapio = min(cpu(run_decode, datagrams) for _ in range(3))
        totals = min(cpu(run_tapio, datagrams, False) for _ in range(3))
        tapio_records = min(cpu(run_tapio, datagrams, True) for _ in range(3))
        small = datagrams[:400]  # the pure-Python parser is slow: fewer datagrams, same rate
        pypi = min(cpu(run_pypi, small) for _ in range(3)) * len(datagrams) / len(small)
        out[name] = {
            "tapio_flows_per_s": round(flows / tapio),
            "tapio_totals_flows_per_s": round(flows / totals),
            "tapio_records_flows_per_s": round(flows / tapio_records),
            "netflow_pypi_flows_per_s": round(flows / pypi),
            "ratio": round(pypi / tapio, 1),
            "ratio_totals": round(pypi / totals, 1),
            "ratio_with_records": round(pypi / tapio_records, 1),
            "tapio_us_per_flow": round(tapio / flows * 1e6, 3),
            "tapio_totals_us_per_flow": round(totals / flows * 1e6, 3),
            "tapio_records_us_per_flow": round(tapio_records / flows * 1e6, 3),
            "netflow_pypi_us_per_flow": round(pypi / flows * 1e6, 3),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
