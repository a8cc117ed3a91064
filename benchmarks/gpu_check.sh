#!/usr/bin/env bash
# The GPU checks, prepared for a session that is lent a GPU machine (15 minutes of device time, the start
# included): the tests of the code that runs on a GPU, the distillation step against PyTorch's, float32 and
# bfloat16, and where kdep_jax's step spends its time on the GPU (benchmarks/step_profile.py). Run from the
# repository's root, each part under its own time limit, its log in $OUT/PART.log (runs/gpu_check without $OUT)
# and its exit status and seconds in $OUT/status.txt, so that a call cut short still returns what it measured:
#
#   bash benchmarks/gpu_check.sh tests profile      # one call of the device tool: the tests took 290 s on an H200
#   bash benchmarks/gpu_check.sh float32 bfloat16   # a second call at once, while the machine is warm: 340 s
#
# The GPU machine's Python (3.12) has JAX with CUDA, Flax, optax, orbax, PyTorch and torchvision, and no
# ml_collections: download its wheel into .whl here first (git ignores it; carry it with the call), and the
# script installs it:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl ml-collections==1.1.0
# STEP_ARGS and PROFILE_ARGS replace the step's and the profile's size and device arguments (tests/test_benchmarks.py
# runs the script on a CPU).
set -u
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests profile float32 bfloat16)
for part in "${parts[@]}"; do
  case $part in
    tests | float32 | bfloat16 | profile) ;;
    *) echo "gpu_check.sh: unknown part '$part'; the parts are tests, float32, bfloat16 and profile" >&2; exit 2 ;;
  esac
done
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
python=${PYTHON:-python3}
step_args=${STEP_ARGS:---device gpu --batch 256 --warmup 3 --repeats 10}
profile_args=${PROFILE_ARGS:---device gpu --batch 256}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

if compgen -G ".whl/*.whl" >/dev/null; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/kdep_site .whl/*.whl \
    && export PYTHONPATH=/tmp/kdep_site
fi

run_part() {  # run_part NAME SECONDS COMMAND...
  local name=$1 limit=$2 start=$SECONDS status
  shift 2
  echo "== $name (at most ${limit} s): $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  status=$?
  echo "$name: exit status $status, $((SECONDS - start)) s" | tee -a "$out/status.txt"
  tail -n 30 "$out/$name.log"
}

# The models' outputs and gradients against torchvision, bfloat16 against float32, the distillation step's loss
# against its formula: the tests whose code takes the GPU's paths (not the CPU's kernels and forms), JAX on the GPU.
gpu_tests=(
  tests/test_models.py::test_eval_mode_matches_torchvision
  tests/test_models.py::test_batchnorm_train_step_matches_torch
  tests/test_models.py::test_train_mode_network_matches_torchvision
  tests/test_models.py::test_bfloat16_close_to_float32_with_float32_params
  tests/test_models.py::test_initialisers_follow_torchvision
  tests/test_models.py::test_gelu_matches_float64_and_torch
  tests/test_models.py::test_relu_matches_torch_at_zero_and_on_nan
  tests/test_models.py::test_bfloat16_conv_on_a_gpu_reads_an_rgb_input_as_8_channels
  tests/test_transformers.py::test_small_configuration_matches_torchvision_and_converts_back
  tests/test_transformers.py::test_bfloat16_computes_with_float32_params_and_outputs
  tests/test_transformers.py::test_bfloat16_vit_close_to_float32
  tests/test_transformers.py::test_stochastic_depth_drops_whole_samples_only_with_a_dropout_rng
  tests/test_transformers.py::test_full_size_224px_matches_torchvision_and_exports_strictly
  tests/test_losses.py
  tests/test_distill.py::test_teacher_is_frozen_and_loss_follows_the_formula
  tests/test_distill.py::test_bfloat16_loss_is_within_1e2_of_float32
)

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$python" -c "from kdep_jax import xla_flags; xla_flags.apply_defaults()
import jax, flax, optax, torch, torchvision
print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'torch',
      torch.__version__, 'torchvision', torchvision.__version__, 'with kdep_jax XLA_FLAGS accepted')"
} >"$out/environment.txt" 2>&1
cat "$out/environment.txt"

for part in "${parts[@]}"; do
  if [ "$part" = tests ]; then
    run_part tests 330 env KDEP_TEST_PLATFORM="${KDEP_TEST_PLATFORM:-cuda}" "$python" -m pytest -p no:cacheprovider \
      -o addopts=-ra -q "${gpu_tests[@]}"
  elif [ "$part" = profile ]; then  # its trace and summary.txt in $out/profile
    # shellcheck disable=SC2086  # profile_args is a list of arguments
    run_part profile 150 "$python" benchmarks/step_profile.py $profile_args --out "$out/profile"
  else
    # shellcheck disable=SC2086  # step_args is a list of arguments
    run_part "step_$part" 270 "$python" benchmarks/distill_step.py $step_args --dtype "$part"
  fi
done
