"""transformers with the public bug classes of issue 23 patched in, as --adapter factories for
benchmarks/search_catalogue.py (an engine developer's bugs, not this project's mutants: each is
a change to what transformers computes, made the way a port would get it wrong):

    oracles search --adapter benchmarks.search_engines:hf_group_score_top_k_over_m --out DIR

- hf_group_score_top_k_over_m: DeepseekV3TopkRouter scores a group by the sum of its top
  (top_k // topk_group) biased scores, not its top two (transformers 5.24.0,
  models/deepseek_v3/modeling_deepseek_v3.py:138-142 has `.topk(2, dim=-1)[0].sum(dim=-1)`);
- hf_yarn_factor_from_ratio: the YaRN factor taken as max_position_embeddings /
  original_max_position_embeddings (what modeling_rope_utils.py:427-428 does when `factor` is
  absent), for the frequencies and the softmax's mscale alike;
- hf_rms_norm_eps_ignored: every RMSNorm at 1e-6 whatever rms_norm_eps says.

Run from the repository root (benchmarks/ is then importable). Never imported by oracles/.
"""

from __future__ import annotations

import contextlib

from oracles.engines.hf import Engine


class _Patched(Engine):
    """transformers' engine with `patch()` (a context manager) active while each case loads
    and runs."""

    def patch(self):
        return contextlib.nullcontext()

    def load_config(self, case):
        return None

    def _load(self, case):
        cls = (self.transformers.DeepseekV2ForCausalLM if case.config.model_type == "deepseek_v2"
               else self.transformers.DeepseekV3ForCausalLM)
        cfg = self.load_config(case)
        kw = {} if cfg is None else {"config": cfg}
        model = cls.from_pretrained(case.model_path, dtype=self.dtype,
                                    attn_implementation=self.options["attn_implementation"], **kw)
        model.eval()
        return model

    def run(self, case):
        with self.patch():
            return super().run(case)


class GroupScoreTopKOverM(_Patched):
    def patch(self):
        import torch
        from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m

        original = m.DeepseekV3TopkRouter.forward

        def forward(router, hidden_states):
            hidden_states = hidden_states.view(-1, router.hidden_dim)
            logits = torch.nn.functional.linear(hidden_states.type(torch.float32),
                                                router.weight.type(torch.float32))
            scores = logits.sigmoid()
            choice = scores + router.e_score_correction_bias
            n = router.top_k // router.topk_group  # the bug: V3's 8 // 4 happens to be 2
            grouped = choice.view(-1, router.num_group, router.num_experts // router.num_group)
            group_scores = grouped.topk(n, dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores)
            group_mask.scatter_(1, group_idx, 1)
            score_mask = (group_mask.unsqueeze(-1)
                          .expand(-1, router.num_group, router.num_experts // router.num_group)
                          .reshape(-1, router.num_experts))
            choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
            idx = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, idx)
            if router.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return logits, weights * router.routed_scaling_factor, idx

        @contextlib.contextmanager
        def swapped():
            m.DeepseekV3TopkRouter.forward = forward
            try:
                yield
            finally:
                m.DeepseekV3TopkRouter.forward = original
        return swapped()


class YarnFactorFromRatio(_Patched):
    def load_config(self, case):
        cfg = self.transformers.AutoConfig.from_pretrained(case.model_path)
        rp = dict(cfg.rope_parameters)
        if rp.get("rope_type") == "yarn":
            rp["factor"] = cfg.max_position_embeddings / rp["original_max_position_embeddings"]
            cfg.rope_parameters = rp
        return cfg


class RmsNormEpsIgnored(_Patched):
    def load_config(self, case):
        cfg = self.transformers.AutoConfig.from_pretrained(case.model_path)
        cfg.rms_norm_eps = 1e-6
        return cfg


def hf_group_score_top_k_over_m():
    return GroupScoreTopKOverM({})


def hf_yarn_factor_from_ratio():
    return YarnFactorFromRatio({})


def hf_rms_norm_eps_ignored():
    return RmsNormEpsIgnored({})
