"""Where the relay's log lines go and what they look like: `[log] format` (text or json),
`[log] level`, and the redaction every line passes on its way out.

`configure_logging` installs one handler on the root logger, writing to stderr (systemd
puts it in the journal), with the KeyRedactor filter (relay/maillog.py) in both formats:
no key secret is written, whatever logger the line came from and wherever in the line
(message, exception text, event fields).

Text, one record per line (a traceback's further lines are indented, so no text a client
sent can begin a line of its own, which is what fail2ban's filter anchors on)::

    2024-05-01 12:00:00,123 WARNING relay.mail: auth_failed session=k3f9a2c1d0 client=192.0.2.7 ...

JSON, one object per line, for log shippers: `ts` (UTC, ISO 8601, milliseconds), `level`
(debug, info, warning, error, critical), `logger`, then `event` and its fields as keys
(relay/maillog.py), or `message` for any other line; `session` when the line was written
inside an SMTP session; `exception` (the traceback text) if there is one.

Levels: `[log] level`, unless `relay --log-level` or RELAY_LOG_LEVEL gave one: an operator
who asked for a level on the command line keeps it until the relay restarts. aiosmtpd's
own `mail.log` (every command and reply) is shown only at debug; aiosqlite's debug lines
(every query, message bodies included) never are.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TextIO

from relay.config import LogConfig
from relay.maillog import KeyRedactor, current_session

__all__ = [
    "LEVELS",
    "JsonFormatter",
    "TextFormatter",
    "configure_logging",
    "parse_level",
    "reset_logging",
    "set_level",
]

LEVELS = ("debug", "info", "warning", "error")
# Loggers whose level does not simply follow the relay's: (level at debug, level otherwise)
_PINNED = {
    "mail.log": (logging.DEBUG, logging.ERROR),  # aiosmtpd: a line per command and per reply
    "aiosqlite": (logging.WARNING, logging.WARNING),  # a line per query, with its parameters
}
# Characters that end a line for some reader (journald, Python's universal newlines)
_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _escape_breaks(text: str) -> str:
    return _BREAKS.sub(lambda m: json.dumps(m.group())[1:-1], text)


class TextFormatter(logging.Formatter):
    """`TIME LEVEL LOGGER: MESSAGE`; a non-event line written inside an SMTP session starts
    its message with `session=ID`, so an aiosmtpd transcript line joins its session."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        session = None if hasattr(record, "event") else current_session()
        if session is not None:
            message = f"session={session.id} {message}"
        text = f"{self.formatTime(record)} {record.levelname} {record.name}: {message}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + self.formatStack(record.stack_info)
        return _escape_breaks(text).replace("\n", "\n  ")


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (see the module docstring for the keys)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        line: dict[str, object] = {
            "ts": ts.replace("+00:00", "Z"), "level": record.levelname.lower(), "logger": record.name,
        }
        event = getattr(record, "event", None)
        fields = getattr(record, "fields", None)
        if isinstance(event, str) and isinstance(fields, dict):
            line["event"] = event
            line.update((k, v) for k, v in fields.items() if k not in line)
        else:
            session = current_session()
            if session is not None:
                line["session"] = session.id
            line["message"] = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        return json.dumps(line, ensure_ascii=True, default=str)


@dataclass
class _Installed:
    handler: logging.Handler | None = None
    override: str | None = None


_installed = _Installed()


def parse_level(text: str) -> str:
    """"DEBUG", "debug" -> "debug"; ValueError naming the choices for anything else."""
    level = text.strip().lower()
    if level not in LEVELS:
        raise ValueError(f"log level {text!r}: expected one of {', '.join(LEVELS)}")
    return level


def configure_logging(config: LogConfig, override: str | None = None, *,
                      stream: TextIO | None = None) -> logging.Handler:
    """Install the relay's log handler (replacing one an earlier call installed) with the
    format and level of `config`; `override` (`--log-level`, RELAY_LOG_LEVEL) wins over
    the config's level, now and at every reload. Returns the handler."""
    override = parse_level(override) if override else None
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    handler.addFilter(KeyRedactor())  # a key a client typed in the wrong place stays secret
    root = logging.getLogger()
    if _installed.handler is not None:
        root.removeHandler(_installed.handler)
    root.addHandler(handler)
    _installed.handler = handler
    _installed.override = override
    set_level(config.level)
    return handler


def set_level(level: str) -> str:
    """Change the log level now, without a restart (reload calls this with the new
    `[log] level`). A level given with `--log-level` or RELAY_LOG_LEVEL stays in force
    instead. Returns the level in force ("debug", "info", ...)."""
    name = _installed.override or parse_level(level)
    number = getattr(logging, name.upper())
    logging.getLogger().setLevel(number)
    for logger, (at_debug, otherwise) in _PINNED.items():
        logging.getLogger(logger).setLevel(at_debug if number <= logging.DEBUG else otherwise)
    return name


def reset_logging() -> None:
    """Remove what configure_logging installed (tests, and programs embedding the relay)."""
    if _installed.handler is not None:
        logging.getLogger().removeHandler(_installed.handler)
    _installed.handler, _installed.override = None, None
    logging.getLogger().setLevel(logging.WARNING)
    for logger in _PINNED:
        logging.getLogger(logger).setLevel(logging.NOTSET)
