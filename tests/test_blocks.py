"""Block keys: chaining, full blocks only, namespace/model isolation, id mapping."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.blocks import BlockHasher, block_id


def test_only_full_blocks_count() -> None:
    h = BlockHasher(block_size=4)
    assert len(h.token_keys(list(range(11)))) == 2
    assert h.token_keys([1, 2, 3]) == []
    assert all(len(k) == 16 for k in h.token_keys(list(range(8))))


def test_chaining_names_the_whole_prefix() -> None:
    h = BlockHasher(block_size=2)
    a = h.token_keys([1, 2, 3, 4, 5, 6])
    b = h.token_keys([1, 2, 3, 4, 9, 9])
    c = h.token_keys([7, 7, 3, 4, 5, 6])
    assert a[:2] == b[:2] and a[2] != b[2]
    # same block contents after a different prefix hash differently
    assert a[1] != c[1] and a[2] != c[2]


def test_namespace_model_and_seed_isolate() -> None:
    toks = list(range(32))
    base = BlockHasher().token_keys(toks)
    assert BlockHasher(namespace="t2").token_keys(toks) != base
    assert BlockHasher(model="m2").token_keys(toks) != base
    assert BlockHasher(seed=b"other").token_keys(toks) != base
    # length-prefixing: moving a byte between namespace and model changes the key
    split_a = BlockHasher(namespace="ab", model="c").token_keys(toks)
    assert split_a != BlockHasher(namespace="a", model="bc").token_keys(toks)


def test_text_blocks_and_ids() -> None:
    h = BlockHasher(text_block_bytes=8)
    keys = h.text_keys("x" * 20)
    assert len(keys) == 2
    assert h.text_block_ids("x" * 20) == [block_id(k) for k in keys]
    assert all(0 <= i < 2**64 for i in h.text_block_ids("hello world, hello world"))


def test_id_keys_are_stable_and_distinct() -> None:
    h = BlockHasher()
    assert h.id_keys([1, 2]) == h.id_keys([1, 2])
    assert len(set(h.id_keys(list(range(100))))) == 100


@pytest.mark.parametrize("bad", [[-1], [2**32]])
def test_token_range_checked(bad: list[int]) -> None:
    with pytest.raises(ValueError):
        BlockHasher(block_size=1).token_keys(bad)


def test_bad_parameters_rejected() -> None:
    with pytest.raises(ValueError):
        BlockHasher(block_size=0)
    with pytest.raises(ValueError):
        BlockHasher().id_keys([2**64])


def test_packed_keys_equal_token_keys() -> None:
    import struct

    from kvmesh.blocks import BlockHasher

    h = BlockHasher(model="m", block_size=4)
    tokens = list(range(10, 23))  # three full blocks and one partial
    parent = b"p" * 16
    assert h.packed_keys(struct.pack("<13I", *tokens), parent) == h.token_keys(tokens, parent)
    assert len(h.packed_keys(struct.pack("<13I", *tokens))) == 3


def reference_keys(seed: bytes, namespace: str, model: str, raw: bytes, step: int, parent: bytes) -> list[bytes]:
    """The block-key definition written with hashlib, to check the C chain (`kvmesh/_blocks.c`)."""
    import hashlib
    import struct

    ns, md = namespace.encode(), model.encode()
    out: list[bytes] = []
    for start in range(0, len(raw) - step + 1, step):
        h = hashlib.blake2b(digest_size=16, key=seed)
        h.update(struct.pack("<Q", len(ns)) + ns + struct.pack("<Q", len(md)) + md)
        h.update(parent + raw[start : start + step])
        parent = h.digest()
        out.append(parent)
    return out


@settings(max_examples=300, deadline=None)
@given(
    seed=st.binary(max_size=64),
    namespace=st.text(max_size=90),
    model=st.text(max_size=140),
    raw=st.binary(max_size=2000),
    step=st.integers(1, 300),
    parent=st.binary(min_size=16, max_size=16),
)
def test_native_chain_equals_the_definition(seed: bytes, namespace: str, model: str, raw: bytes, step: int,
                                            parent: bytes) -> None:
    # Every length of key, prefix and piece: empty keys, prefixes and pieces that end exactly on
    # BLAKE2b's 128-byte block boundary, pieces longer than a block.
    h = BlockHasher(seed=seed, namespace=namespace, model=model, block_size=1, text_block_bytes=step)
    assert h._keys(raw, step, parent) == reference_keys(seed, namespace, model, raw, step, parent)


def test_native_chain_refuses_what_it_cannot_hash() -> None:
    h = BlockHasher()
    with pytest.raises(ValueError):
        h.token_keys(list(range(32)), parent=b"short")
    with pytest.raises(ValueError):
        h._keys(b"x" * 64, 0, b"\x00" * 16)
