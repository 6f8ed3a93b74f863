#!/usr/bin/env bash
# Creates the compose deployment's secrets, which are git-ignored and never in a clone. Idempotent:
# whatever exists already is kept (bring your own CA and server certificate by putting ca.pem,
# server.pem and server.key in deploy/certs first).
#   1. deploy/certs/{ca.pem,ca.key,server.pem,server.key}: a development CA and a server
#      certificate naming `coordinator` (the host the agents use) and localhost;
#   2. deploy/agents/NAME/keys/{node.key,node.pub}: each agent's node key pair, and
#      deploy/agents/federation.pub: all of them, the federation each agent pins for SecAgg+;
#   3. an admin token: its hash replaces the placeholder in deploy/coordinator.toml, the token is
#      printed once and kept in deploy/admin.token (mode 0600) for `fedmoe admin --token-file`.
# It also writes the host user's ids to .env (FEDMOE_UID/FEDMOE_GID, compose.yaml's build args)
# so that the containers' user can read the 0600 private keys it mounts.
# Uses .venv/bin/fedmoe (`make setup`), else `fedmoe` on PATH; FEDMOE_CLI=/path/to/fedmoe overrides.
set -euo pipefail
cd "$(dirname "$0")/.."

AGENTS=(finance clinical manufacturing)
CERTS=deploy/certs
CONFIG=deploy/coordinator.toml
TOKEN_FILE=deploy/admin.token
PLACEHOLDER=0000000000000000000000000000000000000000000000000000000000000000

if [ -n "${FEDMOE_CLI:-}" ]; then
  fedmoe=$FEDMOE_CLI
elif [ -x .venv/bin/fedmoe ]; then
  fedmoe=.venv/bin/fedmoe
elif command -v fedmoe >/dev/null; then
  fedmoe=$(command -v fedmoe)
else
  echo "setup.sh: no fedmoe command: run \`make setup\` (makes .venv) or install fedmoe" >&2
  exit 1
fi

# 1. TLS: the files the deployment mounts.
needed=("$CERTS/ca.pem" "$CERTS/server.pem" "$CERTS/server.key")
present=0
for f in "${needed[@]}"; do [ -f "$f" ] && present=$((present + 1)); done
if [ "$present" -eq "${#needed[@]}" ]; then
  echo "certs: keeping $CERTS (ca.pem, server.pem, server.key exist)"
elif [ "$present" -eq 0 ] && [ ! -e "$CERTS/ca.key" ]; then
  "$fedmoe" certs --out "$CERTS" --host coordinator --host localhost
else
  echo "setup.sh: $CERTS is incomplete (it needs ca.pem, server.pem and server.key): remove it to make new development certificates, or complete it with your own" >&2
  exit 1
fi

# 2. One node key pair per agent.
for name in "${AGENTS[@]}"; do
  keys=deploy/agents/$name/keys
  if [ -f "$keys/node.key" ]; then
    echo "keys: keeping $keys/node.key"
  else
    "$fedmoe" agent init --dir "$keys"
  fi
done

# The federation every agent pins for secure aggregation: all of the agents' public keys.
for name in "${AGENTS[@]}"; do cat "deploy/agents/$name/keys/node.pub"; done >deploy/agents/federation.pub.tmp
mv deploy/agents/federation.pub.tmp deploy/agents/federation.pub
echo "federation: deploy/agents/federation.pub pins ${#AGENTS[@]} node keys"

# 3. The admin token, while deploy/coordinator.toml still holds the placeholder.
if grep -q "^sha256 = \"$PLACEHOLDER\"" "$CONFIG"; then
  out=$("$fedmoe" coordinator token --name ops)
  token=$(printf '%s\n' "$out" | sed -n '2p')
  digest=$(printf '%s\n' "$out" | sed -n 's/^sha256 = "\([0-9a-f]\{64\}\)"$/\1/p')
  if ! printf '%s' "$token" | grep -Eq '^[A-Za-z0-9_-]{32,}$' || [ -z "$digest" ]; then
    echo "setup.sh: unexpected output from \`fedmoe coordinator token\`:" >&2
    printf '%s\n' "$out" >&2
    exit 1
  fi
  (umask 077 && printf '%s\n' "$token" >"$TOKEN_FILE")
  # Rewrite in place (same inode): a running coordinator's bind mount keeps seeing the file.
  updated=$(sed "s/^sha256 = \"$PLACEHOLDER\".*\$/sha256 = \"$digest\"  # set by deploy\/setup.sh/" "$CONFIG")
  printf '%s\n' "$updated" >"$CONFIG"
  echo
  echo "admin token for ops (shown once; kept in $TOKEN_FILE, mode 0600; $CONFIG holds only its hash):"
  echo "$token"
  echo
else
  echo "token: keeping the admin token hash in $CONFIG (no placeholder left)"
fi

# The containers' user: the host user's ids, so that the 0600 keys above stay readable there.
if [ ! -f .env ] || ! grep -q '^FEDMOE_UID=' .env; then
  uid=$(id -u) gid=$(id -g)
  if [ "$uid" -eq 0 ]; then uid=10001 gid=10001; fi  # never root in the containers
  printf 'FEDMOE_UID=%s\nFEDMOE_GID=%s\n' "$uid" "$gid" >>.env
  echo "wrote FEDMOE_UID=$uid FEDMOE_GID=$gid to .env (the containers' user)"
fi
if [ "$(id -u)" -eq 0 ]; then
  # Run as root: hand the private keys to the containers' (non-root) user.
  uid=$(sed -n 's/^FEDMOE_UID=//p' .env | tail -n1) gid=$(sed -n 's/^FEDMOE_GID=//p' .env | tail -n1)
  chown "$uid:$gid" "$CERTS/server.key" deploy/agents/*/keys/node.key
fi

cat <<EOF
next:
  docker compose build
  # each agent's privacy ledger, made once (starting an agent never makes one):
EOF
for name in "${AGENTS[@]}"; do
  echo "  docker compose run --rm --no-deps agent-$name fedmoe agent --config /etc/fedmoe/agent.toml new-ledger"
done
cat <<EOF
  docker compose up -d
  # register each agent's public key (agents stay unhealthy until their key is registered):
EOF
for name in "${AGENTS[@]}"; do
  echo "  $fedmoe admin --ca $CERTS/ca.pem --token-file $TOKEN_FILE nodes register $name --public-key deploy/agents/$name/keys/node.pub"
done
echo "  $fedmoe admin --ca $CERTS/ca.pem --token-file $TOKEN_FILE start --config deploy/run.toml --watch"
