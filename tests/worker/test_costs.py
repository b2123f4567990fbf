"""The one cost model: the engine's fetch rule and the router's scores read the same terms."""

import math

from worker.costs import CostModel

LINK = CostModel(prefill_s_per_token=1e-3, transfer_s_per_block=1e-4, transfer_overhead_s=0.02, max_running=8)


def test_fetching_pays_from_the_crossover_on():
    n = math.ceil(LINK.crossover_blocks(16))  # 0.02 s / (16 ms - 0.1 ms) per block: 2 blocks
    assert n == 2 and not LINK.fetch_pays(n - 1, 16) and LINK.fetch_pays(n, 16)
    assert LINK.fetch_s(3) == 0.02 + 3 * 1e-4 and LINK.prefill_s(32) == 32 * 1e-3


def test_an_unmeasured_link_never_fetches_and_no_fetch_costs_nothing():
    c = CostModel()
    assert c.transfer_s_per_block == math.inf and not c.fetch_pays(100, 16)
    assert c.fetch_s(0) == 0.0 and c.crossover_blocks(16) == math.inf


def test_stats_round_trip_to_what_the_router_scores_with():
    d = LINK.to_dict(16)
    assert d["crossover_blocks"] == LINK.crossover_blocks(16)
    assert CostModel.from_dict(d) == LINK
    assert CostModel.from_dict(CostModel().to_dict(16)) == CostModel()  # inf survives too


def test_the_engine_measures_every_term_it_reports(demo_engine):
    c = demo_engine.costs
    assert 0 < c.prefill_s_per_token < 1 and 0 < c.promote_s_per_block < 1
    assert c.promote_s_per_block != CostModel().promote_s_per_block  # measured, not the router's assumption
    assert c.max_running == demo_engine.config.max_running
    assert CostModel.from_dict(demo_engine.stats()["costs"]) == c
