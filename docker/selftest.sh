#!/usr/bin/env bash
# Build the CPU CI image, run its default command (the test suite), print PASS or FAIL with
# the image's size, and remove everything this script created.
#   sudo bash docker/selftest.sh           build, test, clean up
#   bash docker/selftest.sh --check        only check that the tools are there
# Uses docker when an engine answers, else buildah and podman (root, vfs storage). Where no
# image registry is reachable, python:3.11-slim is replaced by a local stand-in made with
# debootstrap (Debian's Python 3.11 and its headers, not the official image's build). Host
# pip settings (a local wheel folder, a CA bundle) reach the build only as a secret and
# read-only mounts. A missing tool is named, with the apt line that installs it, and the
# script exits 2 before doing anything.
set -euo pipefail
cd "$(dirname "$0")/.."
image=syncbn-ci-selftest
base=docker.io/library/python:3.11-slim
made_base=0
index=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}

if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    build=(docker build) run=(docker run --rm --shm-size 1g) remove=(docker rmi -f) size=(docker image inspect -f '{{.Size}}')
else
    # No engine: buildah builds, podman runs, with runc as its OCI runtime. crun, which
    # Debian's podman brings, fails on hybrid cgroups ("cgroups in hybrid mode not
    # supported"), so it stands in for runc only on a unified (v2) hierarchy.
    runtime=$(command -v runc || true)
    if [ -z "$runtime" ] && [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
        runtime=$(command -v crun || true)
    fi
    missing=()
    for tool in buildah podman debootstrap; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    [ -n "$runtime" ] || missing+=(runc)
    if [ ${#missing[@]} -gt 0 ]; then
        echo "selftest: needs a Docker engine, or these tools to build and run without one: ${missing[*]}" >&2
        echo "selftest: install them with: apt-get update && apt-get install -y ${missing[*]}" >&2
        exit 2
    fi
    storage=(--storage-driver vfs)
    build=(buildah "${storage[@]}" bud --isolation chroot) remove=(buildah "${storage[@]}" rmi -f)
    run=(podman "${storage[@]}" --cgroup-manager cgroupfs --events-backend file run --rm --runtime "$runtime"
         --network host --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 --shm-size 1g)
    size=(podman "${storage[@]}" image inspect -f '{{.Size}}')
fi
if [ "${1:-}" = --check ]; then
    echo "selftest: tools present (${build[0]})"
    exit 0
fi
work=$(mktemp -d)

cleanup() {
    "${remove[@]}" "$image" >/dev/null 2>&1 || true
    if [ "$made_base" = 1 ]; then "${remove[@]}" "$base" >/dev/null 2>&1 || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# pip settings for the build, from this host's: a local wheel folder and a CA bundle, if any.
printf '[global]\n' >"$work/pip.conf"
mounts=()
if [ -d /opt/wheels ] && ls /opt/wheels/torch-* >/dev/null 2>&1; then
    printf 'find-links = /opt/wheels\n' >>"$work/pip.conf"
    mounts+=(-v /opt/wheels:/opt/wheels:ro)
    # A local CPU wheel (version 2.13.0+cpu) outranks the plain 2.13.0 of any index.
    index=${TORCH_INDEX_URL:-https://pypi.org/simple}
fi
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    printf 'cert = /run/host-ca.crt\n' >>"$work/pip.conf"
    mounts+=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro)
fi

if [ "${build[0]}" = buildah ] && ! buildah "${storage[@]}" inspect --type image "$base" >/dev/null 2>&1 \
    && ! buildah "${storage[@]}" pull -q "$base" >/dev/null 2>&1; then
    echo "selftest: no registry; making a stand-in for $base with debootstrap"
    mirror=${BASE_MIRROR:-http://deb.debian.org/debian}
    debootstrap --variant=minbase --include=python3,python3-venv,python3-dev bookworm "$work/rootfs" "$mirror" >/dev/null
    chroot "$work/rootfs" python3 -m venv /usr/local
    container=$(buildah "${storage[@]}" from scratch)
    tar -C "$work/rootfs" -c . | tar -C "$(buildah "${storage[@]}" mount "$container")" -xp
    buildah "${storage[@]}" config --env PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd python3 "$container"
    buildah "${storage[@]}" commit -q "$container" "$base" >/dev/null
    buildah "${storage[@]}" rm "$container" >/dev/null
    made_base=1
fi

started=$(date +%s)
"${build[@]}" -f docker/Dockerfile -t "$image" --secret id=pipconf,src="$work/pip.conf" \
    --build-arg TORCH_INDEX_URL="$index" "${mounts[@]}" . >"$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log"; echo "selftest: FAIL (build)"; exit 1; }
built=$(date +%s)
megabytes=$(( $("${size[@]}" "$image") / 1000000 ))
echo "selftest: built $image in $((built - started)) s, $megabytes MB"
if "${run[@]}" "$image"; then
    echo "selftest: PASS (tests in $(( $(date +%s) - built )) s, image $megabytes MB)"
else
    echo "selftest: FAIL (tests)"
    exit 1
fi
