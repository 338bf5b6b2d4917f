#!/bin/sh
# certbot deploy hook: copy a renewed certificate where the relay reads it, owned by the
# relay's user (the relay refuses a private key another user could read or change), then
# reload: new connections get the new certificate, open sessions and queued mail carry on.
# Install: install -m 0755 deploy/certbot-deploy-hook.sh /etc/letsencrypt/renewal-hooks/deploy/keyrelay
set -eu
dest=/etc/keyrelay/tls
install -d -m 0750 -o root -g keyrelay "$dest"
# write beside, then rename: the relay never reads a half-written file
install -m 0644 -o keyrelay -g keyrelay "$RENEWED_LINEAGE/fullchain.pem" "$dest/.fullchain.pem.new"
install -m 0600 -o keyrelay -g keyrelay "$RENEWED_LINEAGE/privkey.pem" "$dest/.privkey.pem.new"
mv -f "$dest/.fullchain.pem.new" "$dest/fullchain.pem"
mv -f "$dest/.privkey.pem.new" "$dest/privkey.pem"
# a pair the relay would refuse stops here, before the reload (the running one stays)
runuser -u keyrelay -- /opt/keyrelay/.venv/bin/relay --config /etc/keyrelay/relay.toml check-config >/dev/null
systemctl reload relay
