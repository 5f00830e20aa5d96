#!/usr/bin/env bash
# Run the transformers-integration tests against transformers 4.57.6 (the first release with
# Qwen3-VL), installed beside the default one into a private target dir, no network needed when
# the wheels are on local indexes. Usage: tests/run_transformers_457.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET="${TF457_DIR:-/tmp/tf457}"
if ! PYTHONPATH="$TARGET" python -c "import transformers, sys; sys.exit(transformers.__version__ != '4.57.6')" 2>/dev/null; then
    python -m pip install --quiet --target "$TARGET" --no-deps --upgrade \
        "transformers==4.57.6" "tokenizers>=0.22.0,<=0.23.0" "huggingface_hub>=0.34.0,<1.0" \
        requests urllib3 charset-normalizer certifi idna
fi
PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" python -c "import transformers; print('transformers', transformers.__version__, transformers.__file__)"
PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" python -m pytest \
    tests/test_transformers_integration.py tests/test_seed_classes.py tests/test_packing.py tests/test_packing_collator.py "$@"
PYTHONPATH="$TARGET${PYTHONPATH:+:$PYTHONPATH}" python -m pytest tests/test_quant_kvcache.py -k "generate or refusals" "$@"  # qf.QuantizedStaticCache
