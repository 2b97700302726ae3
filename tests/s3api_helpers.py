"""Shared pieces of the S3 API tests: a mount serving the API, access keys, clients."""

from __future__ import annotations

import json
import os
import re

import boto3
from botocore.config import Config

import subprocess
import sysconfig

from .conftest import REPO, UNPRIV_PYTHON, run_cli

_UNPRIV_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
               "PYTHONPATH": f"{REPO}:{sysconfig.get_paths()['purelib']}", "LANG": "C.UTF-8", "HOME": "/"}


def cli_as(uid: int, *args) -> subprocess.CompletedProcess:
    """`s3fuse ARGS` as uid:uid (the venv's interpreter is not reachable by other uids)."""
    return subprocess.run([UNPRIV_PYTHON, "-m", "s3fuse", *map(str, args)], user=uid, group=uid,
                          extra_groups=[], env=_UNPRIV_ENV, capture_output=True, text=True, timeout=60,
                          cwd="/", stdin=subprocess.DEVNULL)


def start_api_mount(factory, extra_args=()):
    m = factory(extra_args=["--s3-api", "127.0.0.1:0", *extra_args])
    endpoint = endpoint_of(m)
    return m, endpoint


def endpoint_of(m) -> str:
    r = run_cli("s3-key", "add", "--uid", "0", "--allow-root", "--mount", m.mnt)
    assert r.returncode == 0, r.stderr
    match = re.search(r"endpoint\s+(\S+)", r.stdout)
    assert match, r.stdout
    return match.group(1)


def new_key(m, uid: int = 0) -> tuple[str, str]:
    args = ["s3-key", "add", "--uid", uid, "--json", "--mount", m.mnt]
    if uid == 0:
        args.append("--allow-root")
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert set(d) == {"AccessKeyId", "SecretAccessKey"}
    return d["AccessKeyId"], d["SecretAccessKey"]


def client(endpoint: str, akid: str, secret: str, **config):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=akid, aws_secret_access_key=secret,
                        region_name="us-east-1",
                        config=Config(signature_version="s3v4", retries={"max_attempts": 1}, **config))


def error_code(exc) -> str:
    return exc.response["Error"]["Code"]


def env_for(endpoint: str, akid: str, secret: str) -> dict:
    env = dict(os.environ)
    env.update(AWS_ACCESS_KEY_ID=akid, AWS_SECRET_ACCESS_KEY=secret, AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=endpoint, AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null")
    return env
