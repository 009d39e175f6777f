#!/usr/bin/env bash
# Build the pych test guest from Debian packages:
#   build/guest/vmlinux         uncompressed ELF with the PVH entry note (boot this one)
#   build/guest/bzImage         the same kernel as a bzImage
#   build/guest/initramfs.cpio  uncompressed newc cpio: busybox-static, lscpu, lspci
#   build/guest/cmdline         the recommended kernel command line (one line)
# plus build/guest/{config,System.map,hash} for reference.
#
# Results are cached in ${PYCH_CACHE:-$HOME/.cache/pych}/guest/<hash>/, where <hash>
# covers every input: this script, guest/kernel.config, guest/patches/*.patch,
# guest/init, guest/libstubs.c, the versions of the Debian packages used, and the
# compiler.  A cache hit only copies files.  Kernel sources are unpacked and built
# under build/guest-src/ (kept between runs, so small changes rebuild in seconds).
#
# Run from anywhere (the Makefile calls it as `guest/build.sh` from the repo root).
# On a fresh Debian 12 machine it installs what it needs with apt-get (as root).
# Environment: PYCH_CACHE (cache root), JOBS (default: nproc).
set -Eeuo pipefail

say() { printf '[guest] %s\n' "$*" >&2; }
die() { printf '[guest] ERROR: %s\n' "$*" >&2; exit 1; }
trap 'die "failed at line $LINENO: $BASH_COMMAND"' ERR

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
GDIR=$ROOT/guest
OUT=$ROOT/build/guest
WORK=$ROOT/build/guest-src
KSRC=$WORK/linux-source-6.1
KTAR=/usr/src/linux-source-6.1.tar.xz
CACHE_ROOT=${PYCH_CACHE:-$HOME/.cache/pych}/guest
JOBS=${JOBS:-$(nproc)}

# The ONE place in the project that holds the guest kernel command line.
#   pvmsafe    hides the CPU features the PVM host cannot emulate in guest ring 0
#              (guest/patches/0004; replaces "noxsave clearcpuid=popcnt,cx16,...")
#   rodata=off skips the read-only remapping passes (~5 s of boot here)
#   rootfstype=ramfs  unpack the initramfs into ramfs, not tmpfs (7.7 s instead of
#              11.9 s for 4.7 MiB here); /tmp and /run are still tmpfs
#   panic=-1   reboot at once on a panic
CMDLINE='console=ttyS0 panic=-1 quiet rodata=off rootfstype=ramfs pvmsafe'

# Debian packages: build tools, and the sources of the guest's contents.
TOOL_PKGS=(build-essential bc bison flex libelf-dev libssl-dev xz-utils patch)
CONTENT_PKGS=(linux-source-6.1 busybox-static util-linux pciutils pci.ids
              libc6 libsmartcols1 libpci3 zlib1g)

INSTALL_FILES=(vmlinux bzImage initramfs.cpio cmdline config System.map)

# ---------------------------------------------------------------------------
pkg_installed() {
	[[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true) == "install ok installed" ]]
}

