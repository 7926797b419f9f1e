#!/usr/bin/env bash
# Build the guest image the VM tests boot: a stock Debian cloud kernel and a tiny busybox initramfs.
#
# Usage: hack/test-image.sh [--vmlinux]
#   Prints the directory holding `vmlinuz` and `initrd.img` (and `vmlinux` with --vmlinux, the
#   uncompressed ELF kernel Firecracker needs on x86_64).
#
# The image lives in a cache outside the repository, ${MIKROM_IMAGE_CACHE:-$HOME/.cache/mikrom/images},
# in a directory keyed by a hash of this script, so editing the script builds a fresh image and an
# unchanged script reuses the cached one. Nothing is installed on the host besides the Debian
# packages the VM tests need: qemu-system-x86, busybox-static (also the tests' ping), cpio,
# iptables and nftables (the NAT tests); lz4 for --vmlinux.
#
# The guest's /init:
#   - mounts proc, sys and dev, loads the virtio/ACPI-button modules the cloud kernel builds as modules;
#   - reads `ip=<guest>::<gateway>:<netmask>::eth0:off` (the kernel's nfsroot format; this kernel has
#     no IP autoconfiguration, so /init applies it) and configures eth0 with busybox `ip`;
#   - with `mikrom.disk=1` on the command line, mounts the ext4 disk /dev/vda, appends to its
#     /boots and prints `MIKROM-DISK id=<its /id> boots=<lines in /boots>`;
#   - with `mikrom.test_shell=<port>` (tests only), listens on that TCP port with busybox `nc`, one
#     shell per connection (stderr joined to stdout), so a test can run commands inside the guest
#     (send traffic from it, change its addresses) and read what they print;
#   - prints the marker line MIKROM-READY on the console and waits;
#   - powers off on SIGTERM/SIGUSR2 (busybox `poweroff`) and on the ACPI power button (QEMU
#     `system_powerdown`, through busybox acpid); reboots on Ctrl-Alt-Del (SIGINT; Firecracker's
#     SendCtrlAltDel), which ends the VMM as both run with reboots turned into exits.
set -euo pipefail

want_vmlinux=0
for arg in "$@"; do
    case "$arg" in
        --vmlinux) want_vmlinux=1 ;;
        -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
        *) echo "test-image.sh: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

cache_root="${MIKROM_IMAGE_CACHE:-$HOME/.cache/mikrom/images}"
script_hash="$(sha256sum "$0" | cut -c1-12)"
out="$cache_root/test-guest-$script_hash"
mkdir -p "$cache_root"

log() { echo "test-image: $*" >&2; }

apt_updated=0
apt_install() {
    # Install only what is missing; refresh the package lists once if a package is unknown.
    local missing=()
    local pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    log "installing ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
        apt_update
        DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y --no-install-recommends "${missing[@]}" >&2
    fi
}

apt_update() {
    if [ "$apt_updated" -eq 0 ]; then
        timeout 300 apt-get update >&2
        apt_updated=1
    fi
}

# Serialise concurrent runs (parallel test runs share the cache).
exec 9>"$cache_root/.lock"
timeout_s=900
if ! flock -w "$timeout_s" 9; then
    echo "test-image.sh: could not lock $cache_root/.lock within ${timeout_s}s" >&2
    exit 1
fi

apt_install qemu-system-x86 busybox-static cpio iptables nftables
[ "$want_vmlinux" -eq 1 ] && apt_install lz4

if [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ] && { [ "$want_vmlinux" -eq 0 ] || [ -s "$out/vmlinux" ]; }; then
    echo "$out"
    exit 0
fi

work="$(mktemp -d "$cache_root/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# --- kernel -------------------------------------------------------------------------------------
# linux-image-cloud-amd64 is a metapackage; its dependency names the real image package.
kernel_pkg="$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
if [ -z "$kernel_pkg" ]; then
    apt_update
    kernel_pkg="$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
fi
[ -n "$kernel_pkg" ] || { echo "test-image.sh: cannot resolve linux-image-cloud-amd64" >&2; exit 1; }
log "kernel package $kernel_pkg"
# apt's sandbox user cannot write into a root-owned mktemp dir; that warning is harmless.
if ! (cd "$work" && timeout 300 apt-get download "$kernel_pkg" >&2 2>/dev/null); then
    apt_update
    (cd "$work" && timeout 300 apt-get download "$kernel_pkg" >&2)
fi
dpkg-deb -x "$work"/"$kernel_pkg"_*.deb "$work/kpkg"
kver="${kernel_pkg#linux-image-}"
cp "$work/kpkg/boot/vmlinuz-$kver" "$work/vmlinuz"
echo "$kernel_pkg" > "$work/kernel-package"

if [ "$want_vmlinux" -eq 1 ]; then
    # Same approach as the kernel's scripts/extract-vmlinux: find the LZ4 legacy frame magic and
    # decompress from there. lz4 exits non-zero on the trailing bzImage data, so check the ELF magic.
    offset="$(python3 -c "import sys; d=open(sys.argv[1],'rb').read(); print(d.find(b'\x02\x21\x4c\x18'))" "$work/vmlinuz")"
    [ "$offset" -ge 0 ] || { echo "test-image.sh: no LZ4 payload in vmlinuz" >&2; exit 1; }
    tail -c +"$((offset + 1))" "$work/vmlinuz" | lz4 -dc > "$work/vmlinux" 2>/dev/null || true
    [ "$(head -c 4 "$work/vmlinux" | od -An -c | tr -d ' ')" = '177ELF' ] \
        || { echo "test-image.sh: vmlinux extraction failed" >&2; exit 1; }
