"""TPM constants we use, named as in the TCG specifications.

TPM 2.0: TCG TPM 2.0 Library, Part 2 (Structures), sections 6 (constants) and 6.6 (TPM_RC).
TPM 1.2: TCG TPM Main Specification Level 2 Version 1.2, Part 2.
"""

from __future__ import annotations

import enum


class TPM_ALG(enum.IntEnum):  # noqa: N801 (spec name)
    """Algorithm identifiers (Part 2, 6.3; TCG Algorithm Registry)."""

    RSA = 0x0001
    SHA1 = 0x0004
    HMAC = 0x0005
    AES = 0x0006
    KEYEDHASH = 0x0008
    XOR = 0x000A
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    NULL = 0x0010
    SM3_256 = 0x0012
    SM4 = 0x0013
    RSASSA = 0x0014
    RSAES = 0x0015
    RSAPSS = 0x0016
    OAEP = 0x0017
    ECDSA = 0x0018
    ECDH = 0x0019
    ECDAA = 0x001A
    SM2 = 0x001B
    ECSCHNORR = 0x001C
    ECMQV = 0x001D
    KDF1_SP800_56A = 0x0020
    KDF2 = 0x0021
    KDF1_SP800_108 = 0x0022
    ECC = 0x0023
    SYMCIPHER = 0x0025
    CAMELLIA = 0x0026
    CTR = 0x0040
    OFB = 0x0041
    CBC = 0x0042
    CFB = 0x0043
    ECB = 0x0044


MAX_PCR = 23  # PCRs 0..23: the PC Client platform's 24 PCRs, the only ones we select

# The PCR banks this project handles: digest size and name of each (one home for both).
DIGEST_SIZES: dict[int, int] = {
    TPM_ALG.SHA1: 20,
    TPM_ALG.SHA256: 32,
    TPM_ALG.SHA384: 48,
    TPM_ALG.SHA512: 64,
}
HASH_NAMES: dict[int, str] = {
    TPM_ALG.SHA1: "sha1",
    TPM_ALG.SHA256: "sha256",
    TPM_ALG.SHA384: "sha384",
    TPM_ALG.SHA512: "sha512",
}


class TPM_ECC_CURVE(enum.IntEnum):  # noqa: N801 (spec name)
    """ECC curve identifiers (Part 2, 6.4)."""

    NIST_P256 = 0x0003
    NIST_P384 = 0x0004
    NIST_P521 = 0x0005


class TPMA_OBJECT(enum.IntFlag):  # noqa: N801 (spec name)
    """Object attributes (Part 2, 8.3)."""

    FIXEDTPM = 1 << 1
    STCLEAR = 1 << 2
    FIXEDPARENT = 1 << 4
    SENSITIVEDATAORIGIN = 1 << 5
    USERWITHAUTH = 1 << 6
    ADMINWITHPOLICY = 1 << 7
    NODA = 1 << 10
    ENCRYPTEDDUPLICATION = 1 << 11
    RESTRICTED = 1 << 16
    DECRYPT = 1 << 17
    SIGN_ENCRYPT = 1 << 18
    X509SIGN = 1 << 19


class TPMA_NV(enum.IntFlag):  # noqa: N801 (spec name)
    """NV index attributes (Part 2, 13.4); only those vtpm's indices use."""

    AUTHWRITE = 0x00000004
    TPM_NT_COUNTER = 0x00000010  # TPM_NT (bits 4..7) = 1: a monotonic counter
    AUTHREAD = 0x00040000
    NO_DA = 0x02000000
    WRITTEN = 0x20000000


class TPM_EO(enum.IntEnum):  # noqa: N801 (spec name)
    EQ = 0x0000


class TPM_ST(enum.IntEnum):  # noqa: N801 (spec name)
    NO_SESSIONS = 0x8001
    SESSIONS = 0x8002


class TPM_TAG12(enum.IntEnum):  # noqa: N801
    """TPM 1.2 frame tags."""

    RQU_COMMAND = 0x00C1
    RQU_AUTH1_COMMAND = 0x00C2
    RQU_AUTH2_COMMAND = 0x00C3
    RSP_COMMAND = 0x00C4
    RSP_AUTH1_COMMAND = 0x00C5
    RSP_AUTH2_COMMAND = 0x00C6


class TPM_SU(enum.IntEnum):  # noqa: N801
    CLEAR = 0x0000
    STATE = 0x0001


class TPM_CC(enum.IntEnum):  # noqa: N801
    NV_UndefineSpaceSpecial = 0x0000011F
    EvictControl = 0x00000120
    HierarchyControl = 0x00000121
    NV_UndefineSpace = 0x00000122
    Clear = 0x00000126
    HierarchyChangeAuth = 0x00000129
    NV_DefineSpace = 0x0000012A
    PCR_Allocate = 0x0000012B
    CreatePrimary = 0x00000131
    NV_Increment = 0x00000134
    NV_Extend = 0x00000136
    NV_Write = 0x00000137
    PCR_Event = 0x0000013C
    PCR_Reset = 0x0000013D
    SelfTest = 0x00000143
    Startup = 0x00000144
    Shutdown = 0x00000145
    PolicyNV = 0x00000149
    NV_Read = 0x0000014E
    Create = 0x00000153
    Load = 0x00000157
    Quote = 0x00000158
    Sign = 0x0000015D
    Unseal = 0x0000015E
    ContextLoad = 0x00000161
    ContextSave = 0x00000162
    FlushContext = 0x00000165
    PolicyAuthorize = 0x0000016A
    PolicyOR = 0x00000171
    ReadPublic = 0x00000173
    StartAuthSession = 0x00000176
    GetCapability = 0x0000017A
    GetRandom = 0x0000017B
    PCR_Read = 0x0000017E
    PolicyPCR = 0x0000017F
    ReadClock = 0x00000181
    PCR_Extend = 0x00000182
    PolicyGetDigest = 0x00000189


class TPM_ORD12(enum.IntEnum):  # noqa: N801
    """TPM 1.2 ordinals."""

    Extend = 0x00000014
    PcrRead = 0x00000015
    GetRandom = 0x00000046
    GetCapability = 0x00000065
    SaveState = 0x00000098
    Startup = 0x00000099


class TPM_STARTUP12(enum.IntEnum):  # noqa: N801
    CLEAR = 0x0001
    STATE = 0x0002
    DEACTIVATED = 0x0003


class TPM_RC(enum.IntEnum):  # noqa: N801
    SUCCESS = 0x000
    INITIALIZE = 0x100
    FAILURE = 0x101
    SEQUENCE = 0x103
    DISABLED = 0x120
    EXCLUSIVE = 0x121
    AUTH_MISSING = 0x125
    POLICY = 0x126
    PCR = 0x127
    PCR_CHANGED = 0x128
    UPGRADE = 0x12D
    REBOOT = 0x130
    COMMAND_SIZE = 0x142
    COMMAND_CODE = 0x143
    CANCELED = 0x909
    TESTING = 0x90A
    RETRY = 0x922
    LOCALITY = 0x907
    YIELDED = 0x908
    LOCKOUT = 0x921
    NV_UNAVAILABLE = 0x923


# libtpms callbacks answer TPM 1.2 style result codes.
TPM_SUCCESS = 0x0
TPM_FAIL = 0x9
TPM_RETRY = 0x800

HEADER_SIZE = 10
