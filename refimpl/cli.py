"""The `refimpl` command line (DESIGN.md section 5). User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

import numpy as np

from . import accounting
from .atomic import atomic_file, check_destination
from .backend import to_numpy
from .checkpoint import Checkpoint
from .config import Config
from .errors import CheckpointError, InputError, RefimplError, printable
from .generate import decode, greedy
from .layout import STORAGE_BYTES, stored_entries, tensor_plan
from .memory import parse_memory
from .loader import load
from .writer import make_checkpoint, shard_entries

MAX_SEED = 2 ** 63 - 1
TEMPERATURE_RANGE = (1e-6, 1e6)  # besides 0 (greedy): softmax(logits / T) stays finite


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (`refimpl: error: ...`, exit 2) like every other
    user error."""

    def error(self, message):
        self.exit(2, f"{self.prog.split()[0]}: error: {printable(message)} "
                     f"(see {self.prog} --help)\n")


def _int_in(lo: int, hi: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"{v} is not between {lo} and {hi:,}")
        return v
    parse.__name__ = "integer"
    return parse


def _temperature(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    lo, hi = TEMPERATURE_RANGE
    if not (t == 0 or lo <= t <= hi):  # NaN fails both
        raise argparse.ArgumentTypeError(f"{text} must be 0 (greedy) or a finite number from "
                                         f"{lo:g} to {hi:g}")
    return t


_seed = _int_in(0, MAX_SEED)


def _model_options(p) -> None:
    """How a checkpoint is run: precision, device, memory budget, FP8 emulation."""
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--max-memory", default=None,
                   help="keep the process under this size (e.g. 8GB, 6GiB) by releasing weights "
                        "after use and reading them again when needed")
    p.add_argument("--fp8-activations", action="store_true",
                   help="emulate an FP8 engine: FP8-stored projections multiply activations "
                        "quantised per token per 128 channels, accumulating in float32")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--stages", type=_int_in(1, 100_000), default=None,
                   help="split the decoder layers into N pipeline stages, each keeping its layers "
                        "resident (in this process, or one Ray actor each with --ray); the plan is "
                        "printed before any weight is read")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the stages as Ray actors: on a local cluster (no ADDRESS), or join the "
                        "cluster at ADDRESS (auto, HOST:PORT); needs the cluster extra")
    p.add_argument("--stage-memory", default=None,
                   help="refuse a plan whose stage needs more than this (e.g. 100GB) for its weights")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="refimpl", description="DeepSeek-V3 reference implementation")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="the main job on the built-in tiny model: make it, run it, "
                                    "print a logits summary and greedy tokens")
    d.add_argument("--preset", default="tiny")
    d.add_argument("--seed", type=_seed, default=0)
    d.add_argument("--tokens", type=_int_in(1, 1024), default=16, help="prompt length")
    d.add_argument("--new", type=_int_in(0, 1024), default=8, help="greedy tokens to generate")

    m = sub.add_parser("make-checkpoint", help="write a random but well-scaled model (HF layout)")
    m.add_argument("--preset", default="tiny")
    m.add_argument("--config", help="a config.json to use instead of a preset")
    m.add_argument("--seed", type=_seed, default=0)
    m.add_argument("--out", help="the directory to write (not needed with --dry-run); it must "
                                 "not exist or be empty, and its parent must exist")
    m.add_argument("--store-dtype", default=None, choices=["float64", "float32", "bfloat16"],
                   help="dtype of the stored floats (default float32; bfloat16 with --fp8, as "
                        "published)")
    m.add_argument("--fp8", action="store_true",
                   help="the published layout: projections in FP8 e4m3 with 128x128 float32 "
                        "block scales (weight_scale_inv), the rest BF16, the gate bias F32")
    m.add_argument("--ue8m0", action="store_true", help="with --fp8: power-of-two scales (V3.1)")
    m.add_argument("--shards", type=_int_in(1, 100_000), default=None,
                   help="write N files model-0000k-of-0000N.safetensors and an index")
    m.add_argument("--dry-run", action="store_true",
                   help="print the tensors, dtypes and bytes that would be written; write nothing")

    g = sub.add_parser("logits", help="logits of a token file")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--tokens", required=True, help=".npy file of integer ids [batch, seq]")
    g.add_argument("--out", required=True, help=".npy file for logits [batch, seq, vocab] "
                                                "(replaced atomically; its directory must exist)")
    _model_options(g)
    g.add_argument("--incremental", action="store_true",
                   help="prefill the first token, then decode the rest one at a time through the "
                        "latent cache")

    r = sub.add_parser("generate", help="greedy (or sampled) decoding, optionally speculative with "
                                        "the MTP modules")
    r.add_argument("--checkpoint", required=True)
    r.add_argument("--prompt", required=True, help="comma-separated token ids, e.g. 1,2,3")
    r.add_argument("--max-new-tokens", type=_int_in(0, 1 << 24), default=32)
    _model_options(r)
    r.add_argument("--json", action="store_true")
    r.add_argument("--mtp", action="store_true",
                   help="speculative decoding: the MTP modules draft, the main model verifies in "
                        "one forward; greedy output is identical to plain greedy decoding")
    r.add_argument("--temperature", type=_temperature, default=0.0,
                   help="0 (default): greedy; from 1e-6 to 1e6: sample from "
                        "softmax(logits / temperature), with --mtp accepting drafts by min(1, p/q)")
    r.add_argument("--seed", type=_seed, default=None, help="random seed for --temperature > 0")
    i = sub.add_parser("info", help="parameters (total, active, MTP, per layer), KV-cache bytes "
                                    "and the checkpoint layout, from a config or a checkpoint")
    src = i.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset")
    src.add_argument("--config", help="a config.json")
    src.add_argument("--checkpoint", help="a checkpoint directory: also counts and checks its "
                                          "stored tensors against its config.json")
    i.add_argument("--cache-dtype", default="bf16", choices=["bf16", "fp16", "fp8", "fp32", "fp64"],
                   help="bytes per cached value for the KV-cache figures (default bf16)")
    i.add_argument("--json", action="store_true")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except RefimplError as e:
        print(f"refimpl: error: {printable(e)}", file=sys.stderr)
        return 2
    except OSError as e:  # the machine's answer about a file the user named (or its disk)
        where = f"{printable(e.filename)}: " if e.filename else ""
        print(f"refimpl: error: {where}{printable(e.strerror or e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line (outputs are atomic: nothing half written)
        print("refimpl: interrupted", file=sys.stderr)
        return 130


def _load_tokens(path: str) -> np.ndarray:
    shown = printable(path)
    if os.path.exists(path) and not os.path.isfile(path):
        raise InputError(f"{shown}: not a regular file")
    try:
        t = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"{shown}: file not found") from None
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{shown}: not a readable .npy array ({printable(e)})") from None
    if not isinstance(t, np.ndarray):
        raise InputError(f"{shown}: not a single .npy array")
    if not np.issubdtype(t.dtype, np.integer):
        raise InputError(f"{shown}: tokens must be integers, got dtype {t.dtype}")
    if t.ndim != 2:
        raise InputError(f"{shown}: tokens must have rank 2 [batch, seq], got shape {list(t.shape)}")
    return t


