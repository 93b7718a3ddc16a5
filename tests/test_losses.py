"""Training-time equations against hand-computed small cases: the MTP loss (eqs. 24-25), the
sequence-wise balance loss (eqs. 17-20) and the auxiliary-loss-free bias update."""

import math

import numpy as np
import pytest

import refimpl
from refimpl import losses
from tests.helpers import tiny_model


def test_mtp_depth_loss_with_uniform_logits_is_terms_over_T_times_log_V():
    # tokens t_0..t_4: T = 4 predictions; depth k has T - k terms, each -log(1/4), divided by T
    tokens = np.array([[0, 1, 2, 3, 0]])
    logits = np.zeros((1, 5, 4))
    assert losses.mtp_depth_loss(logits[:, :4], tokens, 1) == pytest.approx(3 / 4 * math.log(4))
    assert losses.mtp_depth_loss(logits[:, :3], tokens, 2) == pytest.approx(2 / 4 * math.log(4))
    # eq. (25): lambda / D * (L^1 + L^2) = 0.3 / 2 * (3/4 + 2/4) log 4
    got = losses.mtp_loss([logits[:, :4], logits[:, :3]], tokens, lam=0.3)
    assert got == pytest.approx(0.1875 * math.log(4))


def test_mtp_depth_loss_picks_the_token_k_plus_1_ahead():
    # t = (5, 0, 1): T = 2; depth 1 has one term, index 0 predicting t_2 = 1.
    # logits [ln 3, 0] -> P = (3/4, 1/4); -log(1/4) / T = log 2.  Index 1 (beyond) is ignored.
    tokens = np.array([[5, 0, 1]])
    logits = np.array([[[math.log(3), 0.0], [100.0, -100.0]]])
    assert losses.mtp_depth_loss(logits, tokens, 1) == pytest.approx(math.log(2))
    tokens_other = np.array([[5, 0, 0]])  # target 0: -log(3/4) / 2
    assert losses.mtp_depth_loss(logits, tokens_other, 1) == pytest.approx(-math.log(0.75) / 2)


def test_mtp_loss_accepts_teacher_forced_model_outputs():
    cfg = refimpl.Config.preset("tiny").replace(num_nextn_predict_layers=2)
    model = tiny_model(0, cfg)
    tokens = np.random.default_rng(0).integers(0, 256, (2, 9))
    _, mtp_logits = model.forward(tokens, mtp=True)
    T = 8
    by_hand = 0.0
    for k, lg in enumerate(mtp_logits, 1):
        for b in range(2):
            for i in range(T - k):
                z = lg[b, i]
                lse = z.max() + math.log(np.exp(z - z.max()).sum())
                by_hand += -(z[tokens[b, i + k + 1]] - lse) / T / 2
    assert losses.mtp_loss(mtp_logits, tokens, lam=0.3) == pytest.approx(0.3 / 2 * by_hand, rel=1e-12)


def test_mtp_loss_refuses_a_too_short_sequence():
    with pytest.raises(refimpl.InputError, match="depth 2"):
        losses.mtp_depth_loss(np.zeros((1, 1, 4)), np.array([[1, 2, 3]]), 2)


S = np.array([[0.9, 0.1, 0.5, 0.5],
              [0.2, 0.8, 0.6, 0.4]])


def test_balance_loss_hand_computed():
    # s' = [[.45 .05 .25 .25], [.1 .4 .3 .2]] -> P = (.275, .225, .275, .225)
    # top-2 per token (tie 0.5/0.5 to the lower index): {0, 2}, {1, 2} -> counts (1, 1, 2, 0)
    # f = N_r / (K_r T) * counts = 4 / 4 * counts;  L = sum f P = .275 + .225 + .55 = 1.05
    assert losses.balance_loss(S, top_k=2, alpha=1.0) == pytest.approx(1.05)
    assert losses.balance_loss(S, top_k=2, alpha=1e-4) == pytest.approx(1.05e-4)


def test_balance_loss_of_perfectly_balanced_routing_is_alpha():
    # the router's own choice {0, 3}, {1, 2}: every expert once -> f = 1, sum P = 1 -> L = alpha
    assert losses.balance_loss(S, 2, 1e-4, selected=np.array([[0, 3], [1, 2]])) == pytest.approx(1e-4)


def test_bias_update_moves_against_the_load():
    idx = np.array([[0, 2], [0, 1], [0, 3], [2, 3]])
    load = losses.expert_load(idx, 4)
    np.testing.assert_array_equal(load, [3, 1, 2, 2])  # mean 2
    new = losses.update_bias(np.array([0.1, 0.0, -0.2, 0.05]), load, gamma=0.001)
    np.testing.assert_allclose(new, [0.099, 0.001, -0.2, 0.05], rtol=0, atol=1e-15)
