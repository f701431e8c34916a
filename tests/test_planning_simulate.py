"""The platform model against schedules computed by hand: slots, bundles, cold and warm
starts, shared cores, and Lambda's bill."""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
from dask._task_spec import Task, TaskRef

from dask_serverless.graph import translate
from dask_serverless.planning import (
    SLA,
    CpuModel,
    Deadline,
    History,
    PlanInputs,
    PlanWarning,
    Platform,
    Predictor,
    Pricing,
    make_planner,
    residuals,
)
from dask_serverless.planning.bundling import bundle_roots
from dask_serverless.planning.history import (
    InvocationMetrics,
    TaskMetrics,
    cpu_capacity,
    first_task_starts,
    function_identities,
    recent_capacity,
    run_samples,
)

CONFIGS = (512, 1024, 1769, 3008)
COLD, WARM = 0.1, 0.01


def wait(*args):
    return 0


def spin(*args):
    return 0


def join(*args):
    return 0


def history(functions: dict[str, tuple[float, float]]) -> History:
    """``functions[name] = (wall_s, cpu_s)`` at 1769 MB; free transfers; fixed start-ups."""
    tasks = {(f, 1769): [[0, 0, wall, cpu, 0]] * 3 for f, (wall, cpu) in functions.items()}
    return History(
        tasks=tasks,
        transfers={1769: [[0, 0.0], [10**6, 0.0]]},
        startups={1769: [[1, COLD]] * 3 + [[0, WARM]] * 3},
    )


def fan_in(width: int, root: str = "wait") -> dict:
    """``width`` independent roots joined by one task."""
    graph = {(root, i): Task((root, i), wait if root == "wait" else spin) for i in range(width)}
    graph["join"] = Task("join", join, *(TaskRef((root, i)) for i in range(width)))
    return graph


def inputs_for(graph: dict, platform: Platform, functions: dict, deadline=None) -> PlanInputs:
    dag = translate(graph, "join")
    names = function_identities(dag)
    known = {}
    for name in set(names) - {""}:
        known[name] = functions[name.split(":")[0]]
    predictor = Predictor(history(known), SLA.parse("average"), CpuModel(max_vcpus=2))
    return PlanInputs(
        dag=dag,
        functions=names,
        predictor=predictor,
        configs=CONFIGS,
        sla=SLA.parse("average"),
        deadline=Deadline.parse(deadline),
        platform=platform,
    )


TIMES = {"wait": (1.0, 0.0), "spin": (1.0, 1.0), "join": (0.0, 0.0), "root": (0.0, 0.0)}


def test_slots_queue_invocations_and_warm_instances_take_the_rest():
    # Four 1 s roots through two slots: two cold starts, then two warm ones.
    inputs = inputs_for(fan_in(4), Platform(slots=2, load_aware=True, invoke_latency_s=0), TIMES)
    schedule = inputs.schedule([1769] * len(inputs.dag))
    roots = [inputs.dag.index[("wait", i)] for i in range(4)]
    finishes = sorted(schedule.finish[r] for r in roots)
    assert finishes == pytest.approx([COLD + 1, COLD + 1, COLD + 1 + WARM + 1, COLD + 1 + WARM + 1])
    assert schedule.cold_starts == 2
    assert len(schedule.invocations) == 4
    assert schedule.makespan == pytest.approx(COLD + 2 + WARM)


def test_a_bundle_runs_its_roots_one_after_another():
    # Six roots in two bundles of three, no slot limit: two invocations of 3 s each.
    platform = Platform(bundles=2)
    inputs = inputs_for(fan_in(6), platform, TIMES)
    memory = [1769] * len(inputs.dag)
    assert [len(group) for group in inputs.bundle(memory).starts] == [3, 3]
    schedule = inputs.schedule(memory)
    assert len(schedule.invocations) == 2
    assert schedule.makespan == pytest.approx(COLD + 3)
    first = schedule.invocations[0]
    assert first.billed_s == pytest.approx(COLD + 3)


def test_bundles_never_mix_configurations():
    dag = translate(fan_in(6), "join")
    memory = [512, 1769, 512, 1769, 512, 1769, 1769, 0]
    bundling = bundle_roots(dag, 2, memory)
    for group in bundling.starts:
        assert len({memory[i] for i in group}) == 1


