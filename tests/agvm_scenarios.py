"""Training scenarios run on real DeepSpeed CPU ranks by tests/agvm/test_agvm_deepspeed.py.

Module-level functions so spawned ranks can import them. Each scenario trains a small model with
three AGVM modules (one of them shared, like torchvision's RPN head across FPN levels) and returns
plain data that the tests assert on.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.distributed as tdist
from torch import nn

from agvm_ds import AGVM, AGVMConfig, module_param_groups
from agvm_ds.agvm import (
    GradientMoments,
    GradientVarianceModulator,
    assign_modules,
    initialize,
    load_checkpoint,
    moments_from_gradients,
    save_checkpoint,
)

MODULES = {"backbone": ["backbone"], "neck": ["neck"], "head": ["head"]}
CALIBRATED_MODULES = {**MODULES, "calibration": ["calibration"]}
MICRO_BATCH = 8


class OffsetHead(nn.Module):
    """A linear head with a 1-element offset: smaller than the ranks, so ZeRO-3 leaves some of them none."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 4)
        self.offset = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.offset


class Calibration(nn.Module):
    """A per-output scale and shift: a whole AGVM module of 8 elements in two 4-element tensors.

    Fewer elements than the ranks of tests/agvm/test_agvm_many_ranks.py, so every ZeRO stage must leave
    most ranks without a single element of the module, as a small head does on hundreds of GPUs.
    """

    def __init__(self, outputs: int = 4) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(outputs))
        self.shift = nn.Parameter(torch.zeros(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class ToyDetector(nn.Module):
    def __init__(self, tiny_param: bool = False, calibrated: bool = False) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32))
        self.neck = nn.Linear(32, 16)
        self.head = OffsetHead() if tiny_param else nn.Linear(16, 4)
        self.calibration = Calibration() if calibrated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.tanh(self.neck(torch.tanh(self.backbone(x))))
        out = self.head(features) + self.head(0.5 * features)  # a head shared by two "levels"
        return out if self.calibration is None else self.calibration(out)


def modules_of(case: dict[str, Any]) -> dict[str, list[str]]:
    return CALIBRATED_MODULES if case.get("calibrated") else MODULES


def micro_batch(step: int, rank: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1_000_003 * step + 1009 * rank + micro)
    x = torch.randn(MICRO_BATCH, 8, generator=g)
    y = torch.cat([x[:, :2] * 2.0, x[:, 2:4].sin()], dim=1) + 0.3 * torch.randn(MICRO_BATCH, 4, generator=g)
    return x, y


def ds_config(stage: int, dtype: str, gas: int, clip: float, scale_power: int = 8,
              log_comms: bool = False) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "initial_scale_power": scale_power, "loss_scale_window": 3},
        "torch_autocast": {"enabled": dtype == "autocast_bf16", "dtype": "bfloat16"},
        "comms_logger": {"enabled": log_comms, "prof_all": True},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def allow_cpu_fp16() -> None:
    """DeepSpeed's CPU accelerator reports no fp16 support, though torch computes fp16 on CPU.

    Lifting that one capability flag runs DeepSpeed's real fp16 path (dynamic loss scaling,
    overflow skipping, unscaling) on CPU ranks, which is what the AGVM tests need to check.
    """
    from deepspeed.accelerator import get_accelerator

    get_accelerator().is_fp16_supported = lambda: True


