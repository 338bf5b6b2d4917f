"""The admin service: who may do what to workspaces, mailboxes, auth keys and admin tokens.

The CLI (`keystore ...`, run from a root shell: an owner) and the HTTP API and console
(`keystore serve`, an admin token's role) are thin over this one class, so both refuse
the same things with the same words and write the same audit entries. The keystore
(store.py) holds the data rules (a revoked key stays revoked, key limits, suspension);
this layer adds the roles:

* viewer: reads the workspaces it is given (or all);
* editor: also manages the keys and mailboxes of its workspaces;
* owner: everything, including workspace suspension and limits and admin tokens.

A record in a workspace the actor cannot see answers NotFound, as one that does not exist,
so a limited token cannot learn what other workspaces hold. Writes the role does not
allow answer Forbidden.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from keystore.interface import AdminStore
from keystore.legacy import BadLine, LegacyEntry
from keystore.models import ROLES, AdminToken, AuditEvent, AuthKey, Mailbox, Workspace
from keystore.store import LegacyImport, NotFound, StoreError

__all__ = ["Actor", "AdminService", "Forbidden"]


class Forbidden(StoreError):
    """The actor's role or workspaces do not allow this change."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Actor:
    """Who asks: the name the audit log records, a role, and the workspaces it covers."""

    name: str
    role: str  # one of ROLES
    workspaces: frozenset[str] | None = None  # None: every workspace
    token_id: str | None = None

    @classmethod
    def shell(cls, user: str) -> Actor:
        """The CLI's user: whoever holds a root shell on the relay owns everything."""
        return cls(name=user, role="owner")

    @classmethod
    def from_token(cls, token: AdminToken) -> Actor:
        return cls(
            name=f"token:{token.name} ({token.id})",
            role=token.role,
            workspaces=frozenset(token.workspaces) if token.workspaces else None,
            token_id=token.id,
        )

    def sees(self, workspace: str) -> bool:
        return self.workspaces is None or workspace in self.workspaces

    @property
    def rank(self) -> int:
        return ROLES.index(self.role)


