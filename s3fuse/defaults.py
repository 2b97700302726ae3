"""The mount's default settings, in one place: the command line, the configuration file
(config.py) and the daemon (daemon.MountOptions, data.DataStore) all read them here.

Sizes are in bytes, durations in seconds. The store's settings are written to store.json
at init (store.py) and read from there afterwards; these are their values for a new store.
"""

from __future__ import annotations

DIRTY_LIMIT = 64 << 20  # memory for written data not yet stored
CACHE_LIMIT = 32 << 20  # memory for decrypted segments
READAHEAD_KB = 8192  # two blocks: keeps several 1 MiB reads in flight
ALLOW_OTHER = False
LOG_LEVEL = "info"
LOG_LEVELS = ("debug", "info", "warning", "error")
UMOUNT_TIMEOUT = 600.0  # seconds `s3fuse umount` waits for the daemon to exit

# the mount settings config.resolve falls back to, by MountSettings field
MOUNT = {
    "allow_other": ALLOW_OTHER,
    "dirty_limit": DIRTY_LIMIT,
    "cache_limit": CACHE_LIMIT,
    "readahead_kb": READAHEAD_KB,
    "log_level": LOG_LEVEL,
}

# a new store's settings (`s3fuse init`, store.json)
BLOCK_SIZE = 4 << 20
SEGMENT_SIZE = 64 << 10
DAY = 86400
ROTATION_INTERVAL = 30 * DAY  # SSE-S3 master key: a new version every 30 days
REWRAP_BATCH = 100  # key slots re-wrapped per transaction: short enough to keep the loop responsive
REWRAP_RATE = 2000  # key slots per second at most (0: unthrottled)
