#!/usr/bin/env bash
# Installs the Debian packages edge-agent needs when they are missing (mosquitto, swtpm, TSS2 libraries,
# Mesa's lavapipe Vulkan driver for the GPU-accelerator tests).
# Idempotent and quiet when everything is present; needs root or sudo only when something is missing.
set -euo pipefail
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v swtpm >/dev/null 2>&1 || need+=(swtpm swtpm-tools)
# tpm2-tools inspects the simulated TPM in tests (transient handles, lockout); openssl checks certificate chains.
command -v tpm2_getcap >/dev/null 2>&1 || need+=(tpm2-tools)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
[ -e /usr/include/tss2/tss2_esys.h ] || need+=(libtss2-dev)
pkg-config --exists tss2-tcti-swtpm 2>/dev/null || need+=(libtss2-tcti-swtpm0)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
# Pillow has no PyPI wheel for armv7l: where piwheels is not configured pip builds it, against these headers.
if [ "$(uname -m)" = armv7l ]; then
    [ -e /usr/include/jpeglib.h ] || need+=(libjpeg-dev)
    [ -e /usr/include/zlib.h ] || need+=(zlib1g-dev)
fi
# PostgreSQL's binaries for the fleet ingest tests and benchmark, which run private servers (initdb, pg_ctl).
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
# lavapipe (Mesa's CPU Vulkan driver) is a real Vulkan device for LiteRT's WebGPU GPU accelerator. The WebGPU
# layer refuses bookworm's Mesa 22, so on bookworm it comes from bookworm-backports (25.x).
backports=""
if ! { ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1 \
        && ! dpkg-query -W -f='${Version}' mesa-vulkan-drivers 2>/dev/null | grep -q '^22\.'; }; then
    if grep -q '^VERSION_CODENAME=bookworm' /etc/os-release 2>/dev/null; then backports=mesa-vulkan-drivers
    else need+=(mesa-vulkan-drivers); fi
fi
[ ${#need[@]} -eq 0 ] && [ -z "$backports" ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing system packages: ${need[*]} ${backports:+$backports (bookworm-backports)}"
export DEBIAN_FRONTEND=noninteractive
if [ -n "$backports" ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo 'deb http://deb.debian.org/debian bookworm-backports main' | $sudo tee /etc/apt/sources.list.d/bookworm-backports.list >/dev/null
fi
if [[ " ${need[*]} " == *" postgresql "* ]] && [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    # Only the binaries are wanted: no system cluster started on 5432.
    $sudo mkdir -p /etc/postgresql-common
    echo 'create_main_cluster = false' | $sudo tee /etc/postgresql-common/createcluster.conf >/dev/null
fi
$sudo apt-get update -qq
[ ${#need[@]} -eq 0 ] || $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
[ -z "$backports" ] || $sudo apt-get install -y -qq --no-install-recommends -t bookworm-backports "$backports" >/dev/null
# A Debian mosquitto package starts a system broker on 1883; edge-agent's tests use private brokers.
