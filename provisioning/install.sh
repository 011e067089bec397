#!/usr/bin/env bash
# Installs edge-agent on a device (Raspberry Pi, Jetson, any Debian): the wheel (which carries the bundled
# models and the hardware profiles) in a venv under /opt/edge-agent, /var/lib/edge-agent/models for the
# user's own models, the systemd unit, the mosquitto drop-in, the provisioning scripts, and the
# `edge-agent` account (group tss, for /dev/tpmrm0).
# Idempotent. Enables the unit but does not start it: run provisioning/provision-device first.
#
#   DESTDIR=/tmp/stage provisioning/install.sh   stages the files under /tmp/stage and leaves the system
#                                                alone (no account, no systemctl)
#   INSTALL_VENV=no                              skips creating the venv and installing the package into it
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
root=${DESTDIR:-}
prefix=$root/opt/edge-agent
python=${PYTHON:-python3}

if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (or set DESTDIR to stage the files elsewhere)" >&2
    exit 1
fi

if [ -z "$root" ]; then
    getent group tss >/dev/null || groupadd --system tss
    if ! getent passwd edge-agent >/dev/null; then
        useradd --system --user-group --groups tss --home-dir /var/lib/edge-agent --no-create-home \
            --shell /usr/sbin/nologin --comment "edge-agent inference service" edge-agent
    fi
    # An account created before the TPM stack was installed may miss the group.
    id -nG edge-agent | grep -qw tss || usermod --append --groups tss edge-agent
fi

if [ "${INSTALL_VENV:-yes}" != "no" ]; then
    [ -x "$prefix/venv/bin/python" ] || "$python" -m venv "$prefix/venv"
    "$prefix/venv/bin/pip" install --quiet --upgrade pip
    # Built as a wheel first, exactly what a user installing the package gets.
    wheels=$(mktemp -d)
    "$prefix/venv/bin/pip" wheel --quiet --no-deps --wheel-dir "$wheels" "$repo"
    "$prefix/venv/bin/pip" install --quiet "$(echo "$wheels"/edge_agent-*.whl)[tpm]"
    rm -rf "$wheels"
fi

install -d -m 0755 "$prefix/provisioning"
# models_dir: the user's models, served with (and overriding) the bundled ones.
install -d -m 0755 "$root/var/lib/edge-agent/models"
install -m 0644 "$repo"/provisioning/*.py "$repo/provisioning/agent.toml.template" "$prefix/provisioning/"
install -m 0755 "$repo/provisioning/provision-device" "$prefix/provisioning/"
install -m 0644 "$repo/README.md" "$prefix/README.md"

install -D -m 0644 "$repo/systemd/edge-agent.service" "$root/etc/systemd/system/edge-agent.service"
install -D -m 0644 "$repo/systemd/mosquitto-edge-agent.conf" "$root/etc/mosquitto/conf.d/edge-agent.conf"
install -d -m 0750 "$root/etc/edge-agent" "$root/etc/edge-agent/tls" "$root/etc/mosquitto/edge-agent"

if [ -z "$root" ]; then
    chgrp edge-agent /etc/edge-agent /etc/edge-agent/tls
    chown edge-agent:edge-agent /var/lib/edge-agent/models
    if getent group mosquitto >/dev/null; then chgrp mosquitto /etc/mosquitto/edge-agent; fi
    systemctl daemon-reload
    systemctl enable edge-agent.service
    echo "installed; next: /opt/edge-agent/provisioning/provision-device, then the fleet's certificates"
fi
