"""The keystore is a library the relay uses, never the other way round: no module of
keystore/ may load relay/, except its two entry points that are handed the relay's config
file (`keystore` CLI, `keystore serve`). Checked in a fresh interpreter that imports them
one by one and names the first after which a relay module is loaded, so an import
anywhere down the chain is caught."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY_POINTS = {"keystore.cli", "keystore.__main__", "keystore.http.serve"}
MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for path in (ROOT / "keystore").rglob("*.py")
)
LIBRARY = [name for name in MODULES if name not in ENTRY_POINTS]


PROBE = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
    loaded = sorted(m for m in sys.modules if m == "relay" or m.startswith("relay."))
    if loaded:
        print(name, *loaded)
        break
"""


def first_to_load_relay(*modules: str) -> list[str]:
    """[module, relay modules it loaded] for the first of `modules` that loads relay, or []."""
    result = subprocess.run([sys.executable, "-c", PROBE, *modules], capture_output=True, text=True,
                            cwd=ROOT, timeout=60, check=True)
    return result.stdout.split()


def test_the_library_modules_are_all_checked():
    assert {"keystore.store", "keystore.service", "keystore.http.app", "keystore.http.api"} <= set(LIBRARY)
    assert ENTRY_POINTS <= set(MODULES)  # an entry point renamed would silently widen the check


def test_no_keystore_library_module_loads_relay():
    assert first_to_load_relay(*LIBRARY) == []


def test_the_check_sees_an_import_of_relay():
    found = first_to_load_relay("keystore.store", "keystore.cli", "keystore.service")
    assert found[0] == "keystore.cli" and "relay.config" in found
