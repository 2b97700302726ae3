"""Property and stateful tests (hypothesis): the object format parser, the control protocol
(pure, and a live daemon's socket), and the filesystem against an in-memory model.

Example counts come from a profile: HYPOTHESIS_PROFILE=s3fuse-ci (default, bounded for CI) or
s3fuse-soak (scripts/soak --hypothesis). The profiles are applied per test here, so other
modules' hypothesis settings are untouched.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from s3fuse import format as fmt
from s3fuse.control import protocol

settings.register_profile("s3fuse-ci", max_examples=40, deadline=None, derandomize=False,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                          stateful_step_count=25)
settings.register_profile("s3fuse-soak", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
                          stateful_step_count=60)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "s3fuse-ci")
                               if os.environ.get("HYPOTHESIS_PROFILE", "").startswith("s3fuse-") else "s3fuse-ci")
# the live-daemon machines cost a syscall round trip per step: fewer examples
LIVE = settings(PROFILE, max_examples=max(8, PROFILE.max_examples // 4))

SID = b"\xa5" * 16


# ------------------------------------------------------------------ object format

def _read_like_the_daemon(blob: bytes, header: fmt.ObjectHeader, dk: bytes, first: int, last: int) -> bytes:
    """What the data path does: unwrap (given), parse and authenticate the header, compare it
    with the block-map row, fetch exactly the segments' bytes, authenticate them."""
    keys = fmt.derive_object_keys(dk, header.object_id)
    hlen = fmt.header_length(blob)
    got = fmt.parse_header(blob[:hlen], keys)
    if got != header:
        raise fmt.FormatError("header does not match the row")
    start, length = fmt.segment_range(hlen, header.segment_size, header.length, first, last)
    return b"".join(fmt.decrypt_segments(keys, got, first, blob[start:start + length], last - first + 1))


mutations = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(0, 7)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("insert"), st.integers(0, 10**6), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("delete"), st.integers(0, 10**6), st.integers(1, 200)),
    st.tuples(st.just("overwrite"), st.integers(0, 10**6), st.binary(min_size=1, max_size=60)),
    st.tuples(st.just("swap-segments"), st.integers(0, 20), st.integers(0, 20)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=200)),
)


def _mutate(blob: bytes, m: tuple, seg: int) -> bytes:
    b = bytearray(blob)
    kind = m[0]
    if kind == "flip":
        b[m[1] % len(b)] ^= 1 << m[2]
    elif kind == "truncate":
        del b[m[1] % len(b):]
    elif kind == "insert":
        b[m[1] % (len(b) + 1):m[1] % (len(b) + 1)] = m[2]
    elif kind == "delete":
        i = m[1] % len(b)
        del b[i:i + m[2]]
    elif kind == "overwrite":
        i = m[1] % len(b)
        b[i:i + len(m[2])] = m[2]
    elif kind == "swap-segments":
        hlen = fmt.header_length(blob)
        stride = seg + fmt.SEGMENT_OVERHEAD
        body = blob[hlen:]
        segs = [body[i:i + stride] for i in range(0, len(body), stride)]
        i, j = m[1] % len(segs), m[2] % len(segs)
        segs[i], segs[j] = segs[j], segs[i]
        b = bytearray(blob[:hlen] + b"".join(segs))
    elif kind == "append":
        b += m[1]
    return bytes(b)


@PROFILE
@given(data=st.binary(max_size=700), seg=st.sampled_from([16, 64, 256]), mutation=mutations,
       first=st.integers(0, 50), span=st.integers(0, 50))
def test_no_mutation_of_an_object_decodes_to_other_bytes(data, seg, mutation, first, span):
    header = fmt.ObjectHeader(os.urandom(16), SID, 7, 3, "AES256", "", seg, len(data))
    dk = os.urandom(32)
    blob = fmt.encrypt_object(header, dk, data)
    bad = _mutate(blob, mutation, seg)
    count = header.segment_count
    first = min(first, count - 1)
    last = min(count - 1, first + span)
    try:
        out = _read_like_the_daemon(bad, header, dk, first, last)
    except fmt.FormatError:
        return  # rejected: the only other acceptable outcome
    # accepted: then it is exactly the right plaintext (the mutation touched nothing read)
    assert out == data[first * seg:(last + 1) * seg]


@PROFILE
@given(junk=st.binary(max_size=300), dk=st.binary(min_size=32, max_size=32))
def test_parsing_arbitrary_bytes_never_crashes(junk, dk):
    keys = fmt.derive_object_keys(dk, b"\0" * 16)
    try:
        fmt.parse_header(junk, keys)
    except fmt.FormatError:
        pass
    header = fmt.ObjectHeader(b"\0" * 16, SID, 1, 0, "AES256", "", 16, 40)
    try:
        fmt.decrypt_segments(keys, header, 0, junk, 3)
    except fmt.FormatError:
        pass