def build(case: dict[str, Any]):
    if case.get("dtype") == "fp16":
        allow_cpu_fp16()
    torch.manual_seed(0)
    model = ToyDetector(tiny_param=case.get("tiny_param", False), calibrated=case.get("calibrated", False))
    reference = copy.deepcopy(model)
    groups = module_param_groups(model, modules_of(case), weight_decay=1e-4)
    if case.get("optimizer", "sgd") == "sgd":
        base = torch.optim.SGD(groups, lr=case.get("lr", 0.05), momentum=0.9)
    else:
        base = torch.optim.AdamW(groups, lr=case.get("lr", 0.01))
    agvm_config = AGVMConfig(interval=case.get("interval", 1 if case.get("precondition") else 2),
                             ema=case.get("ema", 0.5), start_iter=case.get("start", 0),
                             precondition=case.get("precondition", False))
    optimizer = AGVM(base, agvm_config)
    config = ds_config(case["stage"], case.get("dtype", "fp32"), case.get("gas", 1), case.get("clip", 0.0),
                       case.get("scale_power", 8), case.get("log_comms", False))
    config["zero_optimization"].update(case.get("zero", {}))  # e.g. ZeRO-3's partitioning thresholds
    engine, _, _, scheduler = initialize(
        model=model,
        optimizer=optimizer,
        config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.05 * s)),
    )
    return engine, optimizer, reference


def full_params(engine) -> dict[str, torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}


def full_second_moments(optimizer: AGVM) -> dict[int, torch.Tensor]:
    """ZeRO-0 only: Adam's exp_avg_sq of every parameter, which every rank holds whole."""
    view = optimizer._view
    assert not view.grads_partitioned
    return {id(p): view.local_second_moment(p)[2].detach().float().clone() for p, _, _ in optimizer._param_modules}


def reference_moments(engine, optimizer: AGVM, reference: nn.Module, step: int, rank: int, world: int, gas: int,
                      same_data: bool = False) -> dict[str, tuple]:
    """Brute force: every micro-batch gradient of the step, all-gathered, in fp32 (preconditioned if asked)."""
    reference.load_state_dict(full_params(engine))
    preconditioner = None
    if optimizer.config.precondition:
        v = full_second_moments(optimizer)
        preconditioner = {
            module: torch.cat([1.0 / (v[id(p)].sqrt() + 1e-8) for p in getattr(engine.module, module).parameters()])
            for module in optimizer.module_names
        }
    per_module: dict[str, list[torch.Tensor]] = {m: [] for m in optimizer.module_names}
    for micro in range(gas):
        x, y = micro_batch(step, 0 if same_data else rank, micro)
        reference.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        for module in optimizer.module_names:
            flat = torch.cat([p.grad.reshape(-1) for p in getattr(reference, module).parameters()])
            per_module[module].append(flat if preconditioner is None else flat * preconditioner[module])
    result = {}
    for module, grads in per_module.items():
        local = torch.stack(grads)
        gathered = [torch.empty_like(local) for _ in range(world)]
        tdist.all_gather(gathered, local)
        result[module] = moments_from_gradients(torch.cat(gathered))
    return result


def train(rank: int, world: int, case: dict[str, Any], steps: int, check: bool,
          save_dir: Optional[str] = None, save_at: Optional[int] = None, resume: bool = False) -> dict[str, Any]:
    engine, optimizer, reference = build(case)
    gas = case.get("gas", 1)
    if resume:
        load_checkpoint(engine, save_dir)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
             "autocast_bf16": torch.float32}[case.get("dtype", "fp32")]
    replay = GradientVarianceModulator(optimizer.module_names, optimizer.config)
    records = []
    while engine.global_steps < steps:
        step, skipped = engine.global_steps, engine.skipped_steps
        measuring = optimizer._collecting
        same_data = case.get("same_data", False)
        expected = (reference_moments(engine, optimizer, reference, step, rank, world, gas, same_data)
                    if case.get("check", check) and measuring else None)
        for micro in range(gas):
            x, y = micro_batch(step, 0 if same_data else rank, micro)
            loss = nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
            engine.backward(loss)
            engine.step()
        if measuring and engine.skipped_steps == skipped:
            got = optimizer.last_moments
            record = {"step": step, "A": got.mean_sq_norm.clone(), "B": got.sq_norm_of_mean.clone(),
                      "factors": optimizer.modulator.factors.clone()}
            if expected is not None:
                names = optimizer.module_names
                ref_a = torch.tensor([expected[m][0] for m in names], dtype=torch.float64)
                ref_b = torch.tensor([expected[m][1] for m in names], dtype=torch.float64)
                replay.update(GradientMoments(ref_a, ref_b, world * gas))
                record.update(ref_A=ref_a, ref_B=ref_b, replay_factors=replay.factors.clone(),
                              grad_norm=float(ref_b.sum().sqrt()))
            records.append(record)
        if save_at is not None and engine.global_steps == save_at:
            save_checkpoint(engine, save_dir)
            break
    return {
        "records": records,
        "params": full_params(engine),
        "agvm": optimizer.agvm_state_dict(),
        "factors": optimizer.factors,
        "lrs": [g["lr"] for g in optimizer.param_groups],
        "scheduled_lrs": engine.lr_scheduler.get_last_lr(),
        "num_micro_batches": optimizer._view.num_micro_batches,
        "skipped_steps": engine.skipped_steps,
        "iteration": optimizer.iteration,
        "held_elements": held_elements(engine, modules_of(case)),
        "comms": logged_comms() if case.get("log_comms") else None,
    }


