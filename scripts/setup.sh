#!/usr/bin/env bash
# Set up everything tapio and its tests need on a Debian 12 machine, idempotently:
# apt packages, a virtualenv in .venv built on Debian's python3, and tapio installed
# in it (editable). A second run with nothing changed takes well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
    python3-venv        # the venv is built on Debian's python3 (faster; bcc is packaged for it)
    prometheus          # promtool checks tapio's /metrics; Prometheus scrapes the exporter in tests
    bpfcc-tools python3-bpfcc linux-headers-amd64 bpftool   # the ebpf receiver (bcc compiles at start)
    iproute2            # network namespaces and veth pairs in tests
    openssl             # the TLS tests make their CA and certificates with the openssl command
    python3-systemd     # the journald receiver reads the journal through libsystemd (systemd-python, linked into the venv)
    systemd             # journald tests run real journald namespace instances and a systemd user manager (systemd-run)
    etcd-server         # the etcd-watch tests and bench run a real etcd 3.4 (started by the tests, on loopback)
    etcd-client         # etcdctl: the etcd-watch bench measures it watching beside tapio
    softflowd nfdump    # the netflow receiver's tests: real exporters (softflowd; nfcapd + nfreplay)
    pmacct              # bench_netflow_udp: nfacctd is the C collector the receiver is measured against
    dnsmasq-base dnsutils   # dns-xdp tests: a real DNS server in a namespace, dig as a client
    dnsperf             # bench/bench_dns_xdp.py: offers DNS queries at fixed rates
    # the cri receiver's tests run a real containerd (1.7, fetched below) over CRI:
    runc                # the OCI runtime containerd starts containers with (bookworm's; trixie's needs glibc 2.38)
    containernetworking-plugins   # CNI bridge/host-local/loopback/portmap in /usr/lib/cni: pod sandboxes get a netns and an IP
    busybox-static      # /bin/busybox: the tests build their pause and busybox OCI images from it (no registry is reachable)
    iptables            # the CNI portmap plugin
    gcc python3-dev     # tapio's compiled modules (the ebpf receiver's _hotloop.c, _wirejson.c, cni-log's _fast.c; built below)
)

missing=()
for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing apt packages: ${missing[*]}" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # apt may start daemons on some machines; tests start their own servers.
    $SUDO systemctl stop prometheus >/dev/null 2>&1 || true
    # nfdump's units run nfcapd on UDP 2055 (the netflow receiver's default port) and pmacct's run nfacctd
    $SUDO systemctl stop 'nfdump@*' nfacctd >/dev/null 2>&1 || true
fi

# containerd 1.7 for the cri receiver's tests: GetContainerEvents (the CRI event stream) needs
# 1.7; bookworm ships 1.6.20, which answers UNIMPLEMENTED. The .deb comes from Debian trixie
# through a private apt configuration (its own sources.list, lists and cache under $CTRD_CACHE:
# the system's apt state is not touched) and is unpacked, not installed. Only containerd, ctr
# and the runc shim are used; its runc stays unused (bookworm's /usr/sbin/runc is configured).
CTRD_HOME=${TAPIO_CONTAINERD_HOME:-/opt/tapio/containerd-1.7}
if [ ! -x "$CTRD_HOME/usr/bin/containerd" ]; then
    echo "setup: fetching containerd 1.7 (Debian trixie) into $CTRD_HOME" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    CTRD_CACHE=$(mktemp -d); chmod 755 "$CTRD_CACHE"   # apt downloads as _apt
    mkdir -p "$CTRD_CACHE"/lists/partial "$CTRD_CACHE"/cache/archives/partial "$CTRD_CACHE"/debs
    uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
    [ -n "$uri" ] || uri=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list)
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri trixie main" > "$CTRD_CACHE/sources.list"
    apt_private=(-o Dir::Etc::SourceList="$CTRD_CACHE/sources.list" -o Dir::Etc::SourceParts=/dev/null
                 -o Dir::State::Lists="$CTRD_CACHE/lists" -o Dir::Cache="$CTRD_CACHE/cache")
    apt-get "${apt_private[@]}" update -qq
    (cd "$CTRD_CACHE/debs" && apt-get "${apt_private[@]}" download containerd >/dev/null)
    $SUDO mkdir -p "$CTRD_HOME"
    $SUDO dpkg-deb -x "$CTRD_CACHE"/debs/containerd_1.7*.deb "$CTRD_HOME"
    rm -rf "$CTRD_CACHE"
