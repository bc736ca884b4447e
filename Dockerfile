# lapsam challenge submission image: runtime only (numpy, onnxruntime, openvino; no torch).
#
# Build it with `lapsam submission build --model DIR --tag NAME:latest [--base-image IMG]`,
# which prepares the build context this file expects (see submission/README.md):
#   wheelhouse/deps/    manylinux wheels for the image's Python + requirements.txt
#   wheelhouse/lapsam/  a wheel of lapsam built from the source tree, without extras
#   model/              the exported model folder (manifest.json + graphs)
#   predict.sh          the challenge entry point
# Nothing here reaches a package index: pip installs with --no-index from the wheelhouse.
# BASE_IMAGE is python:3.11-slim, or an offline Debian bookworm base made by
# submission/make-base-image.sh (Debian's python3 is "externally managed": hence the venv).
# Layers go from what changes least (deps) to what changes most (lapsam, model).

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS deps
COPY wheelhouse/deps/ /tmp/wheels/
# Trimmed after install (runtime never loads them): tests, setuptools, onnxruntime's Python
# tools, OpenVINO's GPU/NPU plugins, its headers and the non-ONNX/IR model frontends.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --no-index --find-links /tmp/wheels \
        --disable-pip-version-check --no-cache-dir -r /tmp/wheels/requirements.txt \
 && cd /opt/venv/lib/python3*/site-packages \
 && rm -rf numpy/tests numpy/*/tests setuptools pkg_resources _distutils_hack distutils-precedence.pth \
        onnxruntime/transformers onnxruntime/quantization onnxruntime/tools \
        openvino/include openvino/cmake openvino/libs/cache.json \
        openvino/libs/libopenvino_intel_gpu_plugin.so openvino/libs/libopenvino_intel_npu_plugin.so \
        openvino/libs/libopenvino_tensorflow_frontend.so* openvino/libs/libopenvino_tensorflow_lite_frontend.so* \
        openvino/libs/libopenvino_paddle_frontend.so* openvino/libs/libopenvino_pytorch_frontend.so* \
        openvino/libs/libopenvino_jax_frontend.so* openvino/libs/libopenvino_gguf_frontend.so* \
 && /opt/venv/bin/python -c "import numpy, onnxruntime, openvino, tqdm; \
print('deps ok: numpy', numpy.__version__, '| onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers(), \
'| openvino', openvino.__version__, openvino.Core().available_devices)"

FROM ${BASE_IMAGE}
ARG UID=1000
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LAPSAM_MODEL_DIR=/opt/lapsam/model \
    LAPSAM_OV_CACHE_DIR=/opt/lapsam/ov_cache
RUN useradd --uid ${UID} --user-group --create-home --shell /bin/bash lapsam \
 && mkdir -p /workspace/inputs /workspace/outputs \
 && chown lapsam:lapsam /workspace/inputs /workspace/outputs
COPY --from=deps /opt/venv /opt/venv

# lapsam itself (small, changes with the code), then the model and its compile cache.
COPY wheelhouse/lapsam/ /tmp/lapsam/
RUN /opt/venv/bin/python -m pip install --no-index --no-deps --disable-pip-version-check --no-cache-dir /tmp/lapsam/*.whl \
 && rm -rf /tmp/lapsam
COPY model/ /opt/lapsam/model/
# Fill OpenVINO's compiled-model cache (CACHE_DIR) by running `lapsam predict` on synthetic
# cases; a container on a CPU the cache does not fit compiles again (never fails on it).
# The cache is owned by the runtime user so that OpenVINO can add an entry there.
ARG COMPILE_CACHE=1
RUN mkdir -p /opt/lapsam/ov_cache \
 && if [ "$COMPILE_CACHE" = "1" ]; then python -m lapsam.submission.warmup --model /opt/lapsam/model --cache /opt/lapsam/ov_cache -- --no-progress; fi \
 && chown -R lapsam:lapsam /opt/lapsam/ov_cache

COPY predict.sh /workspace/predict.sh
WORKDIR /workspace
USER lapsam
CMD ["/bin/bash", "-c", "sh predict.sh"]
