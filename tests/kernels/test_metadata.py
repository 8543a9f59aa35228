"""Metadata: the persistent plan kernel and kv-indices kernel against their torch references."""
import random

import pytest
import torch

from mla_runner.kernels import mla_decode_sm90 as sm90
from mla_runner.kernels.metadata import (
    SLACK_DIV,
    PersistentMetadataBuilder,
    PerStepMetadataBuilder,
    device_dram_ratio,
    scaled_dram_ratio,
)
from mla_runner.kernels.plan_kernels import build_kv_indices
from mla_runner.kernels.reference import kv_indices_reference, narrowest_width, width_candidates
from mla_runner.kernels.synthetic import make_problem
from mla_testing.numerics import plan_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _check_plan(meta, seq_lens, q_lens, builder):
    ref = plan_reference(builder, seq_lens, q_lens)
    B = len(seq_lens)
    assert meta.kv_indptr.tolist() == ref["kv_indptr"]
    assert meta.max_qo_len.item() == ref["max_qo_len"] == max(q_lens)
    assert meta.cu_cost.tolist() == ref["cu_cost"]
    assert meta.part_bounds.tolist() == ref["part_bounds"]
    assert meta.part_reqs.flatten().tolist() == ref["part_reqs"]
    assert meta.num_splits.tolist() == ref["num_splits"]
    active = [b for b in range(B) if ref["num_splits"][b] > 0]
    assert [meta.first_part.tolist()[b] for b in active] == [ref["first_part"][b] for b in active]
    assert meta.split_indptr.tolist() == ref["split_indptr"]
    n = meta.num_merge.item()
    assert n == ref["num_merge"]
    assert meta.merge_reqs[:n].tolist() == ref["merge_reqs"]
    assert ref["num_slots"] <= meta.o_partial.shape[0]
    assert n <= meta.max_merges


@pytest.mark.parametrize("seed", range(24))
def test_persistent_plan_matches_reference(seed):
    rng = random.Random(seed)
    B = rng.randint(1, 40)
    seq_lens = [rng.choice([0, 1, 64, 128, rng.randint(1, 3000), rng.randint(1, 300)]) for _ in range(B)]
    q_lens = [rng.choice([0, 1, 1, 2, 3]) for _ in range(B)]
    if seed == 0:
        seq_lens[-1], q_lens[-1] = 20000, 1  # one long request among short ones, last
    pb = make_problem(seq_lens, q_lens, 2, 64, kv_lora_rank=16, rope_dim=0, device=DEVICE, dtype=torch.float32)
    builder = PersistentMetadataBuilder(num_heads=2, max_batch=64, max_q_len=3, max_pages_per_seq=pb.max_pages,
                                        page_size=64, device=DEVICE, kv_lora_rank=16,
                                        num_parts=rng.choice([1, 3, 16, 132]), min_chunk=rng.choice([1, 4]),
                                        snap_div=rng.choice([0, 2, 4]), snap_max=rng.choice([1, 4, 1000]),
                                        max_kv_splits=rng.choice([None, 1, 2, 5]),
                                        split_cost=rng.choice([0, 4, 100]), slack_div=rng.choice([None, 0, 4, 64]))
    meta = builder.build(pb.seq_lens, pb.qo_indptr, pb.block_table)
    _check_plan(meta, seq_lens, q_lens, builder)
    if builder.max_kv_splits:
        assert max(meta.num_splits.tolist()) <= max(builder.max_kv_splits, 2)


