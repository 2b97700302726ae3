"""The `s3fuse` command line: init, mount, umount, status.

Every failure prints one line, `s3fuse: <what went wrong>`, on stderr and exits
non-zero; a traceback is a bug.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import select
import subprocess
import sys
import time

from .control import protocol
from .control.client import ControlClient
from .errors import S3fuseError

EXIT_ERROR = 1
EXIT_USAGE = 2

LOG_LEVELS = ("debug", "info", "warning", "error")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage dump
        self.exit(EXIT_USAGE, f"s3fuse: {message} (see: {self.prog} --help)\n")


def _mib(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number of MiB") from None
    if n <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return n << 20


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="s3fuse", description="An encrypted object filesystem with S3's server-side-encryption model.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    s = sub.add_parser("init", help="create a new store")
    s.add_argument("store", metavar="STORE", help="directory to create the store in (new or empty)")

    s = sub.add_parser("mount", help="mount a store")
    s.add_argument("store", metavar="STORE")
    s.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
    s.add_argument("--foreground", "-f", action="store_true", help="stay in the foreground")
    s.add_argument("--allow-other", action="store_true", help="let other users use the mount (permissions apply)")
    s.add_argument("--log-level", choices=LOG_LEVELS, default="info")
    s.add_argument("--log-file", help="log here (default: stderr in the foreground, STORE/s3fuse.log otherwise)")
    s.add_argument("--dirty-limit-mib", type=_mib, default=64 << 20, dest="dirty_limit",
                   help="memory for unflushed writes (default 64)")
    s.add_argument("--cache-mib", type=_mib, default=32 << 20, dest="cache_limit",
                   help="memory for decrypted segments (default 32)")
    s.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    s = sub.add_parser("umount", help="flush, unmount and wait for the daemon to exit")
    s.add_argument("mountpoint", metavar="MOUNTPOINT")
    s.add_argument("--timeout", type=float, default=600, help="seconds to wait for the daemon (default 600)")

    s = sub.add_parser("status", help="show a mounted store's state")
    s.add_argument("mountpoint", metavar="MOUNTPOINT")
    return p


def _setup_logging(level: str, log_file: str | None) -> None:
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def cmd_init(args) -> int:
    from .store import init_store

    cfg = init_store(args.store)
    print(f"created store {cfg.path} (id {cfg.store_id.hex()})")
    print(f"root key: {cfg.root_key_file} (keep it secret; whoever has it and the store can read everything)")
    return 0


def cmd_mount(args) -> int:
    from .daemon import MountOptions, check_mountpoint, run_foreground
    from .store import load_config

    options = MountOptions(allow_other=args.allow_other, dirty_limit=args.dirty_limit,
                           cache_limit=args.cache_limit)
    if args.foreground:
        _setup_logging(args.log_level, args.log_file)
        ready_fd = args.ready_fd

        def ready(error: str | None) -> None:
            nonlocal ready_fd
            if ready_fd is not None:
                os.write(ready_fd, b"ready\n" if error is None else f"error {error}\n".encode())
                os.close(ready_fd)
                ready_fd = None

        try:
            run_foreground(args.store, args.mountpoint, options, ready)
        except S3fuseError as exc:
            logging.getLogger("s3fuse").error("%s", exc)
            ready(str(exc))
            raise
        return 0

    # Background: check what we can here, then start the daemon and wait until it mounts.
    cfg = load_config(args.store)
    mnt = check_mountpoint(args.mountpoint)
    log_file = os.path.abspath(args.log_file or os.path.join(cfg.path, "s3fuse.log"))
    r, w = os.pipe()
    argv = [sys.executable, "-m", "s3fuse", "mount", cfg.path, mnt, "--foreground",
            "--log-level", args.log_level, "--log-file", log_file, "--ready-fd", str(w),
            "--dirty-limit-mib", str(args.dirty_limit >> 20), "--cache-mib", str(args.cache_limit >> 20)]
    if args.allow_other:
        argv.append("--allow-other")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, pass_fds=(w,), start_new_session=True, cwd="/")
    os.close(w)
    with os.fdopen(r, "rb") as pipe:
        message = pipe.read().decode(errors="replace").strip()
    if message == "ready":
        print(f"mounted {cfg.path} on {mnt} (daemon pid {proc.pid}, log {log_file})")
        return 0
    proc.wait()
    if message.startswith("error "):
        raise S3fuseError(message[len("error "):])
    raise S3fuseError(f"the daemon exited with status {proc.returncode} before mounting; see {log_file}")


def _wait_for_exit(pid: int, timeout: float) -> bool:
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        return bool(ready)
    finally:
        os.close(fd)


def _fusermount(mountpoint: str, lazy: bool = False) -> None:
    cmd = ["fusermount3", "-u"] + (["-z"] if lazy else []) + [mountpoint]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        msg = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"
        raise S3fuseError(f"could not unmount {mountpoint}: {msg}", errno.EBUSY)


def cmd_umount(args) -> int:
    mnt = os.path.realpath(args.mountpoint)
    path = protocol.socket_path(mnt)
    try:
        with ControlClient(path, timeout=args.timeout) as client:
            pid = client.call("unmount")["pid"]
    except S3fuseError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        if not os.path.ismount(mnt):
            raise S3fuseError(f"{mnt} is not an s3fuse mount", errno.EINVAL) from None
        # no daemon answers: a stale mount left by a crash
        _fusermount(mnt, lazy=True)
        print(f"{mnt}: no daemon was running; removed the stale mount")
        return 0
    _fusermount(mnt)
    if not _wait_for_exit(pid, args.timeout):
        raise S3fuseError(f"the daemon (pid {pid}) did not exit within {args.timeout:.0f} s", errno.ETIMEDOUT)
    return 0


def cmd_status(args) -> int:
    mnt = os.path.realpath(args.mountpoint)
    with ControlClient(protocol.socket_path(mnt), timeout=30) as client:
        status = client.call("status")
    for key, value in status.items():
        print(f"{key}: {value}")
    return 0


COMMANDS = {"init": cmd_init, "mount": cmd_mount, "umount": cmd_umount, "status": cmd_status}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except S3fuseError as exc:
        print(f"s3fuse: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("s3fuse: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"s3fuse: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""), file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a bug: say so in one line, keep the traceback in the log
        logging.getLogger("s3fuse").exception("internal error")
        print(f"s3fuse: internal error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
