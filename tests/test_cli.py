"""The `relay` command line as a user runs it: real subprocesses, exit codes, stdout, stderr."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sqlite3
import stat
import subprocess
import sys
import tomllib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme

from relay import __version__

from conftest import Daemon, free_port, server_toml

TIMEOUT_S = 30

GOOD = """
[server]
listen = "127.0.0.1:{listen}"
admin = "127.0.0.1:{admin}"
journal = "relay.db"

[sources.github]
verify = {{ scheme = "github", secret = "${{GH_SECRET}}" }}

[sources.shop]
path = "/in/shop"
verify = {{ scheme = "shopify", secret = "${{SHOP_SECRET}}" }}

[targets.ci]
url = "http://127.0.0.1:{target}/hook"
concurrency = 8

[targets.chat]
url = "log:"

[[routes]]
name = "pushes-to-ci"
source = "github"
filter = "headers.x_github_event == 'push'"
targets = ["ci"]

[[routes]]
name = "orders-to-chat"
source = "shop"
targets = ["chat"]
"""

GOOD_ENV = {"GH_SECRET": "gh-secret-value", "SHOP_SECRET": "shop-secret-value"}

# Three different mistakes: a misspelt key, a route naming an unknown target, a bad duration.
BAD = """
[server]
listn = "127.0.0.1:{listen}"
admin = "127.0.0.1:{admin}"
journal = "relay.db"

[sources.app]

[targets.ci]
url = "log:"
timeout = "ten seconds"

[[routes]]
name = "app-to-ci"
source = "app"
targets = ["cii"]
"""


def relay(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `python -m relay ARGS` in `cwd`, without RELAY_CONFIG unless `env` sets it."""
    base = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def write(folder: Path, name: str, text: str, mode: int = 0o600) -> Path:
    path = folder / name
    path.write_text(text)
    path.chmod(mode)
    return path


def good_config(folder: Path, name: str = "good.toml") -> Path:
    return write(
        folder,
        name,
        GOOD.format(listen=free_port(), admin=free_port(), target=free_port()),
    )


