# lapsam challenge submission image: runtime only (numpy + the model's engine; no torch).
#
# Build it with `lapsam submission build --model DIR --tag NAME:latest [--base-image IMG]`,
# which prepares the build context this file expects (see submission/README.md):
#   wheelhouse/deps/    manylinux wheels for the image's Python + requirements.txt (numpy,
#                       threadpoolctl, tqdm and only the engine(s) whose files the model ships:
#                       openvino for an OpenVINO-only model, no onnxruntime)
#   wheelhouse/lapsam/  a wheel of lapsam built from the source tree, without extras
#   model/              the exported model folder (manifest.json + graphs)
#   predict.sh          the challenge entry point
# Nothing here reaches a package index: pip installs with --no-index from the wheelhouse.
# BASE_IMAGE is python:3.11-slim, or an offline Debian bookworm base made by
# submission/make-base-image.sh (Debian's python3 is "externally managed": hence the venv).
#
# Stages: `deps` installs and trims the venv; `rootfs` is the base image with the venv and the
# runtime user, minus what a container never runs (Python's build tools and test suites, perl,
# docs, ...); the image starts FROM scratch with that file system as ONE layer (so what was
# removed is really gone), then adds lapsam, the model and what the build-time warm-up writes.
# No pip, setuptools or wheel is left in the image.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS deps
COPY wheelhouse/deps/ /tmp/wheels/
# Trimmed after install (the runtime never loads them): pip/setuptools (the image needs no
# installer), tests, headers, f2py, type stubs, onnxruntime's Python tools, OpenVINO's
# conversion tools (`import openvino` would import them and send telemetry), its torch
# backend, every plugin but CPU and every frontend but IR (the model ships IR), and all
# .pyc files: the warm-up in the last stage writes those of the modules `lapsam predict` imports.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/python -m pip install --no-index --find-links /tmp/wheels \
        --disable-pip-version-check --no-cache-dir -r /tmp/wheels/requirements.txt \
 && cd /opt/venv/lib/python3*/site-packages \
 && rm -rf pip pip-* setuptools setuptools-* pkg_resources _distutils_hack distutils-precedence.pth \
        /opt/venv/bin/pip* /opt/venv/bin/f2py /opt/venv/bin/numpy-config /opt/venv/bin/ovc \
        /opt/venv/bin/benchmark_app /opt/venv/bin/opt_in_out /opt/venv/bin/Activate.ps1 \
        numpy/tests numpy/*/tests numpy/f2py numpy/distutils numpy/_pyinstaller numpy/_core/include \
        numpy/_core/lib numpy/_core/_simd.*.so numpy/_core/_*_tests.*.so \
        onnxruntime/transformers onnxruntime/quantization onnxruntime/tools \
        openvino/tools openvino/torch openvino/include openvino/cmake openvino/frontend/*/ \
        openvino/libs/cache.json openvino/libs/tbb.pc openvino_telemetry \
 && if [ -d openvino/libs ]; then find openvino/libs -name 'libopenvino*' ! -name 'libopenvino.so*' \
        ! -name 'libopenvino_intel_cpu_plugin.so' ! -name 'libopenvino_ir_frontend.so*' -delete; fi \
 && find /opt/venv -name '*.pyi' -delete \
 && find /opt/venv -name __pycache__ -prune -exec rm -rf {} + \
 && /opt/venv/bin/python -B -c "import importlib, sys; \
mods = [r.split('==')[0].strip() for r in open('/tmp/wheels/requirements.txt') if r.strip()]; \
[importlib.import_module(m) for m in mods]; ov = sys.modules.get('openvino'); \
print('deps ok:', ', '.join(mods), '| OpenVINO devices:', ov.Core().available_devices if ov else '-')"

