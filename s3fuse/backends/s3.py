"""An S3-compatible object store (AWS S3, MinIO, Ceph RGW, SeaweedFS, ...) behind `Backend`.

botocore signs and sends the requests; they run in trio worker threads, at most
`max_requests` at a time (one CapacityLimiter; botocore's connection pool has the
same size, so a request never waits for a connection). botocore's own retries are
off: `RetryPolicy` retries timeouts, connection errors, 5xx and throttling with
exponential backoff and full jitter, within a bounded time budget; then the call
fails with EIO and one log line.

Objects live under PREFIX/objects/<key>. Reads of whole objects (and whole-object
puts) fill an on-disk LRU cache of ciphertext (see ObjectCache), so that repeated
reads do not go back to the network; partial reads are ranged GETs.

`sync` is a no-op: an S3 PUT is durable when it answers 200. Deletes may be
deferred (`defer_deletes`): the daemon then runs them only after a metadata
snapshot that no longer refers to the objects is in the bucket (docs/S3.md).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import trio

from ..errors import BackendError, StoreError
from ..retry import Backoff
from ..util import one_error
from ..workers import WorkerPool
from .base import Backend, NoSuchObject
from .direct import DirectWriter

log = logging.getLogger(__name__)

MULTIPART_THRESHOLD = 16 << 20  # objects above this go up in parts (S3 needs parts >= 5 MiB)
MULTIPART_PART_SIZE = 8 << 20
DEFAULT_MAX_REQUESTS = 16
DEFAULT_RETRY_BUDGET = 60.0  # seconds of retrying before a request fails with EIO
DEFAULT_CACHE_LIMIT = 1 << 30
RANGE_MERGE_GAP = 256 << 10  # ranges of one object closer than this are fetched in one GET
PREFETCH_MAX = 8  # whole objects fetched ahead of sequential readers at once
DEFAULT_CACHE_WRITES_UPTO = 1 << 20  # objects put up to this size are cached too
DIRECT_BUFFERS = 4  # cache fills with O_DIRECT at once; more fall back to buffered writes
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                   "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable", "TooManyRequests"}


def parse_s3_url(url: str) -> tuple[str, str]:
    """s3://BUCKET[/PREFIX] -> (bucket, prefix without slashes at the ends)."""
    if not url.startswith("s3://"):
        raise StoreError(f"{url!r} is not an s3://BUCKET/PREFIX address")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not bucket:
        raise StoreError(f"{url!r} names no bucket")
    return bucket, prefix.strip("/")


@dataclass
class S3Location:
    bucket: str
    prefix: str
    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None

    @classmethod
    def from_config(cls, b: dict) -> "S3Location":
        return cls(b["bucket"], b.get("prefix", ""), b.get("endpoint_url"), b.get("region"), b.get("profile"))

    def to_config(self) -> dict:
        return {"type": "s3", "bucket": self.bucket, "prefix": self.prefix,
                "endpoint_url": self.endpoint_url, "region": self.region, "profile": self.profile}

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name


class RetryPolicy(Backoff):
    """Full-jitter backoff bounded by a total time budget (s3fuse/retry.py)."""

    def __init__(self, budget: float = DEFAULT_RETRY_BUDGET, base: float = 0.1, cap: float = 5.0) -> None:
        super().__init__(base, cap, budget=budget)


class S3Error(BackendError):
    pass


