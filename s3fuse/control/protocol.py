"""Control-socket framing, pure: u32be length + msgpack map (docs/CONTROL.md).

Request:  {"v": 1, "op": str, "args": {...}}
Response: {"v": 1, "ok": True, "result": ...} or {"v": 1, "ok": False, "errno": int, "error": str}
"""

from __future__ import annotations

import os
import re
import struct

import msgpack

VERSION = 1
MAX_FRAME = 1 << 20
_LEN = struct.Struct(">I")


class ProtocolError(Exception):
    """A frame that cannot be decoded; the connection should be closed."""


def encode(message: dict) -> bytes:
    body = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise ProtocolError("frame too large")
    return _LEN.pack(len(body)) + body


def frame_length(prefix: bytes) -> int:
    (length,) = _LEN.unpack(prefix)
    if length > MAX_FRAME:
        raise ProtocolError(f"declared frame length {length} exceeds {MAX_FRAME}")
    return length


def decode(body: bytes) -> dict:
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"undecodable frame: {exc.__class__.__name__}") from None
    if not isinstance(message, dict):
        raise ProtocolError("frame is not a map")
    return message


def request(op: str, **args) -> dict:
    return {"v": VERSION, "op": op, "args": args}


def ok(result=None) -> dict:
    return {"v": VERSION, "ok": True, "result": result}


def error(err: int, message: str) -> dict:
    return {"v": VERSION, "ok": False, "errno": err, "error": message}


def runtime_dir(uid: int | None = None) -> str:
    uid = os.getuid() if uid is None else uid
    if uid == 0:
        return "/run/s3fuse"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/s3fuse-{uid}"
    return os.path.join(base, "s3fuse") if "XDG_RUNTIME_DIR" in os.environ else base


def mount_name(mountpoint: str) -> str:
    """A file-name-safe name for an absolute mount point (like systemd-escape --path)."""
    path = os.path.realpath(mountpoint).strip("/") or "-"
    return re.sub(r"[^A-Za-z0-9_.-]", lambda m: "\\x%02x" % ord(m.group()) if m.group() != "/" else "-", path)


def socket_path(mountpoint: str, uid: int | None = None) -> str:
    return os.path.join(runtime_dir(uid), mount_name(mountpoint) + ".sock")
