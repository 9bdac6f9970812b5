"""The memory plan (``agvm_ds.detection.memory``, ``agvm-model-info --plan``): ZeRO's arithmetic against
DeepSpeed's source and estimators, the live-bytes tracker, the CUDA autocast policy on CPU, and the
plan against the CPU allocator's peak over a real training step."""
from __future__ import annotations

import contextlib
import time
from unittest import mock

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from agvm_ds.commands.model_info import main as model_info
from agvm_ds.detection import build_detector, load_spec, memory
from agvm_ds.detection.memory import (
    ActivationProfile,
    GiB,
    LiveBytes,
    ParamStats,
    ZeroSetup,
    deepspeed_estimate,
    gpu_peak,
    model_states,
)

N, W = 1_000_000_000, 8
#: A 1B model whose parameters are all Linear/Conv, for the arithmetic checks.
STATS = ParamStats(trainable=N, frozen=0, lower_precision=N, sizes=(N // 2, N // 2), largest_param=N // 2,
                   largest_layer=N // 2, buffer_bytes=0)
#: The small SwinV2 Faster R-CNN of the 1B's family the plan is checked on: Swin-T's widths with the 1B's
#: window 16 and checkpointing, the FPN and heads of faster_rcnn_r18_tiny, so that a CPU step takes seconds.
SMALL_SWIN = {"backbone_kwargs": {"embed_dim": 96, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24]},
              "min_size": 256, "max_size": 256, "fpn_channels": 64,
              "detector_kwargs": {"rpn_pre_nms_top_n_train": 600, "rpn_post_nms_top_n_train": 300,
                                  "box_batch_size_per_image": 64}}
#: The tiny segmenters at the measured step's image size (no resize: the plan measures what the step runs).
SIDE_256 = {"min_size": 256, "max_size": 256}


def _gpu(setup: ZeroSetup, stats: ParamStats = STATS) -> dict[str, int]:
    lines: dict[str, int] = {}
    for line in model_states(stats, setup):
        lines[line.name] = lines.get(line.name, 0) + line.gpu
    return lines


# ---------------------------------------------------------------------------------------------- arithmetic


def test_zero2_autocast_keeps_fp32_weights_whole_and_a_separate_fp32_master_partition():
    gpu = _gpu(ZeroSetup(stage=2, world=W, precision="autocast-bf16", reduce_bucket_size=2e8, overlap_comm=True))
    assert gpu["parameters"] == 4 * N  # bit16_groups_flat holds the fp32 weights whole
    assert gpu["fp32 master"] == 4 * N // W  # single_partition_of_fp32_groups: a clone, fp32 or not
    assert gpu["gradients"] == 4 * N // W  # grads_in_partition, in the model's dtype
    assert gpu["optimizer states"] == 8 * N // W
    assert gpu["gradient buckets"] == int(2e8) * 2 * 1 * 4  # overlap_comm doubles; one comm dtype (all Linear)
    assert gpu["step temporaries"] == 4 * N // W + 4 * N // W  # fp32 flat gradient + AdamW's sqrt(v)


def test_zero1_keeps_whole_gradients_that_fill_during_backward():
    (grads,) = [line for line in model_states(STATS, ZeroSetup(stage=1, world=W, precision="fp32"))
                if line.name == "gradients"]
    assert (grads.gpu, grads.phase) == (4 * N, "filled")


def test_zero3_with_fp32_weights_steps_the_partition_itself_and_16_bit_weights_get_a_master():
    for precision in ("fp32", "autocast-bf16"):
        gpu = _gpu(ZeroSetup(stage=3, world=W, precision=precision))
        assert gpu["parameters"] == 4 * N // W and "fp32 master" not in gpu
        assert gpu["gradients"] == 4 * N // W and gpu["optimizer states"] == 8 * N // W
    gpu = _gpu(ZeroSetup(stage=3, world=W, precision="bf16"))
    assert (gpu["parameters"], gpu["fp32 master"], gpu["gradients"]) == (2 * N // W, 4 * N // W, 2 * N // W)


def test_zero3_buckets_and_gathered_parameters_follow_the_communication_dtypes():
    mixed = ParamStats(trainable=N, frozen=0, lower_precision=N // 2, sizes=(1000, N - 1000), largest_param=N - 1000,
                       largest_layer=N, buffer_bytes=0)
    gpu = _gpu(ZeroSetup(stage=3, world=W, reduce_bucket_size=50_000_000, max_live_parameters=100_000_000,
                         prefetch_bucket_size=50_000_000), mixed)
    assert gpu["gradient buckets"] == 50_000_000 * (2 + 4)  # one bf16 and one fp32 bucket
    assert gpu["gathered parameters"] == 150_000_000 * 3  # half gathered in bf16, half in fp32
    assert gpu["persistent parameters"] == 1000 * 4  # at most param_persistence_threshold elements: whole


def test_offload_moves_the_optimizer_partition_to_host_memory():
    lines = model_states(STATS, ZeroSetup(stage=3, world=W, offload_optimizer="cpu", offload_param="cpu"))
    host = {line.name: line.host for line in lines if line.host}
    assert host == {"parameters": 4 * N // W, "gradients": 4 * N // W, "optimizer states": 8 * N // W,
                    "fp32 master": 4 * N // W}  # offloaded, ZeRO-3 clones the fp32 partition to the CPU
    assert sum(line.gpu for line in lines if line.name in host) == 0


def test_where_deepspeed_assumes_16_bit_weights_our_arithmetic_gives_its_estimate():
    """estimate_zero2_model_states_mem_needs: 2N + 18N/W. Ours for the bf16 section: 2N whole + 2N/W
    gradients + 8N/W moments + 4N/W master + the 4N/W fp32 gradient the step makes."""
    setup = ZeroSetup(stage=2, world=W, precision="bf16", contiguous_gradients=False)
    gpu = _gpu(setup)
    ours = gpu["parameters"] + gpu["gradients"] + gpu["optimizer states"] + gpu["fp32 master"] + 4 * N // W
    assert deepspeed_estimate(STATS, setup)[0] == ours == 2 * N + 18 * N // W
    z3 = deepspeed_estimate(STATS, ZeroSetup(stage=3, world=W))[0]
    assert z3 == 4 * (N // 2) + 18 * N // W  # 4 B x largest layer + 18 B/param, whatever the precision


def test_the_peak_takes_the_larger_of_backward_and_step():
    lines = [memory.StateLine("parameters", gpu=100), memory.StateLine("gradients", gpu=40, phase="filled"),
             memory.StateLine("step temporaries", gpu=30, phase="step")]
    assert gpu_peak(lines, ActivationProfile(1, peak=60, peak_with_grads=90, grads=40)) == 100 + 90
    assert gpu_peak(lines, ActivationProfile(1, peak=10, peak_with_grads=50, grads=40)) == 100 + 40 + 30


@pytest.mark.parametrize("kwargs, named", [
    ({"stage": 4}, "stage=4"), ({"stage": 2, "precision": "tf32"}, "precision='tf32'"),
    ({"stage": 2, "world": 0}, "world=0"), ({"stage": 2, "offload_param": "cpu"}, "offload_param='cpu'"),
    ({"stage": 2, "optimizer": "adam"}, "optimizer='adam'"),
])
def test_a_bad_setup_is_one_error_naming_the_value(kwargs, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        ZeroSetup(**kwargs)


def test_a_shipped_deepspeed_config_gives_its_stage_precision_and_buckets():
    from agvm_ds.commands.model_info import _read_ds_config

    setup = ZeroSetup.from_ds_config(_read_ds_config("zero3_bf16_swin1b"), world=64)
    assert (setup.stage, setup.precision, setup.world, setup.overlap) == (3, "autocast-bf16", 64, False)
    assert (setup.reduce_bucket_size, setup.max_live_parameters, setup.prefetch_bucket_size) == (
        50_000_000, 100_000_000, 50_000_000)
    assert ZeroSetup.from_ds_config(_read_ds_config("zero1_fp16"), world=8).precision == "fp16"


# ---------------------------------------------------------------------------------------------- measuring


def test_live_bytes_counts_a_storage_once_while_it_lives():
    external = torch.zeros(100)
    tracker = LiveBytes()
    with tracker:
        a = torch.empty(1000)  # +4000
        view = a[10:].t()  # a view: nothing
        external.add_(1)  # in place on a tensor made before: nothing
        b = a * 2  # +4000
        del a, view
        tracker.mark("half")
        del b
    assert tracker.peak() == 8000 and tracker.live("half") == 4000 and tracker.live() == 0
    assert tracker.peak(start="half") == 4000


def test_cuda_autocast_policy_gives_the_dtypes_cuda_autocast_gives(monkeypatch):
    """A fake CUDA forward runs through torch's real CUDA autocast kernels (no GPU needed for a
    forward); the same forward on fake CPU tensors under cuda_autocast_policy must see every op
    return the same dtypes. Without the policy, CPU autocast keeps Swin's LayerNorm outputs bf16."""
    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    spec = load_spec("faster_rcnn_swinv2_1b_fpn", {**SMALL_SWIN, "checkpointing": False,  # a shifted block, then 1 each
                                                   "backbone_kwargs": {"depths": [2, 1, 1, 1]}})
    cuda = _forward_dtypes(spec, "cuda", contextlib.nullcontext())
    assert _forward_dtypes(spec, "cpu", memory.cuda_autocast_policy()) == cuda
    assert _forward_dtypes(spec, "cpu", contextlib.nullcontext()) != cuda
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the policy is gone after the block
        assert torch.nn.functional.layer_norm(x, (8,)).dtype == torch.bfloat16


def _forward_dtypes(spec, device: str, policy) -> list[tuple[str, tuple]]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            dtypes = tuple(t.dtype for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            if dtypes:
                self.ops.append((str(func), dtypes))
            return out

    model = build_detector(spec, device="meta")
    with policy, FakeTensorMode(allow_fallback_kernels=False), torch.device(device):
        memory.activations._make_fake(model, "autocast-bf16", gathered_bf16=False)
        record = Record()
        with record, torch.autocast(device, dtype=torch.bfloat16):
            features = model.backbone(torch.empty(1, 3, 128, 128))
            model.rpn.head(list(features.values()))
    return record.ops


def test_every_op_cuda_autocasts_has_its_policy():
    cuda = {op for op in memory.cuda_autocast._autocast_ops("AutocastCUDA")
            if not op.startswith(("cudnn", "_cudnn")) and op != "binary_cross_entropy"}  # cuDNN-only; banned on CUDA
    assert cuda <= set(memory.CUDA_AUTOCAST_POLICY), sorted(cuda - set(memory.CUDA_AUTOCAST_POLICY))


# ---------------------------------------------------------------------------------------------- the plan vs the CPU


@pytest.mark.parametrize("model, overrides", [
    pytest.param("faster_rcnn_swinv2_1b_fpn", SMALL_SWIN, marks=pytest.mark.slow),  # the 1B's checkpointing
    pytest.param("faster_rcnn_r18_tiny", {}, marks=pytest.mark.slow),  # ResNet, BatchNorm, no checkpointing
    ("upernet_r18_tiny", SIDE_256),  # semantic: all of it fake; BatchNorm heads, the auxiliary head
    ("panoptic_fpn_r18_tiny", SIDE_256),  # Mask R-CNN's rest on CPU, the semantic branch in the trunk
])
def test_the_plan_agrees_with_a_measured_cpu_training_step(model, overrides):
    """One process, no DeepSpeed (ZeRO-0 on a world of one), fp32 AdamW, 2 images of 256x256: the
    planned peak (arithmetic model states + measured activations) within 15% of the real step's peak:
    the tensors alive before it (weights, buffers, AdamW moments) + the CPU allocator's peak above them
    (torch.profiler's memory events) over forward, backward and optimizer step, on the same synthetic
    targets. The planned peak is the backward's (activations and filling gradients), not the
    optimizer step's, so the comparison checks the measured activations."""
    spec = load_spec(model, overrides)
    started = time.perf_counter()
    states = model_states(memory.param_stats(build_detector(spec, device="meta")),
                          ZeroSetup(stage=0, world=1, precision="fp32", foreach=False))
    activations = memory.measure_activations(spec, 2, (256, 256), "fp32")
    planned = gpu_peak(states, activations)
    plan_s = time.perf_counter() - started
    assert activations.peak_with_grads > sum(line.gpu for line in states if line.phase in ("step", "filled"))
    measured, resident = _measured_step_peak(spec)
    print(f"{model}: planned {planned / 2**20:.1f} MiB, measured "
          f"{measured / 2**20:.1f} MiB (resident {resident / 2**20:.1f}), {planned / measured - 1:+.1%}; "
          f"plan {plan_s:.1f} s, step {time.perf_counter() - started - plan_s:.1f} s")
    assert abs(planned / measured - 1) < 0.15
    assert abs((planned - resident) / (measured - resident) - 1) < 0.25  # the activations alone, looser


def _measured_step_peak(spec) -> tuple[int, int]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_detector(spec).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        images = [torch.rand(3, 256, 256) for _ in range(2)]
        targets = memory.synthetic_targets(spec, 2, 256, 256)

        def step():
            sum(model(images, targets).values()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for param in optimizer.param_groups[0]["params"]:  # AdamW makes its moments in its first step
            param.grad = torch.zeros_like(param)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tensors = [*model.parameters(), *model.buffers(),
                   *(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))]
        resident = sum(t.numel() * t.element_size() for t in tensors)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return resident + peak, resident


# ---------------------------------------------------------------------------------------------- the command


def test_plan_command_prints_one_row_per_configuration_and_whether_it_fits(capsys, monkeypatch):
    profile_ = ActivationProfile(1, peak=3 * GiB, peak_with_grads=4 * GiB, grads=GiB)
    monkeypatch.setattr(memory, "measure_activations", mock.Mock(return_value=profile_))
    assert model_info(["faster_rcnn_r18_tiny", "--plan", "--world", "8", "64", "--stage", "2", "3",
                       "--images", "1", "2", "--gpu-memory", "4", "80"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split() and line.split()[0] in ("2", "3")]
    assert len(rows) == 2 * 2 * 2 and {row[1] for row in rows} == {"8", "64"}
    assert {row[-2] for row in rows} == {"no"} and {row[-1] for row in rows} == {"yes"}
    assert "DS est." in out and "estimate_zero3_model_states_mem_needs" in out


@pytest.mark.parametrize("args, named", [
    (["--stage", "5"], "stage=5"), (["--precision", "tf32"], "precision='tf32'"),
    (["--ds-config", "zero9"], "'zero9'"), (["--world", "0"], "world=0"),
])
def test_plan_command_rejects_bad_input_in_one_line(capsys, args, named):
    assert model_info(["faster_rcnn_r18_tiny", "--plan", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and err.startswith("agvm-model-info:")
