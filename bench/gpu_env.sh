# Sourced by the GPU machine's scripts (bench/gpu_run.sh, bench/kd_evidence/gpu_grid.sh): puts
# the packages the engine needs beyond that machine's image (PyTorch preinstalled, no network),
# carried in .devcarry/ by bench/devcarry.sh, on PYTHONPATH, with this checkout.
PKG=/tmp/mtkd-packages
mkdir -p "$PKG"
[ -f .devcarry/sitk.tar.xz ] || { echo "no .devcarry/sitk.tar.xz: run bench/devcarry.sh first" >&2; exit 2; }
tar -xJf .devcarry/sitk.tar.xz -C "$PKG"
for wheel in .devcarry/*.whl; do python3 -m zipfile -e "$wheel" "$PKG"; done
export PYTHONPATH="$PKG:$PWD"
