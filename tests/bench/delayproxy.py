#!/usr/bin/env python3
"""Benchmark-only TCP proxy that adds latency, like a longer link.

    delayproxy.py --listen HOST:PORT --upstream HOST:PORT --rtt-ms N

Every byte is forwarded N/2 ms after it arrived, in each direction, so each
request/response exchange (and each TCP round trip through the proxy) takes
N ms longer, while throughput is unchanged: data is a pipeline, not a queue
of sleeps. Per direction at most MAX_BUFFERED bytes wait in the proxy; past
that it stops reading, so TCP flow control reaches the sender.

tests/bench/lazy-pull.sh --latency-ms N runs it inside the registry's
network namespace on the registry's address, in front of the registry
(moved to 127.0.0.1), so every client (containerd, Shoal, stargz) crosses the
shaped link and then the delay. Python standard library only.
"""

import argparse
import asyncio
import sys

CHUNK = 64 << 10
MAX_BUFFERED = 16 << 20


async def pipe(reader, writer, delay):
    """Copies reader to writer, each chunk `delay` seconds after it came."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue(maxsize=MAX_BUFFERED // CHUNK)

    async def read_side():
        try:
            while True:
                data = await reader.read(CHUNK)
                await queue.put((loop.time() + delay, data))
                if not data:
                    return
        except (ConnectionError, OSError):
            await queue.put((loop.time(), b""))

    async def write_side():
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    r = asyncio.ensure_future(read_side())
    try:
        await write_side()
    finally:
        r.cancel()


async def handle(client_r, client_w, upstream, delay):
    host, port = upstream
    try:
        up_r, up_w = await asyncio.open_connection(host, port)
    except OSError as e:
        print(f"delayproxy: upstream {host}:{port}: {e}", file=sys.stderr)
        client_w.close()
        return
    tasks = [
        asyncio.ensure_future(pipe(client_r, up_w, delay)),
        asyncio.ensure_future(pipe(up_r, client_w, delay)),
    ]
    try:
        # Either side ending (or failing) ends the connection once the
        # other direction has nothing left in flight.
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for w in (up_w, client_w):
            w.close()


def hostport(s):
    host, _, port = s.rpartition(":")
    return host, int(port)


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, type=hostport)
    ap.add_argument("--upstream", required=True, type=hostport)
    ap.add_argument("--rtt-ms", required=True, type=float)
    a = ap.parse_args()
    delay = a.rtt_ms / 2000.0
    server = await asyncio.start_server(
        lambda r, w: handle(r, w, a.upstream, delay), a.listen[0], a.listen[1]
    )
    print(
        f"delayproxy: {a.listen[0]}:{a.listen[1]} -> {a.upstream[0]}:{a.upstream[1]}, "
        f"+{a.rtt_ms:g} ms per round trip",
        file=sys.stderr,
        flush=True,
    )
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
