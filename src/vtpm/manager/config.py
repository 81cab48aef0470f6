"""The Manager's configuration: written once by `vtpm manager init`, read by `run`.

`<data-dir>/manager.json` holds what is not secret and rarely changes: the hardware TPM to use
(a TCTI string; none means /dev/tpmrm0 when present, otherwise a swtpm simulator the Manager
starts itself), the group allowed to administer besides root, and the label policy file.
Everything else lives in the database beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vtpm.errors import ConfigError
from vtpm.files import write_atomic
from vtpm.manager.deepquote import DEFAULT_WINDOW

CONFIG_NAME = "manager.json"
DEFAULT_DATA_DIR = Path("/var/lib/vtpm")
HW_DEVICE = Path("/dev/tpmrm0")


@dataclass(frozen=True, slots=True)
class ManagerConfig:
    data_dir: Path
    tcti: str | None = None
    admin_gid: int | None = None
    labels_file: Path | None = None
    quote_window: float = DEFAULT_WINDOW  # seconds a deep quote waits for company

    @property
    def db_path(self) -> Path:
        return self.data_dir / "manager.db"

    @property
    def admin_socket(self) -> Path:
        return self.data_dir / "admin.sock"

    @property
    def simulator_dir(self) -> Path:
        return self.data_dir / "hwtpm"

    @property
    def run_dir(self) -> Path:
        return self.data_dir / "run"

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "log"

    def vtpm_dir(self, vtpm_uuid: object) -> Path:
        return self.data_dir / "vtpms" / str(vtpm_uuid)

    def to_json(self) -> dict[str, object]:
        return {
            "tcti": self.tcti,
            "admin_gid": self.admin_gid,
            "labels_file": None if self.labels_file is None else str(self.labels_file),
            "quote_window": self.quote_window,
        }

    def save(self) -> None:
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = json.dumps(self.to_json(), indent=2) + "\n"
        write_atomic(self.data_dir / CONFIG_NAME, data.encode())

    @classmethod
    def load(cls, data_dir: Path) -> ManagerConfig:
        path = data_dir / CONFIG_NAME
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"{data_dir} is not a Manager data directory (no {CONFIG_NAME}); "
                f"run: vtpm manager init --data-dir {data_dir}"
            ) from None
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path} is unreadable: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} is not a JSON object")
        tcti = raw.get("tcti")
        gid = raw.get("admin_gid")
        labels = raw.get("labels_file")
        if tcti is not None and not isinstance(tcti, str):
            raise ConfigError(f"{path}: tcti must be a string")
        if gid is not None and not isinstance(gid, int):
            raise ConfigError(f"{path}: admin_gid must be a number")
        if labels is not None and not isinstance(labels, str):
            raise ConfigError(f"{path}: labels_file must be a path")
        window = raw.get("quote_window", DEFAULT_WINDOW)
        if not isinstance(window, int | float) or isinstance(window, bool) or not 0 <= window <= 5:
            raise ConfigError(f"{path}: quote_window must be 0..5 seconds")
        return cls(data_dir, tcti, gid, None if labels is None else Path(labels), float(window))
