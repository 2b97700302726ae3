"""Key management: the root key, the SSE-S3 master keyring, and (later) KMS and customer keys."""