fi

# --- initramfs ----------------------------------------------------------------------------------
root="$work/initrd"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,etc/acpi/PWRF,lib/modules}
cp /bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"

# virtio-mmio, virtio-net, virtio-blk, the ACPI power button and evdev are modules in the cloud
# kernel; copy them in load order (dependencies first).
moddir="$work/kpkg/lib/modules/$kver/kernel"
for m in drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_mmio \
         net/core/failover drivers/net/net_failover drivers/net/virtio_net \
         drivers/block/virtio_blk drivers/acpi/button drivers/input/evdev; do
    cp "$moddir/$m.ko" "$root/lib/modules/"
    basename "$m" >> "$root/lib/modules/load-order"
done

# busybox acpid runs /etc/acpi/PWRF/00000080 for the power button; `poweroff` signals init.
cat > "$root/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
exec /bin/busybox poweroff
EOF
chmod 755 "$root/etc/acpi/PWRF/00000080"

cat > "$root/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null

halt_now() {
    echo "MIKROM-POWEROFF"
    sync
    poweroff -f
}
reboot_now() {
    echo "MIKROM-REBOOT"
    sync
    reboot -f
}
# busybox poweroff sends SIGUSR2 to init. With ctrl-alt-del handed to init, the kernel sends SIGINT;
# Firecracker has no ACPI power-off, so Ctrl-Alt-Del reboots (Firecracker exits on a guest reboot).
trap halt_now TERM USR2
trap reboot_now INT
echo 0 > /proc/sys/kernel/ctrl-alt-del

# virtio_mmio takes its device= parameters from the kernel command line (Firecracker passes them
# there); insmod does not read /proc/cmdline the way modprobe does, so hand them over explicitly.
mmio_args=""
for word in $(cat /proc/cmdline); do
    case "$word" in
        virtio_mmio.*) mmio_args="$mmio_args ${word#virtio_mmio.}" ;;
    esac
done
while read -r mod; do
    if [ "$mod" = virtio_mmio ]; then
        insmod "/lib/modules/$mod.ko" $mmio_args
    else
        insmod "/lib/modules/$mod.ko"
    fi
done < /lib/modules/load-order

acpid -c /etc/acpi -l /dev/null 2>/dev/null

ip link set lo up
ipspec=""
for word in $(cat /proc/cmdline); do
    case "$word" in
        ip=*) ipspec="${word#ip=}" ;;
    esac
done
if [ -n "$ipspec" ]; then
    # ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>
    IFS=: read -r addr server gw mask host dev autoconf <<IPEOF
$ipspec
IPEOF
    dev="${dev:-eth0}"
    # Devices appear asynchronously after the module loads.
    n=0
    while [ ! -e "/sys/class/net/$dev" ] && [ "$n" -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
    prefix=0
    for octet in $(echo "$mask" | tr . ' '); do
        while [ "$octet" -gt 0 ]; do
            prefix=$((prefix + (octet & 1))); octet=$((octet >> 1))
        done
    done
    [ -n "$host" ] && hostname "$host"
    ip addr add "$addr/$prefix" dev "$dev"
    ip link set "$dev" up
    [ -n "$gw" ] && ip route add default via "$gw" dev "$dev"
    echo "mikrom: $dev $addr/$prefix gateway ${gw:-none}"
fi

# A disk on the first virtio-blk device (the VM's rootfs, ext4): when the command line says
# mikrom.disk=1, mount it, print what its /id holds and append a line to its /boots, so a test can
# tell the guest booted with its own writable copy and that the copy outlives a restart.
if grep -q "mikrom.disk=1" /proc/cmdline; then
    n=0
    while [ ! -e /dev/vda ] && [ "$n" -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
    mkdir -p /mnt
    if mount -t ext4 /dev/vda /mnt; then
        echo "boot" >> /mnt/boots
        sync
        echo "MIKROM-DISK id=$(cat /mnt/id 2>/dev/null) boots=$(wc -l < /mnt/boots)"
    else
        echo "MIKROM-DISK none"
    fi
fi

# Tests only: a root shell on a TCP port of the guest's network, one per connection.
for word in $(cat /proc/cmdline); do
    case "$word" in
        mikrom.test_shell=*) nc -ll -p "${word#mikrom.test_shell=}" -e /bin/sh -c 'exec 2>&1; exec /bin/sh' & ;;
    esac
done

echo "MIKROM-READY"
while true; do
    sleep 3600 &
    wait $!
done
EOF
chmod 755 "$root/init"

(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) | gzip -9 > "$work/initrd.img"

# Publish atomically: a reader sees either nothing or the complete directory.
mkdir -p "$out.tmp"
mv "$work/vmlinuz" "$work/initrd.img" "$work/kernel-package" "$out.tmp/"
[ "$want_vmlinux" -eq 1 ] && mv "$work/vmlinux" "$out.tmp/"
if [ -d "$out" ]; then
    # Only vmlinux was missing: keep the existing files, add the new one.
    [ "$want_vmlinux" -eq 1 ] && mv "$out.tmp/vmlinux" "$out/"
    rm -rf "$out.tmp"
else
    mv "$out.tmp" "$out"
fi
log "built $out"
echo "$out"
