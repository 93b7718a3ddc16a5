"""llama.cpp through llama-cpp-python (extra `engine-llamacpp`; pip builds llama.cpp from source,
about 25 minutes on 2 cores). A case's checkpoint directory is converted to GGUF by the
HF-to-GGUF converter that llama-cpp-python's sdist vendors (vendor/llama.cpp/
convert_hf_to_gguf.py, with its gguf-py), then loaded with llama_cpp.Llama.

    oracles check GOLDEN --engine llama.cpp --engine-option converter=PATH/convert_hf_to_gguf.py \\
        [--engine-option kv_cache_dtype=f32]

The converter is found from the option `converter`, else the environment variable
LLAMA_CPP_CONVERTER. It refuses a tokenizer whose pre-tokenizer hash it does not know; the
suites' tokenizers are GPT-2-style byte-level BPE (GPT-2's split regex, oracles/engines/
tokenizer.py), so the conversion declares the pre-tokenizer "gpt-2" by replacing the
converter's get_vocab_base_pre for that run (the converter script, not llama.cpp). The cases
feed token ids, so the tokenizer never changes an output.

Options: dtype (float32 | bfloat16 | float16: the GGUF's --outtype), kv_cache_dtype (f16,
llama.cpp's default | f32 | bf16 | q8_0: type_k and type_v), flash_attn (off | on), threads.
Logits at every position (logits_all); decode evaluates forced tokens one at a time through
llama.cpp's KV cache; greedy takes the first maximum. Intermediates come from llama.cpp's own
graph callback (llama_context_params.cb_eval, the hook its eval-callback tool uses): the
adapter hands llama-cpp-python's Llama context parameters with cb_eval set (option
intermediates=on; no llama.cpp source is patched) and copies the named graph tensors as they
are computed: attn_norm-N, attn_out-N, ffn_inp-N (the residual after attention), ffn_norm-N,
ffn_out-N, ffn_moe_topk-N, l_out-N, result_norm, under refimpl's names (GRAPH_NAMES). The
tensor struct is read with ctypes as ggml.h lays it out (ggml_tensor, the vendored version).
"""

from __future__ import annotations

import ctypes
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

from .. import OraclesError
from . import Integer, model_case_support, resolve_options
from .serving import Outputs, Preempt, Share, steps_of

OPTIONS = {
    "dtype": ("float32", ("float32", "bfloat16", "float16"), "GGUF weights (--outtype)"),
    "kv_cache_dtype": ("f16", ("f16", "f32", "bf16", "q8_0"), "type_k and type_v"),
    "flash_attn": ("off", ("off", "on"), "flash attention"),
    "converter": ("", None, "convert_hf_to_gguf.py (else $LLAMA_CPP_CONVERTER)"),
    "threads": ("2", Integer(1, 1024), "CPU threads"),
    "intermediates": ("on", ("on", "off"), "graph tensors through cb_eval"),
    "schedule_ubatch": ("16", Integer(1, 65536), "n_ubatch of schedule cases: llama_decode splits each "
                                    "forward into micro-batches of this many tokens"),
}
# llama.cpp graph tensor name (cb name "-" layer) -> refimpl trace name
GRAPH_NAMES = {"attn_norm": "attn_norm", "attn_out": "attn_out", "ffn_inp": "h_attn",
               "ffn_norm": "ffn_norm", "ffn_out": "ffn_out", "ffn_moe_topk": "topk_idx",
               "l_out": "hidden"}
GGML_F32, GGML_I32 = 0, 26


class _GgmlTensor(ctypes.Structure):
    """struct ggml_tensor (ggml/include/ggml.h): GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64,
    GGML_MAX_SRC 10, GGML_MAX_NAME 64."""
    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int),
                ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32),
                ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p),
                ("name", ctypes.c_char * 64), ("extra", ctypes.c_void_p),
                ("padding", ctypes.c_char * 8)]