def secrets_in(document: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (key path, value) under a key named like a secret, anywhere in a TOML document."""
    if isinstance(document, dict):
        for key, value in document.items():
            here = f"{path}.{key}" if path else key
            if key in ("secret", "admin_token"):
                yield here, value
            else:
                yield from secrets_in(value, here)
    elif isinstance(document, list):
        for index, item in enumerate(document):
            yield from secrets_in(item, f"{path}[{index}]")


# ---------------------------------------------------------------- validate


def test_validate_prints_a_summary_of_a_good_config(tmp_path: Path) -> None:
    """`relay validate` on a good config exits 0 and lists its sources, targets and routes."""
    good_config(tmp_path)
    result = relay("validate", "-c", "good.toml", cwd=tmp_path, env=GOOD_ENV)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == "good.toml: ok"
    assert "sources (2):" in result.stdout
    assert "targets (2):" in result.stdout
    assert "routes (2):" in result.stdout
    words = [line.split() for line in lines]
    assert ["github", "POST", "/hooks/github", "verify=github"] in words
    assert ["shop", "POST", "/in/shop", "verify=shopify"] in words
    assert any(w[:2] == ["ci", "POST"] and "concurrency=8" in w for w in words)
    assert any(w[:3] == ["chat", "POST", "log:"] for w in words)
    assert any(w[:4] == ["pushes-to-ci", "github", "->", "ci"] for w in words)
    assert ["orders-to-chat", "shop", "->", "chat"] in words
    assert "headers.x_github_event == 'push'" in result.stdout
    # the secrets it resolved are not part of the summary
    assert "gh-secret-value" not in result.stdout
    assert "shop-secret-value" not in result.stdout


def test_validate_reports_every_error_with_file_and_key_path(tmp_path: Path) -> None:
    """Three mistakes in one file: exit 78 and all three on stderr, one line each."""
    write(tmp_path, "bad.toml", BAD.format(listen=free_port(), admin=free_port()))
    result = relay("validate", "-c", "bad.toml", cwd=tmp_path)
    assert result.returncode == 78
    assert result.stdout == ""
    errors = result.stderr.splitlines()
    assert len(errors) == 3, result.stderr
    assert all(line.startswith("bad.toml: ") for line in errors)
    assert 'bad.toml: server.listn: unknown key (did you mean "listen"?)' in errors
    assert 'bad.toml: routes[0].targets[0]: unknown target "cii" (known: ci)' in errors
    (duration,) = [line for line in errors if line.startswith("bad.toml: targets.ci.timeout: ")]
    assert '"ten seconds"' in duration


def test_validate_of_a_missing_file_is_one_line(tmp_path: Path) -> None:
    """A config file that does not exist: exit 78 and a single line naming it."""
    result = relay("validate", "-c", "missing.toml", cwd=tmp_path)
    assert result.returncode == 78
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("missing.toml: ")
    assert "No such file" in line


def test_validate_warns_about_a_source_without_verify(tmp_path: Path) -> None:
    """A source anyone can post to is a warning on stderr, not an error: exit 0."""
    text = (
        f'[server]\nlisten = "127.0.0.1:{free_port()}"\nadmin = "127.0.0.1:{free_port()}"\n'
        '[sources.app]\n[targets.out]\nurl = "log:"\n'
        '[[routes]]\nname = "r"\nsource = "app"\ntargets = ["out"]\n'
    )
    write(tmp_path, "open.toml", text)
    result = relay("validate", "-c", "open.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "open.toml: warning: sources.app: no verify: "
        "anyone who can reach the listener can post events"
    ]
    assert result.stdout.splitlines()[0] == "open.toml: ok"


def test_validate_warns_about_literal_secrets_in_a_readable_file(tmp_path: Path) -> None:
    """A literal secret in a file others can read warns (exit 0); after chmod 600 it does not."""
    text = (
        GOOD.format(listen=free_port(), admin=free_port(), target=free_port())
        .replace("${GH_SECRET}", "literal-gh-secret")
        .replace("${SHOP_SECRET}", "literal-shop-secret")
    )
    path = write(tmp_path, "literal.toml", text, mode=0o644)
    readable = relay("validate", "-c", "literal.toml", cwd=tmp_path)
    assert readable.returncode == 0, readable.stderr
    (warning,) = readable.stderr.splitlines()
    assert warning.startswith("literal.toml: warning: ")
    assert "0644" in warning
    assert "sources.github.verify.secret" in warning
    assert "literal-gh-secret" not in readable.stderr + readable.stdout
    path.chmod(0o600)
    private = relay("validate", "-c", "literal.toml", cwd=tmp_path)
    assert private.returncode == 0
    assert private.stderr == ""


def test_config_path_defaults_to_relay_config_variable(tmp_path: Path) -> None:
    """Without -c the file named by $RELAY_CONFIG is used; -c still wins over it."""
    good = good_config(tmp_path)
    write(tmp_path, "bad.toml", BAD.format(listen=free_port(), admin=free_port()))
    from_env = relay("validate", cwd=tmp_path, env={**GOOD_ENV, "RELAY_CONFIG": str(good)})
    assert from_env.returncode == 0, from_env.stderr
    assert from_env.stdout.splitlines()[0] == f"{good}: ok"
    bad_from_env = relay("validate", cwd=tmp_path, env={"RELAY_CONFIG": "bad.toml"})
    assert bad_from_env.returncode == 78
    assert len(bad_from_env.stderr.splitlines()) == 3
    overridden = relay(
        "validate", "-c", "good.toml", cwd=tmp_path, env={**GOOD_ENV, "RELAY_CONFIG": "bad.toml"}
    )
    assert overridden.returncode == 0, overridden.stderr
    assert overridden.stdout.splitlines()[0] == "good.toml: ok"


def test_config_path_falls_back_to_etc(tmp_path: Path) -> None:
    """Without -c or $RELAY_CONFIG the default is /etc/relay/relay.toml."""
    if Path("/etc/relay/relay.toml").exists():
        pytest.skip("this machine has a real /etc/relay/relay.toml")
    result = relay("validate", cwd=tmp_path)
    assert result.returncode == 78
    (line,) = result.stderr.splitlines()
    assert line.startswith("/etc/relay/relay.toml: ")


# ---------------------------------------------------------------- config


def test_config_prints_effective_toml_with_secrets_masked(tmp_path: Path) -> None:
    """`relay config` prints parseable TOML with defaults filled in and every secret as "***"."""
    text = (
        f'[server]\nlisten = "127.0.0.1:{free_port()}"\nadmin = "127.0.0.1:{free_port()}"\n'
        'admin_token = "admin-token-literal-4711"\n'
        '[sources.app]\nverify = { scheme = "github", secret = "${GH_SECRET}" }\n'
        f'[targets.ci]\nurl = "http://127.0.0.1:{free_port()}/hook"\n'
        'headers = { Authorization = "Bearer ${TOKEN}", X-Team = "platform" }\n'
        '[[routes]]\nname = "app-to-ci"\nsource = "app"\ntargets = ["ci"]\n'
    )
    write(tmp_path, "f.toml", text)
    env = {"TOKEN": "tok-from-env-0815", "GH_SECRET": "gh-from-env-0816"}
    result = relay("config", "-c", "f.toml", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    effective = tomllib.loads(result.stdout)
    # defaults filled in
    assert effective["server"]["sync"] == "full"
    assert effective["server"]["retention"] == "7d"
    assert effective["server"]["shutdown_grace"] == "10s"
    assert effective["server"]["journal"] == str(tmp_path / "relay.db")
    assert effective["log"] == {"format": "auto", "level": "info"}
    assert effective["defaults"]["retry"]["attempts"] == 12
    assert effective["defaults"]["concurrency"] == 4
    assert effective["sources"]["app"]["path"] == "/hooks/app"
    assert effective["sources"]["app"]["methods"] == ["POST"]
    assert effective["targets"]["ci"]["method"] == "POST"
    assert effective["targets"]["ci"]["timeout"] == "15s"
    assert effective["targets"]["ci"]["retry"]["attempts"] == 12
    assert effective["routes"][0]["targets"] == ["ci"]
    # secrets masked, other values as they are
    assert effective["server"]["admin_token"] == "***"
    assert effective["sources"]["app"]["verify"]["secret"] == "***"
    assert effective["targets"]["ci"]["headers"] == {
        "Authorization": "***",
        "X-Team": "platform",
    }
    for secret in ("admin-token-literal-4711", "tok-from-env-0815", "gh-from-env-0816"):
        assert secret not in result.stdout
        assert secret not in result.stderr


def test_config_with_errors_exits_78(tmp_path: Path) -> None:
    """`relay config` on a broken file prints the errors, not a half config."""
    write(tmp_path, "bad.toml", BAD.format(listen=free_port(), admin=free_port()))
    result = relay("config", "-c", "bad.toml", cwd=tmp_path)
    assert result.returncode == 78
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 3


# ---------------------------------------------------------------- test


TWO_SECRET_URLS = """
[sources.app]
[targets.tokened]
url = "http://user:pw@127.0.0.1:27199/x?token=${GHS}"
[targets.literal]
url = "http://ops:hunter2@127.0.0.1:27198/y"
[[routes]]
name = "r"
source = "app"
targets = ["tokened", "literal"]
"""


def test_relay_test_masks_target_urls_as_validate_does(tmp_path: Path) -> None:
    """`relay test` prints a target's URL as `relay validate` does: "***" when it comes
    from ${...}, without its password otherwise; `--show-secrets` prints them as they are."""
    write(tmp_path, "f.toml", TWO_SECRET_URLS)
    command = ("test", "-c", "f.toml", "--source", "app", "--data", "{}")
    env = {"GHS": "s3cret"}
    text = relay(*command, cwd=tmp_path, env=env)
    as_json = relay(*command, "--json", cwd=tmp_path, env=env)
    for result in (text, as_json):
        assert result.returncode == 0, result.stderr
        assert "s3cret" not in result.stdout
        assert "hunter2" not in result.stdout
        assert ":pw@" not in result.stdout
    assert "  POST ***\n" in text.stdout
    assert "  POST http://ops:***@127.0.0.1:27198/y\n" in text.stdout
    requests = orjson.loads(as_json.stdout)["requests"]
    assert [r["url"] for r in requests] == ["***", "http://ops:***@127.0.0.1:27198/y"]
    shown = relay(*command, "--json", "--show-secrets", cwd=tmp_path, env=env)
    assert [r["url"] for r in orjson.loads(shown.stdout)["requests"]] == [
        "http://user:pw@127.0.0.1:27199/x?token=s3cret",
        "http://ops:hunter2@127.0.0.1:27198/y",
    ]


def test_a_reader_that_stops_early_ends_relay_quietly(tmp_path: Path) -> None:
    """`relay test ... | head` ends without a traceback: exit 1 (not all was written),
    nothing on stderr."""
    write(tmp_path, "f.toml", TWO_SECRET_URLS)
    (tmp_path / "big.json").write_text(orjson.dumps({"a": "x" * 500_000}).decode())
    with subprocess.Popen(
        [sys.executable, "-m", "relay", "test", "-c", "f.toml", "--source", "app",
         "--file", "big.json"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, "GHS": "s3cret"},
    ) as process:  # fmt: skip
        assert process.stdout is not None
        assert process.stdout.read(10) == b"source app"
        process.stdout.close()
        _, err = process.communicate(timeout=TIMEOUT_S)
    assert (process.returncode, err) == (1, b"")


# ---------------------------------------------------------------- send


async def test_send_to_an_untrusted_certificate_says_so(
    tmp_path: Path, daemons: Callable[..., Awaitable[Daemon]]
) -> None:
    """`relay send` to a TLS listener whose certificate it does not trust (self-signed)
    says that, and names --insecure: exit 1, not "daemon unreachable" (exit 69)."""
    certificate = trustme.CA().issue_cert("127.0.0.1")
    certificate.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    certificate.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    tls = {"tls_cert": f'"{tmp_path / "server.pem"}"', "tls_key": f'"{tmp_path / "server.key"}"'}
    daemon = await daemons(
        server_toml(tmp_path, listen_port=free_port(), **tls)
        + '[sources.app]\n[targets.t]\nurl = "log:"\n'
        + '[[routes]]\nname = "r"\nsource = "app"\ntargets = ["t"]\n'
    )
    result = await asyncio.to_thread(
        relay, "send", "app", "-c", str(daemon.config_path), "--data", "{}", cwd=tmp_path
    )
    assert (result.returncode, result.stdout) == (1, "")
    said = f"relay: the daemon's certificate at https://{daemon.listen}/hooks/app is not trusted"
    assert result.stderr.startswith(said + " (")  # then OpenSSL's reason, which varies
    assert result.stderr.endswith("); --insecure skips the check\n")
    assert result.stderr.count("\n") == 1
    trusted = await asyncio.to_thread(
        relay, "send", "app", "-c", str(daemon.config_path), "--insecure", cwd=tmp_path
    )
    assert (trusted.returncode, trusted.stdout[:4]) == (0, "202 ")


# ---------------------------------------------------------------- init


def test_init_writes_a_private_valid_config(tmp_path: Path) -> None:
    """`relay init` writes a mode-600 file that `relay validate` accepts."""
    result = relay("init", "new.toml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "new.toml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "new.toml" in result.stdout
    check = relay("validate", "-c", "new.toml", cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert check.stdout.splitlines()[0] == "new.toml: ok"


def test_init_without_a_name_writes_relay_toml(tmp_path: Path) -> None:
    """`relay init` with no file argument writes ./relay.toml."""
    result = relay("init", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["relay.toml"]
    assert stat.S_IMODE((tmp_path / "relay.toml").stat().st_mode) == 0o600


def test_two_inits_generate_different_secrets(tmp_path: Path) -> None:
    """Each `relay init` generates its own secrets."""
    assert relay("init", "a.toml", cwd=tmp_path).returncode == 0
    assert relay("init", "b.toml", cwd=tmp_path).returncode == 0
    a = dict(secrets_in(tomllib.loads((tmp_path / "a.toml").read_text())))
    b = dict(secrets_in(tomllib.loads((tmp_path / "b.toml").read_text())))
    assert a, "the starter config holds no secrets"
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert isinstance(value, str)
        assert len(value) >= 16, key
        assert value != b[key], key


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    """A second `relay init` on an existing file fails, says so, and leaves the file unchanged."""
    assert relay("init", "new.toml", cwd=tmp_path).returncode == 0
    path = tmp_path / "new.toml"
    before = path.read_bytes()
    again = relay("init", "new.toml", cwd=tmp_path)
    assert again.returncode != 0
    assert again.returncode != 2  # a runtime refusal, not a usage error
    (line,) = again.stderr.splitlines()
    assert "new.toml" in line
    assert "overwrit" in line
    assert path.read_bytes() == before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


# ---------------------------------------------------------------- run


def test_run_with_a_bad_config_exits_78_before_starting(tmp_path: Path) -> None:
    """`relay run` on a broken config exits 78 with the errors, and opens nothing."""
    listen = free_port()
    write(tmp_path, "bad.toml", BAD.format(listen=listen, admin=free_port()))
    result = relay("run", "-c", "bad.toml", cwd=tmp_path)
    assert result.returncode == 78
    assert result.stdout == ""  # no relay.started (or any other) log line
    assert len(result.stderr.splitlines()) == 3
    assert not (tmp_path / "relay.db").exists()
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", listen)) != 0


@pytest.mark.parametrize("taken", ["listen", "admin"])
def test_run_with_a_port_in_use_exits_1(tmp_path: Path, taken: str) -> None:
    """When the listen or admin port is taken, `relay run` exits 1 with one line on stderr."""
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        port = int(occupant.getsockname()[1])
        ports = {"listen": free_port(), "admin": free_port(), taken: port}
        text = (
            f'[server]\nlisten = "127.0.0.1:{ports["listen"]}"\n'
            f'admin = "127.0.0.1:{ports["admin"]}"\njournal = "relay.db"\n'
            '[log]\nformat = "json"\n'
            '[sources.app]\n[targets.out]\nurl = "log:"\n'
            '[[routes]]\nname = "r"\nsource = "app"\ntargets = ["out"]\n'
        )
        write(tmp_path, "taken.toml", text)
        result = relay("run", "-c", "taken.toml", cwd=tmp_path)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("relay: ")
    assert str(port) in line
    assert "relay.started" not in result.stdout


@pytest.mark.parametrize(
    ("name", "reason"),
    [("notadb.db", "file is not a database"), ("other.db", "no such column: received_at_ms")],
)
def test_run_on_a_journal_that_cannot_be_opened_exits_1_with_one_line(
    tmp_path: Path, name: str, reason: str
) -> None:
    """A journal file that is not SQLite, or a SQLite file of something else (its tables
    do not fit), stops `relay run` with one line naming the file and SQLite's reason,
    not a traceback."""
    (tmp_path / "notadb.db").write_bytes(b"not a database, just text\n" * 200)
    with contextlib.closing(sqlite3.connect(tmp_path / "other.db")) as conn, conn:
        conn.execute("CREATE TABLE events (id TEXT)")  # another program's `events`
    text = (
        f'[server]\nlisten = "127.0.0.1:0"\nadmin = "127.0.0.1:0"\njournal = "{name}"\n'
        '[sources.app]\n[targets.out]\nurl = "log:"\n'
        '[[routes]]\nname = "r"\nsource = "app"\ntargets = ["out"]\n'
    )
    write(tmp_path, "j.toml", text)
    result = relay("run", "-c", "j.toml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"relay: journal: {tmp_path / name}: cannot open it: {reason}"
    ]


# ---------------------------------------------------------------- usage


@pytest.mark.parametrize(
    "args",
    [
        (), ("bogus",), ("validate", "--no-such-option"), ("init", "a.toml", "b.toml"),
        ("event", ""), ("event", "nope"), ("replay", "evt_0", "evt_" + "0" * 26),
        ("events", "--limit", "0"), ("events", "--limit", "501"), ("events", "--limit", "5_0"),
        ("events", "--limit", " +5"), ("events", "--before", "xyz"),
        ("replay", "--dead", "--since", "garbage"), ("replay", "--dead", "--since", "9999999d"),
    ],
    ids=[
        "no-command", "unknown-command", "unknown-option", "extra-argument",
        "empty-event-id", "not-an-event-id", "not-an-event-id-to-replay",
        "limit-0", "limit-501", "limit-5_0", "limit-plus-5", "before-not-an-id",
        "since-garbage", "since-before-year-1",
    ],
)  # fmt: skip
def test_usage_errors_exit_2(tmp_path: Path, args: tuple[str, ...]) -> None:
    """A missing or unknown command or option, an event id that is not one (`relay event
    ''` once printed a traceback), a --limit outside 1-500, a --before that is not an
    event id or a --since that is no time is a usage error: exit 2 and a usage line."""
    result = relay(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("usage: relay")
    assert list(tmp_path.iterdir()) == []


def test_version(tmp_path: Path) -> None:
    """`relay --version` prints the version and exits 0."""
    result = relay("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout == f"relay {__version__}\n"
