"""A keystore on either engine for the tests that run against both (issue 12: "one test
suite runs against both backends, so neither drifts"): `keystore_place` gives a test the
place its keystore lives, a sqlite file in its folder or a fresh PostgreSQL database, and
opens it the way the relay and the CLI do (keystore/opening.py). The fixture itself is in
tests/conftest.py."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from keystore.opening import open_keystore
from keystore.store import KeyStore

__all__ = ["BACKENDS", "KeystorePlace"]

BACKENDS = ["sqlite", "postgresql"]


@dataclass(frozen=True)
class KeystorePlace:
    """Where one test's keystore lives: `url` for PostgreSQL, else keystore.db in `folder`;
    the pepper is always a file in `folder`."""

    folder: Path
    url: str | None = None

    @property
    def backend(self) -> str:
        return "sqlite" if self.url is None else "postgresql"

    @property
    def pepper_file(self) -> Path:
        return self.folder / "pepper"

    async def open(self, *, create: bool = True, **kwargs: object) -> KeyStore:
        return await open_keystore(
            path=None if self.url else self.folder / "keystore.db", url=self.url,
            pepper_file=self.pepper_file, create=create, **kwargs)  # type: ignore[arg-type]

    def config_lines(self) -> str:
        """The [keystore] table of a relay.toml in `folder` naming this keystore."""
        where = f'url = "{self.url}"' if self.url else 'path = "keystore.db"'
        return f'[keystore]\n{where}\npepper_file = "pepper"\n'