def _trace_name(graph_name: str) -> str | None:
    if graph_name == "result_norm":
        return "final_hidden"
    m = re.fullmatch(r"([a-z_]+)-(\d+)", graph_name)
    if m and m.group(1) in GRAPH_NAMES:
        return f"layers.{m.group(2)}.{GRAPH_NAMES[m.group(1)]}"
    return None


def _tensor_array(t: _GgmlTensor) -> np.ndarray | None:
    """The tensor's values as numpy [ne3, ne2, ne1, ne0] (F32 or I32, host memory)."""
    dtype = {GGML_F32: np.float32, GGML_I32: np.int32}.get(t.type)
    if dtype is None or not t.data:
        return None
    ne, nb = list(t.ne), list(t.nb)
    span = sum((n - 1) * b for n, b in zip(ne, nb)) + np.dtype(dtype).itemsize
    buf = (ctypes.c_char * span).from_address(t.data)
    a = np.ndarray(shape=tuple(reversed(ne)), dtype=dtype, buffer=buf, strides=tuple(reversed(nb)))
    return a.copy()
GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}
OUTTYPES = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}

# Run the vendored converter with the pre-tokenizer declared (see the module docstring).
_CONVERT = """
import runpy, sys
conv = sys.argv[1]
sys.path.insert(0, __import__("os").path.dirname(conv))
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [conv] + sys.argv[2:]
runpy.run_path(conv, run_name="__main__")
"""


ENVIRONMENT = ("LLAMA_CPP_CONVERTER",)  # read when the converter option is not given


