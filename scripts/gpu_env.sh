# Source this on the GPU machine, from the repository root: makes `import hybridlab` (with its
# mapped subpackages blocks/ and kernels/) work without pip, whose build backend is absent there.
# Run Python with -P so the repository's own hybridlab/ folder does not shadow the mapping.
export ROOT=$(pwd)
rm -rf /tmp/hl && mkdir -p /tmp/hl/hybridlab
for f in "$ROOT"/hybridlab/*; do ln -s "$f" /tmp/hl/hybridlab/; done
ln -s "$ROOT/blocks" /tmp/hl/hybridlab/blocks
ln -s "$ROOT/kernels" /tmp/hl/hybridlab/kernels
export PYTHONPATH=/tmp/hl:$ROOT
export PYTHONUNBUFFERED=1
