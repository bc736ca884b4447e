"""lapsam.export: LapSam checkpoint -> ONNX / OpenVINO model folder with a manifest, and a parity check.

Entry points: :func:`lapsam.export.exporter.export_model`, :func:`lapsam.export.check.run_check`, the
CLI ``lapsam export CHECKPOINT --out DIR`` / ``lapsam export check DIR --cases DIR`` and
``lapsam bench export``. See ``export/README.md``.
"""