class Engine:
    name = "llama.cpp"
    SERVING = ("schedule cases: one context (kv_unified, n_seq_max = the requests), each "
               "forward ONE llama_decode of a llama_batch holding every request's tokens under "
               "its own seq_id, split by llama.cpp into micro-batches of n_ubatch = "
               "schedule_ubatch tokens; a shared prefix is llama_memory_seq_cp of the donor's "
               "first L positions (the same KV cells); a preempted request is removed "
               "(llama_memory_seq_rm) and recomputed")

    def __init__(self, options: dict | None = None):
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.options = resolve_options(self.name, OPTIONS, options or {})
        conv = self.options["converter"] or os.environ.get("LLAMA_CPP_CONVERTER", "")
        if not conv or not os.path.isfile(conv):
            raise OraclesError(
                "--engine llama.cpp needs the HF-to-GGUF converter: --engine-option "
                "converter=PATH/convert_hf_to_gguf.py or LLAMA_CPP_CONVERTER (it is "
                "vendor/llama.cpp/convert_hf_to_gguf.py in llama-cpp-python's sdist)"
                + (f"; {conv} is not a file" if conv else ""))
        self.converter = os.path.abspath(conv)
        self.options["converter"] = os.path.basename(conv)  # recorded without the machine's path
        self.tmp = tempfile.TemporaryDirectory(prefix="oracles-gguf-")
        self.seen = None  # {trace name: [arrays]} while a forward is observed
        self._cb = None

    def close(self):
        """The adapter protocol's close() (called on the thread that built it; idempotent): the
        graph callback dropped and the converted GGUF files removed (an adapter process ends
        with os._exit, which runs no finalizer: without this they would stay in the temporary
        directory); contexts live only inside run()."""
        import gc

        self._cb = None
        gc.collect()
        self.tmp.cleanup()

    def supports(self, case):
        if case.kind.startswith("mtp") or case.kind == "speculative":
            return ("llama.cpp's converter drops DeepSeek-V2/V3's MTP layers (conversion/deepseek.py"
                    ":239-240 and :397-402 in the llama.cpp llama-cpp-python 0.3.36 vendors: `# TODO "
                    "@ngxson : remove this when we support MTP for deepseek models`, skip_mtp = True)")
        ok = model_case_support(case, self.name, schedules=True)
        if ok is not True:
            return ok
        cfg = case.config
        lite = cfg.num_hidden_layers in (26, 27)
        if (cfg.q_lora_rank is None) != lite:
            return (f"llama.cpp infers q-lora from the layer count (src/models/deepseek2.cpp:8: "
                    f"is_lite = n_layer == 27 || n_layer == 26 ...): q_lora_rank "
                    f"{cfg.q_lora_rank} with {cfg.num_hidden_layers} layers fails to load")
        if cfg.n_shared_experts == 0:
            return ("llama.cpp's deepseek2 loader requires a shared expert (src/models/"
                    "deepseek2.cpp: create_tensor ffn_*_shexp, GGML_ASSERT(layer.ffn_gate_shexp)): "
                    "n_shared_experts 0 has no tensor to load, and the model fails to load")
        return True

    def _gguf(self, case) -> str:
        out = os.path.join(self.tmp.name, case.id + ".gguf")
        if not os.path.exists(out):
            cmd = [sys.executable, "-c", _CONVERT, self.converter, case.model_path, "--outfile", out,
                   "--outtype", OUTTYPES[self.options["dtype"]]]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0 or not os.path.exists(out):
                tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["(no output)"]
                raise RuntimeError(f"convert_hf_to_gguf.py failed on {case.id}: {tail[0]}")
        return out

    def _callback(self):
        """A cb_eval that copies the wanted graph tensors into self.seen[trace name]."""
        def cb(tensor, ask, user_data):
            t = _GgmlTensor.from_address(tensor)
            name = _trace_name(t.name.decode("utf-8", "replace"))
            if ask:
                return name is not None
            if name is not None and self.seen is not None:
                a = _tensor_array(t)
                if a is not None:
                    self.seen.setdefault(name, []).append(a.reshape(-1, a.shape[-1]))
            return True
        return self.llama_cpp.llama_cpp.ggml_backend_sched_eval_callback(cb)

    def _llama(self, case, n_ctx, n_batch=None, n_ubatch=None, n_seq=1):
        """llama_cpp.Llama on the case's GGUF; the context parameters it builds get the graph
        callback (intermediates on) and, for several sequences, n_seq_max and one unified KV
        cache (kv_unified: every sequence's cells in one buffer, so llama_memory_seq_cp shares
        cells instead of copying them)."""
        kv = GGML_TYPES[self.options["kv_cache_dtype"]]
        threads = int(self.options["threads"])
        binding = self.llama_cpp.llama_cpp
        default = binding.llama_context_default_params
        if self.options["intermediates"] == "on":
            self._cb = self._callback()  # kept alive as long as the context

        def params():
            p = default()
            if self.options["intermediates"] == "on":
                p.cb_eval = self._cb
                p.cb_eval_user_data = None
            if n_seq > 1:
                p.n_seq_max = n_seq
                p.kv_unified = True
            return p
        binding.llama_context_default_params = params
        try:
            return self._new_llama(case, n_ctx, kv, threads, n_batch, n_ubatch)
        finally:
            binding.llama_context_default_params = default

    def _new_llama(self, case, n_ctx, kv, threads, n_batch=None, n_ubatch=None):
        n_ctx = max(n_ctx, 16)
        return self.llama_cpp.Llama(
            model_path=self._gguf(case), n_ctx=n_ctx, n_batch=n_batch or n_ctx,
            n_ubatch=n_ubatch or n_ctx, logits_all=True, n_threads=threads,
            n_threads_batch=threads, type_k=kv, type_v=kv,
            flash_attn=self.options["flash_attn"] == "on", seed=0, verbose=False)

    def run(self, case):
        if case.kind == "schedule":
            return self._schedule(case)
        ids = np.asarray(case.inputs["input_ids"], dtype=np.int64)
        if case.kind == "greedy":
            new = case.params["max_new_tokens"]
            llm = self._llama(case, ids.shape[1] + new)
            return {"tokens": np.array([self._greedy(llm, ids[0].tolist(), new)], np.int64)}
        llm = self._llama(case, ids.shape[1])
        rows, traces = [], []
        for r in ids:
            llm.reset()
            toks = r.tolist()
            if case.kind == "prefill":
                self.seen = {}
                llm.eval(toks)
                rows.append(np.array(llm.scores[: len(toks)], np.float32))
            else:  # decode: the prefill, then one forced token at a time through the cache
                p = case.params["prefill"]
                self.seen = None
                llm.eval(toks[:p])
                self.seen = {}
                steps = []
                for j in range(p, len(toks)):
                    llm.eval([toks[j]])
                    steps.append(np.array(llm.scores[j], np.float32))
                rows.append(np.stack(steps))
            traces.append(self.seen)
            self.seen = None
        out = {"logits": np.stack(rows)}
        n = out["logits"].shape[1]
        for name in traces[0]:
            per_row = [np.concatenate(t[name]) if name in t else None for t in traces]
            if any(a is None or a.shape[0] != n for a in per_row):
                continue  # not one row per position (llama.cpp computed a subset): left out
            a = np.stack(per_row)
            out[name] = a.astype(np.int64) if a.dtype == np.int32 else a
        return out

    @staticmethod
    def _greedy(llm, prompt, new):
        llm.reset()
        llm.eval(prompt)
        toks = []
        while True:
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))  # first maximum: lower id on ties
            toks.append(nxt)
            if len(toks) == new:
                return toks
            llm.eval([nxt])


    # ---- serving schedules -------------------------------------------------------------------
    def _schedule(self, case):
        """A `schedule` case in one llama.cpp context (SERVING): every Forward is one
        llama_decode of a batch holding each request's tokens under its seq_id."""
        ll = self.llama_cpp.llama_cpp
        tokens, steps = steps_of(case)
        width = max(sum(c.recompute + c.n for c in st.chunks) for st in steps if not isinstance(st, (Share, Preempt)))
        cells = sum(c.recompute + c.n for st in steps if not isinstance(st, (Share, Preempt)) for c in st.chunks)
        llm = self._llama(case, cells, n_batch=width, n_ubatch=int(self.options["schedule_ubatch"]),
                          n_seq=len(tokens))
        ctx = llm._ctx.ctx
        mem = ll.llama_get_memory(ctx)
        vocab = case.config.vocab_size
        outputs = Outputs(len(tokens))
        batch = ll.llama_batch_init(width, 0, 1)
        try:
            for st in steps:
                if isinstance(st, Share):  # the donor's cells for positions [0, L) join seq r
                    ll.llama_memory_seq_cp(mem, st.donor, st.request, 0, st.length)
                    continue
                if isinstance(st, Preempt):  # its cells freed; its next forward recomputes
                    if not ll.llama_memory_seq_rm(mem, st.request, -1, -1):
                        raise RuntimeError(f"llama_memory_seq_rm refused to free request {st.request}")
                    continue
                rows = []
                for c in st.chunks:
                    for p in c.positions:
                        i = len(rows)
                        batch.token[i] = int(tokens[c.request][p])
                        batch.pos[i] = p
                        batch.n_seq_id[i] = 1
                        batch.seq_id[i][0] = c.request
                        batch.logits[i] = 1
                        rows.append(c)
                batch.n_tokens = len(rows)
                self.seen = {}
                rc = ll.llama_decode(ctx, batch)
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc} on a forward of {len(rows)} tokens")
                logits = np.stack([np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, i), shape=(vocab,)).copy()
                                   for i in range(len(rows))])
                trace = {"logits": logits}
                for name, parts in self.seen.items():
                    a = np.concatenate(parts)
                    if a.shape[0] == len(rows):  # one row per token (else llama.cpp computed a subset)
                        trace[name] = a.astype(np.int64) if a.dtype == np.int32 else a
                self.seen = None
                row = 0
                for c in st.chunks:
                    m = c.recompute + c.n
                    outputs.add(c.request, {k: v[None, row + c.recompute:row + m] for k, v in trace.items()})
                    row += m
        finally:
            self.seen = None
            ll.llama_batch_free(batch)
            llm.close()
        return outputs.result()
