"""One source of defaults and one duration syntax for the command line, the file and the daemon."""

import pytest

from s3fuse import config, defaults, durations
from s3fuse.cli import build_parser
from s3fuse.daemon import MountOptions


def _mount_args(*extra):
    return build_parser().parse_args(["mount", "/s", "/m", *extra])


def test_the_daemon_the_file_and_the_command_line_share_defaults():
    opts = MountOptions()
    settings = config.resolve({"store": "/s", "mountpoint": "/m"}, None)
    assert (opts.dirty_limit, opts.cache_limit, opts.readahead_kb, opts.allow_other) == (
        settings.dirty_limit, settings.cache_limit, settings.readahead_kb, settings.allow_other) == (
        defaults.DIRTY_LIMIT, defaults.CACHE_LIMIT, defaults.READAHEAD_KB, defaults.ALLOW_OTHER)
    assert settings.log_level == defaults.LOG_LEVEL
    init = build_parser().parse_args(["init", "/s"])
    assert (init.block_size_kib << 10, init.segment_size_kib << 10) == (defaults.BLOCK_SIZE,
                                                                       defaults.SEGMENT_SIZE)


def test_the_data_store_defaults_are_the_mounts():
    import inspect

    from s3fuse.data import DataStore
    params = inspect.signature(DataStore).parameters
    assert params["dirty_limit"].default == defaults.DIRTY_LIMIT
    assert params["cache_limit"].default == defaults.CACHE_LIMIT


@pytest.mark.parametrize("text,seconds", [("90d", 90 * 86400), ("12h", 43200), ("30m", 1800), ("45s", 45),
                                          ("2w", 14 * 86400), ("30", 30), ("2.5", 2.5), ("0", 0),
                                          ("never", 0), ("2592000.0", 2592000)])
def test_rotation_interval_takes_the_configuration_files_units(text, seconds):
    assert _mount_args("--rotation-interval", text).rotation_interval == seconds
    toml = f'[encryption]\nrotation_interval = "{text}"\n'
    assert config.parse(toml, "/c.toml").rotation_interval == seconds


@pytest.mark.parametrize("text", ["3 days", "-5", "5y", "", "nan", "inf"])
def test_bad_durations_are_refused_on_both(text, capsys):
    with pytest.raises(SystemExit):
        _mount_args("--rotation-interval", text)
    assert "must be a duration" in capsys.readouterr().err
    with pytest.raises(config.ConfigError, match="must be a duration"):
        config.parse(f'[encryption]\nrotation_interval = "{text}"\n', "/c.toml")


def test_umount_timeout_and_kms_timeouts_take_units():
    assert build_parser().parse_args(["umount", "/m", "--timeout", "2m"]).timeout == 120
    cfg = config.parse('[kms]\nprovider = "builtin"\ntimeout = "30s"\nbackoff = 0.5\n'
                       '[backend]\nlease_seconds = "2m"\n', "/c.toml")
    assert cfg.kms["timeout"] == 30 and cfg.kms["backoff"] == 0.5 and cfg.backend["lease_seconds"] == 120
    with pytest.raises(config.ConfigError, match="kms.timeout: must be longer than zero"):
        config.parse('[kms]\ntimeout = 0\n', "/c.toml")


def test_durations_parse_directly():
    assert durations.parse(7) == 7.0
    for bad in (True, None, -1, float("nan"), [1]):
        with pytest.raises(durations.DurationError):
            durations.parse(bad)
    with pytest.raises(durations.DurationError):
        durations.parse_positive("0s")


def test_a_background_mount_hands_its_resolved_settings_to_the_daemon(new_store, workdir):
    """The daemon a background mount starts gets the settings the command resolved (file and
    command line merged, relative paths made absolute), not a command line rebuilt for it."""
    import json
    import os

    from .conftest import run_cli

    mnt, logs = workdir("mnt"), workdir("logs")
    cfg = workdir("cfg") / "m.toml"
    cfg.write_text(f'[encryption]\nrotation_interval = "12h"\n[audit]\npath = "{logs}/audit.log"\n'
                   '[cache]\ncache_mib = 48\n')
    r = run_cli("mount", new_store, mnt, "--config", cfg.name, "--rotation-interval", "2h",
                "--log-file", "d.log", cwd=cfg.parent)
    assert r.returncode == 0, r.stderr
    try:
        st = json.loads(run_cli("status", mnt, "--json").stdout)
        assert st["rotation_interval"] == 7200  # the command line over the file
        assert st["audit_log"] == f"{logs}/audit.log"  # from the file, found relative to cwd
        assert os.path.exists(cfg.parent / "d.log")
    finally:
        u = run_cli("umount", mnt)
    assert u.returncode == 0, u.stderr
