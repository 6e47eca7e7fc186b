// Registration of the o1kernels ops with the torch dispatcher (schemas + CPU kernels) and the
// pybind11 module o1kernels._C (loaded by o1kernels/_ext.py; importing it registers the ops).
//
// Destination-passing style: the outputs (Tensor(a!) ...) are allocated by the Python wrappers
// in o1kernels/_compiled.py and written in place; the ops return nothing, allocate nothing the
// caller sees and never synchronise with the host, so they trace under torch.compile (with the
// fake implementations in _compiled.py) and replay inside CUDA graphs.
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(o1kernels, m) {
  // Partial attention of every work item of a plan's split layout (PlanLayout in o1kernels/plan.py):
  // part_o [num_partials, Hq, D] fp32 (normalised), part_lse [num_partials, Hq]. seg_start [segments] and
  // q_pos [num_queries] (both or neither): keys masked by query position, within `window` when given;
  // softcap: scores -> softcap * tanh(scores / softcap).
  m.def(
      "tree_attention_partial(Tensor q, Tensor k_cache, Tensor v_cache, Tensor page_table, Tensor seg_page_start, "
      "Tensor seg_capacity, Tensor seg_lens, Tensor seg_queries, Tensor work_seg, Tensor work_kv_start, "
      "Tensor work_kv_end, Tensor work_q_start, Tensor work_q_end, Tensor work_out, Tensor? seg_start, "
      "Tensor? q_pos, int max_work_queries, float sm_scale, int? window, float? softcap, Tensor(a!) part_o, "
      "Tensor(b!) part_lse) -> ()");
  // Log-sum-exp merge of each query's partial slots (CSR) into o [N, H, D], lse [N, H] fp32; sinks [H] fp32:
  // one more logit per head in each denominator (a key with value 0).
  m.def(
      "merge_partials(Tensor part_o, Tensor part_lse, Tensor query_slot_indptr, Tensor query_slots, Tensor? sinks, "
      "Tensor(a!) o, Tensor(b!) lse) -> ()");
  // Merge of two attention states over disjoint key sets (o_a, o_b, o in one dtype).
  m.def("merge_states(Tensor o_a, Tensor lse_a, Tensor o_b, Tensor lse_b, Tensor(a!) o, Tensor(b!) lse) -> ()");
  // Fused PRM step rewards; padded (hidden [Bs, L, Hd]) or packed (hidden [T, Hd] + cu_seqlens).
  m.def(
      "step_rewards(Tensor hidden, Tensor step_mask, Tensor? cu_seqlens, Tensor weight, Tensor? bias, "
      "Tensor? norm_weight, float norm_eps, Tensor? mlp_weight, Tensor? mlp_bias, str activation, "
      "int positive_index, str aggregate, Tensor(a!) step_scores, Tensor(b!) chain_scores) -> ()");
}

TORCH_LIBRARY_IMPL(o1kernels, CPU, m) {
  m.impl("tree_attention_partial", &o1k::bindings::tree_attention_partial_cpu);
  m.impl("merge_partials", &o1k::bindings::merge_partials_cpu);
  m.impl("merge_states", &o1k::bindings::merge_states_cpu);
  m.impl("step_rewards", &o1k::bindings::step_rewards_cpu);
}

#ifndef O1K_WITH_CUDA
#define O1K_WITH_CUDA 0
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "o1kernels compiled ops, registered as torch.ops.o1kernels.*";
  m.attr("WITH_CUDA") = pybind11::bool_(O1K_WITH_CUDA != 0);
}
