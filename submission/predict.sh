#!/bin/sh
# The challenge's entry point, run as `sh predict.sh` from /workspace in a fresh container:
# segment every case in /workspace/inputs into /workspace/outputs with the model baked into
# the image (LAPSAM_MODEL_DIR) and the OpenVINO compile cache prepared at build time
# (LAPSAM_OV_CACHE_DIR). Extra arguments are passed on to `lapsam predict`.
# An empty cache folder (an image built with --no-compile-cache) is not used: filling it
# would only add a write of the compiled blobs to every fresh container.
if [ -z "$(ls -A "${LAPSAM_OV_CACHE_DIR:-/nonexistent}" 2>/dev/null)" ]; then
    unset LAPSAM_OV_CACHE_DIR
fi
exec /opt/venv/bin/lapsam predict -i /workspace/inputs -o /workspace/outputs "$@"
