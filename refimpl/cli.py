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

    r = sub.add_parser("generate", help="greedy (or sampled) decoding, optionally speculative with "
                                        "the MTP modules")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--prompt", required=True, help="comma-separated token ids, e.g. 1,2,3")
    r.add_argument("--max-new-tokens", type=int, default=32)
    r.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    r.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    r.add_argument("--json", action="store_true")
    r.add_argument("--mtp", action="store_true",
                   help="speculative decoding: the MTP modules draft, the main model verifies in "
                        "one forward; greedy output is identical to plain greedy decoding")
    r.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default): greedy; > 0: sample from softmax(logits / temperature), "
                        "with --mtp accepting drafts by min(1, p/q)")
    r.add_argument("--seed", type=int, default=None, help="random seed for --temperature > 0")
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
    from .generate import decode
    from .model import load

    prompt = _parse_prompt(args.prompt)
    if args.temperature < 0:
        raise InputError(f"--temperature must be >= 0, got {args.temperature}")
    model = load(args.checkpoint, dtype=args.dtype, device=args.device)
    model.check_tokens(np.array([prompt]))
    rep = decode(model, prompt, args.max_new_tokens, use_mtp=args.mtp,
                 temperature=args.temperature, seed=args.seed)
    if args.json:
        print(json.dumps(rep.as_dict()))
        return 0
    print(",".join(map(str, rep.tokens)))
    if args.mtp:
        for line in mtp_summary(rep, model.cfg.vocab_size):
            print(line, file=sys.stderr)
    return 0


def mtp_summary(rep, vocab_size: int) -> list[str]:
    """The accounting of a speculative run, in words (printed to stderr by `generate --mtp`)."""
    rates = ", ".join(f"depth {k}: {a}/{d}" + (f" = {a / d:.1%}" if d else "")
                      for k, (a, d) in enumerate(zip(rep.accepted, rep.drafted), 1))
    lines = [f"{len(rep.tokens)} tokens in {rep.forward_passes} main-model forward passes "
             f"(prefill included); {rep.tokens_per_forward:.3f} tokens per decoding forward",
             f"accepted drafts per depth: {rates}",
             "conventions: " + ", ".join(f"{k}={v}" for k, v in rep.mtp_conventions.items())]
    drafted, accepted = sum(rep.drafted), sum(rep.accepted)
    if drafted and accepted / drafted < 0.05:
        lines.append(f"note: acceptance is near zero ({accepted}/{drafted}; chance is about "
                     f"1/{vocab_size}): the MTP modules do not predict this model's tokens, as "
                     f"expected with random weights")
    return lines


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
