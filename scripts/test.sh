#!/usr/bin/env bash
# The tests (fast profile by default; HYPOTHESIS_PROFILE=thorough for a release run).
# Sets itself up on first use: .venv with the test and peer extras (CPU torch + transformers),
# the figures extra (matplotlib: tests/test_figures.py runs docs/figures/make_figures.py) and
# engine-mlx (MLX-LM on CPU, 11 MB of wheels: the MLX engine tests).
source "$(dirname "$0")/_venv.sh" "test,peer,figures,engine-mlx"
# One BLAS/OpenMP thread per process unless the caller sets them: the tests' matrices are small,
# and on 2 cores the pools' spinning threads only compete with the suite's child processes
# (numpy's OpenBLAS and torch read these; README, Tests, has the measured difference).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}" \
       MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
exec .venv/bin/python -m pytest "$@"
