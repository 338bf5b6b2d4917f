"""The keystore: workspaces, mailboxes, auth keys and the audit log, and the `keystore` CLI.

Only this package touches the keystore database. The relay talks to it through
`KeyStore` (async), which is also what the CLI uses, so there is exactly one place where a
login is decided: `KeyStore.authenticate`.
"""
