"""`--print-capabilities`: the features these programs honour, and nothing more.

Consumers read the JSON object `{"type": ..., "features": [...], "version": ...}` and look for
feature names (libvirt: "cmdarg-pwd-fd", "cmdarg-migration" of `swtpm socket`; "tpm-2.0",
"cmdarg-pwdfile-fd", "cmdarg-create-config-files", "cmdarg-reconfigure-pcr-banks" of
`swtpm_setup`). A name is listed only where the option behind it works here; "tpm-1.2" and
"cmdarg-migration" (`--migration`: host-to-host migration, not built) never are.
"""

from __future__ import annotations

import json
import sys

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


def about(action: str, what: str, help_text: str, features: tuple[str, ...] = ()) -> bool:
    """Answer an action that only describes the program, on stdout: "help" (`help_text`),
    "version" (vtpm's, with `what`: e.g. "swtpm-compatible front door"), "capabilities"
    (`features`, as the program named by `what`'s first word). False for any other action."""
    if action == "help":
        sys.stdout.write(help_text)
    elif action == "version":
        print(f"vtpm {__version__} ({what})")
    elif action == "capabilities":
        print(document(what.split("-", 1)[0], features))
    else:
        return False
    return True