def test_warm_instances_start_the_run_warm():
    inputs = inputs_for(fan_in(2), Platform(slots=2, warm=((1769, 1),)), TIMES)
    schedule = inputs.schedule([1769] * len(inputs.dag))
    finishes = sorted(schedule.finish[inputs.dag.index[("wait", i)]] for i in range(2))
    assert finishes == pytest.approx([WARM + 1, COLD + 1])
    assert schedule.cold_starts == 1


def test_an_idle_instance_of_another_size_is_evicted_at_the_limit():
    inputs = inputs_for(fan_in(1), Platform(slots=1, warm=((512, 1),)), TIMES)
    schedule = inputs.schedule([1769] * len(inputs.dag))
    assert schedule.cold_starts == 1
    assert schedule.makespan == pytest.approx(COLD + 1)


def test_cpu_parts_share_the_cores_sleeps_do_not():
    # One core: two instances boot together (0.1 s of CPU each: 0.2 s), then two
    # CPU-bound 1 s tasks take 2 s each; two sleeps still take 1 s.
    spinning = inputs_for(fan_in(2, "spin"), Platform(slots=2, cores=1.0), TIMES)
    schedule = spinning.schedule([1769] * len(spinning.dag))
    assert schedule.makespan == pytest.approx(2 * COLD + 2)
    assert [inv.startup_s for inv in schedule.invocations[:2]] == pytest.approx([2 * COLD] * 2)
    sleeping = inputs_for(fan_in(2), Platform(slots=2, cores=1.0), TIMES)
    assert sleeping.schedule([1769] * len(sleeping.dag)).makespan == pytest.approx(2 * COLD + 1)


def test_a_worker_keeps_children_when_the_platform_is_full():
    # A root fanning out to three 1 s children with one slot: all run in its invocation.
    graph = {"root": Task("root", join)}
    for i in range(3):
        graph[("wait", i)] = Task(("wait", i), wait, TaskRef("root"))
    graph["join"] = Task("join", join, *(TaskRef(("wait", i)) for i in range(3)))
    inputs = inputs_for(graph, Platform(slots=1, load_aware=True, invoke_latency_s=0), TIMES)
    schedule = inputs.schedule([1769] * len(inputs.dag))
    assert len(schedule.invocations) == 1
    assert schedule.makespan == pytest.approx(COLD + 3)
    # Unlimited: one child continues, two get new invocations (cold) and run in parallel.
    free = inputs_for(graph, Platform(invoke_latency_s=0), TIMES).schedule([1769] * len(inputs.dag))
    assert len(free.invocations) == 3
    assert free.makespan == pytest.approx(COLD + COLD + 1)


def test_lambda_bill_rounds_up_to_the_millisecond_and_charges_requests():
    pricing = Pricing.parse({"architecture": "arm64"})
    bill = pricing.bill([(1024, 0.0011), (2048, 1.0)])
    assert bill.gb_s == pytest.approx(0.002 + 2.0)
    assert bill.usd == pytest.approx(2.002 * 0.0000133334 + 2 * 0.2e-6)
    assert bill.requests == 2
    with pytest.raises(ValueError, match="architecture"):
        Pricing.parse({"architecture": "sparc"})


