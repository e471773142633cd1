#!/usr/bin/env python3
"""Regenerates the tarstream seeds: small layer tars in the three formats a
layer uses (ustar, GNU with long names, PAX with xattrs and a global
header). Run from this directory."""
import io, os, tarfile

tarfile.RECORDSIZE = 512  # no padding to 10 KiB
HERE = os.path.dirname(os.path.abspath(__file__))


def layer(fmt, long=False, xattrs=False, glob=False):
    buf = io.BytesIO()
    kw = {"format": fmt}
    if glob:
        kw["pax_headers"] = {"comment": "shoal fuzz seed"}
    with tarfile.open(fileobj=buf, mode="w", **kw) as t:
        def add(name, kind, data=b"", **attrs):
            i = tarfile.TarInfo(name)
            i.type = kind
            i.size = len(data)
            i.mtime = 1700000000
            i.mode = attrs.pop("mode", 0o644)
            for k, v in attrs.items():
                setattr(i, k, v)
            t.addfile(i, io.BytesIO(data) if data else None)
        add("./", tarfile.DIRTYPE, mode=0o755)
        add("./etc/", tarfile.DIRTYPE, mode=0o755)
        add("./etc/hostname", tarfile.REGTYPE, b"shoal\n")
        add("./etc/link", tarfile.SYMTYPE, linkname="hostname")
        add("./etc/hard", tarfile.LNKTYPE, linkname="./etc/hostname")
        add("./dev-null", tarfile.CHRTYPE, devmajor=1, devminor=3)
        add("./fifo", tarfile.FIFOTYPE)
        add("./etc/.wh.removed", tarfile.REGTYPE)
        if long:
            n = "./" + "d" * 60 + "/" + "f" * 120
            add(n, tarfile.REGTYPE, b"x" * 700, uname="user", gname="group")
            add("./l", tarfile.SYMTYPE, linkname="t" * 150)
        if xattrs:
            i = tarfile.TarInfo("./bin")
            i.type = tarfile.REGTYPE
            i.mode = 0o4755
            i.pax_headers = {"SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
                             "SCHILY.xattr.user.k": "v", "mtime": "1700000000.5"}
            data = b"#!/bin/sh\n"
            i.size = len(data)
            t.addfile(i, io.BytesIO(data))
    return buf.getvalue()


d = os.path.join(HERE, "tarstream")
os.makedirs(d, exist_ok=True)
for name, data in [
    ("ustar", layer(tarfile.USTAR_FORMAT)),
    ("gnu-long", layer(tarfile.GNU_FORMAT, long=True)),
    ("pax-xattrs", layer(tarfile.PAX_FORMAT, long=True, xattrs=True, glob=True)),
]:
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)
