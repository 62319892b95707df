"""RFC 9162 Merkle tree: roots, proofs and their verification, checked against pymerkle."""

from __future__ import annotations

import os

import pytest
from pymerkle import InmemoryTree

from ztai.audit import merkle


def leaves(count: int) -> list[bytes]:
    return [merkle.hash_leaf(f"event-{i}".encode()) for i in range(count)]


def test_hash_prefixes_separate_leaves_from_nodes() -> None:
    left, right = b"a" * 32, b"b" * 32
    assert merkle.hash_leaf(left + right) != merkle.hash_children(left, right)


def test_empty_tree_root_is_hash_of_nothing() -> None:
    assert merkle.root([]) == merkle.empty_root()


@pytest.mark.parametrize("size", [1, 2, 3, 7, 8, 9, 31, 64, 100])
def test_root_matches_pymerkle(size: int) -> None:
    data = [os.urandom(16) for _ in range(size)]
    reference = InmemoryTree(algorithm="sha256")
    for item in data:
        reference.append_entry(item)
    assert merkle.root([merkle.hash_leaf(d) for d in data]) == reference.get_root()


def test_frontier_extension_equals_full_recomputation() -> None:
    hashes = leaves(50)
    frontier: list[bytes] = []
    for size in range(50):
        frontier = merkle.extend_frontier(frontier, size, [hashes[size]])
        assert merkle.frontier_root(frontier) == merkle.root(hashes[: size + 1])
        assert len(frontier) == bin(size + 1).count("1")


@pytest.mark.parametrize("size", range(1, 34))
def test_every_inclusion_proof_verifies(size: int) -> None:
    hashes = leaves(size)
    root = merkle.root(hashes)
    for index in range(size):
        merkle.verify_inclusion(hashes[index], index, size, merkle.inclusion_proof(index, hashes), root)


@pytest.mark.parametrize("size", range(1, 34))
def test_every_consistency_proof_verifies(size: int) -> None:
    hashes = leaves(size)
    for old in range(1, size + 1):
        proof = merkle.consistency_proof(old, hashes)
        merkle.verify_consistency(old, size, merkle.root(hashes[:old]), merkle.root(hashes), proof)


def test_inclusion_proof_rejects_wrong_leaf_index_and_root() -> None:
    hashes = leaves(13)
    root = merkle.root(hashes)
    proof = merkle.inclusion_proof(5, hashes)
    with pytest.raises(merkle.ProofError):
        merkle.verify_inclusion(hashes[6], 5, 13, proof, root)
    with pytest.raises(merkle.ProofError):
        merkle.verify_inclusion(hashes[5], 4, 13, proof, root)
    with pytest.raises(merkle.ProofError):
        merkle.verify_inclusion(hashes[5], 5, 13, proof, merkle.root(hashes[:12]))
    with pytest.raises(merkle.ProofError):
        merkle.verify_inclusion(hashes[5], 5, 13, proof[:-1], root)
    with pytest.raises(merkle.ProofError):
        merkle.verify_inclusion(hashes[5], 5, 13, [*proof, root], root)
    with pytest.raises(merkle.ProofError):
        merkle.verify_inclusion(hashes[5], 13, 13, proof, root)


def test_consistency_proof_rejects_a_rewritten_history() -> None:
    hashes = leaves(20)
    forged = list(hashes)
    forged[3] = merkle.hash_leaf(b"rewritten")
    proof = merkle.consistency_proof(7, forged)
    with pytest.raises(merkle.ProofError):
        merkle.verify_consistency(7, 20, merkle.root(hashes[:7]), merkle.root(forged), proof)
    with pytest.raises(merkle.ProofError):
        merkle.verify_consistency(7, 20, merkle.root(hashes[:7]), merkle.root(hashes), proof[:-1])
    with pytest.raises(merkle.ProofError):
        merkle.verify_consistency(0, 20, merkle.root([]), merkle.root(hashes), [])


def test_out_of_range_requests_raise() -> None:
    with pytest.raises(merkle.ProofError):
        merkle.inclusion_proof(3, leaves(3))
    with pytest.raises(merkle.ProofError):
        merkle.consistency_proof(4, leaves(3))
