"""An S3 API over the mounted store (docs/S3API.md)."""
