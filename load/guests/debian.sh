#!/usr/bin/env bash
# Builds a real Debian 12 guest for the real-VM benchmark, from Debian's packages only, and caches it:
#   load/guests/debian.sh [CACHE_DIR]     (default .handoff-cache/debian-guest; prints the folder)
# The folder holds disk.img (8 GiB sparse raw, ext4 made with mkfs.ext4 -d: no loop device needed),
# vmlinuz and initrd.img (from the guest's own /boot, for -kernel/-initrd), and cmdline (the -append).
# The guest runs systemd, a DHCP client on its NIC, and stateful.service: a Python HTTP service on
# port 8080 that holds ~200 MB of records in memory (text, as an application's records are: words and
# numbers, not random bytes), replaces ~300 KB of them a second, and appends a line a second to
# /var/lib/stateful/log. GET /state answers {"seq": N, "digest": ...}: seq only grows,
# so a client that ever sees it go back has met a guest that lost state.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-.handoff-cache/debian-guest}
version=3
if [ -f "$out/ready" ] && [ "$(cat "$out/ready")" = "$version" ]; then echo "$out"; exit 0; fi
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ] || { as_root apt-get update -qq; DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "$2" >/dev/null; }; }
need debootstrap debootstrap
need mkfs.ext4 e2fsprogs
# the Debian mirror this machine's apt uses (one-line or deb822 sources)
mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
  sed -n -e 's/^deb \(http[^ ]*\) bookworm main.*/\1/p' -e 's/^URIs: *\(http[^ ]*debian\)$/\1/p' | head -1 || true)
[ -n "$mirror" ] || { echo "debian.sh: no Debian mirror found in this machine's apt sources" >&2; exit 1; }
root=$(mktemp -d "${TMPDIR:-/tmp}/debian-guest.XXXXXX")
trap 'as_root rm -rf "$root"' EXIT
as_root debootstrap --variant=minbase --include=systemd,systemd-sysv,python3,linux-image-amd64,initramfs-tools,udev,iproute2 bookworm "$root" "$mirror" >/dev/null
as_root tee "$root/etc/fstab" >/dev/null <<'FSTAB'
/dev/vda / ext4 rw,errors=remount-ro 0 1
FSTAB
echo handoff-guest | as_root tee "$root/etc/hostname" >/dev/null
as_root mkdir -p "$root/etc/systemd/network" "$root/opt/stateful" "$root/var/lib/stateful"
as_root tee "$root/etc/systemd/network/10-nic.network" >/dev/null <<'NET'
[Match]
Name=en* eth*
[Network]
DHCP=ipv4
NET
as_root chroot "$root" systemctl enable systemd-networkd >/dev/null 2>&1
as_root tee "$root/opt/stateful/server.py" >/dev/null <<'PY'
import hashlib, http.server, json, random, threading, time
RECORDS, RECORD_BYTES = 50_000, 4096          # ~200 MB of state in memory
WORDS = [f'{a}{b}' for a in ('ka', 'lo', 'mi', 'ne', 'ru', 'sa', 'ti', 'vo') for b in ('ber', 'dal', 'fin', 'gor', 'han', 'mel', 'pos', 'ril', 'sun', 'tek', 'vam', 'zor')]
TOKENS = [f'{w}={n}'.encode() for w in WORDS for n in range(100)]
def record():
    # one C-level call per record: the whole state is made in seconds even under TCG
    return b' '.join(random.choices(TOKENS, k=500))[:RECORD_BYTES].ljust(RECORD_BYTES, b' ')
state = [record() for _ in range(RECORDS)]
seq, lock = 0, threading.Lock()
def churn():
    global seq
    log = open('/var/lib/stateful/log', 'a', buffering=1)
    last_log = 0.0
    while True:
        t = time.time()
        with lock:
            for _ in range(8):             # ~300 KB/s: 8 records every ~0.1 s
                state[random.randrange(RECORDS)] = record()
            seq += 1
        if t - last_log >= 1:
            log.write(f'{t:.3f} seq={seq}\n'); last_log = t
        time.sleep(0.1)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with lock:
            body = json.dumps({'seq': seq, 'digest': hashlib.sha256(state[seq % RECORDS]).hexdigest()[:16]}).encode()
        self.send_response(200); self.send_header('content-type', 'application/json')
        self.send_header('content-length', str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *args): pass
threading.Thread(target=churn, daemon=True).start()
http.server.ThreadingHTTPServer(('0.0.0.0', 8080), Handler).serve_forever()
PY
as_root tee "$root/etc/systemd/system/stateful.service" >/dev/null <<'UNIT'
[Unit]
Description=a service that keeps state in memory and on disk
After=network.target
[Service]
ExecStart=/usr/bin/python3 /opt/stateful/server.py
Restart=no
[Install]
WantedBy=multi-user.target
UNIT
as_root chroot "$root" systemctl enable stateful.service >/dev/null 2>&1
as_root chroot "$root" passwd -d root >/dev/null
as_root rm -rf "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/*
mkdir -p "$out"
rm -f "$out/ready"
cp "$(readlink -f "$root/vmlinuz")" "$out/vmlinuz"
cp "$(readlink -f "$root/initrd.img")" "$out/initrd.img"
rm -f "$out/disk.img"
as_root mkfs.ext4 -q -F -d "$root" "$out/disk.img" 8G
echo "root=/dev/vda rw console=ttyS0 quiet" > "$out/cmdline"
echo "$version" > "$out/ready"
echo "$out"