def test_an_infeasible_deadline_warns_with_the_fastest_makespan():
    inputs = inputs_for(fan_in(2, "spin"), Platform(), TIMES, deadline=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = make_planner("critical-path").plan(inputs)
    messages = [str(w.message) for w in caught if issubclass(w.category, PlanWarning)]
    assert messages and f"{plan.fastest_s:.3f} s" in messages[0]
    assert plan.predicted_makespan_s <= plan.fastest_s + 1e-9


def test_io_bound_tasks_get_the_smallest_size():
    graph = {("wait", 0): Task(("wait", 0), wait)}
    graph[("spin", 0)] = Task(("spin", 0), spin)
    graph["join"] = Task("join", join, TaskRef(("wait", 0)), TaskRef(("spin", 0)))
    inputs = inputs_for(graph, Platform(), TIMES, deadline="fastest+10%")
    plan = make_planner("critical-path").plan(inputs)
    assert plan.memory_mb[inputs.dag.index[("wait", 0)]] == 512
    assert plan.memory_mb[inputs.dag.index[("spin", 0)]] == 1769


def test_pre_warming_takes_a_later_cold_start_off_the_critical_path():
    # A 1 s root at 1769 MB, then its consumer at 512 MB: a new invocation at 1.1 s that
    # would boot (0.1 s). Pre-warmed as the run starts, a 512 MB instance is ready by then.
    graph = {("wait", 0): Task(("wait", 0), wait)}
    graph["join"] = Task("join", join, TaskRef(("wait", 0)))
    inputs = inputs_for(graph, Platform(slots=4, invoke_latency_s=0), TIMES)
    memory = [1769, 512, 0]
    cold = inputs.schedule(memory)
    assert cold.makespan == pytest.approx(COLD + 1 + COLD)
    prewarm = inputs.prewarm(memory, cold)
    assert prewarm == ((512, 1),)
    warmed = inputs.schedule(memory, prewarm=prewarm)
    assert warmed.makespan == pytest.approx(COLD + 1 + WARM)
    # The pre-warmed instance's boot is still billed, as its first invocation's init.
    assert warmed.cost_gb_s == pytest.approx(cold.cost_gb_s, rel=0.05)


def test_roots_on_the_longest_path_are_invoked_first():
    # A lone 1 s root beside the root of a 3-task chain: the chain's root goes first, so
    # on a platform with one free slot the critical path does not queue behind the side.
    graph = {("wait", 0): Task(("wait", 0), wait)}
    graph[("spin", 0)] = Task(("spin", 0), spin)
    for step in (1, 2):
        graph[("spin", step)] = Task(("spin", step), spin, TaskRef(("spin", step - 1)))
    graph["join"] = Task("join", join, TaskRef(("wait", 0)), TaskRef(("spin", 2)))
    inputs = inputs_for(graph, Platform(slots=1, invoke_latency_s=0), TIMES)
    memory = [1769] * len(inputs.dag)
    assert inputs.bundle(memory).starts[0] == [inputs.dag.index[("spin", 0)]]
    schedule = inputs.schedule(memory)
    assert schedule.start[inputs.dag.index[("spin", 0)]] == pytest.approx(COLD)


def measured(start: float, exec_s: float, cpu_s: float, wait_s: float, memory_mb: int = 1769):
    return TaskMetrics(
        index=0,
        worker_id="w",
        start=start,
        memory_mb=memory_mb,
        cold=False,
        input_bytes=0,
        output_bytes=0,
        download_s=0.0,
        exec_s=exec_s,
        downloaded_bytes=0,
        cpu_s=cpu_s,
        wait_s=wait_s,
    )


def test_capacity_is_the_cpu_a_run_got_of_the_cores_it_asked_for():
    cpu = CpuModel(max_vcpus=2)
    # Two CPU-bound 1 s tasks at once, each computing a quarter of the time and waiting
    # the rest: they asked for 2 CPUs and got 0.5.
    busy = [measured(0.0, 1.0, 0.25, 0.75), measured(0.0, 1.0, 0.25, 0.75)]
    assert cpu_capacity(busy, 2.0, cpu) == pytest.approx(0.5, rel=1e-6)
    # Then one alone for a second, getting 0.5 too: over 1 s of demand 2 and 1 s of
    # demand 1 a capacity c gives c + min(c, 1) CPU-s; 1 CPU-s was received, so c = 0.5.
    assert cpu_capacity([*busy, measured(1.0, 1.0, 0.5, 0.5)], 2.0, cpu) == pytest.approx(0.5)
    # Nobody waited: every core was there.
    free = [measured(0.0, 1.0, 1.0, 0.0), measured(0.0, 1.0, 1.0, 0.0)]
    assert cpu_capacity(free, 2.0, cpu) == 2.0
    # A 512 MB quota (0.29 CPU) that gave its task 0.25 CPU held it, not the machine;
    # sleeping tasks ask for nothing.
    throttled = [measured(0.0, 1.0, 0.25, 0.75, memory_mb=512), measured(0.0, 1.0, 0.0, 0.0)]
    assert cpu_capacity(throttled, 2.0, cpu) == 2.0
    # Eight of them at once on a machine that gave the backend 0.4 CPU: a busy machine.
    starved = [measured(0.0, 1.0, 0.05, 0.95, memory_mb=512)] * 8
    assert cpu_capacity(starved, 2.0, cpu) == pytest.approx(0.4)
    # Too little CPU work to tell.
    assert cpu_capacity([measured(0.0, 0.1, 0.01, 0.09)], 2.0, cpu) is None


def test_recent_capacity_is_the_median_of_the_newest_runs_still_current():
    now = 10_000.0
    newest_first = [[now - 1, 0.5], [now - 2, 1.5], [now - 3, 0.7], [now - 4, 0.1]]
    assert recent_capacity(newest_first, now) == pytest.approx(0.7)
    assert recent_capacity([[now - 3600, 0.5]], now) is None
    assert recent_capacity([], now) is None


def test_a_busy_machine_slows_the_prediction_not_the_sizes():
    # Two CPU-bound 1 s roots on two slots of a 2-core machine whose other load leaves the
    # backend half a core. Predicted: the two boots (0.1 CPU-s each, not yet in the
    # backend's cgroup) on the machine's two cores, then the 2 CPU-s of work on half a
    # core: 4 s. Sizes are chosen on the two cores: on half a core 1024 MB would compute
    # as fast as 1769 MB, but the load may be gone when the run starts.
    platform = Platform(slots=2, cores=2.0, capacity=0.5, invoke_latency_s=0)
    inputs = inputs_for(fan_in(2, "spin"), platform, TIMES, deadline="fastest")
    memory = [1769] * len(inputs.dag)
    assert inputs.schedule(memory).makespan == pytest.approx(COLD + 1)
    assert inputs.schedule(memory, loaded=True).makespan == pytest.approx(COLD + 4)
    plan = make_planner("critical-path").plan(inputs)
    spins = [inputs.dag.index[("spin", i)] for i in range(2)]
    assert [plan.memory_mb[i] for i in spins] == [1769, 1769]
    # The join (no work: the smallest size) boots an instance of its own afterwards.
    join = inputs.dag.index["join"]
    assert plan.memory_mb[join] == 512
    assert plan.predicted_makespan_s == pytest.approx(COLD + 4 + COLD)
    assert plan.fastest_s == pytest.approx(COLD + 1 + COLD)


def test_calibration_compares_work_and_leaves_waiting_for_a_cpu_to_the_platform():
    # A 1 CPU-s task that took 2 s because it waited 1 s for a CPU did the work the model
    # predicted: its residual is 1 (a busy machine is the capacity's business). One that
    # computed for 1.5 s did half as much work again.
    inputs = inputs_for(fan_in(1, "spin"), Platform(), TIMES)
    plan = make_planner("uniform-1769").plan(inputs)
    spin_index = inputs.dag.index[("spin", 0)]
    waited = replace(measured(0.0, 2.0, 1.0, 1.0), index=spin_index)
    slower = replace(measured(0.0, 1.5, 1.5, 0.0), index=spin_index)
    found = residuals(plan, inputs.functions, [waited, slower])
    assert found[inputs.functions[spin_index]] == pytest.approx([1.0, 1.5])


def test_a_cold_invocations_setup_before_its_first_task_is_waited_for_not_shared():
    # Two sleeping 1 s roots on one core. A cold start is a 0.1 s boot (CPU: the two
    # share the core, 0.2 s) and then 0.3 s from the handler to the first task (loading
    # the run record: measured on the machine as it was, not shared again): 1.5 s.
    inputs = inputs_for(fan_in(2), Platform(slots=2, cores=1.0, invoke_latency_s=0), TIMES)
    startups = {1769: [[1, COLD, 0.3]] * 3 + [[0, WARM, 0.0]] * 3}
    predictor = Predictor(
        replace(inputs.predictor.history, startups=startups), SLA.parse("average"), CpuModel()
    )
    inputs = replace(inputs, predictor=predictor)
    schedule = inputs.schedule([1769] * len(inputs.dag))
    assert schedule.makespan == pytest.approx(2 * COLD + 0.3 + 1)
    # A start-up sample gets its setup from the invocation's first task.
    first = replace(measured(100.5, 1.0, 0.0, 0.0), invocation_id="a")
    invocation = InvocationMetrics("w", 1769, True, COLD, "a", start=100.2)
    _tasks, _transfers, samples = run_samples(
        [""], [], [invocation], first_starts=first_task_starts([first])
    )
    assert samples == {1769: [[1, COLD, pytest.approx(0.3)]]}


def test_setup_is_work_an_instance_does_at_its_own_speed():
    # Setup measured at 1769 MB (one full vCPU): 0.3 s cold, 0.02 s warm. A 512 MB
    # instance gets 512/1769 of a vCPU, so it sets up in 0.3 * 1769/512 s; the boot itself
    # is the same at every size.
    startups = {1769: [[1, COLD, 0.3]] * 3 + [[0, WARM, 0.02]] * 3}
    predictor = Predictor(History(startups=startups), SLA.parse("average"), CpuModel())
    at_1769, at_512, at_3008 = (predictor.startup(m) for m in (1769, 512, 3008))
    assert at_1769.cold_s == pytest.approx(COLD + 0.3)
    assert at_1769.warm_s == pytest.approx(WARM + 0.02)
    assert at_512.cold_s == pytest.approx(COLD + 0.3 * 1769 / 512)
    assert at_512.warm_s == pytest.approx(WARM + 0.02 * 1769 / 512)
    assert at_3008 == at_1769
    assert at_512.boot_s == at_1769.boot_s == COLD
    # Samples from a small size count as the same work, so sizes agree whichever was seen.
    from_512 = {512: [[1, COLD, 0.3 * 1769 / 512]] * 3 + [[0, WARM, 0.02 * 1769 / 512]] * 3}
    other = Predictor(History(startups=from_512), SLA.parse("average"), CpuModel())
    assert other.startup(1769).cold_s == pytest.approx(at_1769.cold_s)


def test_a_setup_measured_on_a_busy_machine_is_work_at_the_cpus_it_got():
    # A 0.4 s setup at 1769 MB in a run that got half a CPU is 0.2 s of work: on the
    # machine to itself, 0.2 s at 1769 MB and 0.2 * 1769/512 s at 512 MB. On a machine
    # that leaves a quarter of a CPU, both sizes get the quarter (512 MB's quota, 0.29 of
    # a CPU, is not what holds it): 0.8 s, then the 1 s sleep.
    startups = {1769: [[1, COLD, 0.4, 0.5]] * 3 + [[0, WARM, 0.0, 0.5]] * 3}
    platform = Platform(slots=1, cores=2.0, capacity=0.25, invoke_latency_s=0)
    inputs = inputs_for(fan_in(1), platform, TIMES)
    predictor = Predictor(
        replace(inputs.predictor.history, startups=startups), SLA.parse("average"), CpuModel()
    )
    inputs = replace(inputs, predictor=predictor)
    assert predictor.startup(1769).cold_s == pytest.approx(COLD + 0.2)
    assert predictor.startup(512).cold_s == pytest.approx(COLD + 0.2 * 1769 / 512)
    for size in (512, 1769):
        memory = [size] * len(inputs.dag)
        assert inputs.schedule(memory).makespan == pytest.approx(COLD + 0.2 * 1769 / size + 1)
        assert inputs.schedule(memory, loaded=True).makespan == pytest.approx(COLD + 0.8 + 1)
    # A start-up sample keeps the CPUs its run got beside its setup.
    first = replace(measured(100.5, 1.0, 0.0, 0.0), invocation_id="a")
    invocation = InvocationMetrics("w", 1769, True, COLD, "a", start=100.1)
    _tasks, _transfers, samples = run_samples(
        [""], [], [invocation], first_starts=first_task_starts([first]), capacity=0.5
    )
    assert samples == {1769: [[1, COLD, pytest.approx(0.4), 0.5]]}


def test_only_functions_seen_at_several_input_sizes_are_calibrated():
    # Three tasks of 1 CPU-s at one input size, whose residuals say 1.3: the samples are
    # those tasks, so the prediction is their 1 s, not 1.3 s. Seen at two input sizes
    # (1 s at 0 bytes, 2 s at 1 000), the fitted line's misfit is what the bias scales.
    residuals = {"f": [1.3] * 3}
    one = {("f", 1769): [[0, 0, 1.0, 1.0, 0, 0.0]] * 3}
    predictor = Predictor(History(tasks=one, residuals=residuals), SLA.parse("average"))
    assert predictor.bias("f") == 1.0
    assert predictor.exec_time("f", 0, 1769) == pytest.approx(1.0)
    two = {("f", 1769): [[0, 0, 1.0, 1.0, 0, 0.0], [1000, 0, 2.0, 2.0, 0, 0.0]] * 2}
    varied = Predictor(History(tasks=two, residuals=residuals), SLA.parse("average"))
    assert varied.bias("f") == pytest.approx(1.3)
    assert varied.exec_time("f", 0, 1769) == pytest.approx(1.3)
