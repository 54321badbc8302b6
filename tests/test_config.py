"""Tests of relay.config: TOML in, a validated Config out, every error with its key path."""

from __future__ import annotations

import base64
import tomllib
from pathlib import Path

import pytest
import trustme

from relay.config import (
    ConfigError,
    effective_toml,
    format_duration,
    format_rate,
    format_size,
    load,
    parse,
    parse_duration,
    parse_rate,
    parse_size,
    shown_url,
    starter_toml,
    without_password,
)
from relay.model import Address, Rate

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
[sources.github]
verify = { scheme = "github", secret = "${GH_SECRET}" }

[targets.ci]
url = "https://ci.example.com/hook"

[[routes]]
name = "all"
source = "github"
targets = ["ci"]
"""


def write(tmp_path: Path, text: str, name: str = "relay.toml", mode: int = 0o600) -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run each test in its tmp_path, so that "relay.toml" names the file written there."""
    monkeypatch.chdir(tmp_path)


def errors_of(text: str, tmp_path: Path, env: dict[str, str] | None = None) -> list[str]:
    """The errors of loading `text` from "relay.toml", as the user would pass it."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load(Path(path.name), env={} if env is None else env)
    return caught.value.errors


def one_error(text: str, tmp_path: Path, env: dict[str, str] | None = None) -> str:
    errors = errors_of(text, tmp_path, env)
    assert len(errors) == 1, errors
    return errors[0]


# --------------------------------------------------------------------------- units


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("10s", 10.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("7d", 604800.0),
        ("1h30m", 5400.0),
        ("1.5s", 1.5),
        ("0", 0.0),
    ],
)
def test_parse_duration_reads_units(text: str, seconds: float) -> None:
    """Durations like "250ms", "10s", "5m", "2h", "7d" read as seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["10", "10x", "s", "-5s", "", "5 m s", 10, 1.5, None])
def test_parse_duration_rejects_bad_input(bad: object) -> None:
    """A duration without a unit, with an unknown unit, or not a string is refused."""
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)  # type: ignore[arg-type]


def test_parse_duration_refuses_more_than_100_years() -> None:
    """A duration up to 100 years is read; a longer one is refused, saying the limit."""
    assert parse_duration("36500d") == 36500 * 86400
    for text in ("36500d1ms", "200000000000d", "99999999999999999999999s"):
        with pytest.raises(ValueError, match=r'too long: at most 100 years \("36500d"\)'):
            parse_duration(text)


TOO_LONG = "200000000000d"

EVERY_DURATION = f"""
[server]
retention = "{TOO_LONG}"
read_timeout = "{TOO_LONG}"
idle_timeout = "{TOO_LONG}"
shutdown_grace = "{TOO_LONG}"

[defaults]
timeout = "{TOO_LONG}"
retry = {{ first = "{TOO_LONG}", max = "{TOO_LONG}", max_age = "{TOO_LONG}" }}

[sources.demo]
verify = {{ scheme = "stripe", secret = "whsec_x", tolerance = "{TOO_LONG}" }}
dedupe = {{ key = "body.id", window = "{TOO_LONG}" }}
rate_limit = "5/{TOO_LONG}"

[sources.other]
dedupe = "{TOO_LONG}"
verify = {{ scheme = "github", secret = "x" }}

[targets.t]
url = "log:"
timeout = "{TOO_LONG}"
rate_limit = "1/{TOO_LONG}"
retry = {{ first = "{TOO_LONG}", max = "{TOO_LONG}", max_age = "{TOO_LONG}" }}

[[routes]]
name = "r"
source = "demo"
targets = ["t"]

[[routes]]
name = "o"
source = "other"
targets = ["t"]
"""


def test_every_duration_key_refuses_more_than_100_years(tmp_path: Path) -> None:
    """A duration too long for the journal's millisecond times (a dedupe window of
    200000000000 days) is a config error on its key path, not a daemon that fails
    every write; every duration key is checked."""
    errors = errors_of(EVERY_DURATION, tmp_path)
    keys = [
        "server.retention",
        "server.read_timeout",
        "server.idle_timeout",
        "server.shutdown_grace",
        "defaults.timeout",
        "defaults.retry.first",
        "defaults.retry.max",
        "defaults.retry.max_age",
        "sources.demo.verify.tolerance",
        "sources.demo.dedupe.window",
        "sources.demo.rate_limit",
        "sources.other.dedupe",
        "targets.t.timeout",
        "targets.t.rate_limit",
        "targets.t.retry.first",
        "targets.t.retry.max",
        "targets.t.retry.max_age",
    ]
    assert errors == [
        f'relay.toml: {key}: duration "{TOO_LONG}" is too long: at most 100 years ("36500d")'
        for key in keys
    ]


def test_concurrency_is_at_most_10000(tmp_path: Path) -> None:
    """A concurrency beyond 10000 (each unit a worker, and a window of the journal read
    with it) is a config error on its key path."""
    text = MINIMAL.replace('url = "https://', 'concurrency = 99999999999999999999\nurl = "https://')
    text += "[defaults]\nconcurrency = 10001\n"
    assert errors_of(text, tmp_path, env={"GH_SECRET": "s"}) == [
        "relay.toml: defaults.concurrency: must be from 1 to 10000, got 10001",
        "relay.toml: targets.ci.concurrency: must be from 1 to 10000, got 99999999999999999999",
    ]


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("512KiB", 512 * 1024),
        ("25MiB", 25 * 2**20),
        ("1GiB", 2**30),
        ("100B", 100),
        ("10KB", 10_000),
        ("2MB", 2_000_000),
        ("1.5KiB", 1536),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_size_reads_units(value: str | int, size: int) -> None:
    """Sizes are binary (KiB, MiB, GiB), decimal (KB, MB) or a plain number of bytes."""
    assert parse_size(value) == size