def _save_npy(path: str, a: np.ndarray, expect=...) -> None:
    """np.save atomically: a temporary name beside `path`, then rename (refimpl.atomic)."""
    with atomic_file(path, InputError, expect=expect) as f:
        np.save(f, a)


def _config_from(args):
    return Config.from_json(args.config) if getattr(args, "config", None) else Config.preset(args.preset)


def cmd_make_checkpoint(args) -> int:
    cfg = _config_from(args)
    if args.ue8m0 and not args.fp8:
        raise InputError("--ue8m0 needs --fp8")
    store = args.store_dtype or ("bfloat16" if args.fp8 else "float32")
    if args.dry_run:
        entries = stored_entries(tensor_plan(cfg), args.fp8, store)
        runs = shard_entries(entries, args.shards or 1)
        by = {}
        for _, d, sh in entries:
            t = by.setdefault(d, [0, 0])
            t[0] += 1
            t[1] += math.prod(sh) * STORAGE_BYTES[d]
        print(f"would write {len(entries):,} tensors, {sum(b for _, b in by.values()):,} bytes in "
              f"{len(runs)} file(s): "
              + ", ".join(f"{d} {n:,} tensors {b:,} B" for d, (n, b) in sorted(by.items())))
        return 0
    if not args.out:
        raise InputError("make-checkpoint needs --out DIR (or --dry-run)")

    check_destination(args.out, "directory", CheckpointError)
    bar = None
    if args.shards and args.shards > 1 and sys.stderr.isatty():  # progress on a terminal only
        from tqdm import tqdm

        bar = tqdm(total=args.shards, unit="shard", desc="make-checkpoint")
    make_checkpoint(args.out, cfg, seed=args.seed, store_dtype=store, fp8=args.fp8,
                    shards=args.shards, ue8m0=args.ue8m0,
                    progress=None if bar is None else (lambda k, n: bar.update(1)))
    if bar is not None:
        bar.close()
    print(f"wrote {printable(args.out)}")
    return 0


