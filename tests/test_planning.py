"""The planner's model without running anything: SLA, predictions, simulation, planners."""

from __future__ import annotations

import dask
import pytest
from dask._task_spec import Task, TaskRef

from dask_serverless import Scheduler
from dask_serverless.graph import translate
from dask_serverless.planning import (
    SLA,
    CpuModel,
    Deadline,
    History,
    PlanInputs,
    Predictor,
    Timeline,
    make_planner,
    pinned_memory,
)
from dask_serverless.planning.history import function_identities
from dask_serverless.planning.predict import fit_line

CONFIGS = (512, 1024, 1769, 3008)
CPU = CpuModel(max_vcpus=2)


def work(*args):
    return 0


def light(*args):
    return 0


def chain_graph(length: int, name: str = "work") -> dict:
    graph = {(name, 0): Task((name, 0), work)}
    for i in range(1, length):
        graph[(name, i)] = Task((name, i), work, TaskRef((name, i - 1)))
    return graph


def history_of(samples: dict) -> History:
    """History with ``samples[(function, MB)] = [(input_bytes, output_bytes, exec_s), …]``."""
    return History(tasks={k: [list(s) for s in v] for k, v in samples.items()})


def inputs_for(graph: dict, keys, history: History, sla="p95", deadline=None) -> PlanInputs:
    dag = translate(graph, keys)
    functions = function_identities(dag)
    predictor = Predictor(history, SLA.parse(sla), CPU)
    return PlanInputs(
        dag=dag,
        functions=functions,
        predictor=predictor,
        configs=CONFIGS,
        sla=SLA.parse(sla),
        deadline=Deadline.parse(deadline),
        pinned=pinned_memory(dag, CONFIGS),
    )


# -- SLA and deadline ---------------------------------------------------------------------


def test_sla_parsing():
    assert SLA.parse("average").percentile is None
    assert SLA.parse("p95").percentile == 95
    assert str(SLA.parse("p99.9")) == "p99.9"
    for bad in ("p100", "p0", "fast", "95", "p-5"):
        with pytest.raises(ValueError):
            SLA.parse(bad)


def test_percentile_is_the_slow_side():
    times = [1.0, 1.0, 1.0, 1.0, 2.0]
    assert SLA.parse("p99").of_times(times) > SLA.parse("p50").of_times(times) == 1.0


def test_deadline_parsing():
    assert Deadline.parse(None).target(2.0) == 2.0
    assert Deadline.parse("fastest+10%").target(2.0) == pytest.approx(2.2)
    assert Deadline.parse("fastest+1s").target(2.0) == pytest.approx(3.0)
    assert Deadline.parse(5).target(2.0) == 5.0
    for bad in ("soon", "fastest*2", -1):
        with pytest.raises(ValueError):
            Deadline.parse(bad)


def test_scheduler_rejects_bad_planner_and_sla_before_anything_runs(redis_url):
    with pytest.raises(ValueError, match="unknown planner"):
        Scheduler(redis=redis_url, planner="fastest-please")
    with pytest.raises(ValueError, match="unparsable SLA"):
        Scheduler(redis=redis_url, sla="p150")
    with pytest.raises(ValueError, match="unparsable deadline"):
        Scheduler(redis=redis_url, deadline="tomorrow")


# -- predictions --------------------------------------------------------------------------


def test_constant_time_chain_is_predicted_constant():
    """The origin predicted a fixed 500 ms task at 500, 7754, 15007 … ms down a chain."""
    function = "work:tests.test_planning.work"
    samples = [(size, 1000, 0.5) for size in (0, 1000, 1000, 1000, 0, 1000)]
    inputs = inputs_for(chain_graph(6), ("work", 5), history_of({(function, 1769): samples}))
    column = CONFIGS.index(1769)
    assert [inputs.costs.exec_s[i][column] for i in range(6)] == pytest.approx([0.5] * 6)
    assert inputs.costs.input_bytes[5] == pytest.approx(1000)