@pytest.mark.parametrize("bad", ["1 parsec", "MiB", "-1KiB", "0.5B", -1, 1.5, True])
def test_parse_size_rejects_bad_input(bad: object) -> None:
    """Unknown units, negative sizes and fractions of a byte are refused."""
    with pytest.raises(ValueError, match="size"):
        parse_size(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("50/s", Rate(50, 1.0)),
        ("600/m", Rate(600, 60.0)),
        ("1000/h", Rate(1000, 3600.0)),
        ("5/10s", Rate(5, 10.0)),
    ],
)
def test_parse_rate_reads_count_per_unit(text: str, rate: Rate) -> None:
    """Rates like "50/s" and "600/m" read as a count per period."""
    assert parse_rate(text) == rate


@pytest.mark.parametrize(
    "bad", ["50", "50/x", "0/s", "/s", "1.5/s", 50, "1000000001/s", "9" * 400 + "/s"]
)
def test_parse_rate_rejects_bad_input(bad: object) -> None:
    """A rate needs a positive whole count (at most a billion: more is no limit, and a
    count of hundreds of digits would overflow a float at the first request), a "/" and
    a unit."""
    with pytest.raises(ValueError, match="rate"):
        parse_rate(bad)  # type: ignore[arg-type]


def test_formatters_pick_the_largest_exact_unit() -> None:
    """Durations, sizes and rates print in the largest unit that is exact."""
    assert format_duration(604800) == "7d"
    assert format_duration(0.25) == "250ms"
    assert format_duration(5400) == "90m"
    assert format_duration(0) == "0s"
    assert format_size(2**20) == "1MiB"
    assert format_size(1536) == 1536
    assert format_size(1000) == 1000
    assert format_size(3 * 2**30) == "3GiB"
    assert format_rate(Rate(600, 60.0)) == "600/m"
    assert format_rate(Rate(5, 10.0)) == "5/10s"
    for seconds in (0.001, 0.3, 1.5, 59.0, 3601.0, 86400.0 * 3):
        assert parse_duration(format_duration(seconds)) == seconds


# --------------------------------------------------------------------------- defaults


def test_defaults_are_filled_in(tmp_path: Path) -> None:
    """A config that only names a source, a target and a route gets every SPEC default."""
    config = load(write(tmp_path, MINIMAL), env={"GH_SECRET": "s3cret"})
    server = config.server
    assert server.listen == Address("127.0.0.1", 8080)
    assert server.admin == Address("127.0.0.1", 9090)
    assert server.admin_token == ""
    assert server.journal == tmp_path / "relay.db"
    assert server.sync == "full"
    assert server.retention_s == 7 * 86400
    assert server.max_body_bytes == 2**20
    assert (server.read_timeout_s, server.idle_timeout_s, server.shutdown_grace_s) == (10, 15, 10)
    assert server.tls_cert is None
    assert server.tls_key is None
    assert server.deny_networks == ()
    assert (config.log.format, config.log.level) == ("auto", "info")

    source = config.sources["github"]
    assert source.path == "/hooks/github"
    assert source.methods == ("POST",)
    assert source.verify is not None
    assert source.verify.secrets == ("s3cret",)
    assert source.verify.tolerance_s == 300
    assert source.dedupe is None
    assert source.max_body_bytes == 2**20
    assert (source.rate_limit, source.burst, source.ack_status, source.challenge) == (
        None,
        None,
        202,
        "",
    )

    target = config.targets["ci"]
    assert target.method == "POST"
    assert (target.timeout_s, target.concurrency, target.pause_after) == (15, 4, 5)
    assert (target.retry.attempts, target.retry.first_s) == (12, 5)
    assert (target.retry.max_s, target.retry.max_age_s) == (3600, 3 * 86400)
    assert target.retry_on == frozenset()
    assert not target.ordered
    assert target.order_key is None
    assert target.sign is None

    (route,) = config.routes
    assert (route.name, route.source, route.targets) == ("all", "github", ("ci",))
    assert route.filter is None
    assert route.transform is None


def test_targets_inherit_defaults_and_merge_retry_key_by_key(tmp_path: Path) -> None:
    """[defaults] apply to every target; a target's retry table overrides only the keys it sets."""
    text = (
        MINIMAL
        + """
[defaults]
timeout = "3s"
concurrency = 2
retry = { attempts = 5, max = "10m" }

[targets.chat]
url = "https://chat.example.com/"
retry = { first = "1s" }
concurrency = 9
retry_on = [409, 404]
ordered = true
"""
    )
    config = load(write(tmp_path, text), env={"GH_SECRET": "s"})
    chat = config.targets["chat"]
    assert (chat.timeout_s, chat.concurrency) == (3, 9)
    assert (chat.retry.attempts, chat.retry.first_s, chat.retry.max_s) == (5, 1, 600)
    assert chat.retry_on == frozenset({404, 409})
    assert chat.ordered
    assert config.targets["ci"].retry.first_s == 5


def test_ipv6_addresses_networks_and_methods(tmp_path: Path) -> None:
    """Addresses may be "[::1]:port"; CIDRs and methods are normalised."""
    text = """
[server]
listen = "[::1]:0"
admin = "localhost:9191"
deny_networks = ["10.0.0.1/8"]
[sources.a]
methods = ["post", "put"]
allow_from = ["192.0.2.1"]
rate_limit = "10/s"
burst = 20
"""
    config = load(write(tmp_path, text), env={})
    assert config.server.listen == Address("::1", 0)
    assert str(config.server.listen) == "[::1]:0"
    assert str(config.server.deny_networks[0]) == "10.0.0.0/8"
    assert config.sources["a"].methods == ("POST", "PUT")
    assert str(config.sources["a"].allow_from[0]) == "192.0.2.1/32"
    assert config.sources["a"].burst == 20


