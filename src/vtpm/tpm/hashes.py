"""The hash algorithms TPM structures name: TPM_ALG id, name, digest size and hash object.

The ids, names and sizes come from `vtpm.tpm.constants` (their one home); this module adds
what a verifier computes with them (hashlib digests, `cryptography` hash objects for
signature checks) and the spec's bound on a digest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes

from vtpm.tpm.constants import DIGEST_SIZES, HASH_NAMES, TPM_ALG

MAX_DIGEST = max(DIGEST_SIZES.values())  # sizeof(TPMU_HA): the largest digest, SHA-512


@dataclass(frozen=True, slots=True)
class HashInfo:
    alg: int
    name: str
    size: int

    def new(self) -> hashes.HashAlgorithm:
        return _HASH_CLASSES[self.name]()

    def digest(self, *parts: bytes) -> bytes:
        h = hashlib.new(self.name)
        for p in parts:
            h.update(p)
        return h.digest()


_HASH_CLASSES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
HASHES: dict[int, HashInfo] = {
    alg: HashInfo(alg, name, DIGEST_SIZES[alg]) for alg, name in HASH_NAMES.items()
}
HASH_BY_NAME: dict[str, HashInfo] = {h.name: h for h in HASHES.values()}


def hash_name(alg: int) -> str:
    """`sha256` for a hash we handle, the TPM_ALG name for another algorithm, else hex."""
    info = HASHES.get(alg)
    if info is not None:
        return info.name
    try:
        return TPM_ALG(alg).name.lower()
    except ValueError:
        return f"{alg:#06x}"