def test_linear_fit_has_an_intercept():
    line = fit_line([0, 100, 200], [1.0, 2.0, 3.0])
    assert (line.intercept, line.slope) == pytest.approx((1.0, 0.01))
    assert fit_line([5, 5], [2.0, 2.0]).at(10**9) == pytest.approx(2.0)


def test_transfer_time_is_latency_plus_bytes_over_a_measured_bandwidth():
    """Counters of a few bytes show a latency, not a bandwidth: their jitter (1 ms at
    8 bytes, 5 ms at 32) must not extrapolate to seconds per megabyte."""
    counters = [[8, 0.001], [8, 0.001], [32, 0.005], [8, 0.002], [28, 0.001]]
    predictor = Predictor(History(transfers={1769: counters}), SLA.parse("average"), CPU)
    # The median latency, and the default 100 MB/s until a large transfer is measured.
    assert predictor.transfer_time(500_000, 1769) == pytest.approx(0.001 + 0.005)
    # Blocks of 1 MB at 10 ms beyond the latency, one of them slowed to 2 s by a busy
    # machine: the bandwidth is the median's, 100 MB/s.
    blocks = [[10**6, 0.011]] * 4 + [[10**6, 2.0]]
    predictor = Predictor(History(transfers={1769: counters + blocks}), SLA.parse("average"), CPU)
    assert predictor.transfer_time(2 * 10**6, 1769) == pytest.approx(0.001 + 0.02)


def test_cpu_share_scales_unmeasured_sizes():
    # CPU-bound at 1769 MB (CPU time = wall time): other sizes follow the CPU share.
    history = history_of({("f", 1769): [(0, 0, 1.0, 1.0, 0)] * 3})
    predictor = Predictor(history, SLA.parse("average"), CPU)
    assert predictor.exec_time("f", 0, 512) == pytest.approx(1769 / 512)
    assert predictor.exec_time("f", 0, 1024) == pytest.approx(1769 / 1024)
    # One thread cannot use more than one vCPU.
    assert predictor.exec_time("f", 0, 3008) == pytest.approx(1.0)


def test_a_sleeping_task_measured_at_one_size_is_the_same_at_every_size():
    """CPU time tells a sleep from a computation: memory buys a sleep nothing."""
    history = history_of({("s", 1769): [(0, 0, 0.2, 0.001, 0)] * 3})
    predictor = Predictor(history, SLA.parse("average"), CPU)
    for m in CONFIGS:
        assert predictor.exec_time("s", 0, m) == pytest.approx(0.2, rel=0.02)


def test_predictions_never_grow_with_memory_and_equal_speeds_are_pooled():
    """1 / 0.3 / 0.3 s at 512 / 1769 / 3008 MB with a slow outlier at 1769 MB."""
    samples = {
        ("f", 512): [(0, 0, 1.0, 0.29, 0)] * 3,
        ("f", 1769): [(0, 0, 0.3, 0.3, 0)] * 2 + [(0, 0, 0.6, 0.6, 0)],
        ("f", 3008): [(0, 0, 0.3, 0.3, 0)] * 3,
    }
    predictor = Predictor(history_of(samples), SLA.parse("average"), CPU)
    times = [predictor.exec_time("f", 0, m) for m in CONFIGS]
    assert times == sorted(times, reverse=True)
    # 1769 and 3008 MB give one vCPU to a single thread: one prediction for both.
    assert times[2] == pytest.approx(times[3])


def test_error_margins_are_relative():
    """A 3 ms task is not predicted at 14 ms because a 1 s task nearby is noisy."""
    samples = {("tiny", 1769): [(0, 0, 0.003, 0.003, 0)] * 5}
    samples[("big", 1769)] = [(0, 0, t, t, 0) for t in (1.0, 1.0, 1.2, 1.0, 1.4)]
    predictor = Predictor(history_of(samples), SLA.parse("p95"), CPU)
    assert predictor.exec_time("tiny", 0, 1769) == pytest.approx(0.003)
    assert max(predictor.ratios("big")) == pytest.approx(1.4 / 1.0)


