#!/usr/bin/env python3
"""Test-only HTTP/1.1 reverse proxy that injects faults into registry blob GETs.

    faultproxy.py --listen 127.0.0.1:PORT --upstream 127.0.0.1:REGPORT

Forwards every request to the upstream registry and passes the answer back
unchanged: status (200, 206, 307, 404, ...), headers (Content-Range,
Location, ...) and body. Range headers go upstream as they came.

Faults apply only to blob GETs (`/v2/<name>/blobs/sha256:<hex>`) unless
`all=1` is set. Switch them at runtime (GET or POST, query parameters):

    /__fault?mode=MODE[&count=N][&ranged=1][&digest=sha256:HEX][&min_len=N]
             [&skip=N][&stall=SECONDS][&all=1]

  mode     ok        pass through
           flip      flip one byte (XOR 0xff) in the middle of the body
           truncate  send the full Content-Length, then half the body, close
           stall     accept the request, send nothing for `stall` seconds
                     (default 10), then close
           down      close the connection at once, no answer at all
  count    how many matching requests get the fault; -1 (default) = always.
           When it runs out the mode returns to ok.
  ranged   1: only requests with a Range header match
  digest   only blobs whose path contains this digest match
  min_len  only requests whose Range asks for at least this many bytes
           (a Range-less request always passes this filter)
  skip     let this many matching requests through before faulting
  all      1: every proxied request matches (manifests, HEAD, ...), not
           only blob GETs; the digest/ranged/min_len filters still apply

Every /__fault call replaces the whole fault setting. The answer is the new
setting as JSON.

    /__stats          JSON: requests by applied action, blob GETs, the fault
                      setting, and the last 50 proxied requests
    /__reset          zero the counters (the fault setting is kept)

Python standard library only. Logs one line per request to stderr.
"""

import argparse
import http.client
import http.server
import json
import re
import socket
import sys
import threading
import time
import urllib.parse

BLOB_GET = re.compile(r"^/v2/.+/blobs/sha256:[0-9a-f]{64}$")
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
}
MODES = ("ok", "flip", "truncate", "stall", "down")
COPY_CHUNK = 64 << 10


def range_len(value):
    """Bytes a `Range: bytes=a-b` header asks for (None if not that form)."""
    m = re.fullmatch(r"\s*bytes=(\d+)-(\d+)\s*", value or "")
    if not m:
        return None
    return int(m.group(2)) - int(m.group(1)) + 1


