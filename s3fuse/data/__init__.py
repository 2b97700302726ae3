"""The data path: write-back buffers, storing them as objects, reading objects back.

    writeback.py  files, dirty blocks, deferred commits, failures: a state machine, no I/O
    flush.py      stores a batch: seal, put, sync, one commit transaction
    codec.py      seals and opens objects (shared with fsck)
    readcache.py  ranged reads, the decrypted-segment cache, prefetch, page-cache pushes
    collector.py  deletes objects the metadata no longer references
    datastore.py  DataStore: the public face the rest of s3fuse uses
"""

from .datastore import DataStore
from .readcache import SegmentCache
from .writeback import FileState

__all__ = ["DataStore", "FileState", "SegmentCache"]