def held_elements(engine, modules: dict[str, list[str]]) -> dict[str, int]:
    """Elements of each AGVM module in this rank's optimizer partition, padding excluded.

    Read from DeepSpeed's own partitioning, so that a test can show that a rank held no element of
    a module: ZeRO-1/2 link a parameter's fragment of the rank's flat partition (``_hp_mapping``,
    None when the partition holds none of it); ZeRO-3 gives rank r the slice [r p, (r + 1) p) of
    every parameter, p = ``ds_tensor.ds_numel`` (padded), of which only the part below ``ds_numel``
    is real (``Init._partition_param``). Unpartitioned (ZeRO-0 fp32), a rank holds every element.
    """
    params = dict(engine.module.named_parameters())
    rank = tdist.get_rank()

    def held(param: torch.Tensor) -> int:
        if hasattr(param, "ds_tensor"):
            partition = param.ds_tensor.ds_numel
            return max(0, min(partition, param.ds_numel - rank * partition))
        if hasattr(param, "_hp_mapping"):
            return 0 if param._hp_mapping is None else param._hp_mapping.lp_fragment_address.numel
        return param.numel()

    assigned = assign_modules(engine.module, modules)
    return {module: sum(held(params[name]) for name in names) for module, names in assigned.items()}


def logged_comms() -> dict[str, dict[int, int]]:
    """What DeepSpeed's comms logger recorded in this process: {op log name: {message bytes: calls}}.

    The logger is process-wide: run one logged case per process group to read one case's traffic.
    """
    from deepspeed.comm.comm import comms_logger

    logged = comms_logger.comms_dict.items()
    return {name: {size: calls for size, (calls, *_) in sizes.items()} for name, sizes in logged}


def train_cases(rank: int, world: int, cases: list[dict[str, Any]], steps: int, check: bool) -> list[dict[str, Any]]:
    return [train(rank, world, case, steps, check) for case in cases]


def resume_cases(rank: int, world: int, cases: list[dict[str, Any]], steps: int, save_at: int,
                 root: str, resume: bool) -> list[dict[str, Any]]:
    return [
        train(rank, world, case, steps, check=False, save_dir=f"{root}/case{i}",
              save_at=None if resume else save_at, resume=resume)
        for i, case in enumerate(cases)
    ]


def expect_error(rank: int, world: int, case: dict[str, Any]) -> str:
    try:
        build(case)
    except Exception as error:  # the message is what the test checks
        return f"{type(error).__name__}: {error}"
    return "no error"


