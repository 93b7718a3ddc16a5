#!/usr/bin/env bash
# The tests (fast profile by default; HYPOTHESIS_PROFILE=thorough for a release run).
# Sets itself up on first use: .venv with the test and peer extras (CPU torch + transformers)
# and engine-mlx (MLX-LM on CPU, 11 MB of wheels: the MLX engine tests).
source "$(dirname "$0")/_venv.sh" "test,peer,engine-mlx"
exec .venv/bin/python -m pytest "$@"
