#!/usr/bin/env bash
# Build the guest of the VM end-to-end test (tests/test_vm_swap.py):
#   OUTDIR/vmlinuz             Debian's cloud kernel
#   OUTDIR/initramfs.cpio.gz   busybox-static, nbd-client + its libraries, the
#                              kernel modules the guest needs, init, the hog,
#                              deploy/guest/nbdtab (as /etc/nbdtab.template)
#   OUTDIR/initramfs-attach.cpio.gz  the same plus Debian's python3 with just the
#                              files `nbdswap attach` needs (tests/test_vm_attach.py)
#   OUTDIR/initramfs-local.cpio.gz   the base image plus the project venv's python3
#                              with what `nbdswap serve` and `nbdswap attach` need,
#                              compiled dependencies included (tests/test_vm_local.py);
#                              skipped, with a message, while the venv does not exist
# Idempotent: each step is skipped while its outputs are newer than its inputs.
# Needs root (dpkg -x, mknod) and Debian's apt for the kernel package.
set -euo pipefail

[[ $# -eq 1 ]] || { echo "usage: $0 OUTDIR" >&2; exit 2; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
GUEST=$(cd "$HERE/../guest" && pwd)  # deploy/guest/nbdtab goes into the image
mkdir -p "$1/cache"
OUT=$(cd "$1" && pwd)
CACHE=$OUT/cache
# One build at a time per OUTDIR: concurrent test runs would interleave the
# same temporary files.
exec {lock}>"$OUT/.lock"
flock "$lock"
KERNEL_META=linux-image-cloud-amd64
# Load order of the guest's insmod (there is no modules.dep); init repeats it.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
	virtio_blk failover net_failover virtio_net nbd)
BUSYBOX=/bin/busybox   # from busybox-static
REPO=$(cd "$HERE/../.." && pwd)
GUEST_PYTHON=/usr/bin/python3   # Debian's: its standard library goes into the guest
# The project's venv (`make venv`): the local image's server needs its compiled
# dependencies, so it runs the venv's own interpreter, for which pip chose them.
VENV=${NBDSWAP_VENV:-$REPO/.venv}
NBD_CLIENT=$(command -v nbd-client || echo /usr/sbin/nbd-client)

log() { echo "build.sh: $*" >&2; }

TMP=$(mktemp -d "$CACHE/tmp.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# fresh OUTPUT INPUT...: OUTPUT exists and is newer than every INPUT.
fresh() {
	local out=$1 in
	shift
	[[ -e $out ]] || return 1
	for in in "$@"; do [[ $out -nt $in ]] || return 1; done
}

# The real kernel package behind the metapackage, e.g. linux-image-6.1.0-56-cloud-amd64.
resolve_kernel() {
	apt-cache depends "$KERNEL_META" 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'
}

# Prints the path of the kernel .deb in the cache, downloading it if needed.
# apt-get update runs only when the package cannot be resolved or downloaded
# (stale lists); with no network, an already cached kernel is used.
kernel_deb() {
	local pkg debs
	pkg=$(resolve_kernel)
	if [[ -n $pkg ]]; then
		debs=("$CACHE/${pkg}"_*.deb)
		[[ -e ${debs[0]} ]] && { echo "${debs[0]}"; return; }
	fi
	if [[ -z $pkg ]] || ! download "$pkg"; then
		log "refreshing apt lists"
		if apt-get update -q >&2 && pkg=$(resolve_kernel) && [[ -n $pkg ]] && download "$pkg"; then
			:
		else
			debs=("$CACHE"/linux-image-*.deb)
			[[ -e ${debs[0]} ]] || { log "cannot get $KERNEL_META"; exit 1; }
			log "apt failed; using cached ${debs[-1]##*/}"
			echo "${debs[-1]}"
			return
		fi
	fi
	# Keep only the package just downloaded.
	find "$CACHE" -maxdepth 1 -name 'linux-image-*.deb' ! -name "${pkg}_*" -delete
	debs=("$CACHE/${pkg}"_*.deb)
	echo "${debs[0]}"
}

download() { # $1: package; apt-get download writes into the current directory
	log "downloading $1"
	# Root-owned cache: do not drop privileges to _apt (it could not write here).
	(cd "$CACHE" && apt-get download -q -o APT::Sandbox::User=root "$1" >&2)
}

# Kernel and modules: OUT/vmlinuz, OUT/modules/*.ko (uncompressed: busybox insmod
# may lack compressed-module support).
build_kernel() {
	local deb=$1 root=$TMP/kernel m f stale=0
	local -a outputs=("$OUT/vmlinuz")
	for m in "${MODULES[@]}"; do outputs+=("$OUT/modules/$m.ko"); done
	for f in "${outputs[@]}"; do fresh "$f" "$deb" || stale=1; done
	((stale)) || return 0
	log "extracting ${deb##*/}"
	dpkg -x "$deb" "$root"
	mkdir -p "$OUT/modules"
	for m in "${MODULES[@]}"; do
		f=$(find "$root/lib/modules" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" | head -n1)
		[[ -n $f ]] || { log "module $m not in ${deb##*/}"; exit 1; }
		case $f in
		*.xz) xz -dc "$f" >"$OUT/modules/$m.ko" ;;
		*.zst) zstd -qdc "$f" >"$OUT/modules/$m.ko" ;;
		*) cp "$f" "$OUT/modules/$m.ko" ;;
		esac
	done
	f=$(find "$root/boot" -name 'vmlinuz-*' | head -n1)
	[[ -n $f ]] || { log "no vmlinuz in ${deb##*/}"; exit 1; }
	cp "$f" "$OUT/vmlinuz.new" && mv "$OUT/vmlinuz.new" "$OUT/vmlinuz"
	rm -rf "$root"
}

