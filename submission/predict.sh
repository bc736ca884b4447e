#!/bin/sh
# The challenge's entry point, run as `sh predict.sh` from /workspace in a fresh container:
# segment every case in /workspace/inputs into /workspace/outputs with the model baked into
# the image (LAPSAM_MODEL_DIR), the engine it was built for (LAPSAM_BACKEND) and the OpenVINO
# compile cache prepared at build time (LAPSAM_OV_CACHE_DIR). Extra arguments are passed on to
# `lapsam predict`.
# An empty cache folder (an image built with --no-compile-cache) is not used: filling it
# would only add a write of the compiled blobs to every fresh container.
# LAPSAM_TIMINGS=1 (lapsam bench submission): `lapsam predict` prints the time of each phase;
# LAPSAM_T_EXEC records when this script handed over to Python.
cache_used=
for f in "${LAPSAM_OV_CACHE_DIR:-/nonexistent}"/*; do
    [ -e "$f" ] && cache_used=1
    break
done
[ -n "$cache_used" ] || unset LAPSAM_OV_CACHE_DIR
if [ -n "${LAPSAM_TIMINGS:-}" ] && [ "$LAPSAM_TIMINGS" != 0 ]; then
    LAPSAM_T_EXEC=$(date +%s.%N) && export LAPSAM_T_EXEC
fi
exec /opt/venv/bin/lapsam predict -i /workspace/inputs -o /workspace/outputs --backend "${LAPSAM_BACKEND:-openvino}" "$@"
