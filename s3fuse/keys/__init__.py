"""Key management: the root key, the keyring (SSE-S3 master keys, the metadata key), the
built-in KMS and the Transit client, key generations."""
