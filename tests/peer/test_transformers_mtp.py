"""Peer check of the MTP module against transformers 5 (the `peer` extra).

transformers >= 5.2x runs DeepSeek-V3's MTP module itself (`generate(..., use_mtp=True)`, built on
`modeling_layers.MtpModel`): it loads the module from checkpoint keys matching
`model\\.layers\\.61.*` and renames layer `num_hidden_layers` to MTP layer 0, so the main model
must have exactly 61 decoder layers.  We write a small random model with 61 dense layers (the MTP
layer is MoE, as in V3) in the HF layout, load it with transformers in float64, and compare:

- the main model's logits (a precondition: otherwise the MTP comparison means nothing);
- module 1's logits at every index, teacher-forced: `MtpModel.forward_layer` on h^0 (transformers
  takes `hidden_states[-1]`, which it ties to the output AFTER the final norm) and the tokens
  shifted by one, then its shared head; positions are those of the shifted tokens, as its
  generate loop passes them (our `positions="token"`; "index" agrees to rounding since RoPE is
  relative);
- the tokens of `generate(use_mtp=True)` with ours (both lossless, so both plain greedy).

transformers computes the RoPE frequencies (and the router) in float32, so agreement is about
1e-6 relative, not 1e-12; a wrong convention (concatenation order, h^0 before the norm, the
module's own head) differs at order 1, which the test also shows.
"""

import os

import numpy as np
import pytest

import refimpl
from refimpl import mtp
from refimpl.writer import random_weights, save_checkpoint
from refimpl.config import RopeScaling
from refimpl.generate import decode, greedy
from tests.helpers import rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.peer

TOL = 1e-5  # float32 RoPE frequencies in transformers


def config_61():
    """61 dense main layers (tiny widths), one MoE MTP module at layer 61, YaRN live."""
    return refimpl.Config.preset("tiny").replace(
        vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
        num_hidden_layers=61, first_k_dense_replace=61, num_attention_heads=2, kv_lora_rank=16,
        q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16, beta_fast=32.0,
                                 beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=64, num_nextn_predict_layers=1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from transformers import DeepseekV3ForCausalLM
    from transformers.modeling_layers import MtpModel

    cfg = config_61()
    weights = random_weights(cfg, 0)
    path = os.fspath(tmp_path_factory.mktemp("peer") / "m61")
    save_checkpoint(path, cfg, weights, store_dtype="float64")
    hf = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float64,
                                               experts_implementation="eager")  # grouped_mm has no float64
    hf.eval()
    mtp_hf = MtpModel.from_pretrained(hf, device_map={"": "cpu"})
    t = torch.tensor(TOKENS)
    T = TOKENS.shape[1]
    with torch.no_grad():
        out = hf(t, output_hidden_states=True)
        h0 = out.hidden_states[-1]  # tied to the output after the final norm
        h1 = mtp_hf.forward_layer(0, h0[:, :T - 1], torch.arange(1, T)[None], None,
                                  input_ids=t[:, 1:])
        mtp_logits = mtp_hf._project_to_logits(h1).numpy()
    return refimpl.Model.from_arrays(cfg, weights), hf, out.logits.numpy(), mtp_logits


TOKENS = np.random.default_rng(1).integers(0, 64, (1, 10))


def test_main_model_logits_agree_with_transformers(pair):
    model, _, theirs, _ = pair
    assert rel_err(model.forward(TOKENS), theirs) < TOL


def test_mtp_module_logits_agree_with_transformers(pair):
    model, _, _, theirs = pair
    for positions in ("token", "index"):
        _, (ours,) = model.forward(TOKENS, mtp=True,
                                   mtp_conventions=mtp.Conventions(positions=positions))
        assert ours.shape == theirs.shape == (1, 9, 64)
        assert rel_err(ours, theirs) < TOL
    for wrong in (dict(concat="hidden_first"), dict(h0="pre_norm"), dict(weights="module")):
        _, (other,) = model.forward(TOKENS, mtp=True, mtp_conventions=mtp.Conventions(**wrong))
        assert rel_err(other, theirs) > 1e-2, wrong


def test_transformers_mtp_generation_gives_our_tokens(pair):
    model, hf, _, _ = pair
    with torch.no_grad():
        out = hf.generate(torch.tensor(TOKENS), max_new_tokens=3, do_sample=False, use_mtp=True)
    theirs = out[0, TOKENS.shape[1]:].tolist()
    ours = decode(model, TOKENS[0], 3, use_mtp=True)
    assert ours.tokens == theirs == greedy(model, TOKENS[0], 3)
