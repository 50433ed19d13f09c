"""The CRI API (``runtime.v1``) as Python: stubs generated from the vendored ``api.proto`` and checked in.

``api.proto`` is ``pkg/apis/runtime/v1/api.proto`` of k8s.io/cri-api v0.35.0
(commit 400943ab10cb14da9dfba3346672a777e6f651d0), unchanged, under the
Apache License 2.0 stated in its header. ``api_pb2.py`` and
``api_pb2_grpc.py`` are grpcio-tools 1.85.1's output for it, never edited:
regenerate them with ``scripts/gen-cri-proto.sh`` after changing either;
tests/test_cri_proto.py fails when they differ from what the proto compiles to.
"""
