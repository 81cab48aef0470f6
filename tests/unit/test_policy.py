"""vtpm.tpm.policy: OR-tree shape, PCR selection bytes, PcrState validation (no TPM here).

That the digests equal the TPM's own is checked against swtpm in
tests/integration/test_hwtpm.py; these tests pin the structure around them.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtpm.errors import ConfigError
from vtpm.tpm import policy
from vtpm.tpm.policy import OrTree, PcrState


def _leaves(n: int) -> tuple[bytes, ...]:
    return tuple(hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(n))


def _fold(tree: OrTree, index: int) -> bytes:
    """Walk the path as a policy session would: each list must hold the digest so far."""
    acc = tree.leaves[index]
    for branches in tree.path(index):
        assert 2 <= len(branches) <= policy.MAX_OR_BRANCHES
        assert acc in branches
        acc = policy.policy_or(branches)
    return acc


# OR tree ---------------------------------------------------------------------------------------

# leaves -> path length of each leaf index (bottom-up PolicyOR lists)
SHAPES = {
    1: {0: 0},
    2: {0: 1, 1: 1},
    8: {0: 1, 7: 1},
    9: {0: 2, 7: 2, 8: 1},  # leaf 8 is alone in its group of eight and passed up unchanged
    64: {0: 2, 9: 2, 63: 2},
    65: {0: 3, 63: 3, 64: 1},
}


@pytest.mark.parametrize("n", sorted(SHAPES))
def test_or_tree_path_lengths_and_folding(n: int) -> None:
    tree = OrTree(_leaves(n))
    for index, length in SHAPES[n].items():
        assert len(tree.path(index)) == length
    for index in range(n):
        assert _fold(tree, index) == tree.root


def test_or_tree_roots_by_hand() -> None:
    one = _leaves(1)
    assert OrTree(one).root == one[0]
    two = _leaves(2)
    assert OrTree(two).root == policy.policy_or(two)
    nine = _leaves(9)
    assert OrTree(nine).root == policy.policy_or([policy.policy_or(nine[:8]), nine[8]])
    assert OrTree(nine).path(8) == [(policy.policy_or(nine[:8]), nine[8])]
    sixty_five = _leaves(65)
    groups = [policy.policy_or(sixty_five[i : i + 8]) for i in range(0, 64, 8)]
    expected = policy.policy_or([policy.policy_or(groups), sixty_five[64]])
    assert OrTree(sixty_five).root == expected
    assert OrTree(sixty_five).path(64) == [(policy.policy_or(groups), sixty_five[64])]
    assert OrTree(sixty_five).path(10) == [
        tuple(sixty_five[8:16]),
        tuple(groups),
        (policy.policy_or(groups), sixty_five[64]),
    ]


@given(st.integers(min_value=1, max_value=200), st.data())
def test_every_path_folds_to_the_root(n: int, data: st.DataObject) -> None:
    tree = OrTree(_leaves(n))
    index = data.draw(st.integers(min_value=0, max_value=n - 1))
    assert _fold(tree, index) == tree.root


def test_or_tree_refuses_empty_and_bad_index() -> None:
    with pytest.raises(ConfigError):
        OrTree(())
    tree = OrTree(_leaves(3))
    for bad in (-1, 3):
        with pytest.raises(IndexError):
            tree.path(bad)


def test_policy_or_branch_count() -> None:
    for n in (0, 1, 9):
        with pytest.raises(ConfigError, match="branches"):
            policy.policy_or(_leaves(n))


def test_policy_or_digest_by_hand() -> None:
    a, b = _leaves(2)
    expected = hashlib.sha256(bytes(32) + bytes.fromhex("00000171") + a + b).digest()
    assert policy.policy_or([a, b]) == expected


# PCR selection ---------------------------------------------------------------------------------

# TPML_PCR_SELECTION: count=1 | hash=SHA-256 (000b) | sizeofSelect=3 | pcrSelect[3]
SELECTIONS = [
    ([0], "00000001000b03010000"),
    ([0, 7, 16], "00000001000b03810001"),
    ([8, 15], "00000001000b03008100"),
    ([23], "00000001000b03000080"),
    ([4, 5, 6], "00000001000b03700000"),
    (list(range(24)), "00000001000b03ffffff"),
    ([16, 0], "00000001000b03010001"),  # order does not matter
]


@pytest.mark.parametrize(("pcrs", "expected"), SELECTIONS)
def test_pcr_selection_bytes(pcrs: list[int], expected: str) -> None:
    assert policy.pcr_selection(pcrs) == bytes.fromhex(expected)


@pytest.mark.parametrize("pcrs", [[], [24], [-1], [3, 3]])
def test_pcr_selection_refuses(pcrs: list[int]) -> None:
    with pytest.raises(ConfigError):
        policy.pcr_selection(pcrs)


# PcrState --------------------------------------------------------------------------------------

V = bytes(range(32))


@pytest.mark.parametrize(
    ("pcrs", "values"),
    [
        ((7, 0), (V, V)),  # unsorted
        ((0, 0), (V, V)),  # twice
        ((), ()),  # empty
        ((24,), (V,)),  # out of range
        ((-1,), (V,)),
        ((0, 7), (V,)),  # one value short
        ((0,), (V, V)),  # one value too many
        ((0,), (V[:20],)),  # a SHA-1 sized value
        ((0,), (V + b"\0",)),
    ],
)
def test_pcr_state_validation(pcrs: tuple[int, ...], values: tuple[bytes, ...]) -> None:
    with pytest.raises(ConfigError):
        PcrState(pcrs, values)


def test_pcr_state_digests_by_hand() -> None:
    a, b = bytes(32), b"\xff" * 32
    state = PcrState.from_values({16: b, 0: a})
    assert state.pcrs == (0, 16)
    assert state.values == (a, b)
    assert state.pcr_digest() == hashlib.sha256(a + b).digest()
    expected = hashlib.sha256(
        bytes(32)
        + bytes.fromhex("0000017f")
        + bytes.fromhex("00000001000b03010001")
        + hashlib.sha256(a + b).digest()
    ).digest()
    assert state.policy() == expected
    assert state.differences({0: a, 16: a}) == [16]
    assert state.differences({0: a}) == [16]
    assert state.differences({0: a, 16: b, 7: a}) == []


def test_pcr_state_json_round_trip_and_refusals() -> None:
    state = PcrState((0, 7), (V, bytes(32)))
    assert PcrState.from_json(state.to_json()) == state
    bad: list[object] = [
        None,
        [],
        {"pcrs": [0]},
        {"pcrs": [0], "values": ["zz"]},
        {"pcrs": ["x"], "values": [V.hex()]},
        {"pcrs": [0, 1], "values": [V.hex()]},
    ]
    for raw in bad:
        with pytest.raises(ConfigError):
            PcrState.from_json(raw)


# owner key and authorization -------------------------------------------------------------------


def test_verify_public_layout_and_name() -> None:
    x, y = b"\x01" * 32, b"\x02" * 32
    public = policy.ecc_p256_verify_public(x, y)
    assert public[:8] == bytes.fromhex("0023000b00040040")
    assert public.endswith(b"\x00\x20" + x + b"\x00\x20" + y)
    assert policy.object_name(public) == b"\x00\x0b" + hashlib.sha256(public).digest()
    with pytest.raises(ConfigError):
        policy.ecc_p256_verify_public(x[:31], y)


def test_policy_authorize_and_authorization_hash_by_hand() -> None:
    name, ref, approved = b"\x00\x0b" + V, b"group-ref", bytes(32)
    inner = hashlib.sha256(bytes(32) + bytes.fromhex("0000016a") + name).digest()
    assert policy.policy_authorize(name, ref) == hashlib.sha256(inner + ref).digest()
    assert policy.authorization_hash(approved, ref) == hashlib.sha256(approved + ref).digest()
    root = OrTree(_leaves(3)).root
    auth = policy.policy_authorize(name, ref)
    assert policy.seal_policy(root, auth) == policy.policy_or([root, auth])


# approval epochs -------------------------------------------------------------------------------


def test_approval_counter_public_and_name_by_hand() -> None:
    # TPMS_NV_PUBLIC: handle, nameAlg SHA-256, attributes TPM_NT_COUNTER | AUTHWRITE | AUTHREAD
    # | NO_DA (| WRITTEN), empty authPolicy, dataSize 8
    written = bytes.fromhex("01500100000b2204001400000008")
    assert policy.approval_nv_public(0x01500100) == written
    assert policy.approval_nv_public(0x01500100, written=False)[6:10] == bytes.fromhex("02040014")
    name = bytes.fromhex("000b") + hashlib.sha256(written).digest()
    assert policy.approval_nv_name(0x01500100) == name
    for bad in (0x01500000, 0x01500200, 0x015000FF, True):
        with pytest.raises(ConfigError):
            policy.approval_nv_public(bad)


def test_epoch_policy_by_hand() -> None:
    root = _leaves(1)[0]
    name = policy.approval_nv_name(0x01500101)
    operand = (41).to_bytes(8, "big")
    args = hashlib.sha256(operand + bytes.fromhex("00000000")).digest()  # offset 0, EQ
    expect = hashlib.sha256(root + bytes.fromhex("00000149") + args + name).digest()
    assert policy.epoch_policy(root, 0x01500101, 41) == expect
    epoch = policy.Epoch(0x01500101, 41)
    assert epoch.policy(root) == expect == policy.at_epoch(root, epoch)
    assert policy.at_epoch(root, None) == root
    assert epoch.next() == policy.Epoch(0x01500101, 42)
    assert policy.Epoch.from_json(epoch.to_json()) == epoch
    for bad in ({"nv": 0x01500101}, {"nv": 0x01500101, "value": -1}, [1, 2]):
        with pytest.raises(ConfigError):
            policy.Epoch.from_json(bad)
