"""tpm2-pytss (ESAPI) seals under a PolicyPCR policy and unseals, through both TCTIs."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import RunningInstance, instance

pytss = pytest.importorskip("tpm2_pytss", reason="tpm2-pytss is a dev dependency of the project")
from tpm2_pytss import (  # noqa: E402
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_RC,
    TPM2_SE,
    TPM2_SU,
    TPM2B_DIGEST,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPMA_OBJECT,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_SENSITIVE_CREATE,
    TPMT_HA,
    TPMT_PUBLIC,
    TPMT_SYM_DEF,
    TPMU_HA,
    TCTILdr,
    TSS2_Exception,
)

pytestmark = pytest.mark.integration

os.environ.setdefault("TSS2_LOG", "all+NONE")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningInstance]:
    base = tmp_path_factory.mktemp("pytss")
    with instance(base / "state", base / "state.key") as inst:
        yield inst


def _policy_pcr(ectx: ESAPI, kind: TPM2_SE, sel: TPML_PCR_SELECTION) -> ESYS_TR:
    session = ectx.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, kind, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256
    )
    ectx.policy_pcr(session, TPM2B_DIGEST(), sel)
    return session


@pytest.mark.parametrize("kind", ["swtpm", "mssim"])
def test_seal_unseal_under_policy_pcr(running: RunningInstance, kind: str, tmp_path: Path) -> None:
    port = running.port if kind == "swtpm" else running.port + 2  # type: ignore[operator]
    ectx = ESAPI(TCTILdr(kind, f"host=127.0.0.1,port={port}"))
    try:
        ectx.startup(TPM2_SU.CLEAR)
        sel = TPML_PCR_SELECTION.parse("sha256:16")
        trial = _policy_pcr(ectx, TPM2_SE.TRIAL, sel)
        digest = ectx.policy_get_digest(trial)
        ectx.flush_context(trial)

        primary, *_ = ectx.create_primary(TPM2B_SENSITIVE_CREATE(), "ecc")
        template = TPMT_PUBLIC(
            type=TPM2_ALG.KEYEDHASH,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT,
            authPolicy=digest,
        )
        template.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
        secret = os.urandom(24)
        sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=TPM2B_SENSITIVE_DATA(secret)))
        private, public, *_ = ectx.create(primary, sensitive, TPM2B_PUBLIC(template))
        sealed = ectx.load(primary, private, public)

        session = _policy_pcr(ectx, TPM2_SE.POLICY, sel)
        assert bytes(ectx.unseal(sealed, session1=session)) == secret
        ectx.flush_context(session)

        ectx.pcr_extend(
            ESYS_TR.PCR16,
            TPML_DIGEST_VALUES(
                [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=b"\x01" * 32))]
            ),
        )
        session = _policy_pcr(ectx, TPM2_SE.POLICY, sel)
        with pytest.raises(TSS2_Exception) as excinfo:
            ectx.unseal(sealed, session1=session)
        assert excinfo.value.error == TPM2_RC.POLICY_FAIL
        for handle in (session, sealed, primary):
            ectx.flush_context(handle)
    finally:
        ectx.close()