def _is_retryable(exc: Exception) -> bool:
    import botocore.exceptions as bex

    if isinstance(exc, (bex.ConnectionError, bex.HTTPClientError, bex.ReadTimeoutError,
                        bex.ConnectTimeoutError, bex.ResponseStreamingError)):
        return True
    if isinstance(exc, bex.ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        return status >= 500 or status == 429 or code in _THROTTLE_CODES
    return isinstance(exc, (ConnectionError, TimeoutError))


def client_error(exc: Exception) -> tuple[str, int]:
    """(code, HTTP status) of a botocore ClientError, else ('', 0)."""
    import botocore.exceptions as bex

    if isinstance(exc, bex.ClientError):
        return (exc.response.get("Error", {}).get("Code", ""),
                exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    return "", 0


def make_client(loc: S3Location, max_requests: int = DEFAULT_MAX_REQUESTS,
                connect_timeout: float = 5, read_timeout: float = 30):
    """A botocore S3 client: credentials from the usual AWS sources (environment, shared
    credentials file, profile), no retries of its own, a pool as large as our limiter."""
    try:
        import botocore.config
        import botocore.exceptions as bex
        import botocore.session
    except ImportError:
        raise StoreError("the S3 backend needs botocore: pip install 's3fuse[s3]' "
                         "(scripts/bootstrap installs it)", errno.ENOPKG) from None

    config = botocore.config.Config(
        retries={"max_attempts": 1, "mode": "standard"}, max_pool_connections=max_requests,
        connect_timeout=connect_timeout, read_timeout=read_timeout,
        s3={"addressing_style": "path"},
        # our objects authenticate themselves (AEAD); skip the extra CRC pass per request
        request_checksum_calculation="when_required", response_checksum_validation="when_required")
    try:
        session = botocore.session.Session(profile=loc.profile)
        return session.create_client("s3", endpoint_url=loc.endpoint_url,
                                     region_name=loc.region or "us-east-1", config=config)
    except bex.ProfileNotFound:
        raise StoreError(f"AWS profile {loc.profile!r} is not configured", errno.EINVAL) from None


def describe_probe_error(loc: S3Location, exc: Exception) -> str:
    """One line for a failed first contact with the bucket: endpoint, bucket or credentials."""
    import botocore.exceptions as bex

    where = f"{loc.url} at {loc.endpoint_url or 'AWS'}"
    if isinstance(exc, bex.NoCredentialsError):
        return (f"no AWS credentials for {where} (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                f"a shared credentials file, or --profile)")
    if isinstance(exc, (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ConnectionError)):
        return f"cannot reach the S3 endpoint {loc.endpoint_url or 'AWS'} ({exc})"
    if isinstance(exc, bex.ClientError):
        code, status = client_error(exc)
        if code in ("NoSuchBucket",) or status == 404:
            return f"bucket {loc.bucket!r} does not exist at {loc.endpoint_url or 'AWS'}"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                    "InvalidToken", "ExpiredToken") or status == 403:
            return f"the S3 credentials are not accepted for {where} ({code or status})"
        return f"S3 error for {where}: {code or status}"
    return f"S3 error for {where}: {exc}"


class S3Client:
    """Blocking S3 calls with our retry policy. Thread-safe (botocore clients are)."""

    def __init__(self, loc: S3Location, max_requests: int = DEFAULT_MAX_REQUESTS,
                 retry_budget: float = DEFAULT_RETRY_BUDGET, multipart_threshold: int = MULTIPART_THRESHOLD,
                 part_size: int = MULTIPART_PART_SIZE, read_timeout: float = 30) -> None:
        self.loc = loc
        self.retry = RetryPolicy(retry_budget)
        self.multipart_threshold = multipart_threshold
        self.part_size = part_size
        self.multipart_puts = 0
        self.client = make_client(loc, max_requests, connect_timeout=min(5, max(1, retry_budget / 4)),
                                  read_timeout=read_timeout)

    def call(self, what: str, fn: Callable, *args, _budget: float | None = None, **kw):
        """fn(*args, **kw), retried on transient failures; other errors pass through."""
        policy = self.retry if _budget is None else RetryPolicy(_budget, self.retry.base, self.retry.cap)
        delays = policy.delays()
        while True:
            try:
                return fn(*args, **kw)
            except Exception as exc:  # noqa: BLE001 - classified below
                if not _is_retryable(exc):
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise S3Error(f"S3 {what}: {exc} (gave up after {policy.budget:g} s of retries)",
                                  errno.EIO) from None
                time.sleep(delay)

    # -- plain operations (each retried as a whole) ------------------------------
    def probe(self, budget: float = 5.0) -> None:
        """One cheap authenticated call that fails clearly for a wrong endpoint, bucket or
        credentials (raised as is: describe_probe_error words it). Retried only briefly:
        a person is waiting for the answer."""
        import botocore.exceptions as bex

        def once():
            try:
                self.client.list_objects_v2(Bucket=self.loc.bucket, Prefix=self.loc.key(""), MaxKeys=1)
            except (bex.EndpointConnectionError, bex.ConnectTimeoutError) as exc:
                return exc  # the endpoint is wrong or down: say so now, not after the budget
            return None

        failure = self.call("LIST (probe)", once, _budget=budget)
        if failure is not None:
            raise failure

    def put(self, key: str, data: bytes | list[bytes], **extra) -> dict:
        body = data if isinstance(data, (bytes, bytearray)) else b"".join(data)
        if len(body) > self.multipart_threshold and not extra:
            return self._put_multipart(key, memoryview(body))
        # a bytearray goes out in one sendall; bytes botocore would wrap in a file object and
        # send in 16 KiB reads (a copy and a system call each) after an Expect: 100-continue
        return self.call(f"PUT {key}", self.client.put_object, Bucket=self.loc.bucket, Key=key,
                         Body=body if isinstance(body, bytearray) else bytearray(body), **extra)

    def put_file(self, key: str, path: str, if_absent: bool = False) -> None:
        """Upload a local file, in parts when it is large (memory: one part at a time).
        `if_absent`: a single PUT is conditional (If-None-Match: *); a multipart upload
        checks with a HEAD first (not atomic, but the lease makes a race unlikely)."""
        size = os.path.getsize(path)
        if size <= self.multipart_threshold:
            with open(path, "rb") as f:
                self.put(key, f.read(), **({"IfNoneMatch": "*"} if if_absent else {}))
            return
        if if_absent and self.head(key) is not None:
            raise S3Error(f"S3 PUT {key}: the object exists already", errno.EEXIST)
        with open(path, "rb") as f:
            def part(i: int) -> bytes:
                f.seek(i * self.part_size)
                return f.read(self.part_size)
            self._multipart(key, size, part)

    def _put_multipart(self, key: str, body: memoryview) -> dict:
        return self._multipart(key, len(body), lambda i: bytearray(body[i * self.part_size:(i + 1) * self.part_size]))

    def _multipart(self, key: str, size: int, part: Callable[[int], bytes | bytearray]) -> dict:
        b = self.loc.bucket
        self.multipart_puts += 1
        up = self.call(f"create multipart {key}", self.client.create_multipart_upload, Bucket=b, Key=key)
        uid = up["UploadId"]
        try:
            parts = []
            for i in range((size + self.part_size - 1) // self.part_size):
                body = part(i)
                res = self.call(f"upload part {i + 1} of {key}", self.client.upload_part, Bucket=b, Key=key,
                                UploadId=uid, PartNumber=i + 1,
                                Body=body if isinstance(body, bytearray) else bytearray(body))  # see `put`
                parts.append({"PartNumber": i + 1, "ETag": res["ETag"]})
            return self.call(f"complete multipart {key}", self.client.complete_multipart_upload, Bucket=b,
                             Key=key, UploadId=uid, MultipartUpload={"Parts": parts})
        except BaseException:
            try:
                self.client.abort_multipart_upload(Bucket=b, Key=key, UploadId=uid)
            except Exception:  # noqa: BLE001 - the upload is already failing; leftovers expire
                pass
            raise

    def get(self, key: str, start: int = 0, end: int | None = None) -> tuple[bytes, int]:
        """Bytes [start, end) (end None: to the end) and the object's total size."""
        import botocore.exceptions as bex

        kw = {}
        if start or end is not None:
            kw["Range"] = f"bytes={start}-{'' if end is None else end - 1}"

        def fetch():
            res = self.client.get_object(Bucket=self.loc.bucket, Key=key, **kw)
            body = res["Body"].read()
            rng = res.get("ContentRange")  # "bytes a-b/total" on a 206
            total = int(rng.rsplit("/", 1)[1]) if rng else int(res["ContentLength"])
            return body, total

        try:
            return self.call(f"GET {key}", fetch)
        except bex.ClientError as exc:
            code, status = client_error(exc)
            if code in ("NoSuchKey", "404") or status == 404:
                raise NoSuchObject(f"object {key} does not exist", errno.EIO) from None
            if code == "InvalidRange" or status == 416:  # a range at or past the end
                return b"", start
            raise S3Error(f"S3 GET {key}: {code or status}", errno.EIO) from None

    def head(self, key: str) -> dict | None:
        import botocore.exceptions as bex

        try:
            return self.call(f"HEAD {key}", self.client.head_object, Bucket=self.loc.bucket, Key=key)
        except bex.ClientError as exc:
            if client_error(exc)[1] == 404:
                return None
            raise S3Error(f"S3 HEAD {key}: {client_error(exc)[0]}", errno.EIO) from None

    def delete(self, key: str) -> None:
        self.call(f"DELETE {key}", self.client.delete_object, Bucket=self.loc.bucket, Key=key)

    def list_page(self, prefix: str, token: str | None) -> tuple[list[tuple[str, int]], str | None]:
        kw = {"ContinuationToken": token} if token else {}
        res = self.call(f"LIST {prefix}", self.client.list_objects_v2, Bucket=self.loc.bucket,
                        Prefix=prefix, MaxKeys=1000, **kw)
        items = [(o["Key"], o["Size"]) for o in res.get("Contents", [])]
        return items, res.get("NextContinuationToken") if res.get("IsTruncated") else None

    def list_dated_page(self, prefix: str, token: str | None) -> tuple[list[tuple[str, float]], str | None]:
        """(key, LastModified as unix time, by the server's clock) of one page of a listing."""
        kw = {"ContinuationToken": token} if token else {}
        res = self.call(f"LIST {prefix}", self.client.list_objects_v2, Bucket=self.loc.bucket,
                        Prefix=prefix, MaxKeys=1000, **kw)
        items = [(o["Key"], o["LastModified"].timestamp()) for o in res.get("Contents", [])]
        return items, res.get("NextContinuationToken") if res.get("IsTruncated") else None

    def list_all(self, prefix: str) -> list[tuple[str, int]]:
        out, token = [], None
        while True:
            items, token = self.list_page(prefix, token)
            out += items
            if token is None:
                return out


class ObjectCache:
    """Whole objects (ciphertext, as stored) on local disk, least recently used first out.

    Files are written to a temporary name and renamed, so a crash leaves no partial
    entry. The index is in memory (rebuilt from the directory at start, oldest access
    first); all methods run in worker threads, hence the lock.
    """

    def __init__(self, path: str, limit: int) -> None:
        self.path = path
        self.limit = limit
        self.used = 0
        self._lru: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.fills = 0
        # filling the cache with O_DIRECT costs no page-cache copy: the buffered write of what
        # a cold sequential read fetched was a large share of its CPU (docs/BENCH.md)
        self.direct = DirectWriter(DIRECT_BUFFERS)
        os.makedirs(path, mode=0o700, exist_ok=True)
        entries = []
        for name in os.listdir(path):
            p = os.path.join(path, name)
            if name.startswith("."):
                os.unlink(p)  # an interrupted fill
                continue
            st = os.stat(p)
            entries.append((st.st_atime, name, st.st_size))
        for _, name, size in sorted(entries):
            self._lru[name] = size
            self.used += size
        self._evict()

    def read(self, key: str, ranges: list[tuple[int, int | None]]) -> list[bytes] | None:
        with self._lock:
            if key not in self._lru:
                self.misses += 1
                return None
            self._lru.move_to_end(key)
            self.hits += 1
        try:
            fd = os.open(os.path.join(self.path, key), os.O_RDONLY)
        except FileNotFoundError:
            with self._lock:
                self.used -= self._lru.pop(key, 0)
            return None
        try:
            size = os.fstat(fd).st_size
            return [os.pread(fd, size - off if n is None else n, off) for off, n in ranges]
        finally:
            os.close(fd)

    def store(self, key: str, data: bytes | list[bytes]) -> None:
        if self.limit <= 0:
            return
        parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
        size = sum(len(p) for p in parts)
        if size > self.limit // 2:
            return  # one object may not flush half of the cache
        tmp = os.path.join(self.path, f".{key}.{threading.get_ident()}")
        self.fills += 1
        if not self.direct.write(tmp, parts, size):
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, parts)
            finally:
                os.close(fd)
        os.rename(tmp, os.path.join(self.path, key))
        with self._lock:
            self.used += size - self._lru.pop(key, 0)
            self._lru[key] = size
            self._evict()

    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._lru

    def path_of(self, key: str) -> str | None:
        """The cache file of `key` if it is cached (and marks it used)."""
        with self._lock:
            if key not in self._lru:
                return None
            self._lru.move_to_end(key)
        return os.path.join(self.path, key)

    def drop(self, key: str) -> None:
        with self._lock:
            size = self._lru.pop(key, None)
            if size is None:
                return
            self.used -= size
        try:
            os.unlink(os.path.join(self.path, key))
        except FileNotFoundError:
            pass

    def _evict(self) -> None:
        while self.used > self.limit and self._lru:
            key, size = self._lru.popitem(last=False)
            self.used -= size
            try:
                os.unlink(os.path.join(self.path, key))
            except FileNotFoundError:
                pass


def _write_all(fd: int, parts: list) -> None:
    """One gather write per 512 parts (IOV_MAX is 1024), finishing short writes."""
    for start in range(0, len(parts), 512):
        chunk = parts[start : start + 512]
        done = os.writev(fd, chunk)
        want = sum(len(p) for p in chunk)
        if done < want:
            tail = memoryview(b"".join(chunk))[done:]
            while tail:
                tail = tail[os.write(fd, tail) :]


class S3Backend(Backend):
    store_concurrency = 8  # blocks the data layer stores at once: PUT latency, not the disk, limits
    def __init__(self, loc: S3Location, cache_dir: str | None = None, cache_limit: int = DEFAULT_CACHE_LIMIT,
                 max_requests: int = DEFAULT_MAX_REQUESTS, retry_budget: float = DEFAULT_RETRY_BUDGET,
                 multipart_threshold: int = MULTIPART_THRESHOLD, part_size: int = MULTIPART_PART_SIZE,
                 cache_writes_upto: int = DEFAULT_CACHE_WRITES_UPTO) -> None:
        self.loc = loc
        # Objects put are cached too (write-through) only up to this size: small files then
        # read back without a GET, while a write stream's full blocks are not written to the
        # local disk a second time, which slowed sequential writes (docs/BENCH.md); what was just written
        # is in the kernel's page cache anyway until it is evicted or the store remounted.
        self.cache_writes_upto = cache_writes_upto
        # whole-object GETs under way (reads and prefetches): a second reader waits for the first
        self._whole_gets: dict[str, threading.Event] = {}
        self._prefetches = 0
        self._whole_lock = threading.Lock()
        # objects a prefetch just fetched, handed to the read that wants them without reading
        # them back from the cache file; at most PREFETCH_MAX, the oldest dropped beyond that
        self._fresh: OrderedDict[str, bytes] = OrderedDict()
        self.s3 = S3Client(loc, max_requests, retry_budget, multipart_threshold, part_size)
        self._workers = WorkerPool(max_requests, "s3fuse-s3")
        self.cache = ObjectCache(cache_dir, cache_limit) if cache_dir else None
        self.defer_deletes = False
        self.fenced: str | None = None
        self._pending_deletes: list[str] = []
        self._fds: OrderedDict[str, int] = OrderedDict()  # open cache files (event loop only)
        self._stats = {"s3_gets": 0, "s3_bytes_in": 0, "s3_puts": 0, "s3_bytes_out": 0, "s3_deletes": 0,
                       "s3_prefetches": 0, "s3_prefetch_handoffs": 0}

    @property
    def stats(self) -> dict[str, int]:
        out = dict(self._stats, s3_multipart_puts=self.s3.multipart_puts)
        if self.cache:
            out.update(object_cache_bytes=self.cache.used, object_cache_hits=self.cache.hits,
                       object_cache_misses=self.cache.misses, object_cache_fills=self.cache.fills,
                       object_cache_direct_fills=self.cache.direct.writes)
        return out

    def _key(self, key: str) -> str:
        return self.loc.key(f"objects/{key}")

    async def _run(self, what: str, fn, *args):
        try:
            return await self._workers.run(fn, *args)
        except NoSuchObject:
            raise
        except S3Error as exc:
            log.error("%s", exc)
            raise
        except Exception as exc:  # noqa: BLE001 - botocore's error zoo becomes one errno
            import botocore.exceptions as bex

            if not isinstance(exc, (bex.BotoCoreError, bex.ClientError, OSError)):
                raise
            code, status = client_error(exc)
            msg = f"S3 {what}: {code or status or exc}"
            log.error("%s", msg)
            raise S3Error(msg, errno.EACCES if status == 403 else errno.EIO) from None

    def fence(self, reason: str) -> None:
        """Refuse every further write and delete (the mount lease went to another daemon)."""
        self.fenced = reason

    def _check_fence(self) -> None:
        if self.fenced:
            raise S3Error(f"not writing to {self.loc.url}: {self.fenced}", errno.EIO)

    # -- Backend -----------------------------------------------------------------
    def _put(self, key: str, data: bytes | list[bytes]) -> None:
        self._check_fence()
        self.s3.put(self._key(key), data)
        self._stats["s3_puts"] += 1
        self._stats["s3_bytes_out"] += len(data) if isinstance(data, (bytes, bytearray)) else sum(map(len, data))
        if self.cache and self.cache_writes_upto:
            size = len(data) if isinstance(data, (bytes, bytearray)) else sum(map(len, data))
            if size <= self.cache_writes_upto:
                self.cache.store(key, data)

    async def put(self, key: str, data: bytes | list[bytes]) -> None:
        await self._run(f"PUT {key}", self._put, key, data)

    async def put_many(self, items: list[tuple[str, bytes | list[bytes]]], sync: bool = False) -> None:
        # `sync` asks for nothing more: a PUT that answered 200 is durable
        try:
            async with trio.open_nursery() as nursery:
                for key, data in items:
                    nursery.start_soon(self.put, key, data)
        except BaseExceptionGroup as group:
            raise one_error(group) from None

    def prefetch(self, key: str) -> None:
        """Start fetching a whole object into the cache (a sequential reader's next blocks),
        unless it is cached or on its way, or PREFETCH_MAX are on their way already. Never
        blocks and never fails: after a failed prefetch the read fetches the object itself."""
        if not self.fetches_whole_objects:
            return
        with self._whole_lock:
            if key in self._whole_gets or self._prefetches >= PREFETCH_MAX or self.cache.contains(key):
                return
            done = self._whole_gets[key] = threading.Event()
            self._prefetches += 1
        self._workers.submit(self._prefetch, key, done)

    def _prefetch(self, key: str, done: threading.Event) -> None:
        try:
            body, whole = self._fetch_whole(key)
            self._stats["s3_prefetches"] += 1
            if whole:  # a part of an object too large to cache must not answer a read
                with self._whole_lock:
                    self._fresh[key] = body
                    while len(self._fresh) > PREFETCH_MAX:
                        self._fresh.popitem(last=False)
        except Exception as exc:  # noqa: BLE001 - the read that needs it will fetch and report
            log.debug("prefetch of object %s failed: %s", key, exc)
        finally:
            with self._whole_lock:
                del self._whole_gets[key]
                self._prefetches -= 1
            done.set()

    def _take_fresh(self, key: str, ranges: list[tuple[int, int | None]]) -> list[bytes] | None:
        """The ranges from an object a prefetch just fetched (and cached), if it is held."""
        with self._whole_lock:
            body = self._fresh.pop(key, None)
        if body is None:
            return None
        self._stats["s3_prefetch_handoffs"] += 1
        view = memoryview(body)
        return [bytes(view[off:] if n is None else view[off:off + n]) for off, n in ranges]

    def _get_ranges(self, key: str, ranges: list[tuple[int, int | None]]) -> list[bytes]:
        fresh = self._take_fresh(key, ranges)
        if fresh is not None:
            return fresh
        if self.cache:
            hit = self.cache.read(key, ranges)
            if hit is not None:
                return hit
        whole = self._get_whole(key, ranges)
        if whole is not None:
            return whole
        # ranges close together share one GET; far apart ones get their own ranged GET
        # (a header and one segment in the middle of a block: two small requests). A
        # response that turns out to be the whole object goes into the cache.
        out: list[bytes | None] = [None] * len(ranges)
        order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
        groups: list[list[int]] = []
        end_of = lambda i: None if ranges[i][1] is None else ranges[i][0] + ranges[i][1]  # noqa: E731
        for i in order:
            if groups:
                last_end = max((end_of(j) for j in groups[-1]), key=lambda e: float("inf") if e is None else e)
                if last_end is None or ranges[i][0] - last_end <= RANGE_MERGE_GAP:
                    groups[-1].append(i)
                    continue
            groups.append([i])
        for group in groups:
            lo = min(ranges[i][0] for i in group)
            ends = [end_of(i) for i in group]
            hi = None if any(e is None for e in ends) else max(ends)
            body, total = self.s3.get(self._key(key), lo, hi)
            self._stats["s3_gets"] += 1
            self._stats["s3_bytes_in"] += len(body)
            if self.cache and lo == 0 and len(body) == total:
                self.cache.store(key, body)
            view = memoryview(body)
            for i in group:
                off, n = ranges[i]
                end = total if n is None else off + n
                out[i] = bytes(view[off - lo:end - lo])
        return out  # type: ignore[return-value]

    @property
    def fetches_whole_objects(self) -> bool:
        """Does a read miss GET the whole object (see _get_whole)?"""
        return self.cache is not None and self.cache.limit > 0

    def _get_whole(self, key: str, ranges: list[tuple[int, int | None]]) -> list[bytes] | None:
        """With the cache on, a miss fetches the whole object (one GET, capped at what the
        cache admits) and caches it, so later reads anywhere in it, random ones included,
        cost no request. None if the ranges lie past the cap or the object is larger."""
        if self.cache is None or self.cache.limit <= 0 or any(n is None for _, n in ranges):
            return None
        cap = self.cache.limit // 2  # the cache admits objects up to half its size
        if max(off + n for off, n in ranges) > cap:
            return None
        while True:
            with self._whole_lock:
                coming = self._whole_gets.get(key)
                if coming is None:
                    done = self._whole_gets[key] = threading.Event()
                    break
            coming.wait()  # that GET has its own timeouts and retry budget
            hit = self._take_fresh(key, ranges) or self.cache.read(key, ranges)
            if hit is not None:
                return hit
            # it failed, or the object was too large to cache: fetch it here
        try:
            body, _ = self._fetch_whole(key)
        finally:
            with self._whole_lock:
                del self._whole_gets[key]
            done.set()
        view = memoryview(body)
        return [bytes(view[off:off + n]) for off, n in ranges]

    def _fetch_whole(self, key: str) -> tuple[bytes, bool]:
        """GET an object (up to what the cache admits) and cache it if that was all of it.
        -> (the bytes, whether they are the whole object)"""
        body, total = self.s3.get(self._key(key), 0, self.cache.limit // 2)
        self._stats["s3_gets"] += 1
        self._stats["s3_bytes_in"] += len(body)
        whole = len(body) == total
        if whole:
            self.cache.store(key, body)
        return body, whole

    def try_get_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes] | None:
        """The ranges, if the object is in the cache and the bytes are in the page cache
        (RWF_NOWAIT): served on the event loop, without a thread hand-off. Else None."""
        if self.cache is None:
            return None
        fd = self._fds.get(key)
        if fd is None:
            path = self.cache.path_of(key)
            if path is None:
                return None
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
            except OSError:
                return None
            self._fds[key] = fd
            while len(self._fds) > 128:
                os.close(self._fds.popitem(last=False)[1])
        else:
            self._fds.move_to_end(key)
        out = []
        try:
            for off, n in ranges:
                buf = bytearray(n)
                if os.preadv(fd, [buf], off, os.RWF_NOWAIT) != n:
                    return None
                out.append(bytes(buf))
        except OSError:
            return None
        self.cache.hits += 1
        return out

    def _forget_fd(self, key: str) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            os.close(fd)

    async def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return (await self._run(f"GET {key}", self._get_ranges, key, [(offset, length)]))[0]

    async def get_ranges(self, key: str, ranges: list[tuple[int, int]]) -> list[bytes]:
        return await self._run(f"GET {key}", self._get_ranges, key, ranges)

    async def get_ranges_and(self, key: str, ranges: list[tuple[int, int]], transform):
        return await self._run(f"GET {key}", lambda: transform(self._get_ranges(key, ranges)))

    def _delete(self, key: str) -> None:
        self._check_fence()
        if self.cache:
            self.cache.drop(key)
        self.s3.delete(self._key(key))
        self._stats["s3_deletes"] += 1

    async def delete(self, key: str) -> None:
        self._forget_fd(key)
        with self._whole_lock:
            self._fresh.pop(key, None)
        if self.defer_deletes:
            if self.cache:
                self.cache.drop(key)
            self._pending_deletes.append(key)
            return
        await self._run(f"DELETE {key}", self._delete, key)

    def requeue_deletes(self, keys: list[str]) -> None:
        """Put deletes taken with `take_pending_deletes` back, first, for the next snapshot."""
        self._pending_deletes[:0] = keys

    def take_pending_deletes(self) -> list[str]:
        out, self._pending_deletes = self._pending_deletes, []
        return out

    async def delete_now(self, keys: list[str]) -> None:
        try:
            async with trio.open_nursery() as nursery:
                for key in keys:
                    nursery.start_soon(self._run, f"DELETE {key}", self._delete, key)
        except BaseExceptionGroup as group:
            raise one_error(group) from None

    async def head(self, key: str) -> int | None:
        res = await self._run(f"HEAD {key}", self.s3.head, self._key(key))
        return None if res is None else int(res["ContentLength"])

    async def list(self) -> AsyncIterator[str]:
        prefix = self._key("")
        token = None
        while True:
            items, token = await self._run("LIST", self.s3.list_page, prefix, token)
            for key, _size in items:
                yield key[len(prefix):]
            if token is None:
                return

    async def sync(self) -> None:
        return None  # a PUT that answered 200 is durable

    async def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])
        self.s3.client.close()
