"""S3 errors: the code, its HTTP status, and the filesystem errno each maps from."""

from __future__ import annotations

import errno as _errno

STATUS = {
    "AccessDenied": 403, "SignatureDoesNotMatch": 403, "InvalidAccessKeyId": 403,
    "RequestTimeTooSkewed": 403,
    "NoSuchBucket": 404, "NoSuchKey": 404, "NoSuchUpload": 404,
    "ServerSideEncryptionConfigurationNotFoundError": 404,
    "MethodNotAllowed": 405,
    "BucketAlreadyOwnedByYou": 409, "BucketAlreadyExists": 409, "BucketNotEmpty": 409,
    "OperationAborted": 409,
    "MissingContentLength": 411, "PreconditionFailed": 412, "InvalidRange": 416,
    "InternalError": 500, "NotImplemented": 501, "SlowDown": 503, "RequestTimeout": 400,
    "KMS.DisabledException": 400, "KMS.NotFoundException": 400, "KMS.KMSInvalidStateException": 400,
}


class S3Error(Exception):
    """An S3 error response: `code` (S3's), a message, extra XML elements."""

    def __init__(self, code: str, message: str, status: int | None = None, debug: dict | None = None,
                 **extra: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or STATUS.get(code, 400)
        self.extra = {k[0].upper() + k[1:]: str(v) for k, v in extra.items()}
        self.debug = debug or {}
        self.headers: list[tuple[str, str]] = []


def from_errno(err: int, message: str, what: str = "key") -> S3Error:
    """A filesystem error (S3fuseError / OSError errno) as the S3 error a client expects."""
    if err == _errno.ENOENT:
        return S3Error("NoSuchKey" if what == "key" else "NoSuchBucket", message)
    if err in (_errno.EACCES, _errno.EPERM):
        return S3Error("AccessDenied", message)
    if err == _errno.EKEYREVOKED:
        return S3Error("KMS.DisabledException", message)
    if err == _errno.EKEYREJECTED:
        return S3Error("AccessDenied", message)
    if err == _errno.ENOKEY:
        return S3Error("AccessDenied", message)
    if err == _errno.ENOSPC:
        return S3Error("InternalError", message)
    if err in (_errno.ENAMETOOLONG,):
        return S3Error("KeyTooLongError", message)
    if err in (_errno.ENOTDIR, _errno.EISDIR, _errno.EEXIST):
        return S3Error("InvalidRequest", message)
    if err == _errno.ENOTEMPTY:
        return S3Error("BucketNotEmpty", message)
    return S3Error("InternalError", message)
