#!/usr/bin/env python3
"""Regenerates the TOC seeds (toc_footer, toc_blob, toc_json) from the real
eStargz and zstd:chunked blobs in ../../tests/fixtures. Run from this
directory; needs the `zstd` command."""
import gzip, io, json, os, struct, subprocess, tarfile

FIX = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures")
HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def toc_of(blob, kind):
    if kind == "esgz":
        g = blob[-51:]
        off = int(g[16:32], 16)
        comp = blob[off:len(blob) - 51]
        tar = tarfile.open(fileobj=io.BytesIO(gzip.decompress(comp)))
        js = tar.extractfile(tar.getmembers()[0]).read()
        return comp, js, off
    z = blob[-48:]
    off, ln = struct.unpack("<QQ", z[8:24])
    comp = blob[off:off + ln]
    js = subprocess.run(["zstd", "-dc"], input=comp, capture_output=True, check=True).stdout
    return comp, js, off - 8


for f in sorted(os.listdir(FIX)):
    kind = f.rsplit(".", 1)[-1]
    if kind not in ("esgz", "zstd"):
        continue
    blob = open(os.path.join(FIX, f), "rb").read()
    size = struct.pack("<Q", len(blob))
    mode = b"\x01" if kind == "esgz" else b"\x00"
    put("toc_footer", kind, size + blob[-51:])
    comp, js, payload_end = toc_of(blob, kind)
    put("toc_blob", kind, mode + comp)
    put("toc_json", kind, mode + struct.pack("<Q", payload_end) + js)
    # A small TOC in the same shape: the first few entries, chunked file
    # with its chunk entries, and Shoal's startup mark.
    doc = json.loads(js)
    ents = doc["entries"]
    small = {"version": 1, "entries": ents[:12], "startup": {"end": 4096, "files": 1}}
    put("toc_json", kind + "-small", mode + struct.pack("<Q", payload_end)
        + json.dumps(small, separators=(",", ":")).encode())