def test_relative_journal_is_resolved_against_the_config_folder(tmp_path: Path) -> None:
    """journal = "state/relay.db" means next to the config file, not the working directory."""
    folder = tmp_path / "etc"
    folder.mkdir()
    config = load(write(folder, '[server]\njournal = "state/relay.db"\n'), env={})
    assert config.server.journal == folder / "state" / "relay.db"
    assert config.server.journal.is_absolute()


def test_relative_journal_with_a_relative_config_path(tmp_path: Path) -> None:
    """A config given as a relative path still yields an absolute journal path."""
    write(tmp_path, '[server]\njournal = "j.db"\n')
    config = load(Path("relay.toml"), env={})
    assert config.server.journal == tmp_path / "j.db"


# --------------------------------------------------------------------------- interpolation


def test_env_file_and_cred_interpolation(tmp_path: Path) -> None:
    """${NAME}, ${file:PATH} and ${cred:NAME} fill strings; $$ is a literal $."""
    (tmp_path / "secret.txt").write_text("from-file\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "token").write_text("from-cred\n")
    text = """
[server]
admin_token = "${cred:token}"
[sources.a]
verify = { scheme = "github", secret = ["${file:secret.txt}", "${ENV_SECRET}"] }
[targets.t]
url = "https://example.com/${ENV_PATH}?price=$$5"
headers = { Authorization = "Bearer ${ENV_SECRET}" }
"""
    env = {"ENV_SECRET": "from-env", "ENV_PATH": "p", "CREDENTIALS_DIRECTORY": str(creds)}
    config = load(write(tmp_path, text), env=env)
    assert config.server.admin_token == "from-cred"
    verify = config.sources["a"].verify
    assert verify is not None
    assert verify.secrets == ("from-file", "from-env")
    assert config.targets["t"].url == "https://example.com/p?price=$5"
    assert config.targets["t"].headers == {"Authorization": "Bearer from-env"}
    assert "targets.t.headers.Authorization" in config.secret_paths
    assert "targets.t.url" in config.secret_paths
    assert "server.admin_token" in config.secret_paths
    assert "sources.a.verify.secret" in config.secret_paths


def test_missing_env_variable_names_key_and_variable(tmp_path: Path) -> None:
    """An unset ${NAME} is an error naming the key path and the variable."""
    assert one_error(MINIMAL, tmp_path) == (
        "relay.toml: sources.github.verify.secret: environment variable GH_SECRET is not set"
    )


def test_missing_file_names_key_and_file(tmp_path: Path) -> None:
    """A ${file:...} that cannot be read is an error naming the key path and the file."""
    text = '[server]\nadmin_token = "${file:missing.txt}"\n'
    error = one_error(text, tmp_path)
    assert "server.admin_token: cannot read ${file:missing.txt}" in error
    assert str(tmp_path / "missing.txt") in error


def test_cred_without_credentials_directory_is_an_error(tmp_path: Path) -> None:
    """${cred:NAME} needs $CREDENTIALS_DIRECTORY; without it the error says so."""
    text = '[server]\nadmin_token = "${cred:admin}"\n'
    error = one_error(text, tmp_path)
    assert "server.admin_token:" in error
    assert "CREDENTIALS_DIRECTORY" in error


def test_missing_credential_file_names_key_and_file(tmp_path: Path) -> None:
    """A ${cred:NAME} whose file is missing names the key path and the credential."""
    text = '[server]\nadmin_token = "${cred:admin}"\n'
    error = one_error(text, tmp_path, env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert "server.admin_token: cannot read ${cred:admin}" in error


def test_bad_interpolation_syntax_is_reported(tmp_path: Path) -> None:
    """An unterminated "${" or an unknown "${kind:...}" is an error; a lone "$" is literal."""
    text = """
[targets.a]
url = "https://example.com/${OOPS"
[targets.b]
url = "https://example.com/${vault:x}"
[targets.c]
url = "https://example.com/$HOME"
"""
    errors = errors_of(text, tmp_path)
    assert errors[0].startswith('relay.toml: targets.a.url: unterminated "${"')
    assert errors[1].startswith('relay.toml: targets.b.url: unknown "${vault:...}"')
    assert len(errors) == 2


def test_interpolation_works_in_routes_and_lists(tmp_path: Path) -> None:
    """Interpolation applies to every string, including array items in [[routes]]."""
    text = """
[sources.a]
[targets.t]
url = "log:"
[[routes]]
name = "r"
source = "a"
targets = ["${TARGET}"]
"""
    config = load(write(tmp_path, text), env={"TARGET": "t"})
    assert config.routes[0].targets == ("t",)
    errors = errors_of(text, tmp_path)
    assert errors == ["relay.toml: routes[0].targets[0]: environment variable TARGET is not set"]


# --------------------------------------------------------------------------- errors


def test_unknown_key_top_level_nested_and_in_route(tmp_path: Path) -> None:
    """Misspelled keys are errors with a "did you mean" wherever they are."""
    text = """
[serverr]
[server]
listn = "127.0.0.1:8080"
[sources.a]
verify = { scheme = "github", secret = "x", secrte = "y" }
[targets.t]
url = "log:"
[[routes]]
name = "r"
source = "a"
targets = ["t"]
filtr = "body"
"""
    errors = errors_of(text, tmp_path)
    assert 'relay.toml: serverr: unknown key (did you mean "server"?)' in errors
    assert 'relay.toml: server.listn: unknown key (did you mean "listen"?)' in errors
    assert 'relay.toml: sources.a.verify.secrte: unknown key (did you mean "secret"?)' in errors
    assert 'relay.toml: routes[0].filtr: unknown key (did you mean "filter"?)' in errors
    assert len(errors) == 4


def test_unknown_key_without_a_close_match(tmp_path: Path) -> None:
    """An unknown key that resembles nothing is reported without a suggestion."""
    assert one_error("[log]\nzzz = 1\n", tmp_path) == "relay.toml: log.zzz: unknown key"


def test_wrong_types_say_what_was_expected(tmp_path: Path) -> None:
    """A value of the wrong TOML type names the expected and the actual type."""
    text = """
[server]
listen = 8080
[defaults]
concurrency = "4"
[sources.a]
methods = "POST"
"""
    errors = errors_of(text, tmp_path)
    assert "relay.toml: server.listen: expected a string, got integer" in errors
    assert "relay.toml: defaults.concurrency: expected an integer, got string" in errors
    assert "relay.toml: sources.a.methods: expected an array, got string" in errors


def test_dangling_references_use_the_spec_format(tmp_path: Path) -> None:
    """A route naming a missing source or target lists the ones that exist."""
    text = """
[sources.github]
[sources.stripe]
[targets.ci]
url = "log:"
[targets.chat]
url = "log:"
[[routes]]
name = "a"
source = "github"
targets = ["ci"]
[[routes]]
name = "b"
source = "gh"
targets = ["chat"]
[[routes]]
name = "c"
source = "stripe"
targets = ["cii", "chat"]
"""
    errors = errors_of(text, tmp_path)
    assert errors == [
        'relay.toml: routes[1].source: unknown source "gh" (known: github, stripe)',
        'relay.toml: routes[2].targets[0]: unknown target "cii" (known: ci, chat)',
    ]


def test_many_names_get_a_did_you_mean(tmp_path: Path) -> None:
    """With many targets the error suggests the closest name instead of listing them all."""
    targets = "".join(f'[targets.t{i}]\nurl = "log:"\n' for i in range(12))
    text = targets + '[sources.a]\n[[routes]]\nname = "r"\nsource = "a"\ntargets = ["tt11"]\n'
    error = one_error(text, tmp_path)
    assert 'unknown target "tt11" (did you mean "t11"? known: t0, t1,' in error


def test_several_errors_are_reported_at_once(tmp_path: Path) -> None:
    """Every problem in the file is reported in one go, not only the first."""
    text = """
[server]
sync = "sometimes"
retention = "forever"
[sources.a]
ack_status = 302
rate_limit = "10/s"
burst = 10_000_000_000
[targets.t]
url = "ftp://example.com"
concurrency = 0
[[routes]]
source = "a"
targets = ["t"]
"""
    errors = errors_of(text, tmp_path)
    assert errors == [
        'relay.toml: server.sync: invalid value "sometimes" (expected one of "full", "normal")',
        'relay.toml: server.retention: invalid duration "forever": use a number and a unit '
        '(ms, s, m, h, d), e.g. "10s"',
        "relay.toml: sources.a.burst: must be from 1 to 1000000000, got 10000000000",
        "relay.toml: sources.a.ack_status: must be from 200 to 299, got 302",
        'relay.toml: targets.t.url: expected an absolute http(s) URL or "log:", '
        'got "ftp://example.com"',
        "relay.toml: targets.t.concurrency: must be from 1 to 10000, got 0",
        "relay.toml: routes[0].name: missing required key",
    ]
    with pytest.raises(ConfigError) as caught:
        load(Path("relay.toml"), env={})
    assert str(caught.value) == "\n".join(errors)


def test_bad_jmespath_shows_the_expression_and_a_caret(tmp_path: Path) -> None:
    """A filter that does not compile is reported with the expression and a caret under it."""
    text = """
[sources.a]
[targets.t]
url = "log:"
[[routes]]
name = "r"
source = "a"
targets = ["t"]
filter = "body.a == "
"""
    error = one_error(text, tmp_path)
    first, expression, caret = error.split("\n")
    assert first.startswith("relay.toml: routes[0].filter: invalid expression")
    assert expression == "  body.a == "
    assert caret.strip() == "^"
    assert caret.index("^") > 2


def test_bad_order_key_and_dedupe_key_are_reported(tmp_path: Path) -> None:
    """order_key and dedupe.key are compiled too, with their own key paths."""
    text = """
[sources.a]
dedupe = { key = "body.[", window = "1h" }
[targets.t]
url = "log:"
order_key = "(("
"""
    errors = errors_of(text, tmp_path)
    assert [e.split("\n")[0].split(": ")[1] for e in errors] == [
        "sources.a.dedupe.key",
        "targets.t.order_key",
    ]


def test_duplicate_source_paths_name_both_sources(tmp_path: Path) -> None:
    """Two sources on one path is an error naming both."""
    text = '[sources.a]\npath = "/hooks/x"\n[sources.b]\npath = "/hooks/x"\n'
    error = one_error(text, tmp_path)
    assert error == 'relay.toml: sources.b.path: path "/hooks/x" is also used by sources.a'


def test_default_path_clashes_with_an_explicit_one(tmp_path: Path) -> None:
    """The default path "/hooks/NAME" counts when checking for duplicates."""
    text = '[sources.a]\n[sources.b]\npath = "/hooks/a"\n'
    assert "is also used by sources.a" in one_error(text, tmp_path)


def test_path_must_start_with_a_slash(tmp_path: Path) -> None:
    """A source path without a leading "/" is refused."""
    error = one_error('[sources.a]\npath = "hooks/a"\n', tmp_path)
    assert error == 'relay.toml: sources.a.path: must start with "/", got "hooks/a"'


def test_duplicate_route_names(tmp_path: Path) -> None:
    """Route names are unique."""
    text = """
[sources.a]
[targets.t]
url = "log:"
[[routes]]
name = "r"
source = "a"
targets = ["t"]
[[routes]]
name = "r"
source = "a"
targets = ["t"]
"""
    assert one_error(text, tmp_path) == (
        'relay.toml: routes[1].name: duplicate route name "r" (also routes[0])'
    )


def test_admin_token_required_off_loopback(tmp_path: Path) -> None:
    """An admin API reachable from other hosts needs admin_token; loopback does not."""
    error = one_error('[server]\nadmin = "0.0.0.0:9090"\n', tmp_path)
    assert error.startswith("relay.toml: server.admin_token: required when admin")
    for host in ("127.0.0.2", "[::1]", "localhost"):
        load(write(tmp_path, f'[server]\nadmin = "{host}:9090"\n'), env={})
    config = load(write(tmp_path, '[server]\nadmin = "0.0.0.0:9090"\nadmin_token = "t"\n'), env={})
    assert config.server.admin_token == "t"
    assert "server.admin_token" in config.secret_paths


def test_tls_cert_and_key_go_together(tmp_path: Path) -> None:
    """tls_cert without tls_key (or the reverse) is an error; both resolve against the folder."""
    error = one_error('[server]\ntls_cert = "cert.pem"\n', tmp_path)
    assert error.startswith("relay.toml: server.tls_key:")
    error = one_error('[server]\ntls_key = "key.pem"\n', tmp_path)
    assert error.startswith("relay.toml: server.tls_cert:")
    authority = trustme.CA()
    issued = authority.issue_cert("relay.example")
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    (tmp_path / "keys").mkdir()
    issued.private_key_pem.write_to_path(str(tmp_path / "keys" / "k.pem"))
    text = f'[server]\ntls_cert = "c.pem"\ntls_key = "{tmp_path / "keys" / "k.pem"}"\n'
    config = load(write(tmp_path, text), env={})
    assert config.server.tls_cert == tmp_path / "c.pem"
    assert config.server.tls_key == tmp_path / "keys" / "k.pem"


def test_tls_files_that_cannot_be_loaded_are_config_errors(tmp_path: Path) -> None:
    """A missing key, or a key that is not the certificate's, is an error naming the key
    at load (exit 78 from `validate` and `run`), not a failure of the listener at start."""
    issued = trustme.CA().issue_cert("relay.example")
    issued.cert_chain_pems[0].write_to_path(str(tmp_path / "c.pem"))
    error = one_error('[server]\ntls_cert = "c.pem"\ntls_key = "nope.key"\n', tmp_path)
    missing = tmp_path / "nope.key"
    assert error == f"relay.toml: server.tls_key: cannot read {missing}: No such file or directory"
    text = '[server]\ntls_cert = "c.pem"\ntls_key = "nope.key"\n'
    for_admin_commands = load(write(tmp_path, text), env={}, check_tls=False)  # status, ...
    assert for_admin_commands.server.tls_key == missing
    trustme.CA().issue_cert("other").private_key_pem.write_to_path(str(tmp_path / "other.key"))
    error = one_error('[server]\ntls_cert = "c.pem"\ntls_key = "other.key"\n', tmp_path)
    assert error.startswith(f"relay.toml: server.tls_cert: cannot load {tmp_path / 'c.pem'} with")
    assert "KEY_VALUES_MISMATCH" in error


def test_bad_addresses(tmp_path: Path) -> None:
    """Addresses need host:port with a port up to 65535, IPv6 in brackets."""
    text = '[server]\nlisten = "::1:8080"\nadmin = "127.0.0.1:70000"\n'
    errors = errors_of(text, tmp_path)
    assert errors[0].startswith("relay.toml: server.listen: an IPv6 address goes in brackets")
    assert errors[1] == 'relay.toml: server.admin: invalid port "70000" (0 to 65535)'


def test_verify_secrets_are_required_per_scheme(tmp_path: Path) -> None:
    """Each scheme needs its secret (basic: username and password; hmac: a header too)."""
    text = """
[sources.a]
verify = { scheme = "github" }
[sources.b]
verify = { scheme = "basic", username = "u" }
[sources.c]
verify = { scheme = "hmac", secret = "s" }
[sources.d]
verify = { scheme = "standard", secret = "not base64!" }
[sources.e]
verify = { scheme = "md5", secret = "s" }
"""
    errors = errors_of(text, tmp_path)
    assert [error.split(": ")[1] for error in errors] == [
        "sources.a.verify.secret",
        "sources.b.verify.password",
        "sources.c.verify.header",
        "sources.d.verify.secret",
        "sources.e.verify.scheme",
    ]


def test_verify_settings_per_scheme(tmp_path: Path) -> None:
    """Verify options are read per scheme: token defaults to Authorization, lists rotate secrets."""
    whsec = "whsec_" + base64.b64encode(b"k" * 24).decode()
    text = f"""
[sources.tok]
verify = {{ scheme = "token", secret = "t", id_header = "X-Id" }}
dedupe = "1h"
[sources.mac]
[sources.mac.verify]
scheme = "hmac"
secret = ["a", "b"]
header = "X-Sig"
algorithm = "SHA512"
encoding = "base64"
prefix = "sha512="
[sources.std]
verify = {{ scheme = "standard", secret = "{whsec}", tolerance = "1m" }}
dedupe = {{ key = "body.id", window = "2h" }}
"""
    config = load(write(tmp_path, text), env={})
    tok = config.sources["tok"]
    assert tok.verify is not None
    assert (tok.verify.header, tok.verify.id_header) == ("Authorization", "X-Id")
    mac = config.sources["mac"].verify
    assert mac is not None
    assert mac.secrets == ("a", "b")
    assert (mac.algorithm, mac.encoding, mac.prefix) == ("sha512", "base64", "sha512=")
    std = config.sources["std"]
    assert std.verify is not None
    assert std.verify.tolerance_s == 60
    assert std.dedupe is not None
    assert std.dedupe.window_s == 7200
    assert std.dedupe.key is not None
    assert std.dedupe.key.text == "body.id"


def test_options_a_scheme_ignores_are_warned_about(tmp_path: Path) -> None:
    """Setting algorithm on a github source (which is always sha256) warns that it is ignored."""
    text = '[sources.a]\nverify = { scheme = "github", secret = "s", algorithm = "sha1" }\n'
    config = load(write(tmp_path, text), env={})
    assert 'sources.a.verify.algorithm: not used by scheme "github"; ignored' in config.warnings
    verify = config.sources["a"].verify
    assert verify is not None
    assert verify.algorithm == "sha256"


def test_dedupe_needs_a_delivery_id(tmp_path: Path) -> None:
    """dedupe = "24h" on a source whose scheme has no delivery id is an error."""
    error = one_error('[sources.a]\ndedupe = "24h"\n', tmp_path)
    assert error.startswith("relay.toml: sources.a.dedupe: nothing to dedupe on")


def test_sign_needs_a_secret_and_a_header_for_hmac(tmp_path: Path) -> None:
    """A target's sign table needs a secret; hmac also needs the header to put it in."""
    text = """
[targets.a]
url = "https://a.example.com/"
sign = { scheme = "standard" }
[targets.b]
url = "https://b.example.com/"
sign = { scheme = "hmac", secret = "s" }
"""
    errors = errors_of(text, tmp_path)
    assert [error.split(": ")[1] for error in errors] == [
        "targets.a.sign.secret",
        "targets.b.sign.header",
    ]


def test_headers_that_frame_the_request_cannot_be_set(tmp_path: Path) -> None:
    """Content-Length, Transfer-Encoding, Connection... belong to the HTTP client: setting
    them in a target's headers or a route's set_headers is an error naming the key; Host
    may be set (virtual hosting)."""
    text = """
[sources.app]
[targets.a]
url = "https://a.example.com/"
headers = { Host = "api.internal", Content-Length = "5" }
[[routes]]
name = "r"
source = "app"
targets = ["a"]
set_headers = { transfer-encoding = "chunked" }
"""
    errors = errors_of(text, tmp_path)
    reason = 'header "{}" is set by relay (it frames the request)'
    assert [error.split(": ", 2)[1:] for error in errors] == [
        ["targets.a.headers.Content-Length", reason.format("Content-Length")],
        ["routes[0].set_headers.transfer-encoding", reason.format("transfer-encoding")],
    ]


def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    """Broken TOML gives one line with the file, line and column."""
    error = one_error('[server]\nlisten = "127.0.0.1:8080\n', tmp_path)
    assert error.startswith("relay.toml: line 2, column ")
    assert "invalid TOML" in error
    assert "\n" not in error


def test_missing_file_is_one_clear_error(tmp_path: Path) -> None:
    """A config file that does not exist is a ConfigError naming it."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as caught:
        load(path, env={})
    assert caught.value.errors == [f"{path}: cannot read config: No such file or directory"]


# --------------------------------------------------------------------------- warnings


def test_warns_about_a_source_without_verify(tmp_path: Path) -> None:
    """A source without verify loads, with a warning that anyone can post to it."""
    config = load(write(tmp_path, "[sources.demo]\n"), env={})
    assert (
        "sources.demo: no verify: anyone who can reach the listener can post events"
        in config.warnings
    )


def test_warns_when_a_dedupe_window_outlives_retention(tmp_path: Path) -> None:
    """A dedupe window longer than retention warns: a repeat after the event was pruned
    would be answered with an id that no longer exists."""
    text = '[server]\nretention = "1d"\n[sources.a]\ndedupe = { key = "body.id", window = "7d" }\n'
    warnings = load(write(tmp_path, text), env={}).warnings
    assert "sources.a.dedupe: window (7d) is longer than server.retention (1d): a repeat " in (
        "\n".join(warnings)
    )
    within = text.replace('"7d"', '"1d"')
    assert not any("dedupe" in w for w in load(write(tmp_path, within), env={}).warnings)


def test_warns_about_world_readable_literal_secrets(tmp_path: Path) -> None:
    """A file readable by others that holds literal secrets warns; 0600 or ${...} does not."""
    literal = '[sources.a]\nverify = { scheme = "github", secret = "literal" }\n'
    readable = load(write(tmp_path, literal, mode=0o644), env={})
    (warning,) = [w for w in readable.warnings if "readable by other users" in w]
    assert "sources.a.verify.secret" in warning
    assert "0644" in warning
    private = load(write(tmp_path, literal, mode=0o600), env={})
    assert not any("readable" in w for w in private.warnings)
    interpolated = literal.replace('"literal"', '"${S}"')
    from_env = load(write(tmp_path, interpolated, mode=0o644), env={"S": "x"})
    assert not any("readable" in w for w in from_env.warnings)


def test_credentials_in_target_headers_and_urls_count_as_literal_secrets(tmp_path: Path) -> None:
    """A literal bearer token in a target's headers or a route's set_headers, and a password
    in a target URL (sent as Basic auth), make a readable file warn like any other secret."""
    text = """
[sources.a]
[targets.ci]
url = "https://deploy:pass-literal@ci.example.com/hook"
headers = { Authorization = "Bearer literal-ci-token" }
[[routes]]
name = "r"
source = "a"
targets = ["ci"]
set_headers = { X-Auth-Token = "literal2" }
"""
    config = load(write(tmp_path, text, mode=0o644), env={})
    (warning,) = [w for w in config.warnings if "readable by other users" in w]
    for path in ("targets.ci.url", "targets.ci.headers.Authorization", "set_headers.X-Auth-Token"):
        assert path in warning
    assert shown_url(config, config.targets["ci"]) == "https://deploy:***@ci.example.com/hook"
    assert 'url = "https://deploy:***@ci.example.com/hook"' in effective_toml(config)
    assert "pass-literal" not in effective_toml(config)


def test_errors_about_urls_do_not_show_their_secrets(tmp_path: Path) -> None:
    """A bad URL's error names the key but shows neither a password written in it nor a
    value that came from ${...} (a reload failure is logged, `validate` runs under systemd)."""
    text = """
[targets.literal]
url = "https://deploy:S3CR3T@ci.example.com:99999/hook"
[targets.from-env]
url = "${CI_URL}"
"""
    with pytest.raises(ConfigError) as raised:
        load(write(tmp_path, text), env={"CI_URL": "https://ci.example.com/hook?token=TOKEN42 x"})
    message = "\n".join(raised.value.errors)
    assert 'targets.literal.url: invalid port in URL "https://deploy:***@ci.example.com' in message
    assert 'targets.from-env.url: expected an absolute http(s) URL or "log:", got "***"' in message
    assert "S3CR3T" not in message
    assert "TOKEN42" not in message
    hidden = '[targets.odd]\nurl = "https://deploy:ab#cd-SECRET@host:99999/hook"\n'
    with pytest.raises(ConfigError) as raised:  # "#" hides the password from the parser
        load(write(tmp_path, hidden), env={})
    assert "SECRET" not in "\n".join(raised.value.errors)


def test_errors_mask_interpolated_values_exactly(tmp_path: Path) -> None:
    """A value from ${...} is masked in its error also as a URL without its password and
    as a list item; a short one (not a secret) does not mask the words of the message."""
    text = """
[server]
allow_networks = ["${NET}"]
[log]
level = "${LVL}"
[targets.t]
url = "${CI_URL}"
"""
    env = {"NET": "SeCrEt-123", "LVL": "e", "CI_URL": "https://u:pw@example.com:99999/SeCrEt-456"}
    with pytest.raises(ConfigError) as raised:
        load(write(tmp_path, text), env=env)
    message = "\n".join(raised.value.errors)
    assert "SeCrEt" not in message
    assert 'targets.t.url: invalid port in URL "***"' in message
    assert 'log.level: invalid value "***" (expected one of "debug"' in message


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "https://deploy:S3CR3T@ci.example.com:99999/hook",
            "https://deploy:***@ci.example.com:99999/hook",
        ),
        ("https://user:pw@host.example?to=a@b", "https://user:***@host.example?to=a@b"),
        ("https://api.example.com?at=12:30@utc", "https://api.example.com?at=12:30@utc"),
        ("https://user@host.example/x", "https://user@host.example/x"),
        ("log:", "log:"),
    ],
)
def test_without_password_masks_only_a_password(url: str, shown: str) -> None:
    """Only the password of the user information is masked; an "@" or ":" in the query is
    not taken for one, and the host stays."""
    assert without_password(url) == shown


def test_summaries_show_urls_without_secrets(tmp_path: Path) -> None:
    """`relay validate` lists a plain URL as written and an interpolated one as "***"."""
    text = '[targets.plain]\nurl = "https://a.example/x"\n[targets.env]\nurl = "${U}"\n'
    config = load(write(tmp_path, text), env={"U": "https://hooks.example/services/T0/SECRET"})
    assert shown_url(config, config.targets["plain"]) == "https://a.example/x"
    assert shown_url(config, config.targets["env"]) == "***"


# --------------------------------------------------------------------------- output

FULL = """
[server]
listen = "0.0.0.0:8080"
admin = "127.0.0.1:9090"
journal = "/var/lib/relay/relay.db"
sync = "normal"
retention = "36h"
max_body = "512KiB"
shutdown_grace = "0s"
deny_networks = ["10.0.0.0/8"]
allow_networks = ["10.1.0.0/16"]

[log]
format = "json"
level = "debug"

[defaults]
timeout = "2500ms"
retry = { attempts = 3, first = "1s", max = "1m", max_age = "1h" }

[sources.open]
path = "/in"
methods = ["POST", "PUT"]
dedupe = { key = "body.id", window = "10m" }
max_body = 1000
rate_limit = "600/m"
burst = 5
allow_from = ["192.0.2.0/24"]
ack_status = 200
challenge = "slack"

[targets.ci]
url = "https://ci.example.com/hook?price=$$5"
method = "put"
headers = { "X-Team" = "core" }
retry = { attempts = 8 }
retry_on = [409]
rate_limit = "5/10s"
order_key = "body.repository.id"

[targets.console]
url = "log:"

[[routes]]
name = "to-ci"
source = "open"
filter = "headers.x_github_event == 'push'"
transform = "{text: body.message}"
set_headers = { "X-Origin" = "relay" }
drop_headers = ["X-Drop"]
targets = ["ci", "console"]
"""


def test_effective_toml_round_trips_to_an_equal_config(tmp_path: Path) -> None:
    """`relay config` output, loaded again, gives the same configuration."""
    path = write(tmp_path, FULL)
    config = load(path, env={})
    output = effective_toml(config)
    assert parse(output, path=path, env={}) == config
    document = tomllib.loads(output)
    assert document["server"]["retention"] == "36h"
    assert document["server"]["max_body"] == "512KiB"
    assert document["defaults"]["timeout"] == "2500ms"
    assert document["sources"]["open"]["rate_limit"] == "600/m"
    assert document["sources"]["open"]["max_body"] == 1000
    assert document["targets"]["ci"]["retry"] == {
        "attempts": 8,
        "first": "1s",
        "max": "1m",
        "max_age": "1h",
    }
    assert document["routes"][0]["filter"] == "headers.x_github_event == 'push'"


def test_effective_toml_of_minimal_config_fills_every_default(tmp_path: Path) -> None:
    """The effective config names every setting, including those left at their default."""
    config = load(write(tmp_path, "[sources.a]\n"), env={})
    document = tomllib.loads(effective_toml(config))
    assert set(document["server"]) == {
        "listen",
        "admin",
        "admin_token",
        "journal",
        "sync",
        "retention",
        "max_body",
        "read_timeout",
        "idle_timeout",
        "shutdown_grace",
        "tls_cert",
        "tls_key",
        "deny_networks",
        "allow_networks",
    }
    assert document["defaults"]["retry"]["max_age"] == "3d"
    assert document["sources"]["a"]["path"] == "/hooks/a"
    assert parse(effective_toml(config), path=config.path, env={}) == config


def test_effective_toml_of_an_hmac_source_without_an_id_header_parses_back(
    tmp_path: Path,
) -> None:
    """An hmac source that sets no `id_header` is written without one (an empty name would
    not parse), so `relay config`'s output loads again as the same config."""
    text = '[sources.h]\nverify = { scheme = "hmac", secret = "s", header = "X-Sig" }\n'
    config = load(write(tmp_path, text), env={})
    output = effective_toml(config)
    assert "id_header" not in output
    assert parse(output.replace('"***"', '"s"'), path=config.path, env={}) == config


def test_effective_toml_masks_secrets_and_interpolated_values(tmp_path: Path) -> None:
    """Secrets and anything that came from ${...} are shown as "***"."""
    text = """
[server]
admin_token = "admin-literal"
[sources.gh]
verify = { scheme = "github", secret = ["one-literal", "two-literal"] }
[sources.basic]
verify = { scheme = "basic", username = "user", password = "pw-literal" }
[targets.ci]
url = "https://ci.example.com/"
headers = { Authorization = "Bearer ${CI_TOKEN}", "X-Plain" = "visible", X-Api-Key = "k-literal" }
sign = { scheme = "hmac", secret = "sign-literal", header = "X-Sig" }
"""
    config = load(write(tmp_path, text), env={"CI_TOKEN": "token-from-env"})
    output = effective_toml(config)
    assert "literal" not in output
    assert "token-from-env" not in output
    document = tomllib.loads(output)
    assert document["server"]["admin_token"] == "***"
    assert document["sources"]["gh"]["verify"]["secret"] == ["***", "***"]
    assert document["sources"]["basic"]["verify"] == {
        "scheme": "basic",
        "username": "user",
        "password": "***",
    }
    assert document["targets"]["ci"]["headers"] == {
        "Authorization": "***",
        "X-Plain": "visible",
        "X-Api-Key": "***",
    }
    assert document["targets"]["ci"]["sign"]["secret"] == "***"
    # The masked output is still a loadable config (with placeholder secrets).
    parse(output, path=config.path, env={})


def test_starter_toml_parses_with_fresh_secrets(tmp_path: Path) -> None:
    """`relay init` writes a config that loads and has new secrets every time."""
    first, second = starter_toml(), starter_toml()
    assert first != second
    one = parse(first, path=tmp_path / "relay.toml", env={})
    two = parse(second, path=tmp_path / "relay.toml", env={})
    assert one.server.admin_token
    assert one.server.admin_token != two.server.admin_token
    demo_one, demo_two = one.sources["demo"].verify, two.sources["demo"].verify
    assert demo_one is not None
    assert demo_two is not None
    assert len(demo_one.secrets[0]) >= 32
    assert demo_one.secrets != demo_two.secrets
    assert one.targets["console"].is_log
    assert one.routes[0].targets == ("console",)
    assert one.warnings == ()
    whsec = [line for line in first.splitlines() if "whsec_" in line]
    assert whsec
    assert all(line.startswith("#") for line in whsec)


def test_starter_commented_target_is_valid_when_uncommented(tmp_path: Path) -> None:
    """The commented-out example target in the starter config works once uncommented."""
    text = starter_toml()
    uncommented = text.replace("# [targets.ci]", "[targets.ci]")
    for key in ("url", "sign", "retry"):
        uncommented = uncommented.replace(f"# {key} = ", f"{key} = ")
    config = parse(uncommented, path=tmp_path / "relay.toml", env={})
    sign = config.targets["ci"].sign
    assert sign is not None
    assert sign.scheme == "standard"
    assert sign.secrets[0].startswith("whsec_")


# --------------------------------------------------------------------------- example


def test_example_config_loads_as_is() -> None:
    """config.example.toml loads without errors, with a journal next to it."""
    config = load(ROOT / "config.example.toml", env={})
    assert config.server.journal == ROOT / "state" / "relay.db"
    assert config.server.sync == "full"
    assert config.targets["console"].is_log
    assert config.routes[0].name == "demo-to-console"
    assert config.sources["demo"].path == "/hooks/demo"
    assert config.warnings == (
        "sources.demo: no verify: anyone who can reach the listener can post events",
    )


def test_example_reference_block_is_valid_when_uncommented(tmp_path: Path) -> None:
    """The commented "real setup" in config.example.toml is a valid config once uncommented."""
    text = (ROOT / "config.example.toml").read_text()
    active, _, reference = text.partition("# --- A real setup")
    lines = [line[2:] for line in reference.splitlines()[1:] if line.startswith("# ")]
    env = {"GITHUB_WEBHOOK_SECRET": "s", "CI_TOKEN": "t"}
    config = parse(active + "\n".join(lines), path=tmp_path / "relay.toml", env=env)
    assert config.targets["ci"].retry.attempts == 8
    assert config.sources["github"].dedupe is not None


def test_errors_name_the_config_path_as_given(tmp_path: Path) -> None:
    """Errors and Config.path use the config path exactly as the user gave it."""
    path = write(tmp_path, "[sources.a]\n")
    assert load(path, env={}).path == path
    assert load(Path("relay.toml"), env={}).path == Path("relay.toml")
    write(tmp_path, "[sources.a]\nack_status = 1\n")
    with pytest.raises(ConfigError) as caught:
        load(path, env={})
    assert caught.value.errors[0].startswith(f"{path}: sources.a.ack_status: ")