class KnownNoise(nn.Module):
    """loss = sum_i <w_i, x_i>: the gradient of module i is x_i, whose mean and covariance we choose."""

    DIM = 256

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Parameter(torch.zeros(self.DIM))
        self.neck = nn.Parameter(torch.zeros(self.DIM))
        self.head = nn.Parameter(torch.zeros(self.DIM))

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        return (xs[:, 0] * self.backbone).sum(1) + (xs[:, 1] * self.neck).sum(1) + (xs[:, 2] * self.head).sum(1)


KNOWN_MEAN = (1.0, 1.0, 1.0)
KNOWN_STD = (4.0, 1.0, 0.7)  # per coordinate, of one micro-batch gradient


def known_noise(rank: int, world: int, steps: int, gas: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = KnownNoise()
    groups = module_param_groups(model, MODULES, no_decay_1d=False)
    optimizer = AGVM(torch.optim.SGD(groups, lr=1e-3), AGVMConfig(interval=1, ema=0.9))
    engine, _, _, _ = initialize(
        model=model, optimizer=optimizer,
        config={"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": gas,
                "zero_optimization": {"stage": 2}, "steps_per_print": 10**9},
    )
    mean = torch.tensor(KNOWN_MEAN).view(1, 3, 1)
    std = torch.tensor(KNOWN_STD).view(1, 3, 1)
    for step in range(steps):
        for micro in range(gas):
            g = torch.Generator().manual_seed(7919 * step + 131 * rank + micro)
            xs = mean + std * torch.randn(1, 3, KnownNoise.DIM, generator=g)
            engine.backward(engine(xs).sum())
            engine.step()
    return optimizer.factors


def shared_memory_left(rank: int, world: int, case: dict[str, Any]) -> list[str]:
    """DeepSpeed CPU all-reduce segments of this process group still named in /dev/shm after
    initialize, also when initialize refuses the configuration."""
    import glob
    import os

    expect_error(rank, world, case)
    tdist.barrier()
    return sorted(glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{os.environ['MASTER_PORT']}_*"))


# --- checks of the scenarios' results against their brute-force references ---

FP32_TOL = 1e-5
CLIP = 0.02  # well below the toy model's gradient norm, so clipping is active on every step


def max_rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float(((got - ref).abs() / ref.abs()).max())


def assert_moments_match(result: dict, tol: float) -> None:
    assert result["records"], "no statistics step was checked"
    for record in result["records"]:
        assert max_rel_err(record["A"], record["ref_A"]) < tol, record
        assert max_rel_err(record["B"], record["ref_B"]) < tol, record
        # the wrapper's factors are the core's factors applied to the brute-force moments
        assert float((record["factors"] - record["replay_factors"]).abs().max()) < 10 * tol


# --- layer-wise LAMB and LARS under ZeRO (tests/agvm/test_layerwise.py) ---

LAYERWISE_WEIGHT_DECAY = 0.01


class ReferenceLars(torch.optim.Optimizer):
    """Plain LARS on whole tensors, the brute force the layer-wise Lars must equal (You et al. 2017,
    timm's form): r = c ||w|| / (||g|| + wd ||w|| + eps), 1 where a norm is 0, only where wd != 0;
    buf = m buf + r (g + wd w), the first buf being that term; w -= lr buf."""

    def __init__(self, params, lr: float, momentum: float, trust_coefficient: float, eps: float) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, trust_coefficient=trust_coefficient, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            wd = group["weight_decay"]
            for p in group["params"]:
                g = p.grad.double()
                if wd != 0:
                    w_norm, g_norm = float(p.double().norm()), float(g.norm())
                    ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
                    ratio = ratio if w_norm > 0 and g_norm > 0 else 1.0
                    g = (g + wd * p.double()) * ratio
                state = self.state[p]
                state["buf"] = g.clone() if "buf" not in state else group["momentum"] * state["buf"] + g
                p.sub_(group["lr"] * state["buf"])


def layerwise_optimizer(case: dict[str, Any], groups: list[dict[str, Any]], reference: bool = False):
    """The case's LAMB or LARS; with ``reference``, the single-process brute force on whole tensors."""
    from timm.optim import Lamb as TimmLamb

    from agvm_ds.optim import Lamb, Lars

    if case["optimizer"] in ("lamb", "timm_lamb"):  # timm_lamb: what build_optimizer used before, per share
        kwargs = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=LAYERWISE_WEIGHT_DECAY,
                      bias_correction=case.get("bias_correction", True))
        if reference or case["optimizer"] == "timm_lamb":
            return TimmLamb(groups, max_grad_norm=None, **kwargs)
        return Lamb(groups, **kwargs)
    kwargs = dict(lr=0.5, momentum=0.9, trust_coefficient=0.02, eps=1e-8)
    if reference:
        return ReferenceLars(groups, **kwargs)
    return Lars(groups, weight_decay=LAYERWISE_WEIGHT_DECAY, **kwargs)


class InnerStepRecorder:
    """What the base optimizer got in each inner step call: its (flat) parameters before and after,
    their gradients, and the lr of their group (AGVM's factor included)."""

    def __init__(self, base: torch.optim.Optimizer) -> None:
        self.pending: list[dict[str, Any]] = []
        base.register_step_pre_hook(self._before)
        base.register_step_post_hook(self._after)

    def _before(self, optimizer, args, kwargs) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.pending.append({"param": p, "group": group["name"], "lr": group["lr"],
                                         "before": p.detach().float().clone(), "grad": p.grad.detach().float().clone()})

    def _after(self, optimizer, args, kwargs) -> None:
        for record in self.pending:
            record.setdefault("after", record["param"].detach().float().clone())

    def take(self) -> list[dict[str, Any]]:
        records, self.pending = self.pending, []
        return records


def whole_tensors(engine, view, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The step's original tensors (before, grad, after), assembled from every rank's fragments by an
    all-reduce of zero-filled buffers (fragments of ranks do not overlap), and how many ranks held each."""
    named = dict(engine.module.named_parameters())
    names = list(named)
    name_of = {id(p): n for n, p in named.items()}
    name_of.update({id(view._masters[id(p)]): n for n, p in named.items() if id(p) in view._masters})
    numel = {n: (p.ds_numel if hasattr(p, "ds_numel") else p.numel()) for n, p in named.items()}
    full = {key: {n: torch.zeros(numel[n]) for n in names} for key in ("before", "grad", "after")}
    holders = {n: torch.zeros(1) for n in names}
    lrs = {}
    for record in records:
        lrs[record["group"]] = record["lr"]
        layout = view.partition_fragments(record["param"])
        if layout is None:
            name = name_of[id(record["param"])]
            for key in full:
                full[key][name] = record[key].reshape(-1)
            continue
        tensors, fragments = layout
        for fragment in fragments:
            name = name_of[id(tensors[fragment.index])]
            holders[name] += 1
            for key in full:
                full[key][name][fragment.offset:fragment.offset + fragment.numel] = \
                    record[key][fragment.start:fragment.start + fragment.numel]
    if view.grads_partitioned:
        packed = torch.cat([full[key][n] for key in full for n in names] + [holders[n] for n in names])
        tdist.all_reduce(packed)
        pieces = iter(packed.split([numel[n] for _ in full for n in names] + [1] * len(names)))
        full = {key: {n: next(pieces) for n in names} for key in full}
        holders = {n: int(next(pieces)) for n in names}
    shapes = {n: tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape) for n, p in named.items()}
    return {"tensors": {key: {n: t.reshape(shapes[n]) for n, t in values.items()} for key, values in full.items()},
            "holders": {n: int(h) for n, h in holders.items()}, "lrs": lrs}


def layerwise_build(case: dict[str, Any]):
    torch.manual_seed(0)
    model = ToyDetector(tiny_param=True)
    reference = copy.deepcopy(model)
    no_decay_1d = not case.get("adapt_all", True)
    groups = module_param_groups(model, MODULES, weight_decay=LAYERWISE_WEIGHT_DECAY, no_decay_1d=no_decay_1d)
    optimizer = AGVM(layerwise_optimizer(case, groups), AGVMConfig(interval=1, ema=0.5))
    recorder = InnerStepRecorder(optimizer.base_optimizer)
    config = ds_config(case["stage"], case.get("dtype", "fp32"), case.get("gas", 2), case.get("clip", CLIP),
                       log_comms=case.get("log_comms", False))
    config["zero_optimization"].update(case.get("zero", {}))
    config.update(case.get("deepspeed", {}))
    engine, _, _, _ = initialize(
        model=model, optimizer=optimizer, config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.05 * s)),
    )
    ref_groups = module_param_groups(reference, MODULES, weight_decay=LAYERWISE_WEIGHT_DECAY, no_decay_1d=no_decay_1d)
    return engine, optimizer, recorder, reference, layerwise_optimizer(case, ref_groups, reference=True)


def layerwise_train(rank: int, world: int, case: dict[str, Any], steps: int) -> dict[str, Any]:
    """Trains ``steps`` steps; after each, replays the step on whole tensors with the single-process
    reference optimizer fed the same weights and gradients, and records the largest error relative to
    the size of the update (0 = equal, 1 = as far off as the update itself)."""
    if case.get("dtype") == "fp16":
        allow_cpu_fp16()
    if case.get("log_comms"):  # the logger, once on, stays on in this process: count this case alone
        from deepspeed.comm.comm import comms_logger

        comms_logger.comms_dict.clear()
    try:
        engine, optimizer, recorder, reference, ref_optimizer = layerwise_build(case)
    except ValueError as error:  # a refused configuration: the message is what the test checks
        if not case.get("refused"):
            raise
        return {"error": str(error)}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(case.get("dtype", "fp32"), torch.float32)
    ref_params = dict(reference.named_parameters())
    if optimizer._view.kind.value == "fp16_unfused":  # DeepSpeed steps it once on zero gradients to create state
        for p in ref_params.values():
            p.grad = torch.zeros_like(p)
        ref_optimizer.step()
    errors, grad_norms, factors, holders = [], [], [], {}
    for step in range(steps):
        for micro in range(case.get("gas", 2)):
            x, y = micro_batch(step, rank, micro)
            engine.backward(nn.functional.mse_loss(engine(x.to(dtype)).float(), y))
            engine.step()
        records = recorder.take()
        if not records:  # an fp16 step skipped on overflow: nothing was updated
            continue
        got = whole_tensors(engine, optimizer._view, records)
        holders = got["holders"]
        for group in ref_optimizer.param_groups:
            group["lr"] = got["lrs"][group["name"]]
        for name, p in ref_params.items():
            p.data.copy_(got["tensors"]["before"][name])
            p.grad = got["tensors"]["grad"][name].clone()
        ref_optimizer.step()
        step_errors = {}
        for name, p in ref_params.items():
            moved = (p.detach() - got["tensors"]["before"][name]).norm()
            step_errors[name] = float((p.detach() - got["tensors"]["after"][name]).norm() / moved.clamp_min(1e-30))
        errors.append(step_errors)
        grad_norms.append(float(torch.cat([g.reshape(-1) for g in got["tensors"]["grad"].values()]).norm()))
        factors.append(dict(optimizer.factors))
    return {"errors": errors, "grad_norms": grad_norms, "factors": factors, "holders": holders,
            "skipped_steps": engine.skipped_steps, "kind": optimizer._view.kind.value,
            "inner_calls": optimizer._view.inner_calls_per_step,
            "comms": logged_comms() if case.get("log_comms") else None}


def layerwise_cases(rank: int, world: int, cases: list[dict[str, Any]], steps: int) -> list[dict[str, Any]]:
    return [layerwise_train(rank, world, case, steps) for case in cases]