@PROFILE
@given(slot=st.binary(max_size=100), kek=st.binary(min_size=32, max_size=32), aad=st.binary(max_size=50))
def test_key_slots_from_arbitrary_bytes_are_rejected(slot, kek, aad):
    with pytest.raises(fmt.FormatError):
        fmt.unwrap_data_key(kek, slot, aad)


# ------------------------------------------------------------------ control protocol (pure)

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20)


@PROFILE
@given(message=st.dictionaries(st.text(max_size=10), msgpack_values, max_size=6))
def test_frames_round_trip(message):
    frame = protocol.encode(message)
    n = protocol.frame_length(frame[:4])
    assert n == len(frame) - 4
    assert protocol.decode(frame[4:]) == message


@PROFILE
@given(body=st.binary(max_size=400), prefix=st.binary(min_size=4, max_size=4))
def test_decoding_arbitrary_bytes_raises_only_protocol_errors(body, prefix):
    try:
        message = protocol.decode(body)
    except protocol.ProtocolError:
        pass
    else:
        assert isinstance(message, dict)
    try:
        assert protocol.frame_length(prefix) <= protocol.MAX_FRAME
    except protocol.ProtocolError:
        assert struct.unpack(">I", prefix)[0] > protocol.MAX_FRAME


# ------------------------------------------------------------------ live daemon fixtures

@pytest.fixture(scope="module")
def live(module_mount_factory):
    m = module_mount_factory()
    (m.mnt / "sentinel").write_bytes(b"ok")
    return m


class ControlMachine(RuleBasedStateMachine):
    """One client connection that sends valid, malformed and partial frames in any order;
    the daemon answers each complete frame with a well-formed reply or closes the
    connection, and a fresh connection is always served."""

    mount = None

    def __init__(self):
        super().__init__()
        self.path = protocol.socket_path(str(self.mount.mnt))
        self.sock = None
        self.open_ok = False

    def _connect(self):
        if self.sock is not None:
            self.sock.close()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)
        self.sock.settimeout(20)
        self.open_ok = True

    def _reply(self):
        """A reply frame, or None if the daemon closed the connection."""
        buf = b""
        while len(buf) < 4:
            chunk = self.sock.recv(4 - len(buf))
            if not chunk:
                return None
            buf += chunk
        (n,) = struct.unpack(">I", buf)
        assert n <= protocol.MAX_FRAME
        body = b""
        while len(body) < n:
            chunk = self.sock.recv(n - len(body))
            assert chunk, "reply cut short"
            body += chunk
        reply = msgpack.unpackb(body, raw=False)
        assert reply["v"] == 1 and isinstance(reply["ok"], bool)
        if not reply["ok"]:
            assert isinstance(reply["errno"], int) and isinstance(reply["error"], str)
        return reply

    @initialize()
    def start(self):
        self._connect()

    @precondition(lambda self: self.open_ok)
    @rule(op=st.sampled_from(["status", "key.list", "kms.list", "audit.path", "no.such"]),
          args=st.dictionaries(st.text(max_size=8), msgpack_values, max_size=3))
    def request(self, op, args):
        self.sock.sendall(protocol.encode({"v": 1, "op": op, "args": args}))
        reply = self._reply()
        assert reply is not None, "a well-formed request got no reply"
        if op == "no.such":
            assert reply["errno"] == errno.EOPNOTSUPP

    @precondition(lambda self: self.open_ok)
    @rule(value=msgpack_values)
    def wrong_shape(self, value):
        self.sock.sendall(protocol.encode({"v": 1, "op": value, "args": value}) if not isinstance(value, dict)
                          else protocol.encode(value))
        reply = self._reply()
        assert reply is not None
        if not reply["ok"]:
            assert reply["errno"] in (errno.EOPNOTSUPP, errno.EINVAL, errno.EPROTO, errno.EBADMSG, errno.ENOKEY,
                                      errno.EPERM, errno.EACCES), reply

    @precondition(lambda self: self.open_ok)
    @rule(body=st.binary(min_size=1, max_size=200))
    def garbage(self, body):
        self.sock.sendall(struct.pack(">I", len(body)) + body)
        try:
            reply = self._reply()
        except (msgpack.UnpackException, ValueError):
            raise AssertionError("an undecodable reply")
        if reply is None or (not reply["ok"] and reply["errno"] == errno.EBADMSG):
            self.open_ok = False  # documented: a bad frame gets EBADMSG and the connection closes
            if reply is not None:
                assert self._reply() is None

    @precondition(lambda self: self.open_ok)
    @rule(n=st.integers(protocol.MAX_FRAME + 1, 2**32 - 1))
    def huge_length(self, n):
        self.sock.sendall(struct.pack(">I", n))
        reply = self._reply()
        assert reply is not None and reply["errno"] == errno.EBADMSG
        assert self._reply() is None  # and the connection is closed
        self.open_ok = False

    @rule(part=st.binary(max_size=3))
    def partial_then_reconnect(self, part):
        if self.sock is not None and part and self.open_ok:
            self.sock.sendall(part)
        self._connect()

    @invariant()
    def fresh_connection_served(self):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(self.path)
            s.settimeout(20)
            s.sendall(protocol.encode(protocol.request("status")))
            head = s.recv(4)
            assert len(head) == 4
            (n,) = struct.unpack(">I", head)
            body = b""
            while len(body) < n:
                body += s.recv(n - len(body))
            reply = msgpack.unpackb(body, raw=False)
            # EBUSY only while many dropped connections are still being noticed
            assert reply["ok"] or reply["errno"] == errno.EBUSY, reply

    def teardown(self):
        if self.sock is not None:
            self.sock.close()


