"""The mount configuration file: validation (pure), errors through the CLI, the file's
settings reaching a real mount, and the command line overriding the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from s3fuse import config
from s3fuse.config import ConfigError
from s3fuse.errors import S3fuseError

from .conftest import REPO, TRACEBACK, run_cli

EXAMPLE = REPO / "systemd" / "example.toml"


def parse(text: str) -> config.FileConfig:
    return config.parse(text, "/etc/s3fuse/t.toml")


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("/etc/s3fuse/t.toml: ")
    return message


# -- pure validation ----------------------------------------------------------------------

def test_example_configuration_is_valid_and_complete():
    cfg = parse(EXAMPLE.read_text().replace("NAME", "demo"))
    assert cfg.store == "/var/lib/s3fuse/demo"
    assert cfg.mountpoint == "/srv/demo"
    assert cfg.audit_path == "/var/log/s3fuse/demo/audit.log"
    # every key of the schema appears in the example (commented or not), so it documents all
    text = EXAMPLE.read_text()
    for section, keys in config.SCHEMA.items():
        assert f"[{section}]" in text, section
        for key in keys:
            assert f"{key} = " in text, f"{section}.{key} is missing from {EXAMPLE}"


def test_every_key_parses_to_its_setting():
    cfg = parse("""
[store]
path = "/srv/store"
root_key_credential = "root-key"
[mount]
mountpoint = "/mnt/x/"
allow_other = true
readahead_kib = 1024
[encryption]
default_sse = "aws:kms:alias/team"
rotation_interval = "12h"
[cache]
dirty_limit_mib = 16
cache_mib = 8
[audit]
path = "/var/log/s3fuse/x/audit.log"
[log]
level = "debug"
file = "/var/log/s3fuse/x/s3fuse.log"
[kms]
provider = "transit"
address = "https://bao.example:8200/"
mount = "transit"
token_credential = "vault-token"
default_key = "team"
timeout = 2.5
attempts = 3
[backend]
endpoint_url = "http://127.0.0.1:8333"
region = "eu-west-1"
max_requests = 4
cache_mib = 0
cache_writes_upto_kib = 64
""")
    assert (cfg.store, cfg.mountpoint, cfg.root_key_credential) == ("/srv/store", "/mnt/x", "root-key")
    assert cfg.allow_other is True and cfg.readahead_kb == 1024
    assert cfg.default_sse == "aws:kms:alias/team" and cfg.rotation_interval == 12 * 3600
    assert (cfg.dirty_limit, cfg.cache_limit) == (16 << 20, 8 << 20)
    assert cfg.audit_path == "/var/log/s3fuse/x/audit.log"
    assert (cfg.log_level, cfg.log_file) == ("debug", "/var/log/s3fuse/x/s3fuse.log")
    assert cfg.kms == {"provider": "transit", "address": "https://bao.example:8200", "mount": "transit",
                       "token_credential": "vault-token", "default_key": "team", "timeout": 2.5, "attempts": 3}
    assert cfg.backend == {"endpoint_url": "http://127.0.0.1:8333", "region": "eu-west-1", "max_requests": 4,
                           "cache_mib": 0, "cache_writes_upto_kib": 64}


@pytest.mark.parametrize("value,seconds", [("90d", 90 * 86400), ("30m", 1800), ("45s", 45), ("2w", 14 * 86400),
                                           (3600, 3600), (0.5, 0.5), ("never", 0), (0, 0)])
def test_durations(value, seconds):
    text = f'[encryption]\nrotation_interval = {value!r}\n'.replace("'", '"')
    assert parse(text).rotation_interval == seconds


@pytest.mark.parametrize("text,key,reason", [
    ("[stor]\npath = '/x'\n", "stor", "unknown section"),
    ("[store]\npaht = '/x'\n", "store.paht", "unknown key"),
    ("[cache]\ncache_mib = '32'\n", "cache.cache_mib", "must be a positive whole number (got a string '32')"),
    ("[cache]\ncache_mib = 0\n", "cache.cache_mib", "must be a positive whole number (got 0)"),
    ("[cache]\ndirty_limit_mib = true\n", "cache.dirty_limit_mib", "must be a positive whole number"),
    ("[mount]\nallow_other = 'yes'\n", "mount.allow_other", "must be true or false"),
    ("[mount]\nmountpoint = 'mnt'\n", "mount.mountpoint", "must be an absolute path"),
    ("[log]\nlevel = 'loud'\n", "log.level", "must be one of debug, info, warning, error"),
    ("[encryption]\ndefault_sse = 'AES128'\n", "encryption.default_sse", "unknown encryption setting"),
    ("[encryption]\ndefault_sse = 'aws:kms'\n", "encryption.default_sse", "name the KMS key"),
    ("[encryption]\ndefault_sse = 'SSE-C:mine'\n", "encryption.default_sse", "fingerprint"),
    ("[encryption]\nrotation_interval = '3 days'\n", "encryption.rotation_interval", "must be a duration"),
    ("[encryption]\nrotation_interval = -5\n", "encryption.rotation_interval", "must be a duration"),
    ("[kms]\nnamespace = 'team'\n", "kms.namespace", "unknown key"),
    ("[kms]\nattempts = 0\n", "kms.attempts", "must be a positive whole number"),
    ("[kms]\nprovider = 'vault'\n", "kms.provider", "must be one of builtin, transit"),
    ("[kms]\nprovider = 'transit'\naddress = 'vault:8200'\n", "kms.address", "http:// or https:// URL"),
    ("[backend]\nbucket = 'other'\n", "backend.bucket", "unknown key"),
    ("[backend]\ncache_mib = -1\n", "backend.cache_mib", "must be a whole number, 0 or more"),
    ("[store]\nroot_key_credential = 'a/b'\n", "store.root_key_credential", "plain name"),
    ("[store]\nroot_key_file = '/k'\nroot_key_credential = 'k'\n", "store.root_key_credential",
     "one root-key source"),
    ("cache = 5\n", "cache", "must be a table"),
])
def test_bad_configurations_name_the_key_and_reason(text, key, reason):
    message = error_of(text)
    assert f": {key}: " in message
    assert reason in message


def test_transit_needs_an_address(monkeypatch):
    monkeypatch.delenv("VAULT_ADDR", raising=False)
    monkeypatch.delenv("BAO_ADDR", raising=False)
    assert "kms.address: required" in error_of("[kms]\nprovider = 'transit'\n")
    monkeypatch.setenv("VAULT_ADDR", "http://127.0.0.1:8200")
    assert parse("[kms]\nprovider = 'transit'\n").kms == {"provider": "transit"}
    assert "kms.token_credential: give token_file or token_credential" in error_of(
        "[kms]\ntoken_file = '/t'\ntoken_credential = 't'\n")


def test_token_credential_becomes_the_token_file(monkeypatch, tmp_path):
    from s3fuse.cli import _kms_settings

    (tmp_path / "vault-token").write_text("s.x\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    kms = parse("[kms]\nprovider = 'transit'\naddress = 'http://b:8200'\ntoken_credential = 'vault-token'\n").kms
    assert _kms_settings(kms) == {"provider": "transit", "address": "http://b:8200",
                                  "token_file": str(tmp_path / "vault-token")}
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(S3fuseError, match="credential 'vault-token' needs \\$CREDENTIALS_DIRECTORY"):
        _kms_settings(kms)


def test_syntax_error_names_the_line():
    message = error_of("[store]\npath = /x\n")
    assert "not valid TOML" in message and "line 2" in message


def test_command_line_wins_over_the_file_and_the_file_over_defaults():
    file = parse("[store]\npath = '/s'\n[mount]\nmountpoint = '/m'\nallow_other = true\n"
                 "[cache]\ncache_mib = 8\n[log]\nlevel = 'warning'\n")
    s = config.resolve({"mountpoint": "/other", "cache_limit": 16 << 20}, file)
    assert (s.store, s.mountpoint) == ("/s", "/other")
    assert s.cache_limit == 16 << 20 and s.allow_other is True and s.log_level == "warning"
    assert s.dirty_limit == config.DEFAULTS["dirty_limit"]
    s = config.resolve({"store": "/a", "mountpoint": "/b"}, None)
    assert (s.allow_other, s.log_level, s.readahead_kb) == (False, "info", 8192)
    with pytest.raises(ConfigError, match="store.path in /etc/s3fuse/t.toml"):
        config.resolve({}, parse("[mount]\nmountpoint = '/m'\n"))
    # a root key named on the command line replaces the file's source, whatever it is
    s = config.resolve({"root_key_file": "/k"}, parse("[store]\npath='/s'\nroot_key_credential='c'\n"
                                                      "[mount]\nmountpoint='/m'\n"))
    assert (s.root_key_file, s.root_key_credential) == ("/k", None)


# -- through the command line -------------------------------------------------------------------

def _one_line_error(r, *needles: str, status: int = 2) -> str:
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert TRACEBACK not in r.stderr
    assert lines[0].startswith("s3fuse: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("body,key", [
    ("[store]\npath = '/s'\ncompression = true\n", "store.compression: unknown key"),
    ("[cache]\ncache_mib = 'lots'\n", "cache.cache_mib: must be a positive whole number"),
    ("[log]\nlevel = 'verbose'\n", "log.level: must be one of"),
    ("[mount\n", "not valid TOML"),
])
def test_cli_rejects_a_bad_file_in_one_line(workdir, body, key):
    f = workdir("cfg") / "bad.toml"
    f.write_text(body)
    _one_line_error(run_cli("mount", "--config", f, "--foreground"), str(f), key)


def test_cli_missing_file(workdir):
    f = workdir("cfg") / "absent.toml"
    _one_line_error(run_cli("mount", "--config", f), str(f), "cannot read the configuration")


def test_cli_needs_a_store_and_mount_point(workdir):
    f = workdir("cfg") / "partial.toml"
    f.write_text("[store]\npath = '/nonexistent/store'\n")
    _one_line_error(run_cli("mount", "--config", f), "mount.mountpoint", str(f))


def test_file_settings_reach_the_mount_and_the_command_line_overrides(mount_factory, new_store, workdir):
    """audit.path and default_sse from the file take effect; MOUNTPOINT on the command line wins."""
    m = mount_factory(new_store)
    r = run_cli("kms", "create-key", "--alias", "alias/cfg", "--mount", m.mnt)
    assert r.returncode == 0, r.stderr
    m.unmount()

    logs = workdir("logs")
    cfg = workdir("cfg") / "m.toml"
    cfg.write_text(f"""
