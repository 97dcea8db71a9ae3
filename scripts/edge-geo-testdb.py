#!/usr/bin/env python3
"""Writes a tiny MaxMind-format country database for sec-edge's geolocation tests.

Usage: edge-geo-testdb.py OUT.mmdb NETWORK=CC [NETWORK=CC ...]
(`CC` = ISO 3166-1 alpha-2; `NETWORK=-` stores a record without a country, i.e.
"unknown"). Needs the PyPI package `mmdb-writer` on PYTHONPATH; the tests install it
under target/ (see crates/sec-edge/tests/geo.rs).
"""
import sys

from mmdb_writer import MMDBWriter
from netaddr import IPSet


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    w = MMDBWriter(
        ip_version=6,
        ipv4_compatible=True,
        database_type="GeoLite2-Country",
        languages=["en"],
        description="sec-edge test data",
    )
    for arg in sys.argv[2:]:
        net, _, cc = arg.partition("=")
        record = {"continent": {"code": "EU"}}
        if cc != "-":
            record["country"] = {"iso_code": cc, "names": {"en": cc}}
        w.insert_network(IPSet([net]), record)
    w.to_db_file(sys.argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
