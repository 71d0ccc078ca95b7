"""The OpenVINO environment's tests (``.ci/openvino``, in ``.venv-openvino``).

They run with this folder's ``pytest.ini`` and this conftest only: the
environment has the edge runtime with its ``openvino`` extra
(``onnxruntime-openvino``), onnx and numpy, and no Django, so nothing from
``tests/conftest.py`` or ``tests/edge_runtime`` can be imported here.
"""
