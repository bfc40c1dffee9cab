# Sourced by the tools/device_*.sh scripts: installs the carried wheels (.whl/*.whl) once per GPU
# machine into /tmp/site (NO_WHEELS=1 skips it, e.g. in a CPU rehearsal with the venv's python)
# and sets the environment every device run uses: offline, unbuffered, no progress bars.
if [ -z "${NO_WHEELS:-}" ] && [ -d .whl ] && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/.whl/bnb_site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
PY=${PYTHON:-python3}
