#!/usr/bin/env bash
# Installs the Debian packages pych's build, tests and demo need, when any is missing.
# Idempotent; needs root (as on this project's machines) or sudo.
set -euo pipefail
PACKAGES=(
  # the test guest: kernel source and toolchain (gcc also builds the fuzz guest,
  # tests/fuzzguest), busybox and the in-guest tools
  linux-source-6.1 build-essential bc bison flex libelf-dev libssl-dev cpio xz-utils kmod
  busybox-static util-linux pciutils
  # checks and peers: iasl for the AML tests, QEMU as the reference/benchmark peer
  acpica-tools qemu-system-x86
  # qemu-img (disk images in other formats, for the format checks)
  qemu-utils
  # virtiofsd (/usr/lib/qemu/virtiofsd), the vhost-user back-end of the virtio-fs tests, and
  # qemu-storage-daemon, which serves non-raw disk images and the vhost-user-blk tests
  qemu-system-common
  # dpdk-testpmd (in dpdk-dev) with its vhost-user and tap drivers and mempool: the
  # vhost-user-net back-end of the vhost-user-net tests (runs without huge pages)
  dpdk dpdk-dev librte-net-vhost23 librte-net-tap23 librte-mempool-ring23
  # host networking for tap devices, and e2fsprogs for disk images
  iproute2 e2fsprogs
  python3-venv
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "install-deps: installing ${missing[*]}"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