class AdminService:
    """Every admin operation, checked against the actor, then done by the keystore."""

    def __init__(self, store: AdminStore, *, route_names: Sequence[str] = ()) -> None:
        self.store = store
        self.route_names = tuple(route_names)

    # ------------------------------------------------------------ the rules

    @staticmethod
    def _require(actor: Actor, role: str, what: str) -> None:
        if actor.rank < ROLES.index(role):
            raise Forbidden(f"{what} needs the {role} role; this is {actor.role}")

    def _check_route(self, route: object) -> None:
        """Refuse a route the config does not define; None or blank clears (the store
        strips, so " bulk " is bulk), and a value that is not text is the store's to refuse."""
        if isinstance(route, str) and route.strip() and self.route_names \
                and route.strip() not in self.route_names:
            raise StoreError(f"unknown route {route!r}: no [[upstream]] or [[group]] of that name "
                             f"(have: {', '.join(self.route_names)})")

    @staticmethod
    def _in_scope(actor: Actor, workspace: str, what: str) -> None:
        """Writes into a workspace the actor does not cover, named by the caller."""
        if not actor.sees(workspace):
            raise Forbidden(f"{what}: this token manages workspace(s) "
                            f"{', '.join(sorted(actor.workspaces or ()))} only")

    async def _visible_key(self, actor: Actor, key_id: str) -> AuthKey:
        key = await self.store.get_key(key_id)
        if not actor.sees(key.workspace):
            raise NotFound(f"unknown key: {key_id}")
        return key

    async def _editable_key(self, actor: Actor, key_id: str, what: str) -> AuthKey:
        key = await self._visible_key(actor, key_id)
        self._require(actor, "editor", what)
        return key

    async def _editable_mailbox(self, actor: Actor, address: str, what: str) -> Mailbox:
        mailbox = await self.mailbox(actor, address)
        self._require(actor, "editor", what)
        return mailbox

    # ---------------------------------------------------------------- reads

    async def workspaces(self, actor: Actor) -> list[Workspace]:
        return [w for w in await self.store.list_workspaces() if actor.sees(w.name)]

    async def workspace(self, actor: Actor, name: str) -> Workspace:
        for found in await self.workspaces(actor):
            if found.name == name:
                return found
        raise NotFound(f"unknown workspace: {name}")

    async def mailboxes(self, actor: Actor, workspace: str | None = None) -> list[Mailbox]:
        return [m for m in await self.store.list_mailboxes(workspace) if actor.sees(m.workspace)]

    async def mailbox(self, actor: Actor, address: str) -> Mailbox:
        mailbox = await self.store.get_mailbox(address)
        if not actor.sees(mailbox.workspace):
            raise NotFound(f"unknown mailbox: {address}")
        return mailbox

    async def keys(
        self, actor: Actor, *, mailbox: str | None = None, workspace: str | None = None,
        search: str | None = None, status: str | None = None, owner: str | None = None,
        unused_for: float | None = None, not_rotated_for: float | None = None,
        kind: str | None = None,
    ) -> list[AuthKey]:
        """Keys (and legacy passwords, marked by `kind`) matching every filter; `mailbox`:
        every key able to log in as it."""
        if mailbox is not None:
            await self.mailbox(actor, mailbox)  # NotFound, rather than an empty list
        return await self.store.list_keys(
            mailbox=mailbox, workspace=workspace, search=search, status=status, owner=owner,
            unused_for=unused_for, not_rotated_for=not_rotated_for,
            workspaces=None if actor.workspaces is None else sorted(actor.workspaces), kind=kind,
        )

    async def key(self, actor: Actor, key_id: str) -> AuthKey:
        return await self._visible_key(actor, key_id)

    async def audit(
        self, actor: Actor, *, key_id: str | None = None, mailbox: str | None = None,
        since: float | None = None, limit: int | None = None,
    ) -> list[AuditEvent]:
        """The trail, oldest first. A token limited to some workspaces sees their entries
        only (admin-token and workspace entries from before schema 4 have none, and so do
        older entries whose key and mailbox are gone: see schema.py's migration 4)."""
        return await self.store.audit_events(
            key_id=key_id, mailbox=mailbox, since=since, limit=limit,
            workspaces=None if actor.workspaces is None else sorted(actor.workspaces),
        )

    # ------------------------------------------------------------ mailboxes

    async def add_mailbox(
        self, actor: Actor, address: str, *, workspace: str, aliases: Iterable[str] = (),
        route: str | None = None,
    ) -> Mailbox:
        self._require(actor, "editor", "adding a mailbox")
        self._in_scope(actor, workspace, f"adding a mailbox to workspace {workspace}")
        if actor.role != "owner" and workspace not in {w.name for w in await self.store.list_workspaces()}:
            raise Forbidden(f"workspace {workspace} does not exist; only an owner creates workspaces")
        self._check_route(route)
        return await self.store.add_mailbox(address, workspace=workspace, aliases=aliases,
                                            route=route, actor=actor.name)

    async def suspend_mailbox(self, actor: Actor, address: str, *, reason: str | None) -> Mailbox:
        await self._editable_mailbox(actor, address, "suspending a mailbox")
        return await self.store.suspend_mailbox(address, reason=reason, actor=actor.name)

    async def resume_mailbox(self, actor: Actor, address: str) -> Mailbox:
        await self._editable_mailbox(actor, address, "resuming a mailbox")
        return await self.store.resume_mailbox(address, actor=actor.name)

    async def remove_mailbox(self, actor: Actor, address: str, *, force: bool) -> int:
        await self._editable_mailbox(actor, address, "removing a mailbox")
        return await self.store.remove_mailbox(address, force=force, actor=actor.name)

    # ----------------------------------------------------------------- keys

    async def create_key(
        self, actor: Actor, *, name: str, mailbox: str | None = None, workspace: str | None = None,
        owner: str | None = None, note: str | None = None,
        permissions: Iterable[str] = ("email.send",), expires: float | None = None,
        route: str | None = None, rate_limit: int | None = None, allow_from: Iterable[str] = (),
    ) -> tuple[AuthKey, str]:
        """A new key and its full secret (shown this once)."""
        self._require(actor, "editor", "creating a key")
        if mailbox is not None:
            target = (await self.mailbox(actor, mailbox)).workspace
        elif workspace is not None:
            target = workspace
        else:
            raise StoreError("a key is scoped to exactly one mailbox or one workspace")
        self._in_scope(actor, target, f"creating a key in workspace {target}")
        self._check_route(route)
        return await self.store.create_key(
            name=name, mailbox=mailbox, workspace=workspace, owner=owner, note=note,
            permissions=permissions, expires=expires, route=route, rate_limit=rate_limit,
            allow_from=allow_from, actor=actor.name,
        )

    async def update_key(self, actor: Actor, key_id: str, changes: Mapping[str, object]) -> AuthKey:
        await self._editable_key(actor, key_id, "changing a key")
        if "route" in changes:
            self._check_route(changes["route"])
        return await self.store.update_key(key_id, changes, actor=actor.name)

    async def disable_key(self, actor: Actor, key_id: str) -> AuthKey:
        await self._editable_key(actor, key_id, "disabling a key")
        return await self.store.disable_key(key_id, actor=actor.name)

    async def enable_key(self, actor: Actor, key_id: str) -> AuthKey:
        await self._editable_key(actor, key_id, "enabling a key")
        return await self.store.enable_key(key_id, actor=actor.name)

    async def revoke_key(self, actor: Actor, key_id: str) -> AuthKey:
        await self._editable_key(actor, key_id, "revoking a key")
        return await self.store.revoke_key(key_id, actor=actor.name)

    async def revoke_keys(
        self, actor: Actor, *, owner: str | None = None, mailbox: str | None = None,
    ) -> list[AuthKey]:
        """Every key (not yet revoked) of one owner, or scoped to one mailbox, within the
        actor's workspaces."""
        self._require(actor, "editor", "revoking keys")
        if mailbox is not None:
            await self.mailbox(actor, mailbox)
        return await self.store.revoke_keys(
            owner=owner, mailbox=mailbox, actor=actor.name,
            workspaces=None if actor.workspaces is None else sorted(actor.workspaces),
        )

    async def rotate_key(self, actor: Actor, key_id: str, *, grace: float = 0) -> tuple[AuthKey, str]:
        await self._editable_key(actor, key_id, "rotating a key")
        return await self.store.rotate_key(key_id, grace=grace, actor=actor.name)

    async def end_rotation_grace(self, actor: Actor, key_id: str) -> AuthKey:
        await self._editable_key(actor, key_id, "ending a rotation grace")
        return await self.store.end_rotation_grace(key_id, actor=actor.name)

    async def delete_key(self, actor: Actor, key_id: str, *, confirm: str) -> AuthKey:
        """Delete a key record; `confirm` must be the key's name, typed by the person
        (the CLI's prompt, the console's field; `--yes` stands for it)."""
        key = await self._editable_key(actor, key_id, "deleting a key")
        if confirm.strip() != key.name:
            raise StoreError("confirmation did not match the key's name; nothing deleted")
        return await self.store.delete_key(key_id, actor=actor.name)

    # ----------------------------------------------------------- workspaces

    async def suspend_workspace(self, actor: Actor, name: str, *, reason: str | None) -> tuple[int, int]:
        await self.workspace(actor, name)
        self._require(actor, "owner", "suspending a workspace")
        return await self.store.suspend_workspace(name, reason=reason, actor=actor.name)

    async def resume_workspace(self, actor: Actor, name: str) -> tuple[int, int]:
        await self.workspace(actor, name)
        self._require(actor, "owner", "resuming a workspace")
        return await self.store.resume_workspace(name, actor=actor.name)

    async def set_key_limit(self, actor: Actor, name: str, limit: int) -> None:
        await self.workspace(actor, name)
        self._require(actor, "owner", "setting a workspace's key limit")
        await self.store.set_key_limit(name, limit, actor=actor.name)

    # --------------------------------------------------------- admin tokens

    async def create_token(
        self, actor: Actor, *, name: str, role: str, workspaces: Iterable[str] = (),
        replace: bool = False,
    ) -> tuple[AdminToken, str]:
        """`replace`: revoke the active tokens of that name first, in one transaction."""
        self._require(actor, "owner", "creating an admin token")
        return await self.store.create_token(name=name, role=role, workspaces=workspaces,
                                             actor=actor.name, replace=replace)

    async def tokens(self, actor: Actor) -> list[AdminToken]:
        self._require(actor, "owner", "listing admin tokens")
        return await self.store.list_tokens()

    async def revoke_token(self, actor: Actor, token_id: str) -> AdminToken:
        self._require(actor, "owner", "revoking an admin token")
        return await self.store.revoke_token(token_id, actor=actor.name)

    async def login(self, presented: str, client_ip: str) -> Actor | None:
        """The actor an admin token stands for, or None (unknown, wrong or revoked: the
        caller cannot tell which, nor should anyone it answers)."""
        token = await self.store.verify_token(presented, client_ip)
        return None if token is None else Actor.from_token(token)

    # ------------------------------------------------------ legacy passwords

    async def import_legacy(
        self, actor: Actor, entries: Sequence[LegacyEntry], *, source: str,
        workspace: str | None = None, problems: Sequence[BadLine] = (), skip_bad: bool = False,
        dry_run: bool = False,
    ) -> LegacyImport:
        """An owner's: it creates workspaces and mailboxes across the keystore."""
        self._require(actor, "owner", "importing legacy passwords")
        return await self.store.import_legacy(
            entries, source=source, actor=actor.name, workspace=workspace, problems=problems,
            skip_bad=skip_bad, dry_run=dry_run)

    async def legacy_passwords(self, actor: Actor, *, workspace: str | None = None,
                               status: str | None = None) -> list[AuthKey]:
        return await self.keys(actor, workspace=workspace, status=status, kind="legacy")

    async def expire_legacy(self, actor: Actor, deadline: float, *, workspace: str | None = None,
                            mailbox: str | None = None) -> list[AuthKey]:
        self._require(actor, "editor", "setting a deadline for legacy passwords")
        if workspace is not None:
            await self.workspace(actor, workspace)  # NotFound for one it cannot see
        if mailbox is not None:
            await self.mailbox(actor, mailbox)
        return await self.store.expire_legacy(
            deadline, actor=actor.name, workspace=workspace, mailbox=mailbox,
            workspaces=None if actor.workspaces is None else sorted(actor.workspaces))

    async def convert_legacy(self, actor: Actor, mailbox: str, *,
                             name: str = "converted from legacy password") -> tuple[AuthKey, AuthKey, str]:
        await self._editable_mailbox(actor, mailbox, "converting a legacy password")
        return await self.store.convert_legacy(mailbox, actor=actor.name, name=name)

    # ---------------------------------------------------------------- other

    async def backup(self, actor: Actor, target: Path) -> None:
        self._require(actor, "owner", "a backup")
        await self.store.backup(target)
