#!/usr/bin/env bash
# Build the local base image kvmesh-base:<hash> (+ tag kvmesh-base:local) without
# any container registry: debootstrap a minimal Debian, put kvmesh's runtime
# dependencies into /opt/venv (wheels downloaded on the host, installed offline
# inside the rootfs), then `docker import` the tree.
#
# Idempotent and cached: <hash> covers the dependencies in pyproject.toml, the
# build-system requirements and this script; when kvmesh-base:<hash> exists the
# script only (re)tags it as kvmesh-base:local and exits.
#
# Needs: root (debootstrap, chroot), a Docker daemon, Python >= 3.11 (tomllib),
# a Debian mirror (the one apt already uses here) and PyPI (pip).
#
# Env: PYTHON (host python, default: repo .venv, else python3), DEBIAN_MIRROR
# (default: from /etc/apt/sources.list*), KVMESH_BASE_FORCE=1 (rebuild anyway).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SELF="$REPO/deploy/build-base-image.sh"
BUILD="$REPO/deploy/.build"
SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates
IMAGE=kvmesh-base

log() { printf '[build-base-image] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
"$PYTHON" -c 'import sys, tomllib; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON must be Python >= 3.11 (tomllib)"
docker info >/dev/null 2>&1 || die "no Docker daemon reachable (docker info failed)"

mkdir -p "$BUILD"
# One build at a time (make image and the test fixture may race).
exec 9>"$BUILD/.lock"
flock 9

# Requirements from pyproject.toml: runtime deps, the tracing extra (so
# `--otlp-endpoint` works in the image), then build-system requires (so the app
# image can `pip install --no-build-isolation` the project offline).
"$PYTHON" - "$REPO/pyproject.toml" >"$BUILD/requirements.txt" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    data = tomllib.load(f)
reqs = list(data["project"].get("dependencies", []))
reqs += data["project"].get("optional-dependencies", {}).get("tracing", [])
reqs += data.get("build-system", {}).get("requires", [])
print("\n".join(reqs))
EOF
[[ -s "$BUILD/requirements.txt" ]] || die "no dependencies read from pyproject.toml"

DEB_ARCH="$(dpkg --print-architecture)"
case "$DEB_ARCH" in
    amd64) PY_ARCH=x86_64 ;;
    arm64) PY_ARCH=aarch64 ;;
    *) die "unsupported architecture $DEB_ARCH" ;;
esac

HASH="$( { cat "$BUILD/requirements.txt"; echo "$SUITE $PACKAGES $DEB_ARCH"; cat "$SELF"; } \
    | sha256sum | cut -c1-12)"
TAG="$IMAGE:$HASH"

