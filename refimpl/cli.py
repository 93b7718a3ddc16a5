"""The `refimpl` command line (DESIGN.md section 5). User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

from .backend import to_numpy
from .errors import InputError, RefimplError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="refimpl", description="DeepSeek-V3 reference implementation")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="the main job on the built-in tiny model: make it, run it, "
                                    "print a logits summary and greedy tokens")
    d.add_argument("--preset", default="tiny")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--tokens", type=int, default=16, help="prompt length")
    d.add_argument("--new", type=int, default=8, help="greedy tokens to generate")

    m = sub.add_parser("make-checkpoint", help="write a random but well-scaled model (HF layout)")
    m.add_argument("--preset", default="tiny")
    m.add_argument("--config", help="a config.json to use instead of a preset")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", required=True)
    m.add_argument("--store-dtype", default="float32", choices=["float64", "float32", "bfloat16"])

    g = sub.add_parser("logits", help="logits of a token file")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--tokens", required=True, help=".npy file of integer ids [batch, seq]")
    g.add_argument("--out", required=True, help=".npy file for logits [batch, seq, vocab]")
    g.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    g.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    g.add_argument("--incremental", action="store_true",
                   help="prefill the first token, then decode the rest one at a time through the "
                        "latent cache")

    r = sub.add_parser("generate", help="greedy decoding")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--prompt", required=True, help="comma-separated token ids, e.g. 1,2,3")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    r.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    r.add_argument("--json", action="store_true")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except RefimplError as e:
        print(f"refimpl: error: {e}", file=sys.stderr)
        return 2


def _load_tokens(path: str) -> np.ndarray:
    try:
        t = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable .npy array ({e})") from None
    if not isinstance(t, np.ndarray):
        raise InputError(f"{path}: not a single .npy array")
    if not np.issubdtype(t.dtype, np.integer):
        raise InputError(f"{path}: tokens must be integers, got dtype {t.dtype}")
    if t.ndim != 2:
        raise InputError(f"{path}: tokens must have rank 2 [batch, seq], got shape {list(t.shape)}")
    return t


def _save_npy(path: str, a: np.ndarray) -> None:
    """np.save to a temporary name in the same directory, then rename."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".refimpl-", suffix=".npy", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, a)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _config_from(args):
    from .config import Config

    return Config.from_json(args.config) if getattr(args, "config", None) else Config.preset(args.preset)


def cmd_make_checkpoint(args) -> int:
    from .checkpoint import make_checkpoint

    make_checkpoint(args.out, _config_from(args), seed=args.seed, store_dtype=args.store_dtype)
    print(f"wrote {args.out}")
    return 0


def run_logits(model, tokens, incremental: bool) -> np.ndarray:
    """Full forward, or token-by-token decode through the latent cache."""
    if not incremental:
        return to_numpy(model.forward(tokens))
    cache = model.new_cache(batch=tokens.shape[0], max_len=tokens.shape[1])
    steps = [to_numpy(model.forward(tokens[:, j:j + 1], cache=cache)) for j in range(tokens.shape[1])]
    return np.concatenate(steps, axis=1)


def cmd_logits(args) -> int:
    from .model import load

    tokens = _load_tokens(args.tokens)
    model = load(args.checkpoint, dtype=args.dtype, device=args.device)
    model.check_tokens(tokens)
    _save_npy(args.out, run_logits(model, tokens, args.incremental))
    return 0


def _parse_prompt(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--prompt {text!r} is not comma-separated integers") from None
    if not ids:
        raise InputError("--prompt is empty")
    return ids


def cmd_generate(args) -> int:
    from .generate import greedy
    from .model import load

    prompt = _parse_prompt(args.prompt)
    model = load(args.checkpoint, dtype=args.dtype, device=args.device)
    model.check_tokens(np.array([prompt]))
    new = greedy(model, prompt, args.max_new_tokens)
    if args.json:
        print(json.dumps({"prompt": prompt, "tokens": new, "forward_passes": 1 + max(len(new) - 1, 0)}))
    else:
        print(",".join(map(str, new)))
    return 0


def cmd_demo(args) -> int:
    from .checkpoint import make_checkpoint
    from .config import Config
    from .generate import greedy
    from .model import load

    cfg = Config.preset(args.preset)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "model")
        make_checkpoint(path, cfg, seed=args.seed)
        model = load(path)
        rng = np.random.default_rng(args.seed)
        tokens = rng.integers(0, cfg.vocab_size, (1, args.tokens))
        logits = to_numpy(model.forward(tokens))
        last = logits[0, -1]
        print(f"preset {args.preset}: {cfg.num_hidden_layers} layers "
              f"({cfg.first_k_dense_replace} dense), hidden {cfg.hidden_size}, "
              f"{cfg.n_routed_experts} experts in {cfg.n_group} groups, "
              f"YaRN x{cfg.rope_scaling.factor if cfg.rope_scaling else 1}, float64")
        print(f"prompt ({args.tokens} random ids, seed {args.seed}): {tokens[0].tolist()}")
        print(f"logits {list(logits.shape)}: mean {logits.mean():+.6f} std {logits.std():.6f} "
              f"last-position top-5 ids {np.argsort(-last, kind='stable')[:5].tolist()}")
        new = greedy(model, tokens[0], args.new)
        print(f"greedy continuation ({args.new} tokens, latent-cache decode): {new}")
    return 0


COMMANDS = {"demo": cmd_demo, "make-checkpoint": cmd_make_checkpoint, "logits": cmd_logits,
            "generate": cmd_generate}


if __name__ == "__main__":
    sys.exit(main())
