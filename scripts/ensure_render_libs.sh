#!/usr/bin/env bash
# MuJoCo's offscreen rendering (MUJOCO_GL=egl, the simulator's default) needs Mesa's EGL and its software
# rasteriser. Installs them with apt-get when run as root on Debian/Ubuntu; otherwise says in one line
# what to install. Exits 0 when everything is there.
set -euo pipefail
packages=(libegl1 libegl-mesa0 libgl1-mesa-dri)
if ! command -v dpkg >/dev/null 2>&1; then
  ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1' && exit 0
  echo "wmpo: MuJoCo rendering needs Mesa EGL (libEGL.so.1 and a DRI software driver); install them with your package manager" >&2
  exit 2
fi
missing=()
for pkg in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing MuJoCo rendering libraries: ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi
echo "wmpo: MuJoCo rendering needs: sudo apt-get install ${missing[*]} (or run make sim-deps as root)" >&2
exit 2
