#!/usr/bin/env python3
"""Opens CLIENTS WebSocket signaling clients to a server on 127.0.0.1 and
prints how much the server's resident memory grew: memory per client.

    signaling-clients.py callisto|peerjs CLIENTS PORT SERVER_PID

Callisto clients join rooms of 8 (each is sent a welcome and the others'
peer-joined); PeerJS clients register an id (each is sent OPEN). Neither
reads afterwards: what the server sent waits in the kernel, not in it.
Raw sockets, so that nothing beyond Python is needed.
"""
import base64
import json
import os
import socket
import struct
import sys
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise SystemExit(f"no VmRSS for pid {pid}")


def masked_text_frame(text):
    data = text.encode()
    mask = os.urandom(4)
    if len(data) < 126:
        head = bytes([0x81, 0x80 | len(data)])
    else:
        head = bytes([0x81, 0x80 | 126]) + struct.pack(">H", len(data))
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def main():
    kind, clients, port, pid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    before = rss_kib(pid)
    sockets = []
    for i in range(clients):
        s = socket.create_connection(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        path = "/ws" if kind == "callisto" else f"/peerjs?key=peerjs&id=client{i}&token=t{i}"
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        status = s.recv(4096).split(b"\r\n")[0]
        if b" 101 " not in status:
            raise SystemExit(f"{kind}: client {i} not upgraded: {status!r}")
        if kind == "callisto":
            s.sendall(masked_text_frame(json.dumps({"type": "join", "room": f"room{i // 8}", "name": f"n{i}"})))
        sockets.append(s)
    time.sleep(3)
    after = rss_kib(pid)
    print(f"{kind:9} {clients} clients  RSS {before / 1024:6.1f} -> {after / 1024:6.1f} MiB  "
          f"{(after - before) / clients:5.1f} KiB per client")


if __name__ == "__main__":
    main()
