#!/usr/bin/env bash
# Installs the Debian packages edge-agent needs when they are missing (mosquitto, swtpm, TSS2 libraries).
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
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# A Debian mosquitto package starts a system broker on 1883; edge-agent's tests use private brokers.