FROM ${BASE_IMAGE} AS rootfs
ARG UID=1000
# The runtime user, then the base image's parts that no container runs: the base Python's
# pip/setuptools/wheel and test/IDE/2to3/docs modules, bundled wheels for venv creation, perl
# (package scripts only), glibc's iconv modules, time zones, docs and package caches; and the
# standard library's .pyc files (the warm-up writes those of the modules predict imports).
RUN useradd --uid ${UID} --user-group --create-home --shell /bin/bash lapsam \
 && mkdir -p /workspace/inputs /workspace/outputs \
 && chown lapsam:lapsam /workspace/inputs /workspace/outputs \
 && stdlib="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')" \
 && rm -rf "$stdlib"/test "$stdlib"/idlelib "$stdlib"/tkinter "$stdlib"/turtledemo "$stdlib"/turtle.py \
        "$stdlib"/lib2to3 "$stdlib"/pydoc_data "$stdlib"/ensurepip "$stdlib"/distutils \
        "$stdlib"/lib-dynload/_test*.so "$stdlib"/lib-dynload/_ctypes_test*.so "$stdlib"/lib-dynload/xx*.so \
        "$stdlib"/site-packages/pip "$stdlib"/site-packages/pip-* "$stdlib"/site-packages/setuptools \
        "$stdlib"/site-packages/setuptools-* "$stdlib"/site-packages/pkg_resources \
        "$stdlib"/site-packages/_distutils_hack "$stdlib"/site-packages/distutils-precedence.pth \
        "$stdlib"/site-packages/wheel "$stdlib"/site-packages/wheel-* \
        /usr/local/bin/pip* /usr/local/bin/idle* /usr/local/bin/pydoc* /usr/local/bin/2to3* /usr/local/bin/wheel \
        /usr/share/python-wheels /usr/share/doc /usr/share/man /usr/share/info /usr/share/zoneinfo \
        /usr/lib/x86_64-linux-gnu/gconv /usr/lib/x86_64-linux-gnu/perl-base /usr/share/perl5 /usr/bin/perl* \
        /var/lib/apt/lists/* /var/cache/apt /var/cache/debconf /var/log/* \
 && find "$stdlib" -name __pycache__ -prune -exec rm -rf {} +
COPY --from=deps /opt/venv /opt/venv

FROM scratch
COPY --from=rootfs / /
# BACKEND: the engine predict.sh runs (`lapsam submission build` passes onnxruntime for a model
# that ships only ONNX files). LAPSAM_VERIFIED_MARKER: the model's sha256 is checked once by the
# build (below), not in every container; the runtime still hashes a file whose size or mtime
# changed (lapsam/runtime/verified.py).
ARG BACKEND=openvino
ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    LAPSAM_BACKEND=${BACKEND} \
    LAPSAM_MODEL_DIR=/opt/lapsam/model \
    LAPSAM_OV_CACHE_DIR=/opt/lapsam/ov_cache \
    LAPSAM_VERIFIED_MARKER=/opt/lapsam/verified.json

# lapsam itself (small, changes with the code): a pure-Python wheel, unpacked into the venv
# (there is no pip in the image) with its `lapsam` command; then the model.
COPY wheelhouse/lapsam/ /tmp/lapsam/
RUN cd /opt/venv/lib/python3*/site-packages \
 && python -m zipfile -e /tmp/lapsam/lapsam-*.whl . \
 && rm -rf /tmp/lapsam \
 && printf '#!/opt/venv/bin/python\nimport sys\nfrom lapsam.cli import main\nsys.exit(main())\n' > /opt/venv/bin/lapsam \
 && chmod 755 /opt/venv/bin/lapsam
COPY model/ /opt/lapsam/model/
# The warm-up (as root): check every model file's sha256 and write the verified marker, then run
# `lapsam predict` on synthetic cases, which fills OpenVINO's compiled-model cache (CACHE_DIR;
# weight-less blobs where the graph loads back from them, whole ones elsewhere: the choice is
# in ov_cache/lapsam-cache-modes.json; a container on a CPU the cache does not fit compiles
# again, never fails on it) and writes the .pyc files of every module predict imports. The
# build fails if either step fails. The cache is owned by the runtime user so that OpenVINO
# can replace an entry there.
ARG COMPILE_CACHE=1
RUN mkdir -p /opt/lapsam/ov_cache \
 && if [ "$COMPILE_CACHE" = "1" ]; then cache="--cache /opt/lapsam/ov_cache"; else cache=""; fi \
 && python -m lapsam.submission.warmup --model /opt/lapsam/model --marker "$LAPSAM_VERIFIED_MARKER" $cache \
        -- --no-progress --backend "$LAPSAM_BACKEND" \
 && chown -R lapsam:lapsam /opt/lapsam/ov_cache

COPY predict.sh /workspace/predict.sh
WORKDIR /workspace
USER lapsam
CMD ["/bin/bash", "-c", "sh predict.sh"]