class State:
    """The fault setting and counters, shared by all handler threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.fault = self.default_fault()
        self.reset()

    @staticmethod
    def default_fault():
        return {
            "mode": "ok",
            "count": -1,
            "ranged": False,
            "digest": "",
            "min_len": 0,
            "skip": 0,
            "stall": 10.0,
            "all": False,
        }

    def reset(self):
        with self.lock:
            self.by_action = {m: 0 for m in MODES}
            self.requests = 0
            self.blob_gets = 0
            self.recent = []

    def set_fault(self, query):
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
        f = self.default_fault()
        mode = q.get("mode", "ok")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {', '.join(MODES)}")
        f["mode"] = mode
        f["count"] = int(q.get("count", "-1"))
        f["ranged"] = q.get("ranged", "0") in ("1", "true", "yes")
        f["digest"] = q.get("digest", "")
        f["min_len"] = int(q.get("min_len", "0"))
        f["skip"] = int(q.get("skip", "0"))
        f["stall"] = float(q.get("stall", "10"))
        f["all"] = q.get("all", "0") in ("1", "true", "yes")
        with self.lock:
            self.fault = f
            return dict(f)

    def decide(self, method, path, range_header):
        """The action for one proxied request, counted."""
        blob_get = method == "GET" and BLOB_GET.match(path.split("?", 1)[0]) is not None
        with self.lock:
            self.requests += 1
            if blob_get:
                self.blob_gets += 1
            f = self.fault
            action = "ok"
            matches = (
                f["mode"] != "ok"
                and f["count"] != 0
                and (blob_get or f["all"])
                and (not f["ranged"] or range_header is not None)
                and (not f["digest"] or f["digest"] in path)
            )
            if matches and f["min_len"] > 0 and range_header is not None:
                n = range_len(range_header)
                matches = n is not None and n >= f["min_len"]
            if matches:
                if f["skip"] > 0:
                    f["skip"] -= 1
                else:
                    action = f["mode"]
                    if f["count"] > 0:
                        f["count"] -= 1
                        if f["count"] == 0:
                            f["mode"] = "ok"
            self.by_action[action] += 1
            self.recent.append(
                {
                    "t": round(time.time(), 3),
                    "method": method,
                    "path": path,
                    "range": range_header,
                    "action": action,
                }
            )
            del self.recent[:-50]
            return action, dict(f)

    def stats(self):
        with self.lock:
            return {
                "requests": self.requests,
                "blob_gets": self.blob_gets,
                "by_action": dict(self.by_action),
                "fault": dict(self.fault),
                "recent": list(self.recent),
            }


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "faultproxy"
    state = None  # set in main
    upstream = None  # (host, port)

    # Quiet the default per-request log; we write our own line.
    def log_message(self, fmt, *args):
        pass

    def log(self, msg):
        sys.stderr.write(f"{time.strftime('%H:%M:%S')} {msg}\n")
        sys.stderr.flush()

    def do_GET(self):
        self.handle_any()

    def do_HEAD(self):
        self.handle_any()

    def do_POST(self):
        self.handle_any()

    def do_PUT(self):
        self.handle_any()

    def do_PATCH(self):
        self.handle_any()

    def do_DELETE(self):
        self.handle_any()

    def send_json(self, status, obj):
        body = (json.dumps(obj, indent=1) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def drain_request_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def handle_any(self):
        path, _, query = self.path.partition("?")
        if path == "/__fault":
            self.drain_request_body()
            try:
                f = self.state.set_fault(query)
            except ValueError as e:
                return self.send_json(400, {"error": str(e)})
            self.log(f"control: fault set to {json.dumps(f)}")
            return self.send_json(200, f)
        if path == "/__stats":
            self.drain_request_body()
            return self.send_json(200, self.state.stats())
        if path == "/__reset":
            self.drain_request_body()
            self.state.reset()
            return self.send_json(200, {"reset": True})
        self.proxy()

    def hard_close(self):
        """Drop the client connection now, without an answer."""
        self.close_connection = True
        try:
            self.wfile.flush()
        except OSError:
            pass
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def proxy(self):
        body = self.drain_request_body()
        rng = self.headers.get("Range")
        action, fault = self.state.decide(self.command, self.path, rng)
        tag = f"{self.command} {self.path} range={rng or '-'} action={action}"
        if action == "down":
            self.log(f"{tag}: closing without an answer")
            return self.hard_close()
        if action == "stall":
            self.log(f"{tag}: stalling {fault['stall']}s")
            time.sleep(fault["stall"])
            return self.hard_close()

        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() not in HOP_BY_HOP and k.lower() != "host"
        }
        headers["Host"] = f"{self.upstream[0]}:{self.upstream[1]}"
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
        except OSError as e:
            conn.close()
            self.log(f"{tag}: upstream failed: {e}")
            return self.send_json(502, {"error": f"upstream: {e}"})
        try:
            self.relay(resp, action, tag)
        except (BrokenPipeError, ConnectionResetError) as e:
            self.log(f"{tag}: client went away: {e}")
            self.close_connection = True
        finally:
            conn.close()

    def relay(self, resp, action, tag):
        out_headers = [
            (k, v)
            for k, v in resp.getheaders()
            if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"
        ]
        no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        length = resp.getheader("Content-Length")
        need_all = action in ("flip", "truncate") or length is None
        if no_body:
            data = None
        elif need_all:
            data = bytearray(resp.read())
        else:
            data = None

        self.send_response(resp.status, resp.reason)
        for k, v in out_headers:
            self.send_header(k, v)
        if no_body:
            if length is not None:
                self.send_header("Content-Length", length)
            self.end_headers()
            self.log(f"{tag}: {resp.status} (no body)")
            return

        if data is not None:
            note = ""
            if action == "flip" and len(data) > 0:
                i = len(data) // 2
                data[i] ^= 0xFF
                note = f" flipped byte {i} of {len(data)}"
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if action == "truncate":
                half = len(data) // 2
                self.wfile.write(data[:half])
                self.log(f"{tag}: {resp.status} sent {half} of {len(data)} bytes, closing")
                return self.hard_close()
            self.wfile.write(data)
            self.log(f"{tag}: {resp.status} {len(data)} bytes{note}")
            return

        # Pass-through: stream the body.
        total = int(length)
        self.send_header("Content-Length", str(total))
        self.end_headers()
        sent = 0
        while sent < total:
            chunk = resp.read(min(COPY_CHUNK, total - sent))
            if not chunk:
                break
            self.wfile.write(chunk)
            sent += len(chunk)
        if sent < total:
            self.log(f"{tag}: {resp.status} upstream ended after {sent} of {total} bytes")
            return self.hard_close()
        self.log(f"{tag}: {resp.status} {sent} bytes")


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--listen", required=True, help="HOST:PORT to listen on")
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the registry")
    a = ap.parse_args()
    lh, lp = a.listen.rsplit(":", 1)
    uh, up = a.upstream.rsplit(":", 1)
    Handler.state = State()
    Handler.upstream = (uh, int(up))
    srv = Server((lh, int(lp)), Handler)
    sys.stderr.write(f"faultproxy: listening on {lh}:{lp}, upstream {uh}:{up}\n")
    sys.stderr.flush()
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()


if __name__ == "__main__":
    main()
