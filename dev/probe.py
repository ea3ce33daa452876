#!/usr/bin/env python3
"""Readiness probes that speak the servers' own protocols, so `dev/services wait` needs no
client tools: `probe.py kafka HOST:PORT` sends a Kafka Metadata request and succeeds when a
broker answers with at least one broker; `probe.py cassandra HOST:PORT` runs
`SELECT release_version FROM system.local` over CQL native protocol v4 and prints the version;
`probe.py jaeger HOST:PORT` asks Jaeger's query API for its services."""

import json
import socket
import urllib.request
import struct
import sys


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed")
        data += chunk
    return data


def kafka(host, port):
    client = b"prosody-dev-probe"
    # Metadata v0: api_key 3, version 0, correlation id 1, client id, topics = [] (all topics).
    body = struct.pack(">hhih", 3, 0, 1, len(client)) + client + struct.pack(">i", 0)
    with socket.create_connection((host, port), timeout=3) as sock:
        sock.sendall(struct.pack(">i", len(body)) + body)
        size = struct.unpack(">i", recv_exact(sock, 4))[0]
        reply = recv_exact(sock, size)
    correlation, brokers = struct.unpack(">ii", reply[:8])
    if correlation != 1 or brokers < 1:
        raise RuntimeError(f"metadata answered with {brokers} brokers")
    print(f"kafka ready: {brokers} broker(s)")


def cql_frame(opcode, body, stream=0):
    return struct.pack(">BBhBi", 0x04, 0, stream, opcode, len(body)) + body


def cql_read(sock):
    _version, _flags, _stream, opcode, length = struct.unpack(">BBhBi", recv_exact(sock, 9))
    return opcode, recv_exact(sock, length)


def cassandra(host, port):
    with socket.create_connection((host, port), timeout=3) as sock:
        options = b"CQL_VERSION", b"3.0.0"
        startup = struct.pack(">h", 1) + b"".join(struct.pack(">h", len(s)) + s for s in options)
        sock.sendall(cql_frame(0x01, startup))
        opcode, body = cql_read(sock)
        if opcode != 0x02:  # READY
            raise RuntimeError(f"startup answered opcode {opcode}: {body[:200]!r}")
        query = b"SELECT release_version FROM system.local"
        sock.sendall(cql_frame(0x07, struct.pack(">i", len(query)) + query + struct.pack(">hB", 1, 0), 1))
        opcode, body = cql_read(sock)
        if opcode != 0x08:  # RESULT
            raise RuntimeError(f"query answered opcode {opcode}: {body[:200]!r}")
        kind, flags, columns = struct.unpack(">iii", body[:12])
        pos = 12
        if flags & 0x0004:  # has more pages: paging state
            n = struct.unpack(">i", body[pos:pos + 4])[0]
            pos += 4 + max(n, 0)
        if flags & 0x0001:  # global table spec: keyspace and table names
            for _ in range(2):
                n = struct.unpack(">h", body[pos:pos + 2])[0]
                pos += 2 + n
        for _ in range(columns):  # name and type of each column
            n = struct.unpack(">h", body[pos:pos + 2])[0]
            pos += 2 + n
            pos += 2  # type id (varchar has no parameters)
        rows = struct.unpack(">i", body[pos:pos + 4])[0]
        pos += 4
        if kind != 2 or rows < 1:
            raise RuntimeError("no row in system.local")
        n = struct.unpack(">i", body[pos:pos + 4])[0]
        print(f"cassandra ready: release_version {body[pos + 4:pos + 4 + n].decode()}")


def jaeger(host, port):
    with urllib.request.urlopen(f"http://{host}:{port}/api/services", timeout=3) as reply:
        services = json.load(reply).get("data") or []
    print(f"jaeger ready: {len(services)} service(s) traced")


if __name__ == "__main__":
    what, address = sys.argv[1], sys.argv[2]
    host, port = address.rsplit(":", 1)
    try:
        {"kafka": kafka, "cassandra": cassandra, "jaeger": jaeger}[what](host, int(port))
    except Exception as error:  # noqa: BLE001 - any failure means "not ready yet"
        print(f"{what} not ready: {error}", file=sys.stderr)
        sys.exit(1)
