#!/bin/sh
# certbot deploy hook: put a renewed certificate where the relay reads it, owned by the
# relay's user (the relay refuses a private key another user could read or change), then
# reload: new connections get the new certificate, open sessions and queued mail carry on.
#
# Install: install -m 0755 deploy/certbot-deploy-hook.sh /etc/letsencrypt/renewal-hooks/deploy/keyrelay
# and in the relay's config: [tls] cert = "/etc/keyrelay/tls/live/fullchain.pem"
#                                  key  = "/etc/keyrelay/tls/live/privkey.pem"
#
# Each renewal gets a folder of its own and `live` is switched to it by one rename, so a
# start or reload never meets a new certificate beside the old key (which would stop the
# relay with exit 2, not restarted). The three newest copies are kept.
# The KEYRELAY_* variables exist for the tests; the defaults are the README's layout.
set -eu
user=${KEYRELAY_USER:-keyrelay}
tls=${KEYRELAY_TLS_DIR:-/etc/keyrelay/tls}
config=${KEYRELAY_CONFIG:-/etc/keyrelay/relay.toml}
relay=${KEYRELAY_BIN:-/opt/keyrelay/.venv/bin/relay}
reload=${KEYRELAY_RELOAD:-systemctl reload relay}
# keystore serve (deploy/keystore-console.service) serves HTTPS with the same certificate
# when [admin] listen is not loopback; it reads it at start only (its logins start over)
console=${KEYRELAY_CONSOLE_RESTART:-"if systemctl is-active --quiet keystore-console; then systemctl restart keystore-console; fi"}

stamp=$(date -u +%Y%m%dT%H%M%SZ)-$$
install -d -m 0750 -o root -g "$user" "$tls"
install -d -m 0750 -o "$user" -g "$user" "$tls/$stamp"
install -m 0644 -o "$user" -g "$user" "$RENEWED_LINEAGE/fullchain.pem" "$tls/$stamp/fullchain.pem"
install -m 0600 -o "$user" -g "$user" "$RENEWED_LINEAGE/privkey.pem" "$tls/$stamp/privkey.pem"
ln -s "$stamp" "$tls/.live.$$"
mv -T "$tls/.live.$$" "$tls/live"
ls -1d "$tls"/2*/ | head -n -3 | xargs -r rm -rf

# check-config's problems go to certbot's log; they are no reason to keep serving the old
# certificate: a reload refuses a config the relay cannot use and keeps the running one
if ! runuser -u "$user" -- "$relay" --config "$config" check-config >/dev/null; then
    echo "keyrelay: check-config reports the problems above; reloading anyway (the relay keeps its running configuration if it cannot use the new one)" >&2
fi
$reload
eval "$console"
