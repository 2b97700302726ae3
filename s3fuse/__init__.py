"""s3fuse: a FUSE filesystem that stores files as encrypted objects, with S3's SSE model."""

__version__ = "0.1.0"