def test_memory_need_comes_from_the_measured_peak_and_out_of_memory_sizes():
    history = History(
        tasks={
            ("m", 1769): [[0, 0, 0.1, 0.1, 700.0]] * 3,
            ("small", 1769): [[0, 0, 0.1, 0.1, 50.0]],
        },
        out_of_memory={"small": [512]},
    )
    predictor = Predictor(history, SLA.parse("average"), CPU)
    assert predictor.memory_need_mb("m", 0, 0) == pytest.approx(700 * 1.2)
    # It ran out of memory at 512 MB once: never planned there again.
    assert predictor.memory_need_mb("small", 0, 0) > 512


def test_two_predictors_share_nothing():
    slow = Predictor(history_of({("f", 1769): [(0, 0, 2.0)]}), SLA.parse("average"), CPU)
    fast = Predictor(history_of({("f", 1769): [(0, 0, 0.1)]}), SLA.parse("average"), CPU)
    assert slow.exec_time("f", 0, 512) != fast.exec_time("f", 0, 512)
    assert slow.exec_time("f", 0, 1769) == 2.0 and fast.exec_time("f", 0, 1769) == 0.1


# -- simulation ---------------------------------------------------------------------------


def fan_graph() -> dict:
    """A root fanning out to three chains of two, joined by one task."""
    graph = {"root": Task("root", work)}
    for b in range(3):
        graph[f"a{b}"] = Task(f"a{b}", work, TaskRef("root"))
        graph[f"b{b}"] = Task(f"b{b}", work, TaskRef(f"a{b}"))
    graph["join"] = Task("join", work, *(TaskRef(f"b{b}") for b in range(3)))
    return graph


def test_incremental_update_matches_a_full_simulation_and_touches_only_descendants():
    functions = set(function_identities(translate(fan_graph(), "join"))) - {""}
    samples = {(f, m): [(0, 10, 0.1 * 1769 / m)] for f in functions for m in CONFIGS}
    inputs = inputs_for(fan_graph(), "join", history_of(samples))
    dag = inputs.dag
    timeline = Timeline(dag, inputs.costs, [1769] * len(dag))
    target = dag.index["b1"]
    recomputed = timeline.set_memory(target, 512)
    memory = [1769] * len(dag)
    memory[target] = 512
    full = Timeline(dag, inputs.costs, memory)
    assert timeline.finish == pytest.approx(full.finish)
    assert timeline.cost_gb_s == pytest.approx(full.cost_gb_s)
    # b1, its sibling set under a1 (just b1), join, the sink: not the other chains.
    assert recomputed <= 4
    assert timeline.critical_path() == full.critical_path()
    assert dag.index["b1"] in timeline.critical_path()


def test_chain_runs_in_one_invocation():
    function = "work:tests.test_planning.work"
    history = history_of({(function, 1769): [(0, 0, 0.5)]})
    inputs = inputs_for(chain_graph(5), ("work", 4), history, sla="average")
    plan = make_planner("uniform").plan(inputs)
    assert len(plan.invocations()) == 1
    startup = inputs.predictor.startup(1769).cold_s
    assert plan.predicted_makespan_s == pytest.approx(startup + 5 * 0.5, rel=0.01)


# -- planners -----------------------------------------------------------------------------


def heavy_and_light() -> tuple[dict, History]:
    """A CPU-heavy chain of 4 next to light side tasks, all feeding one sink."""
    graph = chain_graph(4, "heavy")
    for b in range(4):
        graph[("light", b)] = Task(("light", b), light)
    graph["end"] = Task(
        "end", light, TaskRef(("heavy", 3)), *(TaskRef(("light", b)) for b in range(4))
    )
    heavy = "heavy:tests.test_planning.work"
    lightf = "light:tests.test_planning.light"
    endf = "end:tests.test_planning.light"
    samples = {}
    for m in CONFIGS:
        share = min(m / 1769, 1.0)
        # Half waiting, half computing: [input, output, wall, cpu, peak MB, CPU wait].
        samples[(heavy, m)] = [(0, 100, 0.5 + 0.5 / share, 0.5, 50, 0.5 / share - 0.5)] * 3
        samples[(lightf, m)] = [(0, 100, 0.05, 0.001, 50, 0)] * 3
        samples[(endf, m)] = [(0, 100, 0.05, 0.001, 50, 0)] * 3
    return graph, history_of(samples)