# Shared libraries of nbd-client, including the dynamic loader (no vdso).
libs_of() {
	ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
}

build_initramfs() {
	local root=$TMP/initramfs out=$OUT/initramfs.cpio.gz lib m
	local -a libs inputs
	mapfile -t libs < <(libs_of "$NBD_CLIENT")
	inputs=("$HERE/build.sh" "$HERE/init" "$HERE/hog.c" "$GUEST/nbdtab" "$BUSYBOX" "$NBD_CLIENT" "${libs[@]}")
	for m in "${MODULES[@]}"; do inputs+=("$OUT/modules/$m.ko"); done
	fresh "$out" "${inputs[@]}" && return
	log "building ${out##*/}"
	mkdir -p "$root"/{bin,sbin,dev,proc,sys,run,tmp,etc,modules}
	cp "$BUSYBOX" "$root/bin/busybox"
	ln -s busybox "$root/bin/sh"
	install -m 755 "$HERE/init" "$root/init"
	cp "$GUEST/nbdtab" "$root/etc/nbdtab.template"
	gcc -O2 -static -Wall -Wextra -Werror -o "$root/bin/hog" "$HERE/hog.c"
	cp "$NBD_CLIENT" "$root/sbin/nbd-client"
	for lib in "${libs[@]}"; do
		mkdir -p "$root$(dirname "$lib")"
		cp -L "$lib" "$root$lib"
	done
	for m in "${MODULES[@]}"; do cp "$OUT/modules/$m.ko" "$root/modules/"; done
	# The kernel opens /dev/console before /init runs (init reopens it anyway).
	[[ $(id -u) == 0 ]] && mknod -m 600 "$root/dev/console" c 5 1
	(cd "$root" && find . -print0 | LC_ALL=C sort -z |
		cpio --null --create --format=newc --owner=0:0 --quiet) | gzip -9n >"$out.new"
	mv "$out.new" "$out"
}

# A second cpio archive appended to the first: the kernel unpacks both, so a
# Python image is the base image plus an interpreter and nbdswap's own files.
# build_python_initramfs OUTPUT MODE PYTHON [SITE_PACKAGES]: MODE is that of
# python-closure.py (attach or serve); SITE_PACKAGES' files go to /opt/nbdswap/site.
build_python_initramfs() {
	local out=$1 mode=$2 python=$3 site=${4:-} root=$TMP/$2 kind path interpreter= lib
	local -a listing sources libs inputs
	inputs=("$OUT/initramfs.cpio.gz" "$HERE/python-closure.py" "$HERE/build.sh" "$python"
		"$REPO"/nbdswap/*.py "$REPO"/nbdswap/*/*.py "$REPO"/nbdswap/*/*.so ${site:+"$site"})
	fresh "$out" "${inputs[@]}" && return
	log "building ${out##*/}"
	mapfile -t listing < <(PYTHONPATH=$REPO${site:+:$site} "$python" -S "$HERE/python-closure.py" "$mode")
	((${#listing[@]})) || { log "python-closure.py $mode failed"; exit 1; }
	for path in "${listing[@]}"; do
		kind=${path%% *} path=${path#* }
		case $kind in
		pkg) install -D -m 644 "$REPO/$path" "$root/opt/nbdswap/$path" ;;
		site) install -D "$site/$path" "$root/opt/nbdswap/site/$path"
			[[ $path == *.so ]] && { sources+=("$site/$path"); strip_elf "$root/opt/nbdswap/site/$path"; } ;;
		*) install -D "$path" "$root$path"
			[[ -n $interpreter ]] || interpreter=$path  # listed first
			[[ $path == *.so || $path == */bin/* ]] && { sources+=("$path"); strip_elf "$root$path"; } ;;
		esac
	done
	mapfile -t libs < <(for path in "${sources[@]}"; do libs_of "$path"; done | sort -u)
	for lib in "${libs[@]}"; do
		install -D "$(readlink -f "$lib")" "$root$lib"
		strip_elf "$root$lib"
	done
	if [[ $interpreter != /usr/bin/python3 ]]; then
		mkdir -p "$root/usr/bin"
		ln -sfn "$interpreter" "$root/usr/bin/python3"
	fi
	{ gzip -dc "$OUT/initramfs.cpio.gz"
	  (cd "$root" && find . -print0 | LC_ALL=C sort -z |
		cpio --null --create --format=newc --owner=0:0 --quiet)
	} | gzip -9n >"$out.new"
	mv "$out.new" "$out"
}

# Debug symbols cost guest memory (the image is unpacked into RAM) and nothing else.
strip_elf() {
	strip --strip-unneeded "$1" 2>/dev/null || true
}

build_local_initramfs() {
	local out=$OUT/initramfs-local.cpio.gz python site
	python=$VENV/bin/python3
	if [[ ! -x $python ]]; then
		log "no venv at $VENV (make venv): skipping ${out##*/}"
		return
	fi
	python=$(readlink -f "$python")
	site=$("$VENV/bin/python3" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')
	build_python_initramfs "$out" serve "$python" "$site"
}

deb=$(kernel_deb)
build_kernel "$deb"
build_initramfs
build_python_initramfs "$OUT/initramfs-attach.cpio.gz" attach "$GUEST_PYTHON"
build_local_initramfs
log "ready: $OUT/vmlinuz $OUT/initramfs.cpio.gz"
