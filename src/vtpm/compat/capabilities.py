"""`--print-capabilities`: the features these programs honour, and nothing more.

Consumers read the JSON object `{"type": ..., "features": [...], "version": ...}` and look for
feature names (libvirt: "cmdarg-pwd-fd", "cmdarg-migration" of `swtpm socket`; "tpm-2.0",
"cmdarg-pwdfile-fd", "cmdarg-create-config-files", "cmdarg-reconfigure-pcr-banks" of
`swtpm_setup`). A name is listed only where the option behind it works here; "tpm-1.2" and
"cmdarg-migration" (`--migration`: host-to-host migration, not built) never are.
"""

from __future__ import annotations

import json

from vtpm import __version__

SWTPM_FEATURES = (
    "tpm-2.0",
    "ctrl-opt-terminate",  # --ctrl ...,terminate
    "cmdarg-key-fd",  # --key fd=N
    "cmdarg-pwd-fd",  # --key pwdfd=N
    "nvram-backend-dir",  # --tpmstate dir= / backend-uri=dir://
    "nvram-backend-file",  # --tpmstate backend-uri=file://
    "tpmstate-opt-lock",  # --tpmstate ...,lock (the state is always locked)
)

SWTPM_SETUP_FEATURES = (
    "tpm-2.0",
    "cmdarg-pwdfile-fd",  # --pwdfile-fd N
    "cmdarg-keyfile-fd",  # --keyfile-fd N
    "cmdarg-create-config-files",  # --create-config-files skip-if-exist (nothing to create)
    "cmdarg-reconfigure-pcr-banks",  # --reconfigure --pcr-banks
    "tpm2-rsa-keysize-2048",  # --rsa-keysize 2048
)


def document(program: str, features: tuple[str, ...]) -> str:
    return json.dumps({"type": program, "features": list(features), "version": __version__})
