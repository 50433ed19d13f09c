#!/usr/bin/env bash
# Regenerate the CRI stubs the cri receiver imports (tapio/receivers/cri/_proto/api_pb2*.py)
# from the vendored api.proto, with the grpcio-tools pinned in pyproject.toml (test extras).
# The stubs are checked in; tests/test_cri_proto.py checks they are this script's output.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. tapio/receivers/cri/_proto/api.proto
