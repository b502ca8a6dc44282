"""The session's local S3 server itself: what the whole suite relies on from it."""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from demo.s3server import MAX_VOLUMES


def test_the_server_holds_more_buckets_than_free_disk_would_allow(s3_server: Any) -> None:
    """Each bucket takes a volume of its own; left to weed's default the limit is free disk /
    volume size, and once a CI host's suite had made ~40 buckets every PutObject failed with
    InternalError. The master must report our limit, not the disk-derived one."""
    status_url = f"http://127.0.0.1:{s3_server.ports['master']}/dir/status"
    with urllib.request.urlopen(status_url, timeout=10) as reply:
        topology = json.load(reply)["Topology"]
    assert topology["Max"] == MAX_VOLUMES


def test_a_fresh_bucket_takes_writes_after_many_others(s3_client: Any, make_bucket: Any) -> None:
    """Forty-five buckets in a row (more than ~42, the limit on a host with 42 GiB free) each
    accept an object and give it back."""
    for index in range(45):
        bucket = make_bucket("many")
        s3_client.put_object(Bucket=bucket, Key="k", Body=f"object {index}".encode())
        assert s3_client.get_object(Bucket=bucket, Key="k")["Body"].read() == f"object {index}".encode()


def test_ports_are_chosen_below_the_range_outgoing_connections_draw_from() -> None:
    """A port found free inside the ephemeral range can be taken by any outgoing connection
    before weed binds it (a CI run failed so: "Port allocation failed")."""
    import random

    from demo.s3server import GRPC_OFFSET, _ephemeral_start, _free_port_pair

    taken: set[int] = set()
    rng = random.Random(7)
    ports = [_free_port_pair(taken, rng) for _ in range(10)]
    assert len(set(ports)) == 10 and len(taken) == 20
    assert all(port + GRPC_OFFSET < _ephemeral_start() for port in ports), ports
