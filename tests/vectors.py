"""The test vector of docs/FORMAT.md: fixed inputs, so the encoding is reproducible."""

from s3fuse import format as fmt

DATA_KEY = bytes(range(32))
KEK = bytes(range(32, 64))
OBJECT_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
STORE_ID = bytes.fromhex("a0" * 16)
PLAINTEXT = b"s3fuse test vector: three segments"
HEADER = fmt.ObjectHeader(OBJECT_ID, STORE_ID, inode=2, block=0, mode="AES256", key_ref="",
                          segment_size=16, length=len(PLAINTEXT))


# a patch of that block: patch 0 of block 0, applying to the object above
PATCH_OBJECT_ID = bytes.fromhex("ffeeddccbbaa99887766554433221100")
PATCH_PLAINTEXT = fmt.encode_patch([(3, b"abc"), (20, b"patch")])
PATCH_HEADER = fmt.ObjectHeader(PATCH_OBJECT_ID, STORE_ID, inode=2, block=fmt.patch_number(0, 0), mode="AES256",
                                key_ref="", segment_size=16, length=len(PATCH_PLAINTEXT), base=OBJECT_ID)


def counter_nonces():
    state = {"n": 0}

    def random(n: int) -> bytes:
        state["n"] += 1
        return state["n"].to_bytes(n, "big")

    return random


def object_bytes() -> bytes:
    return fmt.encrypt_object(HEADER, DATA_KEY, PLAINTEXT, random=counter_nonces())


def patch_bytes() -> bytes:
    return fmt.encrypt_object(PATCH_HEADER, DATA_KEY, PATCH_PLAINTEXT, random=counter_nonces())


def key_slot_bytes() -> bytes:
    aad = fmt.key_slot_aad(STORE_ID, OBJECT_ID, 2, 0, "AES256", "")
    return fmt.wrap_data_key(KEK, DATA_KEY, aad, random=counter_nonces())


META_KEY = bytes(range(64, 96))  # the metadata key of the authenticated-metadata vector


def metadata_macs() -> dict[str, bytes]:
    """The MACs of docs/FORMAT.md's authenticated-metadata vector: a file (inode 2) named
    "a" in the root, with block 0 stored as the object above, and a symlink (inode 3)."""
    from s3fuse import metaauth as ma

    block = ma.block_mac(META_KEY, 2, 0, OBJECT_ID, len(PLAINTEXT), len(PLAINTEXT), 64, "AES256", "", 1,
                         key_slot_bytes())
    entry = ma.entry_mac(META_KEY, 1, b"a", 2)
    symlink = ma.symlink_mac(META_KEY, 3, b"a")
    inode = ma.inode_mac(META_KEY, 2, 0o100644, 1000, 1000, 1, len(PLAINTEXT), 0, None,
                         ma.digest_of([block]))
    config = bytes.fromhex(ma.config_mac(META_KEY, {"store_id": STORE_ID.hex(), "block_size": 4194304,
                                                    "segment_size": 65536, "default_sse": "AES256"}))
    return {"block": block, "entry": entry, "symlink": symlink, "inode": inode, "config": config}


if __name__ == "__main__":
    import textwrap

    print("object:")
    print("\n".join(textwrap.wrap(object_bytes().hex(), 64)))
    print("patch:")
    print("\n".join(textwrap.wrap(patch_bytes().hex(), 64)))
    print("key slot:")
    print("\n".join(textwrap.wrap(key_slot_bytes().hex(), 64)))
    for name, mac in metadata_macs().items():
        print(f"{name} MAC: {mac.hex()}")
