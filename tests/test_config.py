"""The TOML config loader: strict keys and types, messages naming file and key, paths, durations."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.config import (
    ConfigError,
    Duration,
    load_config,
    parse_duration,
    resolve_config_path,
)

ROOT = Path(__file__).resolve().parents[1]
KEYSTORE = '[keystore]\npath = "keystore.db"\npepper_file = "pepper"\n'


def write(folder: Path, text: str, name: str = "config.toml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_for(folder: Path, text: str) -> str:
    path = write(folder, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    return message[len(f"{path}: "):]


def test_minimal_config_and_defaults(tmp_path):
    config = load_config(write(tmp_path, KEYSTORE))
    assert config.source == (tmp_path / "config.toml").resolve()
    assert config.keystore.path == tmp_path / "keystore.db"
    assert config.keystore.pepper_file == tmp_path / "pepper"
    assert config.keystore.default_key_limit == 100
    assert config.server.hostname == "localhost" and config.server.submission == ()
    assert config.auth.max_failures == 10 and config.auth.failure_window == 300
    assert config.tls is None and config.queue is None and config.routing is None
    assert config.upstream == ()


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(("text", "expected"), [
    (KEYSTORE + "colour = 1\n", "[keystore]: unknown key 'colour'"),
    ("colour = 1\n" + KEYSTORE, "top level: unknown key 'colour'"),
    ('source = "elsewhere"\n' + KEYSTORE, "top level: unknown key 'source'"),
    (KEYSTORE + "[logging]\nlevel = 'debug'\n", "top level: unknown key 'logging'"),
    (KEYSTORE + '[server]\nhostnme = "relay.test"\n', "[server]: unknown key 'hostnme'"),
    (KEYSTORE + '[[upstream]]\nname = "a"\nhost = "h"\nprot = 25\n', "[upstream][0]: unknown key 'prot'"),
])
def test_unknown_keys_are_refused(tmp_path, text, expected):
    assert error_for(tmp_path, text) == expected


# ------------------------------------------------------------------ wrong types


@pytest.mark.parametrize(("text", "expected"), [
    (KEYSTORE + "[queue]\npath = 5\n", "[queue] path: expected a string"),
    ('[keystore]\npath = ["a"]\npepper_file = "p"\n', "[keystore] path: expected a string"),
    (KEYSTORE + '[server]\nhostname = 7\n', "[server] hostname: expected a string"),
    (KEYSTORE + '[server]\nmax_recipients = "100"\n',
     "[server] max_recipients: expected a non-negative integer"),
    (KEYSTORE + "[server]\nmax_recipients = -1\n",
     "[server] max_recipients: expected a non-negative integer"),
    (KEYSTORE + "[server]\nmax_recipients = 1.5\n",
     "[server] max_recipients: expected a non-negative integer"),
    (KEYSTORE + "[server]\nmax_connections = true\n",
     "[server] max_connections: expected a non-negative integer"),
    (KEYSTORE + '[server]\ncheck_header_from = "yes"\n',
     "[server] check_header_from: expected true or false"),
    (KEYSTORE + '[server]\nsubmission = "127.0.0.1:587"\n', "[server] submission: expected a list"),
    (KEYSTORE + "[server]\nsubmission = [587]\n", "[server] submission[0]: expected a string"),
    ("server = 5\n" + KEYSTORE, "[server]: expected a table"),
    (KEYSTORE + '[upstream]\nname = "a"\nhost = "h"\n', "[upstream]: expected a list"),
    ("upstream = [1]\n" + KEYSTORE, "[upstream][0]: expected a table"),
])
def test_wrong_types_name_the_key(tmp_path, text, expected):
    assert error_for(tmp_path, text) == expected


def test_message_format_names_the_file(tmp_path):
    path = write(tmp_path, KEYSTORE + "[queue]\npath = 5\n")
    with pytest.raises(ConfigError, match=r"^.*config\.toml: \[queue\] path: expected a string$") as info:
        load_config(path)
    assert str(info.value) == f"{path}: [queue] path: expected a string"


# -------------------------------------------------------------- missing values


@pytest.mark.parametrize(("text", "expected"), [
    ("", "[keystore]: required value is missing"),
    ('[server]\nhostname = "x"\n', "[keystore]: required value is missing"),
    ('[keystore]\npath = "keystore.db"\n', "[keystore] pepper_file: required value is missing"),
    ('[keystore]\npepper_file = "pepper"\n',
     "[keystore]: set path (a sqlite file) or url (postgresql://...), one of them"),
    ('[keystore]\npath = "k.db"\nurl = "postgresql://db/keys"\npepper_file = "pepper"\n',
     "[keystore]: set path (a sqlite file) or url (postgresql://...), one of them"),
    ('[keystore]\nurl = "mysql://db/keys"\npepper_file = "pepper"\n',
     "[keystore] url: expected a postgresql:// URL"),
    (KEYSTORE + '[cluster]\nnode = "a/b"\n',
     "[cluster] node: 'a/b': letters, digits, '.', '_' and '-', at most 63, starting with a letter or digit"),
    (KEYSTORE + '[cluster]\nlease = "1s"\n',
     "[cluster] lease: at least 5s (it is renewed every lease/3 during a delivery)"),
    (KEYSTORE + "[queue]\nmax_queue_lifetime = \"1d\"\n", "[queue] path: required value is missing"),
    (KEYSTORE + '[tls]\ncert = "c.pem"\n', "[tls] key: required value is missing"),
    (KEYSTORE + '[[upstream]]\nhost = "a"\n', "[upstream][0] name: required value is missing"),
    (KEYSTORE + '[[upstream]]\nname = "a"\n', "[[upstream]] a host: required for a smarthost"),
    (KEYSTORE + "[routing]\n", "[routing] default: required value is missing"),
])
def test_missing_required_values(tmp_path, text, expected):
    assert error_for(tmp_path, text) == expected


# ------------------------------------------------------------------- durations


@pytest.mark.parametrize(("text", "seconds"), [
    ("90", 90), ("90s", 90), ("15m", 900), ("24h", 86400), ("30d", 30 * 86400), ("1w", 604800),
    ("250ms", 0.25), ("0.5s", 0.5), (" 2 m ", 120),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "soon", "5y", "-1s", "1.5.2m", "m", "1 2s", "1e3"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


@pytest.mark.parametrize(("value", "seconds"), [('"15m"', 900), ("90", 90), ("0.5", 0.5), ('"250ms"', 0.25)])
def test_durations_in_config(tmp_path, value, seconds):
    config = load_config(write(tmp_path, KEYSTORE + f"[server]\nidle_timeout = {value}\n"))
    assert isinstance(config.server.idle_timeout, Duration)
    assert config.server.idle_timeout == pytest.approx(seconds)


@pytest.mark.parametrize(("text", "expected"), [
    ('[server]\nidle_timeout = "5 parsecs"\n', "[server] idle_timeout: invalid duration '5 parsecs'"),
    ("[server]\nidle_timeout = -5\n", "[server] idle_timeout: expected a duration"),
    ("[server]\nidle_timeout = true\n", "[server] idle_timeout: expected a duration"),
    ('[auth]\nfailure_window = ["5m"]\n', "[auth] failure_window: expected a duration"),
    ('[queue]\npath = "q.db"\nretry_schedule = ["1m", "soon"]\n',
     "[queue] retry_schedule[1]: invalid duration 'soon'"),
])
def test_bad_durations(tmp_path, text, expected):
    assert error_for(tmp_path, KEYSTORE + text).startswith(expected)


# ----------------------------------------------------------------------- paths


def test_relative_paths_are_resolved_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "etc" / "relay"
    write(folder, '[keystore]\npath = "var/keystore.db"\npepper_file = "../secrets/pepper"\n'
                  '[queue]\npath = "/srv/spool.db"\n'
                  '[tls]\ncert = "~/certs/relay.crt"\nkey = "certs/relay.key"\n')
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    for given in (folder / "config.toml", Path("../etc/relay/config.toml")):
        config = load_config(given)
        assert config.source == folder / "config.toml"
        assert config.keystore.path == folder / "var" / "keystore.db"
        assert config.keystore.pepper_file.resolve() == tmp_path / "etc" / "secrets" / "pepper"
        assert config.queue.path == Path("/srv/spool.db")
        assert config.tls.cert == tmp_path / "home" / "certs" / "relay.crt"
        assert config.tls.key == folder / "certs" / "relay.key"
        assert config.keystore.path.is_absolute()


# ---------------------------------------------------------------- cross checks


UPSTREAM = '[[upstream]]\nname = "{name}"\nhost = "127.0.0.1"\n'


@pytest.mark.parametrize(("text", "expected"), [
    ('[server]\nsubmission = ["127.0.0.1:2587"]\n', "[tls]: required when [server] has listeners"),
    ('[tls]\ncert = "c"\nkey = "k"\n[server]\nsubmission = ["localhost"]\n',
     "[server] listener 'localhost': expected HOST:PORT"),
    ('[tls]\ncert = "c"\nkey = "k"\n[server]\nsubmissions = ["::1:465"]\n',
     "[server] listener '::1:465': an IPv6 address needs brackets"),
    ('[tls]\ncert = "c"\nkey = "k"\n[server]\nsubmission = ["0.0.0.0:99999"]\n',
     "[server] listener '0.0.0.0:99999': expected HOST:PORT"),
    (UPSTREAM.format(name="a") + UPSTREAM.format(name="a"), "upstream or group name 'a': defined twice"),
    (UPSTREAM.format(name="a") + 'tls = "ssl"\n',
     "[[upstream]] a tls: expected one of none, starttls, implicit, not 'ssl'"),
    (UPSTREAM.format(name="a") + 'username = "apikey"\n', "[[upstream]] a: username needs password_file"),
    ('[routing]\ndefault = "b"\n' + UPSTREAM.format(name="a"),
     "[routing] default: no [[upstream]] or [[group]] named 'b'"),
])
def test_cross_checks(tmp_path, text, expected):
    assert error_for(tmp_path, KEYSTORE + text).startswith(expected)


def test_ipv6_listener_with_brackets_is_fine(tmp_path):
    config = load_config(write(tmp_path, KEYSTORE + '[tls]\ncert = "c"\nkey = "k"\n'
                                         '[server]\nsubmission = ["[::1]:2587", ":2588"]\n'))
    assert config.server.submission == ("[::1]:2587", ":2588")


# ------------------------------------------------------------- files and lookup


def test_unreadable_or_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "missing.toml")
    assert error_for(tmp_path, "[keystore\n").startswith("not valid TOML")


def test_resolve_config_path(monkeypatch):
    monkeypatch.setenv("RELAY_CONFIG", "/etc/relay/from-env.toml")
    assert resolve_config_path("given.toml") == Path("given.toml")
    assert resolve_config_path(None) == Path("/etc/relay/from-env.toml")
    monkeypatch.delenv("RELAY_CONFIG")
    with pytest.raises(ConfigError, match="pass --config PATH or set RELAY_CONFIG"):
        resolve_config_path(None)


def test_the_example_config_loads():
    config = load_config(ROOT / "config.example.toml")
    assert config.source == ROOT / "config.example.toml"
    assert config.keystore.path == ROOT / "var" / "keystore.db"
    assert config.keystore.pepper_file == ROOT / "var" / "pepper"
    assert config.server.submission == ("127.0.0.1:2587",)
    assert config.server.submissions == ("127.0.0.1:2465",)
    assert config.server.idle_timeout == 300
    assert config.auth.recheck_interval == pytest.approx(0.5)
    assert config.tls.cert == ROOT / "certs" / "dev.crt"
    assert config.queue.retry_schedule == (60, 300, 900, 3600, 10800)
    assert config.queue.max_queue_lifetime == 5 * 86400
    assert config.routing.default == "devsink"
    devsink = config.upstream_named("devsink")
    assert devsink is not None and (devsink.host, devsink.port, devsink.tls) == ("127.0.0.1", 2525, "none")
    assert config.upstream_named("nope") is None


def test_plaintext_to_a_remote_provider_needs_an_explicit_opt_in(tmp_path):
    import pytest as _pytest

    from relay.config import ConfigError, load_config

    base = ('[keystore]\npath = "k.db"\npepper_file = "p"\n[routing]\ndefault = "p"\n'
            '[[upstream]]\nname = "p"\nhost = "smtp.provider.example"\nport = 25\ntls = "none"\n')
    path = tmp_path / "relay.toml"
    path.write_text(base)
    with _pytest.raises(ConfigError, match='tls: "none" sends mail and credentials in clear text'):
        load_config(path)
    path.write_text(base + "allow_plaintext = true\n")
    assert load_config(path).upstream[0].allow_plaintext is True


def test_groups_are_checked(tmp_path):
    import pytest as _pytest

    from relay.config import ConfigError, load_config

    base = ('[keystore]\npath = "k.db"\npepper_file = "p"\n[routing]\ndefault = "g"\n'
            '[[upstream]]\nname = "a"\nhost = "127.0.0.1"\ntls = "none"\n')
    path = tmp_path / "relay.toml"
    for group, message in [
        ('[[group]]\nname = "g"\nmembers = ["a", "zz"]\n', "members: no [[upstream]] named 'zz'"),
        ('[[group]]\nname = "g"\nmembers = ["a"]\nstrategy = "random"\n', "strategy: expected failover"),
        ('[[group]]\nname = "g"\nmembers = ["a"]\nweights = [1, 2]\n', "weights: one weight per member"),
    ]:
        path.write_text(base + group)
        with _pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_config(path)
