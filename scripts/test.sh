#!/usr/bin/env bash
# The tests (fast profile by default; HYPOTHESIS_PROFILE=thorough for a release run).
# Sets itself up on first use: .venv with the test and peer extras (CPU torch + transformers),
# the figures extra (matplotlib: tests/test_figures.py runs docs/figures/make_figures.py) and
# engine-mlx (MLX-LM on CPU, 11 MB of wheels: the MLX engine tests).
source "$(dirname "$0")/_venv.sh" "test,peer,figures,engine-mlx"
exec .venv/bin/python -m pytest "$@"