fi
# and bookworm's own containerd 1.6, unpacked beside it: the cri test of the fallback to
# listing when GetContainerEvents answers UNIMPLEMENTED runs it
CTRD16_HOME=${TAPIO_CONTAINERD_16_HOME:-/opt/tapio/containerd-1.6}
if [ ! -x "$CTRD16_HOME/usr/bin/containerd" ]; then
    echo "setup: fetching containerd 1.6 (Debian bookworm) into $CTRD16_HOME" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    CTRD_CACHE=$(mktemp -d); chmod 755 "$CTRD_CACHE"   # apt downloads as _apt
    (cd "$CTRD_CACHE" && { apt-get download containerd >/dev/null 2>&1 || { $SUDO apt-get update -qq && apt-get download containerd >/dev/null; }; })
    $SUDO mkdir -p "$CTRD16_HOME"
    $SUDO dpkg-deb -x "$CTRD_CACHE"/containerd_1.6*.deb "$CTRD16_HOME"
    rm -rf "$CTRD_CACHE"
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv" >&2
    /usr/bin/python3 -m venv .venv
fi

# bcc compiles against kernel headers found under /lib/modules/$(uname -r). Debian ships
# headers for its own kernel series; link them when the running kernel has none.
# Programs use only tracepoint fields and helpers, so a header version mismatch is harmless.
kdir="/lib/modules/$(uname -r)"
if [ ! -e "$kdir/build/include" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
    common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$hdr" ]; then
        mkdir -p "$kdir"
        ln -sfn "$hdr" "$kdir/build"
        [ -n "$common" ] && ln -sfn "$common" "$kdir/source"
    fi
fi

# bcc's Python package comes from Debian (never `pip install bcc`: an unrelated package);
# link only it into the venv, not all of Debian's dist-packages.
purelib=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d /usr/lib/python3/dist-packages/bcc ] && [ ! -e "$purelib/bcc" ]; then
    ln -sfn /usr/lib/python3/dist-packages/bcc "$purelib/bcc"
fi
# systemd-python likewise: Debian's build for its python3 (the venv's interpreter), only that package.
if [ -d /usr/lib/python3/dist-packages/systemd ] && [ ! -e "$purelib/systemd" ]; then
    ln -sfn /usr/lib/python3/dist-packages/systemd "$purelib/systemd"
fi

# tapio's compiled modules, built against the venv's interpreter (Debian's python3) whenever a source is
# newer than its module. Optional: without one the Python code it stands in for runs (the ebpf and
# cni-log receivers say so at start), so a failed build is reported and setup goes on.
#   tapio/receivers/ebpf/_hotloop.c  the ebpf receiver's record writer
#   tapio/_wirejson.c                OTLP/JSON from protobuf bytes (otlpjson.encode_serialized, the file exporter)
#   tapio/receivers/cni_log/_fast.c  the cni-log receiver's line parser and record writer
ext_suffix=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
py_include=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
for ext_src in tapio/receivers/ebpf/_hotloop.c tapio/_wirejson.c tapio/receivers/cni_log/_fast.c; do
    ext_so="${ext_src%.c}$ext_suffix"
    if [ ! -f "$ext_so" ] || [ "$ext_src" -nt "$ext_so" ]; then
        echo "setup: building $ext_so" >&2
        gcc -O2 -Wall -Wextra -Werror -shared -fPIC -I"$py_include" -o "$ext_so.tmp" "$ext_src" && mv "$ext_so.tmp" "$ext_so" \
            || { rm -f "$ext_so.tmp"; echo "setup: building $ext_so failed; the Python code it stands in for will run" >&2; }
    fi
done

stamp=.venv/.tapio-installed
want="v2-$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing Python dependencies" >&2
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    echo "$want" > "$stamp"
fi
