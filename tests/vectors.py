"""The test vector of docs/FORMAT.md: fixed inputs, so the encoding is reproducible."""

from s3fuse import format as fmt

DATA_KEY = bytes(range(32))
KEK = bytes(range(32, 64))
OBJECT_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
STORE_ID = bytes.fromhex("a0" * 16)
PLAINTEXT = b"s3fuse test vector: three segments"
HEADER = fmt.ObjectHeader(OBJECT_ID, STORE_ID, inode=2, block=0, mode="AES256", key_ref="",
                          segment_size=16, length=len(PLAINTEXT))


def counter_nonces():
    state = {"n": 0}

    def random(n: int) -> bytes:
        state["n"] += 1
        return state["n"].to_bytes(n, "big")

    return random


def object_bytes() -> bytes:
    return fmt.encrypt_object(HEADER, DATA_KEY, PLAINTEXT, random=counter_nonces())


def key_slot_bytes() -> bytes:
    aad = fmt.key_slot_aad(STORE_ID, OBJECT_ID, 2, 0, "AES256", "")
    return fmt.wrap_data_key(KEK, DATA_KEY, aad, random=counter_nonces())


if __name__ == "__main__":
    import textwrap

    print("object:")
    print("\n".join(textwrap.wrap(object_bytes().hex(), 64)))
    print("key slot:")
    print("\n".join(textwrap.wrap(key_slot_bytes().hex(), 64)))
