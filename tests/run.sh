#!/usr/bin/env bash
# The project's test command (README; .ci/run calls it). CPU only: the Triton kernels run under
# Triton's interpreter. The transformers integration is tested on the installed 5.x release and,
# when tests/run_transformers_457.sh exists, again on transformers 4.57.6.
set -euo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=1
python -m pytest tests "$@"
if [ -f tests/run_transformers_457.sh ]; then
  bash tests/run_transformers_457.sh
fi
