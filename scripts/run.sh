#!/usr/bin/env bash
# The main job on the built-in default: generate the tiny model, run it, print a logits summary
# and a greedy continuation. Sets itself up on first use (.venv in the repository).
source "$(dirname "$0")/_venv.sh" ""
exec .venv/bin/refimpl demo "$@"