@pytest.mark.parametrize("seed", range(8))
def test_packed_plan_matches_reference(seed):
    # many requests of similar length (the packed plan's domain) with padding slots among them
    rng = random.Random(100 + seed)
    B = rng.randint(20, 64)
    base = rng.choice([64, 300, 1024, 2048])
    seq_lens = [0 if rng.random() < 0.15 else rng.randint(base, base + base // 3) for _ in range(B)]
    q_lens = [rng.choice([0, 1, 1, 1, 2]) if L else 1 for L in seq_lens]
    pb = make_problem(seq_lens, q_lens, 2, 64, kv_lora_rank=16, rope_dim=0, device=DEVICE, dtype=torch.float32)
    builder = PersistentMetadataBuilder(num_heads=2, max_batch=64, max_q_len=2, max_pages_per_seq=pb.max_pages,
                                        page_size=64, device=DEVICE, kv_lora_rank=16,
                                        num_parts=rng.choice([3, 7, 16]), split_cost=rng.choice([2, 4, 8]),
                                        slack_div=rng.choice([0, 8]))
    meta = builder.build(pb.seq_lens, pb.qo_indptr, pb.block_table)
    _check_plan(meta, seq_lens, q_lens, builder)


def test_persistent_plan_balances_long_request():
    seq_lens, q_lens = [16384] + [256] * 31, [1] * 32
    pb = make_problem(seq_lens, q_lens, 1, 64, kv_lora_rank=16, rope_dim=0, device=DEVICE, dtype=torch.float32)
    builder = PersistentMetadataBuilder(num_heads=64, max_batch=32, max_q_len=1, max_pages_per_seq=pb.max_pages,
                                        page_size=64, device=DEVICE, kv_lora_rank=16, num_parts=16,
                                        min_chunk=1, snap_div=0)
    meta = builder.build(pb.seq_lens, pb.qo_indptr, pb.block_table)
    _check_plan(meta, seq_lens, q_lens, builder)
    bounds = meta.part_bounds.tolist()
    sizes = [bounds[p + 1] - bounds[p] for p in range(16)]
    assert len(set(sizes[:-1])) == 1 and sizes[-1] <= sizes[0]  # equal slices of the total cost
    assert meta.num_splits.tolist()[0] >= 8  # the long request spreads over most parts


def test_slack_keeps_long_requests_whole():
    # 64 requests of 16k at 128 heads over 66 parts: slices of 251 units would cut every request once; whole
    # requests take 258 units (256 blocks + overhead), over the slice + overhead + split_cost by one unit and within
    # its 1/64 slack (251 // 64 = 3): with the default slack, one request a part and nothing to merge; without,
    # the slices. Bad values are refused.
    seq_lens, q_lens = [16384] * 64, [1] * 64
    sl = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    qo = torch.arange(65, dtype=torch.int32, device=DEVICE)
    bt = torch.zeros(64, 256, dtype=torch.int32, device=DEVICE)
    kw = dict(num_heads=128, max_batch=64, max_q_len=1, max_pages_per_seq=256, page_size=64, device=DEVICE,
              num_parts=66, dram_ratio=84)
    for slack_div, merges, widest in ((None, 0, 258), (0, 64, 251)):
        builder = PersistentMetadataBuilder(**kw, slack_div=slack_div)
        meta = builder.build(sl, qo, bt)
        _check_plan(meta, seq_lens, q_lens, builder)
        bounds = meta.part_bounds.tolist()
        assert meta.num_merge.item() == merges and max(b - a for a, b in zip(bounds, bounds[1:])) == widest
    # 16 heads: the sm90 kernel pads them to 64-row tiles on an H100 (the slack), the generic kernel's small tiles
    # elsewhere (none); no DRAM floor either way
    h16 = PersistentMetadataBuilder(**dict(kw, num_heads=16, dram_ratio=None))
    sm90_tiles = sm90.device_reason(h16.device, 64, h16.plan_block) is None
    assert (h16.slack_div, h16.dram_ratio) == (SLACK_DIV if sm90_tiles else 0, 0)
    with pytest.raises(ValueError, match="slack_div must be >= 0"):
        PersistentMetadataBuilder(**kw, slack_div=-1)


def test_packed_plan_keeps_short_requests_whole():
    # 128 equal requests of 18 units over 66 parts (slices of 35 units would cut ~every other one): whole
    # requests, one or two a part; a mix of two lengths too
    for seq_lens in ([1024] * 128, [2048, 1024] * 64):
        q_lens = [1] * len(seq_lens)
        pb = make_problem(seq_lens, q_lens, 1, 64, kv_lora_rank=16, rope_dim=0, device=DEVICE, dtype=torch.float32)
        builder = PersistentMetadataBuilder(num_heads=128, max_batch=128, max_q_len=1, max_pages_per_seq=pb.max_pages,
                                            page_size=64, device=DEVICE, kv_lora_rank=16, num_parts=66)
        meta = builder.build(pb.seq_lens, pb.qo_indptr, pb.block_table)
        _check_plan(meta, seq_lens, q_lens, builder)
        assert meta.num_merge.item() == 0 and meta.num_splits.tolist() == [1] * len(seq_lens)
        bounds = meta.part_bounds.tolist()
        chunk = -(-bounds[-1] // 66)
        assert max(bounds[p + 1] - bounds[p] for p in range(66)) <= chunk + builder.split_cost


def test_snapping_avoids_cutting_short_requests():
    # the same 128 requests with split_cost 0 (no packing: a part of 36 units is over the slice of 35):
    # plain slices cut ~every other request, snapped ones none
    seq_lens, q_lens = [1024] * 128, [1] * 128
    pb = make_problem(seq_lens, q_lens, 1, 64, kv_lora_rank=16, rope_dim=0, device=DEVICE, dtype=torch.float32)
    n_merge = {}
    for snap_div in (0, 2):
        builder = PersistentMetadataBuilder(num_heads=1, max_batch=128, max_q_len=1, max_pages_per_seq=pb.max_pages,
                                            page_size=64, device=DEVICE, kv_lora_rank=16, num_parts=66,
                                            snap_div=snap_div, snap_max=1000, split_cost=0)
        meta = builder.build(pb.seq_lens, pb.qo_indptr, pb.block_table)
        _check_plan(meta, seq_lens, q_lens, builder)
        n_merge[snap_div] = meta.num_merge.item()
        bounds = meta.part_bounds.tolist()
        assert max(bounds[p + 1] - bounds[p] for p in range(66)) <= 35 + 35 // 2
    assert n_merge[0] > 50 and n_merge[2] == 0, n_merge


@pytest.mark.parametrize("lens, parts, want", [
    ([4096] * 64, 66, [1] * 64),  # equal requests that fit one a part: none cut (slices of 64 units cut 62)
    ([4096] * 64, 132, [2] * 64),  # twice the parts: each cut in two (slices of 32 units cut most in three)
    ([4096] * 8, 132, [10] * 8),  # the DRAM floor (7 blocks a part): 10 pieces of 6-7 blocks cut less than 16 of 4
    ([1024] * 64, 132, [1] * 64),  # DRAM floor (13 blocks): whole on 64 parts, not cut in two (H100: 56 -> 50 us)
    ([16384], 132, [64]),  # min_chunk 4: 64 parts of 4 blocks
    ([4096], 132, [32]),  # little KV: 32 parts of 2 blocks (narrowest_width)
    ([4096] + [256] * 7, 132, [32] + [2] * 7),  # (at H = 128, 66 parts, width 4: [16] + [1] * 7)
    ([1024], 132, [16]),  # 16 parts of one block
])
def test_per_request_plan_cuts_equal_requests_evenly(lens, parts, want):
    pb = make_problem(lens, [1] * len(lens), 1, 64, kv_lora_rank=16, rope_dim=0, device=DEVICE, dtype=torch.float32)
    builder = PersistentMetadataBuilder(num_heads=64, max_batch=len(lens), max_q_len=1,
                                        max_pages_per_seq=pb.max_pages, page_size=64, device=DEVICE,
                                        kv_lora_rank=16, num_parts=parts)
    meta = builder.build(pb.seq_lens, pb.qo_indptr, pb.block_table)
    _check_plan(meta, lens, [1] * len(lens), builder)
    assert meta.num_splits.tolist() == want
    bounds = meta.part_bounds.tolist()
    sizes = sorted(bounds[p + 1] - bounds[p] for p in range(parts))
    assert sizes[-1] - min(s for s in sizes if s > 0) <= builder.overhead  # balanced (part 0 of each has the overhead)


@pytest.mark.parametrize("kv, tiles, parts, want", [
    ([16], 1, 132, 1),  # one 1k request: 16 parts of a block
    ([64], 1, 132, 2),  # 4k: 32 of two
    ([256], 1, 132, 4),  # 16k: 64 of four (two blocks would be 128 cut pieces)
    ([64], 2, 66, 3),  # 4k at H = 128: 22 of three
    ([16] * 8, 1, 132, 2),  # eight 1k requests: 64 parts of two (ties with 3 and 4 go to the smaller)
    ([64] + [4] * 7, 2, 66, 4),  # a long request among short ones: widths under 4 would cut the short ones too
    ([16] + [1] * 31, 1, 132, 1),  # requests of one block are never cut
    ([400] * 2, 1, 132, 4),  # nothing under min_chunk fits the parts: min_chunk (the search goes on from it)
])
def test_narrowest_width_weighs_longest_piece_against_cut_pieces(kv, tiles, parts, want):
    assert narrowest_width(kv, tiles, 4, 16, parts) == want
    assert narrowest_width(kv, tiles, 4, 0, parts) == 4  # cut_ratio 0: min_chunk
    assert narrowest_width(kv, tiles, 1, 16, parts) == 1


@pytest.mark.parametrize("kv, tiles, parts, want", [
    ([16] * 64, 1, 132, 16),  # 64 x 1k: the DRAM needs 13 blocks of a part's time anyway; cut in two buys nothing
    ([256] + [16] * 31, 1, 132, 8),  # 8 (two pieces of each short request) over the narrowest fit, 7 (three)
    ([16] + [1] * 63, 2, 66, 6),  # a floor of one block: the narrowest fit, as without the floor
    ([256], 1, 132, 4),  # one 16k request: the floor (4 blocks) changes nothing
    ([256] * 128, 1, 132, 256),  # fits one a part: whole
])
def test_narrowest_width_with_a_dram_floor(kv, tiles, parts, want):
    assert narrowest_width(kv, tiles, 4, 16, parts, dram_ratio=84) == want
    ws = width_candidates(kv, 4, 84, parts)
    assert ws[:8] == list(range(1, 9)) and ws[-1] == max(max(kv), 8) and ws == sorted(set(ws))
    assert width_candidates(kv, 4, 0, parts) == [1, 2, 3, 4]


@pytest.mark.parametrize("heads, dram_ratio, ratio, want", [
    (64, 84, 84, [1] * 64), (64, 0, 0, [2] * 64), (16, None, 0, [2] * 64), (16, 84, 84, [1] * 64),
    (64, None, 84 if DEVICE == "cpu" else None, None),
])
def test_dram_floor_keeps_requests_whole_where_the_dram_bounds_the_step(heads, dram_ratio, ratio, want):
    # H = 64, 64 x 1k: cut in two, the DRAM still needs 13 blocks of a part's time, so they run whole on 64
    # parts; by default builders for head counts below whole 64-row tiles (H = 16) leave the floor off (their cuts
    # write partials of their own rows only), and the others take the device's ratio (the H100's off CUDA)
    lens = [1024] * 64
    pb = make_problem(lens, [1] * 64, 1, 64, kv_lora_rank=16, rope_dim=0, device=DEVICE, dtype=torch.float32)
    builder = PersistentMetadataBuilder(num_heads=heads, max_batch=64, max_q_len=1, max_pages_per_seq=pb.max_pages,
                                        page_size=64, device=DEVICE, kv_lora_rank=16, num_parts=132,
                                        dram_ratio=dram_ratio)
    assert builder.dram_ratio == (device_dram_ratio(DEVICE) if ratio is None else ratio)
    meta = builder.build(pb.seq_lens, pb.qo_indptr, pb.block_table)
    _check_plan(meta, lens, [1] * 64, builder)  # the reference plan with the builder's ratio
    if want is not None:
        assert meta.num_splits.tolist() == want


@pytest.mark.parametrize("props, want", [
    (dict(mem_clock_rate=2619000, mem_bus_width=5120, sm_clock_rate=1980000), 84),  # H100 SXM, where it was measured
    (dict(mem_clock_rate=2619000, mem_bus_width=5120, sm_clock_rate=990000), 168),  # half the clock: blocks take 2x
    (dict(mem_clock_rate=3201000, mem_bus_width=6144, sm_clock_rate=1980000), 123),  # 4.92 TB/s at the same clock
])
def test_dram_ratio_scales_with_the_bandwidth_and_the_sm_clock(props, want):
    assert scaled_dram_ratio(props) == want
    with pytest.raises(ValueError, match="dram_ratio must be >= 0"):
        PersistentMetadataBuilder(num_heads=64, max_batch=1, max_q_len=1, max_pages_per_seq=1, page_size=64,
                                  device=DEVICE, dram_ratio=-1)


@pytest.mark.parametrize("lens, heads, q_len, cut_ratio", [
    ([1024], 64, 1, 16), ([4096], 128, 1, 16), ([4096], 64, 2, 16), ([1024] + [64] * 31, 64, 1, 16),
    ([4096] * 8, 128, 1, 16), ([4096] + [256] * 7, 128, 1, 16), ([1024], 64, 1, 0), ([3000, 70, 5], 16, 3, 16),
])
def test_per_request_width_adapts_to_little_kv(lens, heads, q_len, cut_ratio):
    # the plan kernel's width matches the reference's, which follows narrowest_width; cut_ratio 0: min_chunk
    qls = [q_len] * len(lens)
    pb = make_problem(lens, qls, 1, 64, kv_lora_rank=16, rope_dim=0, device=DEVICE, dtype=torch.float32)
    builder = PersistentMetadataBuilder(num_heads=heads, max_batch=len(lens), max_q_len=q_len,
                                        max_pages_per_seq=pb.max_pages, page_size=64, device=DEVICE,
                                        kv_lora_rank=16, num_parts=132 // -(-heads * q_len // 64),
                                        cut_ratio=cut_ratio)
    meta = builder.build(pb.seq_lens, pb.qo_indptr, pb.block_table)
    _check_plan(meta, lens, qls, builder)
    kv = [-(-L // 64) for L in lens]
    w = narrowest_width(kv, builder.tiles, builder.min_chunk, cut_ratio, builder.num_parts, builder.dram_ratio)
    while sum(-(-n // w) for n in kv) > builder.num_parts:
        w += 1
    assert meta.num_splits.tolist() == [-(-n // w) for n in kv]


def test_slices_when_one_request_is_long():
    # one 32k request among 63 of 512 over 66 parts: one part per short request leaves the long one 3 parts
    # (171 blocks each), so the plan slices the total instead
    lens = [32768] + [512] * 63
    pb = make_problem(lens, [1] * 64, 1, 64, kv_lora_rank=16, rope_dim=0, device=DEVICE, dtype=torch.float32)
    builder = PersistentMetadataBuilder(num_heads=128, max_batch=64, max_q_len=1, max_pages_per_seq=pb.max_pages,
                                        page_size=64, device=DEVICE, kv_lora_rank=16, num_parts=66)
    meta = builder.build(pb.seq_lens, pb.qo_indptr, pb.block_table)
    _check_plan(meta, lens, [1] * 64, builder)
    bounds = meta.part_bounds.tolist()
    assert max(bounds[p + 1] - bounds[p] for p in range(66)) <= -(-(514 + 63 * 10) // 66) + 4
    assert meta.num_splits.tolist()[0] > 20


def test_max_qo_len_is_max_over_all_requests():
    seq_lens, q_lens = [50, 60, 70], [1, 4, 2]  # the longest q is in the middle
    pb = make_problem(seq_lens, q_lens, 1, 16, kv_lora_rank=16, rope_dim=0, device=DEVICE, dtype=torch.float32)
    kw = dict(num_heads=1, max_batch=4, max_q_len=4, max_pages_per_seq=pb.max_pages, page_size=16, device=DEVICE,
              kv_lora_rank=16)
    persistent = PersistentMetadataBuilder(**kw).build(pb.seq_lens, pb.qo_indptr, pb.block_table)
    per_step = PerStepMetadataBuilder(**kw).build(pb.seq_lens, pb.qo_indptr, pb.block_table, seq_lens, q_lens)
    assert persistent.max_qo_len.item() == per_step.max_qo_len.item() == 4


def test_persistent_rebuild_in_place_same_buffers():
    builder = PersistentMetadataBuilder(num_heads=4, max_batch=8, max_q_len=1, max_pages_per_seq=20, page_size=16,
                                        device=DEVICE, kv_lora_rank=16, num_parts=4, min_chunk=1)
    ptrs = None
    for seed, lens in enumerate([[5, 300, 17], [200, 1, 1, 1, 1, 1, 1, 0], [320]]):
        pb = make_problem(lens, [1] * len(lens), 4, 16, kv_lora_rank=16, rope_dim=0, device=DEVICE,
                          dtype=torch.float32, max_pages=20, seed=seed)
        meta = builder.build(pb.seq_lens, pb.qo_indptr, pb.block_table)
        _check_plan(meta, lens, [1] * len(lens), builder)
        p = (meta.kv_indptr.data_ptr(), meta.part_bounds.data_ptr(), meta.o_partial.data_ptr())
        assert ptrs is None or p == ptrs
        ptrs = p


@pytest.mark.parametrize("page", [1, 16, 64])
def test_kv_indices_match_reference(page):
    seq_lens = [1, 64, 0, 200, 33]
    pb = make_problem(seq_lens, [1] * 5, 1, page, kv_lora_rank=16, rope_dim=0, device=DEVICE, dtype=torch.float32)
    builder = PersistentMetadataBuilder(num_heads=1, max_batch=8, max_q_len=1, max_pages_per_seq=pb.max_pages,
                                        page_size=page, device=DEVICE, kv_lora_rank=16)
    meta = builder.build(pb.seq_lens, pb.qo_indptr, pb.block_table)
    ref = kv_indices_reference(pb.seq_lens.cpu(), pb.block_table.cpu(), page)
    out = torch.zeros(sum(seq_lens), dtype=torch.int32, device=DEVICE)
    build_kv_indices(pb.seq_lens, meta.kv_indptr, pb.block_table, page, out)
    assert out.cpu().tolist() == ref.tolist()
    per_step = PerStepMetadataBuilder(num_heads=1, max_batch=8, max_q_len=1, max_pages_per_seq=pb.max_pages,
                                      page_size=page, device=DEVICE, kv_lora_rank=16)
    m2 = per_step.build(pb.seq_lens, pb.qo_indptr, pb.block_table, seq_lens, [1] * 5)
    assert m2.kv_indptr.tolist() == meta.kv_indptr.tolist()


def test_builder_errors():
    with pytest.raises(ValueError, match="page_size"):
        PersistentMetadataBuilder(num_heads=1, max_batch=1, max_q_len=1, max_pages_per_seq=1, page_size=24,
                                  device=DEVICE)
    b = PersistentMetadataBuilder(num_heads=1, max_batch=2, max_q_len=1, max_pages_per_seq=4, page_size=16,
                                  device=DEVICE)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="max_batch"):
        b.build(torch.ones(3, **i32), torch.arange(4, **i32), torch.zeros(3, 4, **i32))
    with pytest.raises(ValueError, match="int32"):
        b.build(torch.ones(2, dtype=torch.int64, device=DEVICE), torch.arange(3, **i32), torch.zeros(2, 4, **i32))
    with pytest.raises(ValueError, match="qo_indptr"):
        b.build(torch.ones(2, **i32), torch.arange(2, **i32), torch.zeros(2, 4, **i32))
    p = PerStepMetadataBuilder(num_heads=1, max_batch=2, max_q_len=1, max_pages_per_seq=4, page_size=16,
                               device=DEVICE)
    with pytest.raises(ValueError, match="host lists"):
        p.build(torch.ones(2, **i32), torch.arange(3, **i32), torch.zeros(2, 4, **i32), [1], [1, 1])
    with pytest.raises(ValueError, match="num_kv_splits"):
        PerStepMetadataBuilder(num_heads=1, max_batch=2, max_q_len=1, max_pages_per_seq=4, page_size=16,
                               device=DEVICE, num_kv_splits=0)


@pytest.mark.parametrize("seed", range(4))
def test_per_step_plan_matches_reference(seed):
    """The O(B + parts) host plan of per_step equals the enumerating reference: min(splits, blocks) equal
    pieces per request."""
    from mla_runner.kernels.metadata import per_step_plan
    from mla_runner.kernels.reference import per_request_plan, request_costs

    rng = random.Random(seed)
    B = rng.randint(1, 30)
    seq_lens = [rng.choice([0, 1, 64, 65, rng.randint(1, 5000)]) for _ in range(B)]
    q_lens = [rng.choice([0, 1, 2]) for _ in range(B)]
    splits = rng.choice([1, 3, 4])
    plan = per_step_plan(seq_lens, q_lens, num_kv_splits=splits)
    costs = request_costs(seq_lens, q_lens, 64, 2)
    ref = per_request_plan(costs, 2, [min(splits, c - 2) if c else 0 for c in costs], len(plan["part_bounds"]) - 1)
    for k in ("part_bounds", "cu_cost", "part_reqs", "num_splits", "split_indptr", "merge_reqs", "num_merge",
              "num_slots"):
        assert plan[k] == ref[k], k
    active = [b for b in range(B) if ref["num_splits"][b]]
    assert [plan["first_part"][b] for b in active] == [ref["first_part"][b] for b in active]


def test_persistent_drops_out_of_bounds_requests():
    """q_len > max_q_len or seq_len > the block table's row: planned as padding (no KV, no work), flagged on the GPU
    without a sync, and ``check`` raises once per flag (once the stream has passed the build)."""
    lens, q_lens = [50, 40, 30, 20], [1, 1, 3, 1]
    pb = make_problem(lens, q_lens, 2, 16, kv_lora_rank=16, rope_dim=0, device=DEVICE, dtype=torch.float32)
    builder = PersistentMetadataBuilder(num_heads=2, max_batch=4, max_q_len=2, max_pages_per_seq=pb.max_pages,
                                        page_size=16, device=DEVICE, kv_lora_rank=16, num_parts=3,
                                        min_chunk=1)
    seq_lens = pb.seq_lens.clone()
    seq_lens[1] = pb.max_pages * 16 + 1  # one token past its row
    meta = builder.build(seq_lens, pb.qo_indptr, pb.block_table)
    # the plan of the same step with the dropped requests' seq_len 0 (request 1: KV over its row, request 2: q_len
    # over max_q_len); max_qo_len still counts every request
    kept = [50, 0, 0, 20]
    ref = plan_reference(builder, kept, q_lens)
    for k in ("kv_indptr", "cu_cost", "part_bounds", "part_reqs", "num_splits", "split_indptr"):
        assert getattr(meta, k).flatten().tolist() == ref[k], k
    assert meta.kv_indptr.tolist() == [0, 50, 50, 50, 70]
    assert meta.max_qo_len.item() == 3
    ref = kv_indices_reference(torch.tensor(kept), pb.block_table.cpu(), 16)
    kv_indices = torch.zeros(70, dtype=torch.int32, device=DEVICE)
    assert build_kv_indices(seq_lens, meta.kv_indptr, pb.block_table, 16, kv_indices).cpu().tolist() == ref.tolist()
    assert meta.dropped.item() == 3
    with pytest.raises(ValueError, match="q_len over max_q_len=2 and a seq_len over"):
        builder.check()
    builder.check()  # the flag was reset
    meta = builder.build(pb.seq_lens, pb.qo_indptr, pb.block_table)  # request 2 alone is over now
    if DEVICE == "cuda":
        torch.cuda.synchronize()  # check() reads the flag's host copy, which the build refreshes asynchronously
    with pytest.raises(ValueError, match="^MLA metadata dropped requests .*: a q_len over max_q_len=2$"):
        builder.check()
    per_step = PerStepMetadataBuilder(num_heads=2, max_batch=4, max_q_len=3, max_pages_per_seq=pb.max_pages,
                                      page_size=16, device=DEVICE, kv_lora_rank=16)
    with pytest.raises(ValueError, match="seq_len of 65 exceeds the 64 tokens a block-table row maps"):
        per_step.build(seq_lens, pb.qo_indptr, pb.block_table, seq_lens.tolist(), q_lens)

