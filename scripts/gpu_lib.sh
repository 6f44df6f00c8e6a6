# What every scripts/gpu_*_check.sh does first; sourced, never run. `gpu_setup PREFIX OUT WORK`
# reads $PREFIX_ENGINE (default vllm), $OUT (default OUT), $PYTHON (default python3),
# $PREFIX_MODEL (default the lent machine's tiny model) and $PREFIX_WORK (default WORK), and
# exports them as PREFIX_ENGINE, PREFIX_OUT, PREFIX_PY, PREFIX_MODEL and PREFIX_WORK for the
# script's Python part (which can `import scripts.gpu_lib`: it runs from the repository root).
# It leaves ENGINE, OUT, PY and WORK set, $OUT made, $WORK emptied and the shell in the repository root.
gpu_setup() {
  local prefix=$1 engine_var="$1_ENGINE" model_var="$1_MODEL" work_var="$1_WORK"
  ENGINE=${!engine_var:-vllm}
  OUT=${OUT:-$2}
  PY=${PYTHON:-python3}
  WORK=${!work_var:-$3}
  export "${prefix}_ENGINE=$ENGINE" "${prefix}_OUT=$OUT" "${prefix}_PY=$PY" "${prefix}_WORK=$WORK"
  export "${prefix}_MODEL=${!model_var:-/root/tiny/tiny-llama}"
  mkdir -p "$OUT"
  rm -rf "$WORK" && mkdir -p "$WORK"
  export PYTHONUNBUFFERED=1
  cd "$(dirname "${BASH_SOURCE[1]}")/.." || exit 1
}
