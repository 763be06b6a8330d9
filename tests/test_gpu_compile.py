"""The GPU compile check: its scheduled-HLO analysis, and (with the CUDA plugin) the deviceless H100 compile."""

import pytest

from dsv3_jax import config
from dsv3_jax import sharding
from experiments import gpu_compile_check as check

SCHEDULED_HLO = """\
HloModule jit_step, is_scheduled=true

%fused_mul (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  ROOT %m = f32[8]{0} multiply(%p0, %p0)
}

%body.sunk.clone (param: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %param = (s32[], bf16[4,8]{1,0}) parameter(0)
  %x = bf16[4,8]{1,0} get-tuple-element(%param), index=1
  %a2a-start.1 = ((bf16[4,8]{1,0}), bf16[4,8]{1,0}) all-to-all-start(%x), channel_id=1, \
metadata={op_name="jit(step)/jvp(Transformer)/moe_layers/ffn/experts/shard_map/all_to_all"}, \
backend_config={"collective_backend_config":{"is_sync":false}}
  %fusion.1 = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_mul
  %gemm.2 = (f32[8,8]{1,0}, s8[0]{0}) custom-call(%x, %x), custom_call_target="__cublas$gemm"
  %bitcast.3 = f32[8]{0} bitcast(%fusion.1)
  %a2a-done.1 = bf16[4,8]{1,0} all-to-all-done(%a2a-start.1)
  %i = s32[] get-tuple-element(%param), index=0
  ROOT %t = (s32[], bf16[4,8]{1,0}) tuple(%i, %a2a-done.1)
}

%body.sunk (param: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  ROOT %param = (s32[], bf16[4,8]{1,0}) parameter(0)
}

ENTRY %main (x: f32[8]) -> f32[64] {
  %x = f32[8]{0} parameter(0)
  %ar-start = f32[8]{0} all-reduce-start(%x), to_apply=%add, \
backend_config={"collective_backend_config":{"is_sync":true}}
  %ar-done = f32[8]{0} all-reduce-done(%ar-start), \
metadata={op_name="transpose(jvp(Transformer))/gate/dot_general"}
  %w = (s32[], bf16[4,8]{1,0}) while(%t0), condition=%cond, body=%body.sunk.clone, \
metadata={op_name="jit(step)/jvp(Transformer)/Transformer._trunk/while"}
  ROOT %ag = f32[64]{0} all-gather(%x), dimensions={0}
}
"""


def test_schedule_analysis_pairs_collectives_and_the_work_between():
  loop_a2a, entry_ar = check.async_collectives(SCHEDULED_HLO)
  # The all-to-all in the loop body (named after its while loop, not the similarly named computation):
  assert loop_a2a.computation == "loop (fwd Transformer._trunk)"
  assert (loop_a2a.kind, loop_a2a.start, loop_a2a.result_bytes) == ("all-to-all", "a2a-start.1", 4 * 8 * 2)
  assert loop_a2a.source == "fwd ffn/experts/shard_map/all_to_all"  # the last four components
  assert loop_a2a.between == ("fusion", "gemm")  # the bitcast is bookkeeping
  assert loop_a2a.overlapped and not loop_a2a.sync
  # The entry all-reduce: nothing between start and done, marked synchronous, source from the done.
  assert (entry_ar.computation, entry_ar.kind, entry_ar.between) == ("ENTRY", "all-reduce", ())
  assert entry_ar.sync and not entry_ar.overlapped
  assert entry_ar.source == "bwd gate/dot_general"
  assert check.synchronous_collectives(SCHEDULED_HLO) == [("ENTRY", "all-gather")]
  report = check.format_report([loop_a2a, entry_ar], check.synchronous_collectives(SCHEDULED_HLO))
  assert "| loop (fwd Transformer._trunk) | all-to-all | 64 | fwd ffn/experts/shard_map/all_to_all | " \
         "1 fusion, 1 gemm | yes |" in report
  assert "2 async collectives, 1 with compute scheduled between start and done; 1 synchronous" in report


def test_schedule_analysis_refuses_an_unfinished_collective():
  broken = SCHEDULED_HLO.replace("  %a2a-done.1 = bf16[4,8]{1,0} all-to-all-done(%a2a-start.1)\n", "")
  with pytest.raises(ValueError, match=r"never done: \['a2a-start.1'\]"):
    check.async_collectives(broken)


def test_mesh_flag_names_a_bad_axis():
  assert sharding.parse_sizes("data=2,expert=4") == {"data": 2, "expert": 4}
  with pytest.raises(sharding.MeshError, match="mesh entry 'experts=8'"):
    sharding.parse_sizes("experts=8")


@pytest.mark.skipif(not check.plugin_installed(),
                    reason="jax-cuda12-plugin is missing: pip install jax-cuda12-plugin==0.10.2 "
                           "jax-cuda12-pjrt==0.10.2 (a separate environment; see docs/EXPERT_PARALLEL.md)")
def test_expert_parallel_step_compiles_for_eight_h100s():
  """XLA's GPU compiler takes the EP step: ragged all-to-alls, async, with compute scheduled inside them."""
  cfg = config.tiny(dim=128, n_heads=4, inter_dim=256, moe_inter_dim=64, n_layers=2, n_dense_layers=1,
                    n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
                    n_mtp_layers=0, dtype="bfloat16", vocab_size=512)
  hlo = check.compile_step({"data": 2, "expert": 4}, batch=8, seq_len=64, cfg=cfg)
  collectives = check.async_collectives(hlo)
  ragged = [c for c in collectives if c.kind == "ragged-all-to-all"]
  # Forward: rows, ids, gates there and results back; backward: the three float ones transposed.
  assert len(ragged) == 7
  assert sum(c.kind == "all-to-all" for c in collectives) >= 3  # the count exchanges
  assert not check.synchronous_collectives(hlo)
  assert any(c.overlapped for c in ragged)


@pytest.mark.skipif(not check.plugin_installed(),
                    reason="jax-cuda12-plugin is missing: pip install jax-cuda12-plugin==0.10.2 "
                           "jax-cuda12-pjrt==0.10.2 (a separate environment; see docs/EXPERT_PARALLEL.md)")
def test_pipelined_step_compiles_for_four_h100s():
  """The DualPipeV step: async collective-permutes in the tick loop, expert all-to-alls inside the F&B branch."""
  hlo = check.compile_pipelined_step({"pipe": 2, "data": 1, "fsdp": 1, "expert": 2, "tensor": 1}, "dualpipev",
                                     microbatches=4, batch=4, seq_len=32)
  collectives = check.async_collectives(hlo)
  assert not check.synchronous_collectives(hlo)
  permutes = [c for c in collectives if c.kind == "collective-permute"]
  assert permutes and all(c.computation.startswith("loop") for c in permutes)
  fb = [c for c in collectives if c.computation.startswith("branch 5 of") and "all-to-all" in c.kind]
  assert fb and any(c.overlapped for c in fb)