if [[ "${KVMESH_BASE_FORCE:-0}" != 1 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    docker tag "$TAG" "$IMAGE:local"
    log "up to date: $TAG (tagged $IMAGE:local)"
    exit 0
fi

[[ "$(id -u)" == 0 ]] || die "building $TAG needs root (debootstrap, chroot); run as root once"
T0=$SECONDS

# Remove a tree that debootstrap/chroot may have left mounts in: unmount first
# and refuse to delete anything still mounted (a bind-mounted /dev would be fatal).
safe_rm() {
    local dir="$1" mp
    [[ -e "$dir" ]] || return 0
    dir="$(realpath "$dir")"
    [[ "$dir" == "$BUILD"/* ]] || die "refusing to remove $dir (outside $BUILD)"
    for mp in $(awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r); do
        umount -l "$mp" || true
    done
    if awk -v d="$dir/" 'index($2, d) == 1 {found=1} END {exit !found}' /proc/mounts; then
        die "$dir still has mounts; not removing"
    fi
    rm -rf --one-file-system "$dir"
}

# The Debian mirror apt uses on this machine (no other host), and its security suite.
read -r MIRROR SECURITY < <("$PYTHON" - "$SUITE" <<'EOF'
import glob, sys
suite = sys.argv[1]
entries = []  # (uri, suites)
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for block in open(path).read().split("\n\n"):
        fields = {}
        for line in block.splitlines():
            if ":" in line and not line.lstrip().startswith("#"):
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.split()
        if "deb" in fields.get("types", []) and fields.get("enabled", ["yes"]) != ["no"]:
            for uri in fields.get("uris", []):
                entries.append((uri, fields.get("suites", [])))
for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*.list"))]:
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        parts = [p for p in line.split() if not p.startswith("[")]
        if len(parts) >= 3 and parts[0] == "deb":
            entries.append((parts[1], [parts[2]]))
main = next((u for u, s in entries if suite in s), "")
sec = next((u for u, s in entries if f"{suite}-security" in s), "-")
print(main or "-", sec)
EOF
)
MIRROR="${DEBIAN_MIRROR:-$MIRROR}"
[[ -n "$MIRROR" && "$MIRROR" != "-" ]] || die "no apt source for $SUITE found in /etc/apt; set DEBIAN_MIRROR"
log "mirror $MIRROR (security: $SECURITY)"

if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    apt-get install -y -q debootstrap >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && apt-get install -y -q debootstrap >/dev/null; } \
        || die "could not install debootstrap"
fi

# Stage 1: the OS tree (Debian + Python), cached across dependency changes.
OS_LAYOUT=4  # bumped when the tree's preparation below changes: a cached tree is rebuilt
OS_KEY="$(echo "$OS_LAYOUT $SUITE $PACKAGES $DEB_ARCH $MIRROR $SECURITY" | sha256sum | cut -c1-12)"
OS="$BUILD/os"
if [[ "$(cat "$BUILD/os.stamp" 2>/dev/null)" != "$OS_KEY" ]]; then
    safe_rm "$OS"
    rm -f "$BUILD/os.stamp"
    mkdir -p "$BUILD/debs"
    log "debootstrap $SUITE ($PACKAGES)"
    debootstrap --variant=minbase --arch="$DEB_ARCH" --include="$PACKAGES" \
        --cache-dir="$BUILD/debs" "$SUITE" "$OS" "$MIRROR" >"$BUILD/debootstrap.log" 2>&1 \
        || { tail -n 30 "$BUILD/debootstrap.log" >&2; die "debootstrap failed (log: $BUILD/debootstrap.log)"; }
    # Images never need docs, man pages or translations; keep future installs lean too.
    cat >"$OS/etc/dpkg/dpkg.cfg.d/01-kvmesh-lean" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
    printf 'Acquire::Languages "none";\n' >"$OS/etc/apt/apt.conf.d/01-kvmesh-no-languages"
    {
        printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
            "$MIRROR" "$SUITE" "$SUITE"
        if [[ "$SECURITY" != "-" ]]; then
            printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
                "$SECURITY" "$SUITE"
        fi
    } >"$OS/etc/apt/sources.list.d/debian.sources"
    rm -f "$OS/etc/apt/sources.list"
    # rm first: writing through a symlink in the tree would hit the host's file.
    rm -f "$OS/etc/resolv.conf"
    cp -L /etc/resolv.conf "$OS/etc/resolv.conf"
    log "applying $SUITE-updates/-security"
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        chroot "$OS" sh -c 'apt-get update -q && apt-get -y -q upgrade && apt-get clean' \
        >"$BUILD/apt-upgrade.log" 2>&1 \
        || { tail -n 30 "$BUILD/apt-upgrade.log" >&2; die "apt upgrade in rootfs failed"; }
    # Docs go, each package's copyright file stays (its licence asks for it).
    # (A package's doc directory may be a link to another's: those links stay.)
    find "$OS/usr/share/doc" -mindepth 1 ! -type d ! -type l ! -name copyright -delete 2>/dev/null || true
    find "$OS/usr/share/doc" -mindepth 2 -type l ! -name copyright -delete 2>/dev/null || true
    find "$OS/usr/share/doc" -mindepth 3 -delete 2>/dev/null || true  # examples' own copyright files
    find "$OS/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
    rm -rf "$OS"/usr/share/man/* "$OS"/usr/share/info/* \
        "$OS"/var/lib/apt/lists/* "$OS"/var/cache/apt/* "$OS"/var/cache/debconf/*-old \
        "$OS"/var/log/*.log "$OS"/var/log/apt/* "$OS"/tmp/* 2>/dev/null || true
    find "$OS/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true
    rm -f "$OS/etc/resolv.conf" "$OS/etc/machine-id"
    : >"$OS/etc/resolv.conf"
    : >"$OS/etc/machine-id"
    echo "$OS_KEY" >"$BUILD/os.stamp"
    log "OS tree ready ($((SECONDS - T0)) s, $(du -sh --one-file-system "$OS" | cut -f1))"
else
    log "reusing OS tree $OS"
fi

# Stage 2: wheels for the target (cp311, glibc manylinux, this arch), downloaded on the host.
WHEELS="$BUILD/wheels-$HASH"
for old in "$BUILD"/wheels-*; do [[ "$old" == "$WHEELS" ]] || safe_rm "$old"; done
mkdir -p "$WHEELS"
PLATFORMS=()
for minor in $(seq 36 -1 5); do PLATFORMS+=(--platform "manylinux_2_${minor}_${PY_ARCH}"); done
PLATFORMS+=(--platform "manylinux2014_${PY_ARCH}" --platform "manylinux2010_${PY_ARCH}" --platform "manylinux1_${PY_ARCH}")
log "pip download -> $WHEELS"
env -u PIP_FIND_LINKS "$PYTHON" -m pip download -q --disable-pip-version-check \
    --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 "${PLATFORMS[@]}" \
    -d "$WHEELS" -r "$BUILD/requirements.txt" \
    || die "pip download failed"

# Stage 3: rootfs = OS tree + /opt/venv with the dependencies, installed offline in a chroot.
ROOT="$BUILD/rootfs"
safe_rm "$ROOT"
cp -a --reflink=auto "$OS" "$ROOT"
mkdir -p "$ROOT/tmp/wheels"
cp "$WHEELS"/*.whl "$ROOT/tmp/wheels/"
cp "$BUILD/requirements.txt" "$ROOT/tmp/requirements.txt"
log "installing dependencies into /opt/venv"
env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    chroot "$ROOT" sh -ec '
        python3 -m venv /opt/venv
        /opt/venv/bin/pip install -q --no-index --find-links /tmp/wheels -r /tmp/requirements.txt
        /opt/venv/bin/pip freeze --all > /opt/venv/kvmesh-base-freeze.txt
        /opt/venv/bin/python -c "import grpc, pycrdt, zmq, msgspec, uvloop, aiohttp, tokenizers, xxhash, structlog"
    ' || die "installing dependencies in the rootfs failed"
rm -rf "$ROOT/tmp/wheels" "$ROOT/tmp/requirements.txt" "$ROOT/root/.cache"
echo "$HASH" >"$ROOT/opt/venv/kvmesh-base-hash"

log "docker import $TAG"
tar --numeric-owner --xattrs -C "$ROOT" \
    --exclude='./dev/*' --exclude='./proc/*' --exclude='./sys/*' --exclude='./tmp/*' \
    -c . \
  | docker import \
        --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV VIRTUAL_ENV=/opt/venv' \
        --change 'ENV LANG=C.UTF-8' \
        --change "LABEL org.opencontainers.image.title=kvmesh-base kvmesh.base.hash=$HASH" \
        --change 'CMD ["python3"]' \
        - "$TAG" >/dev/null
docker tag "$TAG" "$IMAGE:local"
safe_rm "$ROOT"
# Older kvmesh-base:<hash> images are superseded; drop them if nothing uses them.
for old in $(docker images --format '{{.Repository}}:{{.Tag}}' "$IMAGE" | grep -v -e ":$HASH\$" -e ':local$' || true); do
    docker rmi "$old" >/dev/null 2>&1 || true
done
log "built $TAG (+ $IMAGE:local) in $((SECONDS - T0)) s, $(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}')"
