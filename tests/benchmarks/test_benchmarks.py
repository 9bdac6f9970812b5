"""The benchmarks: throughput.py's CPU mode end to end (one process and the deepspeed launcher),
time_to_train.py's arithmetic on hand-computed cases, and the shared paired-ratio statistics."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed import free_port

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import time_to_train as ttt  # noqa: E402
from timing import interleaved_times, paired_ratio  # noqa: E402


def _cpu_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu"}


SMOKE = ["--device", "cpu", "--steps", "3", "--warmup", "1", "--size", "96", "--images-per-gpu", "1",
         "--peak-tflops", "1"]


# --- throughput.py -------------------------------------------------------------------------------

@pytest.mark.slow
def test_throughput_cpu_mode_times_every_variant_and_agvm_measures(tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "benchmarks/throughput.py", *SMOKE, "--images-per-gpu", "2", "1",
                           "--json", str(out)],
                          cwd=REPO, env=_cpu_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for label in ("plain PyTorch loop", "agvm-ds, AGVM off", "agvm-ds, AGVM every 10", "agvm-ds, AGVM every 1"):
        assert label in proc.stdout
    assert "AGVM overhead at 2 images/GPU, agvm-ds, AGVM every 1 / AGVM off: step time" in proc.stdout

    result = json.loads(out.read_text())
    assert result["world_size"] == 1 and result["size"] == [96, 96] and result["accumulation"] == 2
    assert [run["images_per_gpu"] for run in result["runs"]] == [1, 2]  # a sweep, in ascending order
    for run in result["runs"]:
        variants = run["variants"]
        assert list(variants) == ["plain", "agvm_off", "agvm_10", "agvm_1"]
        for name, row in variants.items():
            assert len(row["step_times_s"]) == 3
            # images x 2 micro-batches per step, over the median step time
            assert row["images_per_s_per_gpu"] == pytest.approx(run["images_per_gpu"] * 2 / row["step_time_s"])
            # MFU = 3 x forward FLOPs x images/s / peak (1 TFLOP/s given)
            assert row["mfu"] == pytest.approx(
                3 * result["forward_gflops_per_image"] * 1e9 * row["images_per_s_per_gpu"] / 1e12)
            assert row["peak_allocated_gib"] is None  # no CUDA allocator on CPU
            if name != "plain":
                ratio = row["images_per_s_vs_plain"]
                assert ratio["mean"] > 0 and math.isfinite(ratio["half_width_95"])
        # timed iterations 1..3, then 5..7: AGVM every 1 measures in all, every 10 in none, off never
        assert variants["agvm_1"]["agvm_stats_steps_timed"] == 3
        assert variants["agvm_10"]["agvm_stats_steps_timed"] == 0
        assert all(math.isfinite(m["phi"]) for m in variants["agvm_1"]["agvm_statistics"].values())
        assert all(math.isnan(m["phi"]) for m in variants["agvm_off"]["agvm_statistics"].values())
        assert variants["agvm_1"]["step_time_vs_agvm_off"]["mean"] > 0
        assert "step_time_vs_agvm_off" not in variants["agvm_off"]

    # time_to_train.py reads the agvm-ds (AGVM every 10) figure of such a file, labelled as measured
    model, points = ttt.throughput_from_json(out)
    assert model == "faster_rcnn_r18_tiny" and [p.images_per_gpu for p in points] == [1, 2]
    assert points[1].images_per_s == result["runs"][1]["variants"]["agvm_10"]["images_per_s_per_gpu"]
    assert points[0].source.startswith("measured: result.json, agvm-ds, AGVM every 10")


@pytest.mark.slow
def test_throughput_runs_under_the_deepspeed_launcher_on_two_ranks(tmp_path):
    out = tmp_path / "result.json"
    env = _cpu_env()
    proc = subprocess.run(
        ["deepspeed", "--num_gpus", "2", "--master_port", env["MASTER_PORT"], "benchmarks/throughput.py",
         *SMOKE, "--steps", "2", "--accumulation", "1", "--variants", "plain,agvm_1", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    result = json.loads(out.read_text())
    (run,) = result["runs"]
    assert result["world_size"] == 2 and list(run["variants"]) == ["plain", "agvm_1"]
    row = run["variants"]["agvm_1"]
    assert row["images_per_s_total"] == pytest.approx(2 * row["images_per_s_per_gpu"])
    # two ranks x one micro-batch: two gradients per step, enough for AGVM to measure
    assert all(math.isfinite(m["phi"]) for m in row["agvm_statistics"].values())


def test_throughput_rejects_an_unknown_variant(capsys):
    import throughput

    with pytest.raises(SystemExit) as error:
        throughput.parse_args(["--variants", "plain,agvm_5"])
    assert error.value.code == 2
    assert "unknown ['agvm_5']; valid: ['plain', 'agvm_off', 'agvm_10', 'agvm_1']" in capsys.readouterr().err


def test_throughput_refuses_agvm_with_a_single_micro_batch_gradient():
    import throughput

    settings = throughput.settings_from(throughput.parse_args(["--accumulation", "1"]))
    with pytest.raises(ValueError, match="at least 2 micro-batch gradients"):
        throughput.check_agvm_can_measure(["plain", "agvm_10"], settings, world=1)
    throughput.check_agvm_can_measure(["plain", "agvm_off"], settings, world=1)


# --- timing.py -----------------------------------------------------------------------------------

def test_interleaving_rotates_the_order_and_drops_warmup():
    calls = []
    times = interleaved_times({name: (lambda batch, name=name: calls.append((name, batch))) for name in "abc"},
                              inputs=lambda r: r * 10, rounds=2, warmup=1, sync=lambda: None)
    assert calls == [("a", 0), ("b", 0), ("c", 0), ("b", 10), ("c", 10), ("a", 10), ("c", 20), ("a", 20), ("b", 20)]
    assert {name: len(t) for name, t in times.items()} == {"a": 2, "b": 2, "c": 2}


def test_paired_ratio_mean_and_confidence_interval():
    ratio = paired_ratio([2.0, 3.0, 4.0], [1.0, 1.0, 1.0])
    assert ratio.mean == 3.0
    assert ratio.half_width == pytest.approx(1.96 * 1.0 / math.sqrt(3))
    assert math.isnan(paired_ratio([1.0], [2.0]).half_width)


# --- time_to_train.py: the arithmetic, by hand -----------------------------------------------------
# 1e9 parameters, 4-byte gradients and parameters, 16 GPUs = 2 nodes x 8, NVLink 400 GB/s,
# InfiniBand 50 GB/s, no latency, one bucket. Batch 64 -> 4 images per GPU; measured 10 images/s at
# 2 images per GPU -> 2 micro-steps, compute 0.4 s. Reduce-scatter (= all-gather) of 4e9 bytes:
# 7/8 x 4e9 / 400e9 = 8.75 ms in the node + 1/2 x (4e9 / 8) / 50e9 = 5 ms between nodes = 13.75 ms.

WORKLOAD = ttt.Workload("m", global_batch=64, size=(32, 32), paper="", goal_images_per_gpu=1)
POINTS = [ttt.Throughput(2, 10.0, "test")]
TRAFFIC = ttt.Traffic(parameters=10**9, grad_bytes=4, param_bytes=4, bucket_elements=10**9)
NETWORK = ttt.Network(gpus_per_node=8, nvlink_gb_s=400, infiniband_gb_s=50, hop_latency_us=0)


def _step(network=NETWORK, overlap=False, gpus=16):
    return ttt.estimate_step(WORKLOAD, gpus, POINTS, TRAFFIC, network, overlap, epochs=1, dataset_images=640)


def test_time_to_train_without_overlap_hand_computed():
    row = _step()
    assert (row.images_per_gpu, row.micro_steps) == (4, 2)
    assert row.compute_s == pytest.approx(0.4)
    assert row.reduce_scatter_s == pytest.approx(0.01375)
    assert row.all_gather_s == pytest.approx(0.01375)
    assert row.step_s == pytest.approx(0.4 + 2 * 0.01375 + 0.01375)  # 0.44125
    assert row.run_s == pytest.approx(10 * 0.44125)  # 640 // 64 = 10 steps
    assert not row.extrapolated


def test_time_to_train_with_overlap_hides_reduce_scatter_behind_backward():
    # backward of a micro-step is 2/3 x 0.2 s > 13.75 ms: only the all-gather remains
    assert _step(overlap=True).step_s == pytest.approx(0.4 + 0.01375)
    # InfiniBand at 0.5 GB/s: reduce-scatter 8.75 ms + 1/2 x 5e8 / 5e8 = 0.50875 s exceeds the backward
    slow = ttt.Network(gpus_per_node=8, nvlink_gb_s=400, infiniband_gb_s=0.5, hop_latency_us=0)
    assert _step(slow, overlap=True).step_s == pytest.approx(2 * (0.2 / 3 + 0.50875) + 0.50875)
    assert _step(slow).step_s == pytest.approx(0.4 + 3 * 0.50875)


def test_time_to_train_latency_load_and_limits():
    # 16 GPUs: 7 ring steps in the node + 1 between nodes, 10 us each, 3 buckets
    network = ttt.Network(gpus_per_node=8, nvlink_gb_s=400, infiniband_gb_s=50, hop_latency_us=10)
    assert ttt.ring_collective_seconds(0, 16, network, buckets=3) == pytest.approx(3 * 8 * 10e-6)
    # one node of 4 GPUs: no inter-node term
    assert ttt.ring_collective_seconds(4e9, 4, NETWORK, buckets=1) == pytest.approx(3 / 4 * 4e9 / 400e9)
    # batch 64 on 48 GPUs: the busiest GPU gets ceil(64/48) = 2 images; on 128 GPUs there is no row
    assert _step(gpus=48).images_per_gpu == 2
    assert _step(gpus=128) is None
    # measured only at 2 images per micro-batch, asked for 1 per GPU: used, but flagged
    assert ttt.pick_throughput(POINTS, 1) == (POINTS[0], True)
    with pytest.raises(ValueError, match="whole number of 8-GPU nodes"):
        ttt.ring_collective_seconds(1e9, 12, NETWORK, buckets=1)


def test_time_to_train_goal_placeholder_from_mfu():
    workload = ttt.Workload("m", 960, (1024, 1024), "", goal_images_per_gpu=4, goal_mfu=0.35)
    point = ttt.goal_placeholder(workload, forward_flops=8e12, peak_flops=989e12)
    assert point.images_per_s == pytest.approx(0.35 * 989e12 / (3 * 8e12))
    assert point.source.startswith(ttt.PLACEHOLDER)


def test_time_to_train_prints_assumptions_inputs_and_the_paper(capsys):
    assert ttt.main(["--throughput", "faster_rcnn_r50_fpn=8:40", "--overlap"]) == 0
    out = capsys.readouterr().out
    assert "Assumptions (a projection from the inputs below, not a measurement)" in out
    assert "communication overlapped with backward: yes" in out
    assert "40 images/s/GPU at 8 images/GPU [given on the command line]" in out
    assert "paper: Faster R-CNN R50-FPN, batch 1536, 12 epochs: 4.2 min on 768 A100" in out
    assert "faster_rcnn_swinv2_1b_fpn: no throughput input" in out
    row_768 = next(line for line in out.splitlines() if line.split()[:1] == ["768"])
    assert row_768.split()[1:3] == ["2", "1"]  # 1536 / 768 = 2 images per GPU, one micro-step


def test_time_to_train_rejects_a_model_it_does_not_project(capsys):
    assert ttt.main(["--throughput", "retinanet_r50_fpn=8:40"]) == 2
    assert "no workload for ['retinanet_r50_fpn']" in capsys.readouterr().err