def test_control_protocol_state_machine(live):
    ControlMachine.mount = live
    ControlMachine.TestCase.settings = LIVE
    ControlMachine.TestCase().runTest()
    assert live.proc.poll() is None
    assert (live.mnt / "sentinel").read_bytes() == b"ok"


# ------------------------------------------------------------------ filesystem vs a model

NAMES = st.sampled_from(["a", "b", "c", "d"])


class FilesystemMachine(RuleBasedStateMachine):
    """create, write, truncate, rename, unlink, read and fsync on a real mount, mirrored in a
    dict; every read and listing must match the model."""

    mount = None
    counter = 0

    def __init__(self):
        super().__init__()
        FilesystemMachine.counter += 1
        self.dir = self.mount.mnt / f"fsm-{FilesystemMachine.counter}"
        self.dir.mkdir()
        self.model: dict[str, bytearray] = {}

    def p(self, name):
        return self.dir / name

    @rule(name=NAMES)
    def create(self, name):
        with open(self.p(name), "wb"):
            pass
        self.model[name] = bytearray()

    @precondition(lambda self: self.model)
    @rule(data=st.data(), off=st.integers(0, 600_000), payload=st.binary(min_size=1, max_size=70_000))
    def write(self, data, off, payload):
        name = data.draw(st.sampled_from(sorted(self.model)))
        fd = os.open(self.p(name), os.O_WRONLY)
        try:
            os.pwrite(fd, payload, off)
        finally:
            os.close(fd)
        buf = self.model[name]
        if len(buf) < off:
            buf.extend(bytes(off - len(buf)))
        buf[off:off + len(payload)] = payload

    @precondition(lambda self: self.model)
    @rule(data=st.data(), size=st.integers(0, 700_000))
    def truncate(self, data, size):
        name = data.draw(st.sampled_from(sorted(self.model)))
        os.truncate(self.p(name), size)
        buf = self.model[name]
        if size < len(buf):
            del buf[size:]
        else:
            buf.extend(bytes(size - len(buf)))

    @precondition(lambda self: self.model)
    @rule(data=st.data(), dst=NAMES)
    def rename(self, data, dst):
        src = data.draw(st.sampled_from(sorted(self.model)))
        os.rename(self.p(src), self.p(dst))
        self.model[dst] = self.model.pop(src)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def unlink(self, data):
        name = data.draw(st.sampled_from(sorted(self.model)))
        os.unlink(self.p(name))
        del self.model[name]

    @precondition(lambda self: self.model)
    @rule(data=st.data(), off=st.integers(0, 700_000), n=st.integers(0, 300_000))
    def read(self, data, off, n):
        name = data.draw(st.sampled_from(sorted(self.model)))
        fd = os.open(self.p(name), os.O_RDONLY)
        try:
            got = os.pread(fd, n, off)
        finally:
            os.close(fd)
        assert got == bytes(self.model[name][off:off + n])

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def fsync(self, data):
        name = data.draw(st.sampled_from(sorted(self.model)))
        fd = os.open(self.p(name), os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @invariant()
    def listing_and_sizes_match(self):
        assert sorted(os.listdir(self.dir)) == sorted(self.model)
        for name, buf in self.model.items():
            assert os.stat(self.p(name)).st_size == len(buf)

    def teardown(self):
        for name in self.model:
            assert self.p(name).read_bytes() == bytes(self.model[name]), f"{name} differs at the end"
        shutil.rmtree(self.dir)


def test_filesystem_state_machine(live):
    FilesystemMachine.mount = live
    FilesystemMachine.TestCase.settings = LIVE
    FilesystemMachine.TestCase().runTest()
    assert live.proc.poll() is None
