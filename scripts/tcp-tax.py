#!/usr/bin/env python3
"""What a program attached to loopback costs other TCP traffic over it.

Runs a TCP exchange over 127.0.0.1 inside the current network namespace,
client and server in this one process, and prints the CPU time it took
(user + system, this process's threads; on loopback the kernel's receive
work runs in the sender's context, so it is counted too):

  rr:   64-byte request, 64-byte answer, one at a time (TCP_NODELAY):
        CPU microseconds per round trip
  bulk: 64 KiB writes, one way: CPU microseconds per MiB

Usage: tcp-tax.py SECONDS   (see docs/benchmarks.md for the A/B loop)
"""
import os
import socket
import sys
import threading
import time

SECS = float(sys.argv[1]) if len(sys.argv) > 1 else 3.0


def cpu():
    t = os.times()
    return t.user + t.system


def run(mode):
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def serve():
        c, _ = srv.accept()
        buf = bytearray(1 << 20)
        while True:
            k = c.recv_into(buf, 64 if mode == "rr" else len(buf))
            if k == 0:
                break
            if mode == "rr":
                c.sendall(buf[:k])
        c.close()

    t = threading.Thread(target=serve)
    t.start()
    c = socket.create_connection(("127.0.0.1", port))
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    start, cpu0, n = time.time(), cpu(), 0
    if mode == "rr":
        msg = b"y" * 64
        while time.time() - start < SECS:
            for _ in range(100):
                c.sendall(msg)
                got = 0
                while got < 64:
                    got += len(c.recv(64 - got))
            n += 100
    else:
        chunk = b"x" * 65536
        while time.time() - start < SECS:
            for _ in range(64):
                c.sendall(chunk)
            n += 64 * 65536
    c.shutdown(socket.SHUT_WR)
    t.join()
    used = cpu() - cpu0
    c.close()
    srv.close()
    if mode == "rr":
        return used / n * 1e6
    return used / (n / (1 << 20)) * 1e6


if __name__ == "__main__":
    print(f"rr {run('rr'):.1f} us/round-trip  bulk {run('bulk'):.0f} us/MiB")