def run_logits(model, tokens, incremental: bool) -> np.ndarray:
    """Full forward, or token-by-token decode through the latent cache."""
    if not incremental:
        return to_numpy(model.forward(tokens))
    cache = model.new_cache(batch=tokens.shape[0], max_len=tokens.shape[1])
    steps = [to_numpy(model.forward(tokens[:, j:j + 1], cache=cache)) for j in range(tokens.shape[1])]
    return np.concatenate(steps, axis=1)


def _memory_options(args) -> dict:
    """--max-memory and --fp8-activations as load() keywords."""
    mem = None if args.max_memory is None else parse_memory(args.max_memory)
    return {"max_memory": mem, "fp8_activations": args.fp8_activations}


def _load_model(args):
    """The checkpoint as the options say, with per-layer progress on a terminal."""
    if args.ray is not None and args.stages is None:
        raise InputError("--ray needs --stages N (how many pipeline stages)")
    if args.stages is not None:
        mem = None if args.stage_memory is None else parse_memory(args.stage_memory, "--stage-memory")
        report = None if args.quiet else (lambda text: print(text, file=sys.stderr, flush=True))
        return load(args.checkpoint, dtype=args.dtype, device=args.device, stages=args.stages,
                    ray=args.ray, stage_memory=mem, report=report, **_memory_options(args))
    if args.stage_memory is not None:
        raise InputError("--stage-memory needs --stages N")
    model = load(args.checkpoint, dtype=args.dtype, device=args.device, **_memory_options(args))
    if not args.quiet and sys.stderr.isatty():
        from tqdm import tqdm

        model.progress = lambda it, **kw: tqdm(it, leave=False, **kw)
    return model


def cmd_logits(args) -> int:
    dest = check_destination(args.out, "file", InputError)  # before any work
    tokens = _load_tokens(args.tokens)
    model = _load_model(args)
    model.check_tokens(tokens)
    _save_npy(args.out, run_logits(model, tokens, args.incremental), expect=dest)
    return 0


def _parse_prompt(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"--prompt {printable(repr(text))[:80]} is not comma-separated "
                         "integers") from None
    if not ids:
        raise InputError("--prompt is empty")
    return ids


def cmd_generate(args) -> int:
    prompt = _parse_prompt(args.prompt)
    model = _load_model(args)
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


def _layer_runs(layers: list[dict]) -> list[dict]:
    """Consecutive layers with equal counts folded into one row (0-2 dense, 3-60 moe, 61 mtp)."""
    runs = []
    for row in layers:
        key = (row["kind"], row["total"], row["active"])
        if runs and runs[-1]["key"] == key:
            runs[-1]["last"] = row["layer"]
        else:
            runs.append({"key": key, "first": row["layer"], "last": row["layer"], "row": row})
    return runs


