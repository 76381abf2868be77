#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian machine (run as root):
# the upstream registry, the container clients (podman, skopeo, containerd's ctr), nginx for
# benchmarks, Maven, and nox.
set -euo pipefail
need=()
# maven + libmaven-dependency-plugin-java + junit4: the mvn client test's upstream
# (/usr/share/maven-repo holds the dependency plugin and what it needs).
# zsh: the zsh completion script's test. iproute2 + util-linux (unshare): the README test runs
# each README block in a network namespace of its own.
# chromium + chromium-driver: the status page's headless-browser test (selenium).
for pkg in docker-registry skopeo podman containerd nginx-light curl maven libmaven-dependency-plugin-java junit4 zsh iproute2 util-linux chromium chromium-driver; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # The packaged registry service (with auth) is not used: tests start their own.
  (systemctl stop docker-registry 2>/dev/null || service docker-registry stop 2>/dev/null) || true
  # Nor the packaged containerd: tests/test_setup.py starts daemons with their own sockets.
  (systemctl stop containerd 2>/dev/null || service containerd stop 2>/dev/null) || true
fi
python3 -m pip install -q --disable-pip-version-check nox
