#!/usr/bin/env bash
# Idempotent machine + project setup for nodemesh (Debian bookworm, as root).
# Every step checks before it acts, so a second run takes a second or two.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '[setup] %s\n' "$*"; }

if [ "$(id -u)" != 0 ]; then
    echo "nodemesh setup must run as root (it installs packages, mounts bpffs and builds network namespaces): try 'sudo make ...'" >&2
    exit 1
fi

APT_PKGS="python3-bpfcc bpfcc-tools bpftool clang llvm libbpf-dev linux-headers-amd64 iproute2 iptables nftables python3-venv python3-dev util-linux procps curl"
missing=""
for p in $APT_PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    say "installing Debian packages:$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq $missing >/dev/null
fi

# bcc compiles against headers under /lib/modules/$(uname -r); the running kernel ships none,
# Debian's headers package does (see shared SETUP.md).
K=$(uname -r)
if [ ! -e "/lib/modules/$K/build/include" ]; then
    say "linking kernel headers for bcc into /lib/modules/$K"
    mkdir -p "/lib/modules/$K"
    ln -sfn "$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -1)" "/lib/modules/$K/build"
    ln -sfn "$(ls -d /usr/src/linux-headers-*-common | sort -V | tail -1)" "/lib/modules/$K/source"
fi

mountpoint -q /sys/fs/bpf || { say "mounting bpffs"; mount -t bpf bpf /sys/fs/bpf; }

# The venv comes from Debian's python so that `import bcc` (Debian only) works.
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import bcc' 2>/dev/null; then
    say "creating .venv from /usr/bin/python3 with system site packages"
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi

# Reinstall only when the project definition or a Cython source changed.
stamp=.venv/.nodemesh-installed
if [ ! -f "$stamp" ] || [ -n "$(find pyproject.toml setup.py fastpath -newer "$stamp" -print -quit)" ]; then
    say "installing nodemesh (editable, Cython extensions built)"
    .venv/bin/pip install -q -e '.[test]'
    touch "$stamp"
fi
say "ready: $(.venv/bin/nodemesh --version)"
