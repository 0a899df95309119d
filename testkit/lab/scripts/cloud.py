"""The "cloud" behind the gateway (its own namespace): NTP on UDP 123 and an HTTP API on TCP 8080."""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Api(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"interval": 3}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def ntp(ip: str) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((ip, 123))
    while True:
        _, addr = s.recvfrom(512)
        now = int(time.time()) + 2_208_988_800
        s.sendto(b"\x24\x02" + b"\0" * 38 + struct.pack("!II", now, 0), addr)


if __name__ == "__main__":
    ip = sys.argv[1]
    threading.Thread(target=ntp, args=(ip,), daemon=True).start()
    server = ThreadingHTTPServer((ip, 8080), Api)
    print("ready", flush=True)
    server.serve_forever()
