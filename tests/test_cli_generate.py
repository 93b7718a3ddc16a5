"""`refimpl generate` as a user runs it: plain and --mtp decoding, the JSON report, and bad input
answered by one clear line and exit code 2."""

import json

import pytest

import refimpl
from refimpl.writer import make_checkpoint, random_weights, save_checkpoint
from tests.helpers import run_cli


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "tiny"
    make_checkpoint(path, refimpl.Config.preset("tiny"), seed=0)
    return path


@pytest.fixture(scope="module")
def ckpt_no_mtp(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "tiny-no-mtp"
    cfg = refimpl.Config.preset("tiny")
    save_checkpoint(path, cfg, random_weights(cfg, 0, mtp=False))
    return path


def test_generate_mtp_json_reports_the_run_and_matches_plain_greedy(ckpt):
    plain = run_cli("generate", "--checkpoint", ckpt, "--prompt", "1,2,3", "--max-new-tokens", 6,
                    "--json")
    spec = run_cli("generate", "--checkpoint", ckpt, "--prompt", "1,2,3", "--max-new-tokens", 6,
                   "--mtp", "--json")
    assert plain.returncode == 0 and spec.returncode == 0, plain.stderr + spec.stderr
    p, s = json.loads(plain.stdout), json.loads(spec.stdout)
    assert s["tokens"] == p["tokens"] and len(s["tokens"]) == 6
    assert s["mtp_depth"] == 1 and p["mtp_depth"] == 0
    # each accepted draft saves one main-model forward: N tokens take N - accepted forwards
    assert p["forward_passes"] == 6
    assert s["forward_passes"] == 6 - sum(s["accepted_per_depth"])
    assert 1.0 <= s["tokens_per_forward"] <= 2.0
    assert s["mtp_conventions"] == {"concat": "embedding_first", "h0": "final_norm",
                                    "chain": "head_norm", "weights": "main", "positions": "index",
                                    "first_embedding": "keep"}
    assert len(s["acceptance_per_depth"]) == 1


def test_generate_mtp_text_says_acceptance_is_near_zero_for_random_weights(ckpt):
    r = run_cli("generate", "--checkpoint", ckpt, "--prompt", "1,2,3", "--max-new-tokens", 8,
                "--mtp")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().split(",")) == 8
    assert "main-model forward passes" in r.stderr
    assert "acceptance is near zero" in r.stderr


@pytest.mark.parametrize("args,message", [
    (("--prompt", "1,256,3"), "token id 256"),
    (("--prompt", "1,-1"), "token id -1"),
    (("--max-new-tokens", 3000), "exceeds max_position_embeddings"),
    (("--temperature", -1), "--temperature"),
])
def test_generate_bad_input_is_one_line_exit_2(ckpt, args, message):
    base = {"--prompt": "1,2,3", "--max-new-tokens": 4}
    base.update(dict(zip(args[::2], args[1::2])))
    r = run_cli("generate", "--checkpoint", ckpt, *[x for kv in base.items() for x in kv])
    assert r.returncode == 2
    assert message in r.stderr and r.stderr.count("\n") == 1 and r.stderr.startswith("refimpl: error:")


def test_generate_mtp_on_a_checkpoint_without_mtp_layers_is_one_line_exit_2(ckpt_no_mtp):
    ok = run_cli("generate", "--checkpoint", ckpt_no_mtp, "--prompt", "1,2", "--max-new-tokens", 2)
    assert ok.returncode == 0, ok.stderr
    r = run_cli("generate", "--checkpoint", ckpt_no_mtp, "--prompt", "1,2", "--max-new-tokens", 2,
                "--mtp")
    assert r.returncode == 2
    assert "needs MTP layers" in r.stderr and r.stderr.count("\n") == 1
