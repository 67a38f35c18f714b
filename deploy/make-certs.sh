#!/usr/bin/env bash
# Makes a test certificate authority and the certificates a kvmesh fleet
# needs, with openssl. For trials and tests: a production fleet takes its
# certificates from its own PKI (cert-manager, Vault, ...).
#
#   deploy/make-certs.sh OUT_DIR [NAME ...]
#
# Writes to OUT_DIR:
#   ca.pem ca.key          the CA (keep ca.key off the nodes)
#   mesh.pem mesh.key      a node's mesh certificate: every node may share it,
#                          or run this once per node; it carries the name
#                          kvmesh-mesh (--mesh-tls-server-name's default), for
#                          both server and client use (mutual TLS)
#   server.pem server.key  the public port's certificate, for localhost,
#                          127.0.0.1 and every NAME given (DNS names)
#   client.pem client.key  a client certificate (for --tls-client-ca)
set -euo pipefail
out=${1:?usage: make-certs.sh OUT_DIR [NAME ...]}
shift
mkdir -p "$out"
cd "$out"
days=825

sub() {  # sub NAME KIND SAN...
  local name=$1 kind=$2; shift 2
  local san
  san=$(IFS=,; echo "$*")
  openssl req -newkey rsa:2048 -nodes -keyout "$name.key" -subj "/CN=$name" -out "$name.csr" 2>/dev/null
  printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\n' "$san" "$kind" > "$name.ext"
  openssl x509 -req -in "$name.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days $days \
    -sha256 -extfile "$name.ext" -out "$name.pem" 2>/dev/null
  rm -f "$name.csr" "$name.ext"
  chmod 600 "$name.key"
}

openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -subj "/CN=kvmesh test CA" -days $days \
  -sha256 -out ca.pem 2>/dev/null
chmod 600 ca.key
sub mesh serverAuth,clientAuth DNS:kvmesh-mesh
server_san=(DNS:localhost IP:127.0.0.1)
for n in "$@"; do server_san+=("DNS:$n"); done
sub server serverAuth "${server_san[@]}"
sub client clientAuth DNS:kvmesh-client
rm -f ca.srl
echo "certificates in $out: ca.pem mesh.pem/.key server.pem/.key client.pem/.key"
