"""The systemd unit: it passes `systemd-analyze verify` and has what SPEC §7 asks for."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

UNIT = REPO / "systemd" / "relay.service"
NEEDED_SYSTEMD = 253  # Type=notify-reload


def systemd_version() -> int | None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return None
    out = subprocess.run([analyze, "--version"], capture_output=True, text=True, check=False)
    match = re.match(r"systemd (\d+)", out.stdout)
    return int(match[1]) if match else None


def test_unit_has_the_settings_the_spec_asks_for() -> None:
    """notify-reload, validate before start, no restart loop on a bad config, a state dir."""
    settings = {
        key: value
        for key, _, value in (
            line.partition("=") for line in UNIT.read_text().splitlines() if "=" in line
        )
        if not key.startswith("#")
    }
    assert settings["Type"] == "notify-reload"
    # "-": the main process's 78 is what RestartPreventExitStatus sees (see the unit)
    assert settings["ExecStartPre"] == "-/usr/local/bin/relay validate"
    assert settings["ExecStart"] == "/usr/local/bin/relay run"
    assert settings["StateDirectory"] == "relay"
    assert settings["DynamicUser"] == "yes"
    assert settings["SyslogIdentifier"] == "relay"
    assert settings["RestartPreventExitStatus"] == "78"
    assert settings["LimitNOFILE"] == "65536"
    assert settings["ProtectSystem"] == "strict"
    assert settings["NoNewPrivileges"] == "yes"
    assert "AF_UNIX" in settings["RestrictAddressFamilies"]  # the notify socket
    assert settings["WatchdogSec"]


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit (with ExecStart pointing at this install)."""
    version = systemd_version()
    if version is None or version < NEEDED_SYSTEMD:
        pytest.skip(
            f"systemd-analyze {version or 'missing'}: Type=notify-reload needs systemd >= "
            f"{NEEDED_SYSTEMD} (scripts/test installs it from bookworm-backports under CI)"
        )
    relay = Path(sys.executable).parent / "relay"
    unit = tmp_path / "relay.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/relay", str(relay)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],  # noqa: S607 - found on PATH above
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "relay.service" not in result.stderr, result.stderr