[store]
path = "{new_store}"
[mount]
mountpoint = "/nonexistent/overridden/on/the/command/line"
[encryption]
default_sse = "aws:kms:alias/cfg"
rotation_interval = "12h"
[audit]
path = "{logs}/trail/audit.log"
""")
    m.extra_args = ["--config", str(cfg)]
    m.start()
    with open(m.mnt / "f", "wb") as f:
        f.write(b"x" * 1000)
        f.flush()
        os.fsync(f.fileno())  # stored now: its data key is generated (and audited) before the checks
    assert os.getxattr(m.mnt / "f", "user.s3fuse.mode") == b"aws:kms"
    r = run_cli("status", m.mnt, "--verbose")
    assert f"audit_log: {logs}/trail/audit.log" in r.stdout
    assert "rotation_interval: 43200.0" in r.stdout, r.stdout
    r = run_cli("audit", "verify", "--mount", m.mnt)
    assert r.returncode == 0 and f"{logs}/trail/audit.log" in r.stdout, r.stderr
    trail = Path(logs / "trail" / "audit.log").read_text()
    assert "GenerateDataKey" in trail
    assert oct(os.stat(logs / "trail" / "audit.log").st_mode & 0o777) == "0o600"
    m.unmount()


def test_unknown_default_kms_key_is_a_start_error(new_store, workdir):
    cfg = workdir("cfg") / "k.toml"
    mnt = workdir("mnt")
    cfg.write_text(f'[store]\npath = "{new_store}"\n[mount]\nmountpoint = "{mnt}"\n'
                   '[encryption]\ndefault_sse = "aws:kms:alias/nope"\n')
    _one_line_error(run_cli("mount", "--config", cfg, "--foreground"), "default_sse aws:kms:alias/nope", status=1)
    assert not os.path.ismount(mnt)
