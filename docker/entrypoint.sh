#!/usr/bin/env bash
# The ENTRYPOINT of Dockerfile.gpu and Dockerfile.neuron.
#
# SageMaker starts the image as `docker run IMAGE serve` (hosting) and `docker run IMAGE train`
# (training jobs); anything else is run as given, so `docker run IMAGE kiln compile ...` or
# `docker run -it IMAGE bash` work too.
#
#   serve [FLAGS]   kiln serve on 0.0.0.0, HTTP on $SAGEMAKER_BIND_TO_PORT (8080 when unset),
#                   gRPC on the first port of $SAGEMAKER_SAFE_PORT_RANGE that is not the HTTP
#                   port (8081 when unset; KILN_GRPC_PORT overrides, 0 turns gRPC off); the
#                   model from $SM_ROOT/model when it holds one (config.json or a .gguf file),
#                   else kiln's default model; runtime adapter loads allowed from under
#                   $SM_ROOT (KILN_LORA_ROOTS). FLAGS are kiln serve flags and win.
#   train [FLAGS]   kiln train under the SageMaker training contract: hyperparameters and data
#                   channels from $SM_ROOT/input, the adapter to $SM_ROOT/model, checkpoints to
#                   $SM_ROOT/checkpoints, a failure reason to $SM_ROOT/output/failure.
#   CMD [ARGS]      exec'd as given.
#
# SM_ROOT (default /opt/ml) is the same root as `kiln train --sm-root`; tests point it at a
# temporary folder. Every branch ends in exec, so kiln is PID 1 and gets SageMaker's SIGTERM.
set -euo pipefail

SM_ROOT="${SM_ROOT:-/opt/ml}"

# CUDA forward compatibility (GPU image): when the host's NVIDIA driver is older than the one
# the image's CUDA needs, the cuda-compat libraries of the base image take over, as SageMaker
# advises for hosts whose driver lags the container's CUDA. No-op without a GPU or compat dir.
# CUDA_COMPAT_DIR moves the compat dir (tests).
enable_cuda_compat() {
    local compat="${CUDA_COMPAT_DIR:-/usr/local/cuda/compat}" lib host image
    [[ -d "$compat" ]] && command -v nvidia-smi >/dev/null 2>&1 || return 0
    host="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -n 1)" || return 0
    lib="$(find "$compat" -maxdepth 1 -name 'libcuda.so.*.*' -print -quit)"
    [[ -n "$host" && -n "$lib" ]] || return 0
    image="${lib##*/libcuda.so.}"
    if [[ "$(printf '%s\n%s\n' "$host" "$image" | sort -V | head -n 1)" != "$image" ]]; then
        echo "kiln entrypoint: host driver $host < $image: using the CUDA compat libraries" >&2
        export LD_LIBRARY_PATH="$compat${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
}

# The model SageMaker unpacked into $SM_ROOT/model, as kiln's own settings would pick it:
# the folder when it has config.json, else its first .gguf file; nothing when it holds neither.
sagemaker_model() {
    local dir="$SM_ROOT/model" gguf
    if [[ -f "$dir/config.json" ]]; then
        printf '%s\n' "$dir"
        return
    fi
    gguf="$(find "$dir" -maxdepth 1 -type f -name '*.gguf' 2>/dev/null | LC_ALL=C sort | head -n 1)"
    [[ -n "$gguf" ]] && printf '%s\n' "$gguf"
    return 0
}

serve() {
    # An explicit model (KILN_MODEL, or the TGI / LMI names kiln also reads) wins over
    # /opt/ml/model, and a --model flag wins over both.
    if [[ -z "${KILN_MODEL:-}${HF_MODEL_ID:-}${OPTION_MODEL_ID:-}" ]]; then
        local model
        model="$(sagemaker_model)"
        [[ -n "$model" ]] && export KILN_MODEL="$model"
    fi
    export KILN_HOST="${KILN_HOST:-0.0.0.0}"
    # Runtime adapter loads (SageMaker's POST /adapters, used for adapter inference components)
    # may read adapters that SageMaker placed under its tree; KILN_LORA_ROOTS overrides.
    export KILN_LORA_ROOTS="${KILN_LORA_ROOTS:-$SM_ROOT}"
    # Without a safe port range the gRPC port defaults to 8081; keep it off the HTTP port.
    local http="${KILN_PORT:-${SAGEMAKER_BIND_TO_PORT:-8080}}"
    if [[ -z "${KILN_GRPC_PORT:-}${SAGEMAKER_SAFE_PORT_RANGE:-}" && "$http" == 8081 ]]; then
        export KILN_GRPC_PORT=8082
    fi
    exec kiln serve "$@"
}

enable_cuda_compat

if [[ $# -eq 0 ]]; then
    set -- serve
fi
case "$1" in
    serve)
        shift
        serve "$@"
        ;;
    train)
        shift
        exec kiln train --sagemaker --sm-root "$SM_ROOT" "$@"
        ;;
    *)
        exec "$@"
        ;;
esac