def test_critical_path_planner_downgrades_off_the_critical_path():
    graph, history = heavy_and_light()
    inputs = inputs_for(graph, "end", history)
    uniform = make_planner("uniform-3008").plan(inputs)
    plan = make_planner("critical-path").plan(inputs)
    dag = inputs.dag
    for b in range(4):
        assert plan.memory_mb[dag.index[("light", b)]] == 512
        assert not plan.on_critical_path(dag.index[("light", b)])
    for i in range(4):
        assert plan.memory_mb[dag.index[("heavy", i)]] == 1769
        assert plan.on_critical_path(dag.index[("heavy", i)])
    assert plan.quantile_s <= plan.target_s + 1e-9
    assert plan.predicted_makespan_s <= uniform.predicted_makespan_s * 1.01
    assert plan.predicted_cost_gb_s < 0.7 * uniform.predicted_cost_gb_s
    text = str(plan)
    assert "critical" in text and "('heavy', 0)" in text


def test_a_looser_deadline_downgrades_the_critical_path_too():
    graph, history = heavy_and_light()
    fastest = make_planner("critical-path").plan(inputs_for(graph, "end", history))
    loose = make_planner("critical-path").plan(
        inputs_for(graph, "end", history, deadline="fastest+100%")
    )
    assert loose.predicted_cost_gb_s < fastest.predicted_cost_gb_s
    assert loose.predicted_makespan_s <= 2 * fastest.predicted_makespan_s + 1e-9
    assert min(loose.memory_mb[i] for i in range(4)) < 1769


def test_p99_plans_more_conservatively_than_p50():
    graph = chain_graph(4, "noisy")
    function = "noisy:tests.test_planning.work"
    times = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 1.5]
    samples = {
        (function, m): [(0, 0, t / 2 + t / 2 * 1769 / min(m, 1769)) for t in times] for m in CONFIGS
    }
    history = history_of(samples)
    deadline = 10.0
    p50 = make_planner("critical-path").plan(
        inputs_for(graph, ("noisy", 3), history, "p50", deadline)
    )
    p99 = make_planner("critical-path").plan(
        inputs_for(graph, ("noisy", 3), history, "p99", deadline)
    )
    # Each keeps the deadline in its own statistic of the makespan's distribution.
    assert p99.quantile_s <= deadline and p50.quantile_s <= deadline
    assert p99.predicted_cost_gb_s > p50.predicted_cost_gb_s
    assert sum(p99.memory_mb[:4]) > sum(p50.memory_mb[:4])


def test_no_history_means_uniform_middle_configuration():
    inputs = inputs_for(chain_graph(3), ("work", 2), History())
    plan = make_planner(None).plan(inputs)
    assert set(plan.memory_mb[:3]) == {1769}
    assert "no history" in plan.planner


def test_wukong_takes_the_smallest_sufficient_configuration():
    graph, history = heavy_and_light()
    plan = make_planner("wukong").plan(inputs_for(graph, "end", history))
    assert set(plan.memory_mb[:-1]) == {512}


def test_annotations_pin_memory():
    @dask.delayed
    def step(x):
        return x

    with dask.annotate(memory=2000):
        first = step(1)
    last = step(first)
    graph, history = heavy_and_light()
    inputs = inputs_for(last.__dask_graph__(), last.key, history)
    plan = make_planner("critical-path").plan(inputs)
    assert plan.memory_mb[inputs.dag.index[first.key]] == 3008
    with dask.annotate(memory=10**6):
        huge = step(1)
    with pytest.raises(ValueError, match="largest configuration"):
        inputs_for(huge.__dask_graph__(), huge.key, history)
