"""The refimpl command line as a user runs it: results, and one-line errors with exit code 2."""

import json
import os
import time

import numpy as np
import pytest

import refimpl
from refimpl.writer import make_checkpoint
from tests.helpers import rel_err, run_cli, run_main


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "tiny"
    make_checkpoint(d, refimpl.Config.preset("tiny"), seed=0)
    return d


def _one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refimpl: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_demo_prints_a_summary_and_greedy_tokens():
    r = run_cli("demo", "--new", "3")
    assert r.returncode == 0, r.stderr
    assert "logits [1, 16, 256]" in r.stdout and "greedy continuation (3 tokens" in r.stdout


def test_make_checkpoint_then_logits_full_and_incremental(ckpt, tmp_path):
    tokens = np.random.default_rng(0).integers(0, 256, (2, 12))
    np.save(tmp_path / "t.npy", tokens)
    for extra, name in (((), "full.npy"), (("--incremental",), "inc.npy"),
                        (("--dtype", "float32"), "f32.npy")):
        r = run_cli("logits", "--checkpoint", ckpt, "--tokens", tmp_path / "t.npy",
                    "--out", tmp_path / name, *extra)
        assert r.returncode == 0, r.stderr
    full = np.load(tmp_path / "full.npy")
    np.testing.assert_array_equal(full, refimpl.load(ckpt).forward(tokens))
    assert rel_err(np.load(tmp_path / "inc.npy"), full) < 1e-12
    assert np.load(tmp_path / "f32.npy").dtype == np.float32


def test_generate_json(ckpt):
    r = run_cli("generate", "--checkpoint", ckpt, "--prompt", "1,2,3", "--max-new-tokens", "4",
                "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["tokens"]) == 4 and out["prompt"] == [1, 2, 3]


@pytest.mark.parametrize("tokens, needles", [
    (np.array([[1, 2, 999]]), ["token id 999", "outside the vocabulary"]),
    (np.array([[0.5, 1.0]]), ["t.npy", "must be integers", "float64"]),
    (np.array([1, 2, 3]), ["t.npy", "rank 2"]),
])
def test_bad_token_files_exit_2_with_one_line(ckpt, tmp_path, tokens, needles):
    np.save(tmp_path / "t.npy", tokens)
    r = run_cli("logits", "--checkpoint", ckpt, "--tokens", tmp_path / "t.npy",
                "--out", tmp_path / "l.npy")
    _one_line_error(r, *needles)
    assert not os.path.exists(tmp_path / "l.npy")


def test_not_an_npy_file(ckpt, tmp_path):
    (tmp_path / "t.npy").write_bytes(b"garbage")
    _one_line_error(run_cli("logits", "--checkpoint", ckpt, "--tokens", tmp_path / "t.npy",
                            "--out", tmp_path / "l.npy"), "t.npy")


def test_checkpoint_errors_exit_2(ckpt, tmp_path):
    _one_line_error(run_cli("generate", "--checkpoint", tmp_path / "none", "--prompt", "1"),
                    "not a checkpoint directory")
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.load(open(ckpt / "config.json"))
    cfg["n_group"] = 3
    (bad / "config.json").write_text(json.dumps(cfg))
    _one_line_error(run_cli("generate", "--checkpoint", bad, "--prompt", "1"),
                    "config.json", "n_routed_experts (16) is not divisible by n_group (3)")


def test_make_checkpoint_bad_preset_and_prompt(ckpt, tmp_path):
    _one_line_error(run_cli("make-checkpoint", "--preset", "nope", "--out", tmp_path / "x"),
                    "preset 'nope'")
    _one_line_error(run_cli("generate", "--checkpoint", ckpt, "--prompt", "1,a"), "--prompt")
    _one_line_error(run_cli("generate", "--checkpoint", ckpt, "--prompt", "1",
                            "--max-new-tokens", "5000"), "max_position_embeddings")


# ---- option values and escaping (issue 10) ------------------------------------------------------

@pytest.mark.parametrize("argv, needle", [
    (["generate", "--checkpoint", "C", "--prompt", "1", "--temperature", "nan"], "--temperature"),
    (["generate", "--checkpoint", "C", "--prompt", "1", "--temperature", "inf"], "--temperature"),
    (["generate", "--checkpoint", "C", "--prompt", "1", "--temperature", "-0.5"], "--temperature"),
    (["generate", "--checkpoint", "C", "--prompt", "1", "--temperature", "1e-300"], "--temperature"),
    (["generate", "--checkpoint", "C", "--prompt", "1", "--temperature", "1", "--seed", "-1"], "--seed"),
    (["make-checkpoint", "--seed", "-1", "--dry-run"], "--seed"),
    (["make-checkpoint", "--seed", str(2**70), "--dry-run"], "--seed"),
    (["demo", "--seed", "-3"], "--seed"),
    (["demo", "--tokens", "0"], "--tokens"),
    (["generate", "--checkpoint", "C", "--prompt", "1", "--max-new-tokens", "-2"], "--max-new-tokens"),
    (["make-checkpoint", "--shards", "0", "--dry-run"], "--shards"),
    (["logits", "--checkpoint", "C"], "required"),
])
def test_bad_option_values_are_one_line_exit_2(ckpt, argv, needle):
    rc, out, err = run_main(*[ckpt if a == "C" else a for a in argv])
    assert rc == 2 and out == "", (rc, out, err)
    assert err.startswith("refimpl: error: ") and err.count("\n") == 1 and needle in err, err


def test_temperature_zero_and_a_seed_are_accepted(ckpt):
    rc, out, err = run_main("generate", "--checkpoint", ckpt, "--prompt", "1,2", "--max-new-tokens",
                            "2", "--temperature", "0.7", "--seed", "0")
    assert rc == 0 and len(out.strip().split(",")) == 2, err


def test_huge_counts_are_refused_at_once_by_every_command(tmp_path):
    cfg = refimpl.Config.preset("tiny").to_dict()
    for key, value in (("num_hidden_layers", 10**9), ("n_routed_experts", 10**8),
                       ("num_nextn_predict_layers", 10**8)):
        bad = dict(cfg, **{key: value})
        d = tmp_path / key
        d.mkdir()
        (d / "config.json").write_text(json.dumps(bad))
        np.save(tmp_path / "t.npy", np.array([[1, 2]]))
        for argv in (["info", "--config", d / "config.json"],
                     ["make-checkpoint", "--config", d / "config.json", "--dry-run"],
                     ["make-checkpoint", "--config", d / "config.json", "--out", d / "out"],
                     ["info", "--checkpoint", d],
                     ["logits", "--checkpoint", d, "--tokens", tmp_path / "t.npy",
                      "--out", tmp_path / "l.npy"]):
            t = time.perf_counter()
            rc, _, err = run_main(*argv)
            assert time.perf_counter() - t < 2.0, argv
            assert rc == 2 and err.count("\n") == 1 and key in err and "must be from" in err, err
        assert os.listdir(d) == ["config.json"]


def test_file_contents_are_escaped_before_printing(ckpt, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.load(open(ckpt / "config.json"))
    cfg["topk_method"] = "x\r\nrefimpl: error: none\u2028\x1b[2J"
    (bad / "config.json").write_text(json.dumps(cfg))
    rc, _, err = run_main("info", "--checkpoint", bad)
    assert rc == 2 and err.count("\n") == 1 and "\r" not in err and "\x1b" not in err, err
    assert "\u2028" not in err and "x\\r\\nrefimpl: error: none\\u2028\\x1b[2J" in err

