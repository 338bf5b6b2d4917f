"""`relay`: run the relay, and the small operator commands around it.

Exit status: 0 done, 1 runtime failure (a PostgreSQL keystore or queue not answering yet
included: systemd starts the relay again), 2 configuration or usage error, or a spool or
keystore that cannot be used (systemd's RestartPreventExitStatus=2 keeps either from
restart-looping).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from keystore.keys import PepperError
from keystore.store import KeystoreUnavailable
from relay.config import ConfigError, LogConfig, load_config, resolve_config_path
from relay.logformat import configure_logging
from relay.queue.sqlite import SpoolUnusable
from relay.queue.store import SpoolBusy, SpoolError
from relay.queuecli import QueueRefused, add_queue_parser, run_queue_command
from relay.statuscli import add_status_parser, run_status_command

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="SMTP submission relay with auth keys")
    parser.add_argument("--config", help="config file (default: $RELAY_CONFIG)")
    parser.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="overrides [log] level, also at reload (default: $RELAY_LOG_LEVEL)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser("serve", help="run the relay (the default)")
    commands.add_parser("gen-cert", help="write a self-signed dev certificate to [tls] cert/key")
    sink = commands.add_parser("dev-sink", help="development upstream writing messages to a folder")
    sink.add_argument("--host", default="127.0.0.1")
    sink.add_argument("--port", type=int, default=2525)
    sink.add_argument("--dir", default="var/sink")
    commands.add_parser("hint", help="print how to create a key and send a test message")
    check = commands.add_parser(
        "check-config", help="check config, certificate, keystore, routes, DKIM; exit 1 listing problems")
    check.add_argument("--json", action="store_true", help="problems, warnings and listeners as JSON")
    keygen = commands.add_parser("dkim-keygen", help="write a DKIM private key; print its DNS record")
    keygen.add_argument("domain")
    keygen.add_argument("selector")
    keygen.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    keygen.add_argument(
        "--out", help="key file (default: dkim/DOMAIN.SELECTOR.key beside --config, else here)")
    add_queue_parser(commands)
    add_status_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    log_level = args.log_level or os.environ.get("RELAY_LOG_LEVEL") or None  # given: wins over [log]
    try:
        configure_logging(LogConfig(), log_level)  # until the config file's [log] is known
    except ValueError as exc:
        print(f"relay: RELAY_LOG_LEVEL: {exc}", file=sys.stderr)
        return 2
    if args.command not in (None, "serve"):
        # a PostgreSQL pool logs every failed connection attempt; a command that cannot reach
        # the database says so in its one line on stderr (as the keystore CLI does)
        logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    if args.command == "dev-sink":
        try:
            asyncio.run(_sink(args))
        except KeyboardInterrupt:
            pass
        return 0
    if args.command == "dkim-keygen":
        return _dkim_keygen(args)
    if args.command == "status":  # exits 1 on an unreadable config or spool (a monitoring check)
        return run_status_command(args.config, as_json=args.json)
    if args.command == "check-config":
        from relay.checkconfig import main as check_config

        return check_config(args.config, as_json=args.json)
    try:
        config = load_config(resolve_config_path(args.config))
        configure_logging(config.log, log_level)
        if args.command == "gen-cert":
            return _gen_cert(config)
        if args.command == "hint":
            return _hint(config)
        if args.command == "queue":
            if config.queue is None:
                raise ConfigError(f"{config.source}: [queue]: required for `relay queue`")
            return run_queue_command(config.queue.path, args, url=config.queue.url)
        from relay.app import DatabaseDown, run

        try:
            run(config)  # Relay.start checks the secret files first
        except DatabaseDown as exc:  # not up yet: exit 1, for systemd to start it again
            print(f"relay: {exc}", file=sys.stderr)
            return 1
    except (ConfigError, SpoolUnusable) as exc:  # waiting will not fix either: no restart loop
        print(f"relay: {exc}", file=sys.stderr)
        return 2
    except (QueueRefused, SpoolBusy, SpoolError) as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    except (KeystoreUnavailable, PepperError) as exc:
        print(f"relay: keystore: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"relay: {exc}", file=sys.stderr)
        return 1
    return 0


async def _sink(args) -> None:
    from relay.devsink import run_dev_sink

    await run_dev_sink(args.host, args.port, Path(args.dir))


def _gen_cert(config) -> int:
    from relay.tlsconf import generate_self_signed

    if config.tls is None:
        raise ConfigError(f"{config.source}: [tls]: needed to know where to write the certificate")
    generate_self_signed(config.server.hostname, config.tls.cert, config.tls.key)
    print(f"wrote {config.tls.cert} and {config.tls.key} (self-signed, for development only)")
    return 0


def _dkim_keygen(args) -> int:
    """Works without a config file: the key is made before [[dkim]] can name it."""
    from relay.signing import generate_key

    base = Path(args.config).resolve().parent if args.config else Path.cwd()
    out = Path(args.out) if args.out else base / "dkim" / f"{args.domain.lower()}.{args.selector}.key"
    try:
        record = generate_key(args.domain, args.selector, out, args.algorithm)
    except ValueError as exc:
        print(f"relay: dkim-keygen: {exc}", file=sys.stderr)
        return 2
    except FileExistsError:
        print(f"relay: dkim-keygen: {out} already exists; not overwriting it", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"relay: dkim-keygen: {out}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    key_file = out.resolve()
    if args.config and key_file.is_relative_to(base):
        key_file = key_file.relative_to(base)  # config paths are relative to the config's folder
    print(f"""wrote {out} ({args.algorithm}, mode 0600: the relay's user must own it)

Publish this TXT record in DNS:

{record}

Then add to the config file and restart the relay:

[[dkim]]
domain = "{args.domain.lower()}"
selector = "{args.selector}"
key_file = {json.dumps(str(key_file))}
""")
    return 0


def _hint(config) -> int:
    port = config.server.submission[0].rpartition(":")[2] if config.server.submission else "587"
    cfg = f"--config {config.source}"
    metrics = ""
    if config.metrics.listen:
        metrics = f"\n  curl -s http://{config.metrics.listen}/metrics | grep ^keyrelay_"
    console = ""
    if config.admin.listen:
        console = (f"\nThe admin console and API (keystore serve) are on http://{config.admin.listen}/:"
                   "\nlog in with the owner admin token printed below.\n")
    print(f"""
Relay starting. To send a test message through it, in another terminal:

  .venv/bin/keystore {cfg} mailbox add me@example.com
  KEY=$(.venv/bin/keystore {cfg} key create --mailbox me@example.com --name "swaks test" --json \\
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])')
  swaks --server 127.0.0.1:{port} --tls \\
        --auth PLAIN --auth-user me@example.com --auth-password "$KEY" \\
        --from me@example.com --to you@example.net

Delivered messages appear in var/sink/. How the relay is doing:

  .venv/bin/relay {cfg} status{metrics}
{console}
Stop with Ctrl-C.
""")
    return 0