def _print_info(title: str, info: dict) -> None:
    n = "{:>19,}".format
    print(title)
    print("parameters (spec section 8)")
    print(f"  total, main model (no MTP)        {n(info['total_params'])}")
    print(f"  active per token                  {n(info['active_params_per_token'])}"
          "   (embedding and lm_head counted whole)")
    print(f"  active per token, no embedding    {n(info['active_params_per_token_without_embedding'])}")
    print(f"  MTP module(s)                     {n(info['mtp_params'])}"
          f"   ({info['mtp_params_unique']:,} without the stored embedding/head copies)")
    print(f"  total with MTP                    {n(info['total_params_with_mtp'])}")
    print("  by component (main model): " + ", ".join(
        f"{k} {v:,}" for k, v in info["main_components"].items()))
    print("per layer        kind        total params       active/token      FFN/MoE total"
          "     FFN/MoE active")
    for r in _layer_runs(info["layers"]):
        row = r["row"]
        span = str(r["first"]) if r["first"] == r["last"] else f"{r['first']}-{r['last']}"
        print(f"  {span:<13} {row['kind']:<6}{n(row['total'])}{n(row['active'])}"
              f"{n(row['ffn_total'])}{n(row['ffn_active'])}")
    kv = info["kv_cache"]
    ctx = kv["context_tokens"]
    print(f"KV cache ({kv['cache_dtype']}, {kv['layers']} layers; baseline: {kv['baseline']})")
    print(f"  MLA latent (c_kv + k_rope)  {kv['mla_values_per_token_per_layer']:>7,} values/token/layer"
          f"  {kv['mla_bytes_per_token']:>13,} B/token  {kv['mla_bytes_context']:>19,} B at {ctx:,} tokens")
    print(f"  full multi-head K and V     {kv['mha_values_per_token_per_layer']:>7,} values/token/layer"
          f"  {kv['mha_bytes_per_token']:>13,} B/token  {kv['mha_bytes_context']:>19,} B at {ctx:,} tokens")
    print(f"  MLA caches {100 * kv['mla_fraction_of_mha']:.4g}% of the baseline "
          f"({100 * (1 - kv['mla_fraction_of_mha']):.4g}% saved)")
    lay = info["checkpoint_fp8"]
    print(f"FP8 checkpoint layout (as published): {lay['tensors']:,} tensors, {lay['bytes']:,} bytes ("
          + ", ".join(f"{k} {v['tensors']:,} tensors {v['bytes']:,} B" for k, v in lay["by_dtype"].items())
          + ")")
    print(f"bytes read per decode token (FP8 layout, batch 1, nothing cached): "
          f"{info['fp8_bytes_read_per_decode_token']:,}")
    st = info.get("stored")
    if st:
        print(f"stored in {printable(st['path'])}: {st['tensors']:,} tensors in {st['files']} file(s), "
              f"{st['bytes']:,} bytes, {st['params']:,} parameters (scales not counted); "
              + ", ".join(f"{k} {v:,}" for k, v in st["by_dtype"].items()))
        print(f"  matches config.json: every tensor present with its implied shape; "
              f"MTP layers {'present' if st['has_mtp'] else 'absent'}; "
              f"{st['fp8_weights']:,} FP8 weights with fitting scales")


def cmd_info(args) -> int:
    if args.checkpoint:
        ckpt = Checkpoint(args.checkpoint)
        cfg, title = ckpt.config, f"checkpoint {printable(args.checkpoint)}"
        stored = ckpt.inventory()
    else:
        cfg = Config.from_json(args.config) if args.config else Config.preset(args.preset)
        title = f"config {printable(args.config)}" if args.config else f"preset {printable(args.preset)}"
        stored = None
    info = accounting.summary(cfg, cache_dtype=args.cache_dtype)
    if stored:
        info["stored"] = stored
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        _print_info(title, info)
    return 0


COMMANDS = {"info": cmd_info, "demo": cmd_demo, "make-checkpoint": cmd_make_checkpoint, "logits": cmd_logits,
            "generate": cmd_generate}


if __name__ == "__main__":
    sys.exit(main())
