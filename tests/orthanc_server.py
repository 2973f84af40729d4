"""A real Orthanc with its DICOMweb plugin for the tests: 127.0.0.1, free port, throwaway storage.

Needs the Debian packages ``orthanc`` and ``orthanc-dicomweb`` (``.ci/run`` installs them);
:func:`orthanc_or_skip` says why the tests skip when they are missing.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins"))
USER = "cxr-test"
PASSWORD = "pw-Zq7-not-in-any-output"


def _plugin() -> Path | None:
    for folder in PLUGIN_DIRS:
        lib = folder / "libOrthancDicomWeb.so"
        if lib.is_file():
            return lib
    return None


def orthanc_or_skip() -> tuple[str, Path]:
    binary = shutil.which("Orthanc")
    if binary is None:
        pytest.skip("Orthanc is not installed (apt-get install -y orthanc orthanc-dicomweb)")
    plugin = _plugin()
    if plugin is None:
        pytest.skip("the Orthanc DICOMweb plugin is not installed (apt-get install -y orthanc-dicomweb)")
    return binary, plugin


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    folder: Path
    port: int
    binary: str
    plugin: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.base}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return (USER, PASSWORD)

    def start(self) -> None:
        config = {
            "Name": "cxr-batch-tests",
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "HttpPort": self.port,
            "DicomServerEnabled": False,
            "DicomPort": free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [str(self.plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1,
        }
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [self.binary, str(self.folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.base}/system", auth=self.auth, timeout=1).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError("Orthanc did not start within 30 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def upload(self, paths: list[Path]) -> None:
        for path in paths:
            r = requests.post(f"{self.base}/instances", data=path.read_bytes(), auth=self.auth, timeout=30)
            r.raise_for_status()


def start_orthanc(folder: Path, files: list[Path]) -> Orthanc:
    binary, plugin = orthanc_or_skip()
    folder.mkdir(parents=True, exist_ok=True)
    server = Orthanc(folder=folder, port=free_port(), binary=binary, plugin=plugin)
    server.start()
    server.upload(files)
    return server
