"""Edge export of pni-ray bundles: ONNX graphs + Arrow tables (onnx_export), a torch-free
onnxruntime runtime (runtime), TensorRT engines (trt) and a TensorRT op check (opcheck).

Importing the package imports nothing heavy: `pni_ray.export.runtime` and `pni_ray.export.tables` run where
torch is absent.
"""