ensure_packages() {
	local missing=() p
	for p in "${TOOL_PKGS[@]}" "${CONTENT_PKGS[@]}"; do
		pkg_installed "$p" || missing+=("$p")
	done
	((${#missing[@]} == 0)) && return 0
	[[ $(id -u) == 0 ]] || die "missing Debian packages: ${missing[*]} (run as root, or: sudo apt-get install -y ${missing[*]})"
	say "installing: ${missing[*]}"
	apt-get update
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
}

input_hash() {
	local f
	{
		echo "pych guest inputs v1"
		for f in "$GDIR/build.sh" "$GDIR/kernel.config" "$GDIR/init" "$GDIR/libstubs.c" \
			 "$GDIR"/patches/*.patch; do
			printf '%s %s\n' "$(sha256sum <"$f" | cut -d' ' -f1)" "${f#"$GDIR"/}"
		done
		dpkg-query -W -f='${Package}=${Version}\n' "${CONTENT_PKGS[@]}"
		gcc --version | sed -n 1p
		ld --version | sed -n 1p
	} | sha256sum | cut -c1-16
}

install_outputs() {  # $1 = complete cache dir
	local f
	mkdir -p "$OUT"
	# copy + rename: whoever is booting the previous files keeps a consistent set
	for f in "${INSTALL_FILES[@]}"; do
		cp "$1/$f" "$OUT/.$f.tmp"
		mv -f "$OUT/.$f.tmp" "$OUT/$f"
	done
	echo "$HASH" >"$OUT/.hash.tmp"
	mv -f "$OUT/.hash.tmp" "$OUT/hash"
	say "build/guest ready (hash $HASH):"
	(cd "$OUT" && ls -l "${INSTALL_FILES[@]}" >&2)
	say "cmdline: $(cat "$OUT/cmdline")"
}

# ---------------------------------------------------------------------------
# Kernel tree: extracted once, patches re-applied when the patch set changes.
patches_id() { cat "$GDIR"/patches/*.patch | sha256sum | cut -d' ' -f1; }

apply_patches() {
	local p
	mkdir -p "$WORK/applied-patches"
	for p in "$GDIR"/patches/*.patch; do
		say "applying ${p#"$ROOT"/}"
		(cd "$KSRC" && patch -p1 -N -s --no-backup-if-mismatch <"$p") || die "patch ${p##*/} does not apply"
		cp "$p" "$WORK/applied-patches/"
	done
}

revert_patches() {
	local p list=()
	[[ -d $WORK/applied-patches ]] || return 1
	mapfile -t list < <(ls -1 "$WORK"/applied-patches/*.patch 2>/dev/null | sort -r)
	for p in "${list[@]}"; do
		(cd "$KSRC" && patch -R -p1 -s --dry-run --no-backup-if-mismatch <"$p" >/dev/null 2>&1) || return 1
		(cd "$KSRC" && patch -R -p1 -s --no-backup-if-mismatch <"$p") || return 1
		rm -f "$p"
	done
}

prepare_tree() {
	local want stamp=$KSRC/.pych-tree
	want="linux-source=$(dpkg-query -W -f='${Version}' linux-source-6.1) patches=$(patches_id)"
	if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then
		say "kernel tree up to date ($KSRC)"
		return
	fi
	if [[ -f $stamp && $(head -c 200 "$stamp") == "linux-source=$(dpkg-query -W -f='${Version}' linux-source-6.1) "* ]]; then
		say "patch set changed: reverting the previously applied patches"
		rm -f "$stamp"
		if revert_patches; then
			apply_patches
			echo "$want" >"$stamp"
			return
		fi
		say "could not revert cleanly; extracting a fresh tree"
	fi
	rm -rf "$KSRC" "$WORK/applied-patches" "$WORK/extract.tmp"
	mkdir -p "$WORK/extract.tmp"
	say "extracting $KTAR (~10 s)"
	tar -xf "$KTAR" -C "$WORK/extract.tmp"
	mv "$WORK/extract.tmp/linux-source-6.1" "$KSRC"
	rmdir "$WORK/extract.tmp"
	apply_patches
	echo "$want" >"$stamp"
}

configure_kernel() {
	local frag=$GDIR/kernel.config line key val got mism=()
	say "configuring: tinyconfig + guest/kernel.config + olddefconfig"
	(
		cd "$KSRC"
		make -s tinyconfig >"$WORK/config.log" 2>&1
		scripts/kconfig/merge_config.sh -m .config "$frag" >>"$WORK/config.log" 2>&1
		make -s olddefconfig >>"$WORK/config.log" 2>&1
	) || { cat "$WORK/config.log" >&2; die "kernel configuration failed"; }

	# Every option of the fragment must have ended up exactly as requested.
	while IFS= read -r line || [[ -n $line ]]; do
		line=${line%%#*}
		line=${line//[[:space:]]/}
		[[ -z $line ]] && continue
		key=${line%%=*}
		val=${line#*=}
		if [[ $val == n ]]; then
			got=$(grep -E "^$key=" "$KSRC/.config" || true)
			[[ -z $got ]] || mism+=("$line  (got: $got)")
		else
			if ! grep -qxF -- "$line" "$KSRC/.config"; then
				got=$(grep -E "^$key=|^# $key is not set" "$KSRC/.config" || true)
				mism+=("$line  (got: ${got:-absent})")
			fi
		fi
	done <"$frag"
	if ((${#mism[@]})); then
		say "kernel config does not match guest/kernel.config:"
		printf '  mismatch: %s\n' "${mism[@]}" >&2
		die "${#mism[@]} option(s) not set as requested (unmet dependencies?)"
	fi
	say "config verified: all $(grep -cE '^CONFIG_' "$frag") options of guest/kernel.config as requested"
}

build_kernel() {
	say "building the kernel: make -j$JOBS vmlinux bzImage (full build ~5-10 min on 2 cores)"
	(cd "$KSRC" && make -j"$JOBS" KBUILD_BUILD_USER=pych KBUILD_BUILD_HOST=pych vmlinux bzImage) \
		|| die "kernel build failed"
	local hdr notes
	hdr=$(readelf -h "$KSRC/vmlinux")
	[[ $hdr =~ Class:[[:space:]]*ELF64 ]] || die "vmlinux is not ELF64"
	# XEN_ELFNOTE_PHYS32_ENTRY (type 18) in a "Xen" note = the PVH entry point.
	notes=$(readelf -n "$KSRC/vmlinux")
	grep -E '^[[:space:]]*Xen[[:space:]]' <<<"$notes" | grep -iE '0x00000012|PHYS32_ENTRY' >/dev/null \
		|| die "vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
}

# ---------------------------------------------------------------------------
# initramfs
build_stubs() {
	local d=$WORK/stubs
	rm -rf "$d"
	mkdir -p "$d"
	cat >"$d/libkmod.map" <<-'EOF'
	LIBKMOD_5 { global: kmod_*; local: *; };
	EOF
	cat >"$d/libudev.map" <<-'EOF'
	LIBUDEV_183 { global: udev_new; udev_unref; udev_list_entry_get_next;
	              udev_list_entry_get_name; udev_list_entry_get_value; local: *; };
	LIBUDEV_196 { global: udev_hwdb_new; udev_hwdb_unref;
	              udev_hwdb_get_properties_list_entry; } LIBUDEV_183;
	EOF
	gcc -shared -fPIC -O2 -s -DSTUB_LIBKMOD -Wl,-soname,libkmod.so.2 \
		-Wl,--version-script="$d/libkmod.map" -o "$d/libkmod.so.2" "$GDIR/libstubs.c"
	gcc -shared -fPIC -O2 -s -DSTUB_LIBUDEV -Wl,-soname,libudev.so.1 \
		-Wl,--version-script="$d/libudev.map" -o "$d/libudev.so.1" "$GDIR/libstubs.c"
}

elf_needed() { readelf -d "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p'; }
elf_interp() { readelf -l "$1" | sed -n 's/.*Requesting program interpreter: \(.*\)\]$/\1/p'; }

# pci.ids cut down to what a pych/QEMU/Cloud Hypervisor guest can show: the
# device classes, Red Hat (virtio, QEMU), the QEMU VGA vendor, and the Intel
# chipset devices QEMU emulates.  The full file is 1.3 MB (3.3 s of unpacking).
trim_pci_ids() {
	awk '
	BEGIN {
		keepv["1af4"] = keepv["1b36"] = keepv["1234"] = 1
		n = split("0d57 100e 10d3 1237 2415 24cd 25ab 2668 2918 2922 2930 2934 2935 2936 2937 2938 2939 293a 293c 29c0 7000 7010 7020 7110 7111 7113", ids, " ")
		for (i = 1; i <= n; i++) inteld[ids[i]] = 1
	}
	/^# (Version|Date):/ { print; next }
	/^#/ || /^[[:space:]]*$/ { next }
	/^C / { classes = 1 }
	classes { print; next }
	/^[0-9a-f][0-9a-f][0-9a-f][0-9a-f] / { v = $1; kv = (v in keepv) || v == "8086"; if (kv) print; kd = 0; next }
	/^\t[0-9a-f][0-9a-f][0-9a-f][0-9a-f] / { kd = kv && (v != "8086" || ($1 in inteld)); if (kd) print; next }
	/^\t\t/ { if (kd) print; next }
	' /usr/share/misc/pci.ids
}

build_initramfs() {  # $1 = output file
	local stage=$WORK/initramfs list=$WORK/initramfs.list libdir=/lib/x86_64-linux-gnu
	local -A soname_path=() done_libs=()
	local queue=() bin so p path interp a

	say "assembling the initramfs"
	if [[ $(readelf -l /bin/busybox) == *"program interpreter"* ]]; then
		die "/bin/busybox is dynamically linked: the busybox-static package is needed"
	fi
	build_stubs
	[[ -x $WORK/gen_init_cpio && $WORK/gen_init_cpio -nt $KSRC/usr/gen_init_cpio.c ]] ||
		gcc -O2 -o "$WORK/gen_init_cpio" "$KSRC/usr/gen_init_cpio.c"

	rm -rf "$stage"
	mkdir -p "$stage/etc" "$stage/bin" "$stage/lib" "$stage/usr/share/misc"

	# small config files
	cat >"$stage/etc/fstab" <<-'EOF'
	proc      /proc  proc      nosuid,nodev,noexec  0 0
	sysfs     /sys   sysfs     nosuid,nodev,noexec  0 0
	devtmpfs  /dev   devtmpfs  nosuid               0 0
	tmpfs     /tmp   tmpfs     nosuid,nodev,mode=1777  0 0
	tmpfs     /run   tmpfs     nosuid,nodev,mode=0755  0 0
	EOF
	printf 'root:x:0:0:root:/root:/bin/sh\n' >"$stage/etc/passwd"
	printf 'root:x:0:\ntty:x:5:\n' >"$stage/etc/group"
	printf 'export PS1="# "\n' >"$stage/etc/profile"
	trim_pci_ids >"$stage/usr/share/misc/pci.ids"

	# lscpu, lspci and the shared objects they need (readelf NEEDED closure);
	# libkmod/libudev are replaced by the stubs from guest/libstubs.c.
	while read -r so _ path _; do
		[[ $path == /* ]] && soname_path[$so]=$path
	done < <(ldd /usr/bin/lscpu /usr/bin/lspci | grep '=>')
	soname_path[libkmod.so.2]=$WORK/stubs/libkmod.so.2
	soname_path[libudev.so.1]=$WORK/stubs/libudev.so.1
	interp=$(elf_interp /usr/bin/lscpu)
	[[ -n $interp ]] || die "no ELF interpreter in lscpu"
	done_libs[${interp##*/}]=1  # libc's NEEDED ld-linux-x86-64.so.2 is the interpreter itself
	mkdir -p "$stage/usr/bin" "$stage$libdir" "$stage$(dirname "$interp")"
	strip --strip-unneeded -o "$stage$interp" "$(readlink -f "$interp")"
	for bin in /usr/bin/lscpu /usr/bin/lspci; do
		strip --strip-unneeded -o "$stage$bin" "$bin"
		mapfile -t -O "${#queue[@]}" queue < <(elf_needed "$bin")
	done
	while ((${#queue[@]})); do
		so=${queue[0]}
		queue=("${queue[@]:1}")
		[[ -n ${done_libs[$so]:-} ]] && continue
		done_libs[$so]=1
		path=${soname_path[$so]:-}
		[[ -n $path ]] || die "cannot locate $so"
		strip --strip-unneeded -o "$stage$libdir/$so" "$(readlink -f "$path")"
		mapfile -t -O "${#queue[@]}" queue < <(elf_needed "$path")
	done
	# every NEEDED of every staged ELF must be staged too
	for p in "$stage/usr/bin/lscpu" "$stage/usr/bin/lspci" "$stage$libdir"/*; do
		for so in $(elf_needed "$p"); do
			[[ -e $stage$libdir/$so || $so == "${interp##*/}" ]] || die "$so (needed by ${p#"$stage"}) missing from the initramfs"
		done
	done
	# the stubs must satisfy the symbol versions lspci asks for
	"$stage$interp" --library-path "$stage$libdir" "$stage/usr/bin/lspci" --version >/dev/null \
		|| die "staged lspci does not load"
	"$stage$interp" --library-path "$stage$libdir" "$stage/usr/bin/lscpu" --version >/dev/null \
		|| die "staged lscpu does not load"

	# gen_init_cpio list: everything owned by root, special files without mknod
	{
		echo "# pych test guest initramfs (generated by guest/build.sh)"
		for a in /bin /dev /etc /lib /lib64 /mnt /proc /root /run /sbin /sys /tmp /usr /usr/bin \
			 /usr/sbin /usr/share /usr/share/misc /var "$libdir"; do
			case $a in
			/root) echo "dir $a 0700 0 0" ;;
			/tmp) echo "dir $a 1777 0 0" ;;
			*) echo "dir $a 0755 0 0" ;;
			esac
		done
		echo "nod /dev/console 0600 0 0 c 5 1"
		echo "nod /dev/null 0666 0 0 c 1 3"
		echo "file /init $GDIR/init 0755 0 0"
		echo "file /bin/busybox /bin/busybox 0755 0 0"
		# busybox applet links (Debian's list), but not over the real lscpu/lspci
		/bin/busybox --list-full | sort -u | while read -r a; do
			case /$a in
			/bin/busybox | /usr/bin/lscpu | /usr/bin/lspci | /linuxrc) ;;
			/bin/* | /sbin/* | /usr/bin/* | /usr/sbin/*) echo "slink /$a /bin/busybox 0777 0 0" ;;
			esac
		done
		for a in etc/fstab etc/passwd etc/group etc/profile usr/share/misc/pci.ids; do
			echo "file /$a $stage/$a 0644 0 0"
		done
		echo "file /usr/bin/lscpu $stage/usr/bin/lscpu 0755 0 0"
		echo "file /usr/bin/lspci $stage/usr/bin/lspci 0755 0 0"
		for p in "$stage$libdir"/*; do
			echo "file $libdir/${p##*/} $p 0755 0 0"
		done
		echo "file $interp $stage$interp 0755 0 0"
	} >"$list"
	"$WORK/gen_init_cpio" -t 0 "$list" >"$1"
	say "initramfs: $(($(stat -c %s "$1") / 1024)) KiB, $(grep -c '^\(file\|slink\|dir\|nod\) ' "$list") entries"
}

# ---------------------------------------------------------------------------
main() {
	local cdir tmp
	command -v dpkg-query >/dev/null || die "this script needs a Debian system (dpkg-query)"
	ensure_packages
	mkdir -p "$WORK" "$CACHE_ROOT"
	HASH=$(input_hash)
	cdir=$CACHE_ROOT/$HASH
	if [[ -f $cdir/.complete ]]; then
		say "cache hit: $cdir"
		install_outputs "$cdir"
		return
	fi

	# one builder at a time per tree (other shells may run `make guest` too)
	exec 9>"$WORK/.lock"
	if ! flock -n 9; then
		say "waiting for another guest build to finish"
		flock 9
	fi
	if [[ -f $cdir/.complete ]]; then
		say "cache hit: $cdir"
		install_outputs "$cdir"
		return
	fi
	say "building guest $HASH (cache: $cdir)"

	prepare_tree
	configure_kernel
	build_kernel

	tmp=$CACHE_ROOT/.tmp-$HASH-$$
	rm -rf "$tmp"
	mkdir -p "$tmp"
	build_initramfs "$tmp/initramfs.cpio"
	cp "$KSRC/vmlinux" "$tmp/vmlinux"
	cp "$KSRC/arch/x86/boot/bzImage" "$tmp/bzImage"
	cp "$KSRC/.config" "$tmp/config"
	cp "$KSRC/System.map" "$tmp/System.map"
	echo "$CMDLINE" >"$tmp/cmdline"
	touch "$tmp/.complete"
	rm -rf "$cdir"
	mv "$tmp" "$cdir"
	install_outputs "$cdir"
}

main "$@"
